"""The dashboard's routes: pages rendered from ``templates/``, a few JSON and server-sent-event endpoints."""

from __future__ import annotations

import asyncio
import json
import mimetypes
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.templating import Jinja2Templates

from slmforge.errors import SlmForgeError
from slmforge.ui import UiSettings, _jobs
from slmforge.ui._detail import detail
from slmforge.ui._lineage import lineage_svg
from slmforge.ui._scan import Project, artifacts, find, integrity, lineage, metric_deltas

HERE = Path(__file__).parent
COOKIE = "slmforge_key"
_STATIC = {"app.css": HERE / "static" / "app.css", "app.js": HERE / "static" / "app.js"}
_SHOWN_FILES = {".png": "image/png", ".svg": "image/svg+xml"}  # anything else is sent as text/plain


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


class _Ui:
    """The state the handlers share: settings, templates, projects by key."""

    def __init__(self, settings: UiSettings):
        self.settings = settings
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["number"] = _number
        self.templates.env.filters["size"] = _size
        self.projects: dict[str, Project] = {p.key: p for p in settings.projects}

    def key(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        return request.cookies.get(COOKIE)

    def allowed(self, request: Request) -> bool:
        check = self.settings.authenticate
        key = self.key(request)
        return check is None or bool(key and check(key))

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        if not self.allowed(request):
            return RedirectResponse(f"/ui/login?next={quote(request.url.path)}", 303)
        key = self.key(request) if self.settings.authenticate else None
        return self.templates.TemplateResponse(request, name, {"api_key": key or "", "active": name.split(".")[0],
                                                               "projects": self.projects, **context},
                                               status_code=status)

    def project(self, key: str) -> Project:
        if key not in self.projects:
            raise SlmForgeError(f"No project {key!r} here; the dashboard shows {', '.join(self.projects)}.")
        return self.projects[key]


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _same_origin(request: Request) -> bool:
    """A form post from a page of this server (the browser's Origin, else Referer): another site must not
    start runs on a dashboard that runs without keys on loopback."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True  # not a browser (curl, a test client): nothing to forge
    parts = urlsplit(origin)
    return parts.netloc == request.headers.get("host", "")


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (parsed here: starlette's form parser needs python-multipart for this alone)."""
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()}


def build_router(settings: UiSettings) -> APIRouter:
    ui = _Ui(settings)
    router = APIRouter(prefix="/ui", include_in_schema=False)
    _static_routes(router, ui)
    _page_routes(router, ui)
    _job_routes(router, ui)
    _playground_routes(router, ui)
    return router


def _static_routes(router: APIRouter, ui: _Ui) -> None:
    @router.get("/static/{name}")
    async def static(name: str):
        path = _plotly_js() if name == "plotly.min.js" else _STATIC.get(name)
        if path is None:
            return JSONResponse({"error": f"no static file {name}"}, 404)
        return FileResponse(path, media_type=mimetypes.guess_type(name)[0], headers={"Cache-Control": "max-age=3600"})

    @router.get("/login")
    async def login_page(request: Request, next: str = "/ui/"):
        return ui.templates.TemplateResponse(request, "login.html", {"next": next, "error": "", "active": "login",
                                                                     "projects": ui.projects, "api_key": ""})

    @router.post("/login")
    async def login(request: Request):
        form = await _form(request)
        key, target = form.get("key", "").strip(), form.get("next", "/ui/")
        target = target if target.startswith("/ui") else "/ui/"
        if ui.settings.authenticate is not None and not (key and ui.settings.authenticate(key)):
            return ui.templates.TemplateResponse(
                request, "login.html", {"next": target, "error": "That key is not valid on this server.",
                                        "active": "login", "projects": ui.projects, "api_key": ""}, status_code=401)
        response = RedirectResponse(target, 303)
        response.set_cookie(COOKIE, key, httponly=True, samesite="strict", path="/ui")
        return response


def _page_routes(router: APIRouter, ui: _Ui) -> None:
    @router.get("/")
    async def runs(request: Request):
        views = []
        for p in ui.projects.values():
            try:
                items = artifacts(p)
                nodes, edges = lineage(p, items)
                views.append({"project": p, "name": p.name, "artifacts": items, "error": "",
                              "lineage": lineage_svg(nodes, edges, f"/ui/p/{p.key}/a/"),
                              "jobs": _jobs.list_jobs(p.root)[:8], "stages": p.config().project.stages})
            except SlmForgeError as exc:
                views.append({"project": p, "name": str(p.config_path), "error": str(exc), "artifacts": []})
        return ui.page(request, "runs.html", views=views)

    @router.get("/p/{key}/a/{artifact_id:path}")
    async def artifact(request: Request, key: str, artifact_id: str):
        try:
            a = find(ui.project(key), artifact_id)
            problems = integrity(a)
        except SlmForgeError as exc:
            return ui.page(request, "error.html", 404, message=str(exc))
        return ui.page(request, "artifact.html", project=ui.project(key), a=a, problems=problems,
                       view=detail(a, dict(request.query_params)),
                       manifest_json=json.dumps(a.manifest.to_json(), indent=2))

    @router.get("/p/{key}/file/{artifact_id:path}")
    async def artifact_file(request: Request, key: str, artifact_id: str, name: str):
        if not ui.allowed(request):
            return JSONResponse({"error": "a valid key is needed"}, 401)
        try:
            a = find(ui.project(key), artifact_id)
        except SlmForgeError as exc:
            return JSONResponse({"error": str(exc)}, 404)
        if name not in a.manifest.files:
            return JSONResponse({"error": f"{name} is not a file of {artifact_id}"}, 404)
        return FileResponse(a.path / name, media_type=_SHOWN_FILES.get(Path(name).suffix, "text/plain"))

    @router.get("/compare")
    async def compare(request: Request, project: str = "", a: str = "", b: str = ""):
        from slmforge.evaluate.suites import builtin_suites

        views = {p.key: [x for x in artifacts(p)] for p in ui.projects.values()}
        deltas, error = None, ""
        if project and a and b:
            try:
                deltas = metric_deltas(find(ui.project(project), a), find(ui.project(project), b))
            except SlmForgeError as exc:
                error = str(exc)
        return ui.page(request, "compare.html", artifacts_by_project=views, suites=[*builtin_suites(), "perplexity"],
                       deltas=deltas, error=error, chosen={"project": project, "a": a, "b": b})


def _job_argv(p: Project, form: dict[str, str]) -> tuple[list[str], str, str, str | None]:
    """The command a start form asks for: (argv after ``slmforge``, title, kind, the artifact it makes)."""
    config = ["-c", str(p.config_path)] if p.config_path else []
    sets = [x for o in p.overrides for x in ("--set", o)]
    action = form.get("action", "run")
    if action == "compare":
        a, b, suite = form.get("a", ""), form.get("b", ""), form.get("suite", "")
        if not (a and b and suite):
            raise SlmForgeError("A comparison needs model A, model B and a suite.")
        limit = ["--limit", form["limit"]] if form.get("limit", "").isdigit() else []
        result = f"compare-{Path(a).name}-vs-{Path(b).name}-{suite}"
        argv = ["eval", "compare", str(p.root / a), str(p.root / b), "--suite", suite, *limit,
                "--out", str(p.root / result), *config, *sets]
        return argv, f"compare {a} vs {b} on {suite}", "compare", result
    stage = form.get("stage", "")
    force = ["--force"] if form.get("force") else []
    if stage:
        stages = p.config().project.stages
        if stage not in stages:
            raise SlmForgeError(f"{stage!r} is not a stage of this project ({', '.join(stages)}).")
        return ["run", "--from", stage, "--until", stage, *force, *config, *sets], f"stage {stage}", "run", stage
    return ["run", *force, *config, *sets], "all stages", "run", None


def _job_routes(router: APIRouter, ui: _Ui) -> None:
    @router.post("/p/{key}/jobs")
    async def start_job(request: Request, key: str):
        if not ui.allowed(request) or not _same_origin(request):
            return JSONResponse({"error": "a valid key and a page of this server are needed"}, 403)
        p = ui.project(key)
        try:
            argv, title, kind, result = _job_argv(p, await _form(request))
            job = _jobs.start(p.root, argv, title, kind, cwd=p.config_path.parent if p.config_path else Path.cwd(),
                              result=result)
        except SlmForgeError as exc:
            return ui.page(request, "error.html", 409, message=str(exc))
        return RedirectResponse(f"/ui/p/{key}/jobs/{job.id}", 303)

    @router.get("/p/{key}/jobs/{job_id}")
    async def job_page(request: Request, key: str, job_id: str):
        job = _jobs.get(ui.project(key).root, job_id)
        if job is None:
            return ui.page(request, "error.html", 404, message=f"No job {job_id} in this project.")
        return ui.page(request, "job.html", project=ui.project(key), job=job, bars=job.progress())

    @router.post("/p/{key}/jobs/{job_id}/cancel")
    async def cancel_job(request: Request, key: str, job_id: str):
        if not ui.allowed(request) or not _same_origin(request):
            return JSONResponse({"error": "a valid key and a page of this server are needed"}, 403)
        job = _jobs.get(ui.project(key).root, job_id)
        if job is not None:
            _jobs.cancel(job)
        return RedirectResponse(f"/ui/p/{key}/jobs/{job_id}", 303)

    @router.get("/p/{key}/jobs/{job_id}/events")
    async def job_events(request: Request, key: str, job_id: str, log_from: int = 0):
        if not ui.allowed(request):
            return JSONResponse({"error": "a valid key is needed"}, 401)
        job = _jobs.get(ui.project(key).root, job_id)
        if job is None:
            return JSONResponse({"error": f"no job {job_id}"}, 404)
        return StreamingResponse(_events(request, job, max(0, log_from)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(request: Request, job: _jobs.Job, log_at: int):
    """Server-sent events: ``progress`` (a bar's state), ``log`` (output past byte ``log_at``), then ``done``
    (the status, and the artifact the job made)."""
    progress_at = 0
    while True:
        ended = job.status != "running"  # read before the files: what follows the end is sent too
        for name, attr in (("progress", "progress.jsonl"), ("log", "log.txt")):
            path = job.folder / attr
            start = progress_at if name == "progress" else log_at
            try:
                with path.open("rb") as f:
                    f.seek(start)
                    chunk = f.read()
            except OSError:
                chunk = b""
            if name == "progress":
                whole = chunk[: chunk.rfind(b"\n") + 1]  # only complete lines
                progress_at += len(whole)
                for line in whole.decode("utf-8", "replace").splitlines():
                    yield f"event: progress\ndata: {line}\n\n"
            elif chunk:
                log_at += len(chunk)
                yield f"event: log\ndata: {json.dumps(chunk.decode('utf-8', 'replace'))}\n\n"
        if ended:
            done = {"status": job.status, "result": job.spec.get("result"), **(job.exit() or {})}
            yield f"event: done\ndata: {json.dumps(done)}\n\n"
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.4)


def _playground_routes(router: APIRouter, ui: _Ui) -> None:
    @router.get("/playground")
    async def playground(request: Request):
        return ui.page(request, "playground.html", info=ui.settings.server_info())

    @router.post("/api/render")
    async def render(request: Request):
        if not ui.allowed(request):
            return JSONResponse({"error": "a valid key is needed"}, 401)
        body = await request.json()
        if ui.settings.render_prompt is None:
            return JSONResponse({"prompt": None})
        try:
            return JSONResponse({"prompt": ui.settings.render_prompt(str(body.get("model")), list(body.get("messages") or []))})
        except Exception as exc:  # a model that renders its own prompt, or messages its template refuses
            return JSONResponse({"prompt": None, "error": str(exc)})
