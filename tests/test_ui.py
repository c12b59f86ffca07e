"""Issue 17: the dashboard, driven end to end by Playwright in a real headless Chromium (Debian's
``chromium``, installed by ``make system-deps``) against the server on 127.0.0.1 over a tiny project.

Screenshots of the main pages go to ``$SLMFORGE_UI_SCREENSHOTS`` when it is set (``make screenshots``
writes the README's, docs/img/ui-*.png).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import LiveServer, tiny_pretrain_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make system-deps)"),
              pytest.mark.timeout(600)]
SHOTS = os.environ.get("SLMFORGE_UI_SCREENSHOTS")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project with data, tokenizer, two small models (train, train-b) and a project file."""
    import torch

    from slmforge.config import dump_config
    from slmforge.pipeline import run_pipeline
    from slmforge.train import pretrain

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ui-project")
    cfg = tiny_pretrain_config(root, max_steps=30, eval_every=10)
    cfg.project.name = "garden-slm"
    cfg.project.stages = ["data", "tokenizer", "train"]
    (root / "slmforge.yaml").write_text(dump_config(cfg))
    run_pipeline(cfg)
    b = cfg.model_copy(deep=True)
    b.train.out, b.train.max_steps, b.train.lr = "runs/train-b", 60, 3e-3
    pretrain(b, progress=False)
    return root


@pytest.fixture(scope="module")
def server(project: Path):
    from slmforge.generate import load_generator
    from slmforge.serve import create_app
    from slmforge.ui import project as ui_project

    app = create_app({"train": load_generator(str(project / "runs" / "train"))},
                     ui=[ui_project(project / "slmforge.yaml")])
    with LiveServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A 1280x800 page that fails the test on any console error or uncaught exception."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"console errors: {errors}"


def _shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"ui-{name}.png"))


def test_runs_list_and_lineage(server, page):
    page.goto(f"{server}/ui/")
    rows = page.locator("table.artifacts tbody th a")
    assert sorted(rows.all_inner_texts()) == ["data", "tokenizer", "train", "train-b"]
    assert page.locator("table.artifacts").get_by_text("model").count() >= 2
    # the lineage graph: one node per artifact and the source, edges data -> tokenizer -> train
    svg = page.locator("svg.lineage")
    assert svg.is_visible()
    assert svg.locator("a.node").count() == 4 and svg.locator("g.external").count() == 1
    assert svg.locator("path.edge").count() >= 5
    box = svg.bounding_box()
    assert box and box["width"] > 300 and box["height"] > 40
    _shot(page, "runs")
    svg.locator("a.node", has_text="train-b").click()
    page.wait_for_url("**/ui/p/p0/a/train-b")
    assert page.locator("#integrity").inner_text().startswith("intact")
    page.locator("#chart-loss .main-svg").first.wait_for()  # Plotly drew the loss curve
    assert page.locator("#chart-loss .scatterlayer .trace").count() >= 1
    _shot(page, "artifact")


def test_data_view_browses_dropped_documents_by_reason(server, page, project):
    dropped = [json.loads(x) for x in (project / "runs" / "data" / "dropped.jsonl").read_text().splitlines()]
    page.goto(f"{server}/ui/p/p0/a/data")
    assert page.locator("table.dropped tbody tr").count() == len(dropped)
    if dropped:
        reason = dropped[0]["reason"]
        page.select_option("#reason", reason)
        page.get_by_role("button", name="Show").click()
        assert page.locator("table.dropped tbody tr").count() == sum(d["reason"] == reason for d in dropped)


def test_a_started_stage_streams_progress_to_completion(server, page):
    page.goto(f"{server}/ui/")
    page.select_option("#stage-p0", "tokenizer")
    page.check("input[name=force]")
    page.get_by_role("button", name="Start").click()
    page.wait_for_url("**/jobs/*")
    status = page.locator("#status")
    status.filter(has_text="succeeded").wait_for(timeout=120_000)
    bar = page.locator(".bar").first  # the tokenizer stage's own progress bar, as the CLI shows it
    assert bar.locator("progress").get_attribute("value") == bar.locator("progress").get_attribute("max")
    assert "tokenizer: running" in page.locator("#log").inner_text()
    assert page.locator("#cancel-form").is_hidden()
    _shot(page, "job")


def test_a_run_survives_the_page_being_closed(server, browser, project):
    from slmforge.ui import _jobs

    context = browser.new_context()
    pg = context.new_page()
    pg.goto(f"{server}/ui/")
    pg.select_option("#stage-p0", "data")
    pg.check("input[name=force]")
    pg.get_by_role("button", name="Start").click()
    pg.wait_for_url("**/jobs/*")
    job_id = pg.url.rsplit("/", 1)[1]
    context.close()  # nobody watches any more
    deadline = time.monotonic() + 120
    while (job := _jobs.get(project / "runs", job_id)).status == "running":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert job.status == "succeeded", job.log_tail()


def test_comparison_started_from_the_page_shows_a_verdict(server, page):
    page.goto(f"{server}/ui/compare")
    page.select_option("#a-p0", "train")
    page.select_option("#b-p0", "train-b")
    page.select_option("#suite-p0", "arithmetic")
    page.fill("#limit-p0", "12")
    _shot(page, "compare")
    page.get_by_role("button", name="Compare").click()
    page.wait_for_url("**/jobs/*")
    page.locator("#status").filter(has_text="succeeded").wait_for(timeout=240_000)
    page.locator("#result-link a").click()
    verdict = page.locator("table.verdicts td.verdict")
    assert verdict.count() == 1 and verdict.inner_text().strip()
    assert "arithmetic" in page.locator("table.verdicts").inner_text()
    assert page.locator("table.items tbody tr").count() == 12  # the per-item differences
    _shot(page, "comparison")
    # metric deltas of any two artifacts
    page.goto(f"{server}/ui/compare?project=p0&a=train&b=train-b")
    table = page.locator("table.deltas")
    assert "val_loss" in table.inner_text() and table.locator("tbody tr").count() >= 3


def test_playground_streams_a_reply(server, page):
    page.goto(f"{server}/ui/playground")
    page.locator("#model option").first.wait_for(state="attached")
    assert page.locator("#model").input_value() == "train"
    page.fill("#max_tokens", "24")
    page.fill("#temperature", "0")
    page.fill("#prompt", "Tomatoes need")
    page.get_by_role("button", name="Send").click()
    stats = page.locator("#stats")
    stats.filter(has_text="tokens/s").wait_for(timeout=60_000)
    assert "time to first token" in stats.inner_text()
    reply = page.locator(".msg.assistant .body").inner_text()
    assert reply and not reply.startswith("Error")
    page.locator("#prompt-details summary").click()
    assert "Tomatoes need" in page.locator("#rendered").inner_text()
    _shot(page, "playground")


def test_keyboard_labels_and_narrow_window(server, browser):
    context = browser.new_context(viewport={"width": 420, "height": 800})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    for path in ("/ui/", "/ui/compare", "/ui/playground", "/ui/p/p0/a/train", "/ui/p/p0/a/data"):
        pg.goto(f"{server}{path}")
        pg.wait_for_load_state("networkidle")
        # nothing wider than the window: wide tables and the graph scroll inside their own boxes
        assert pg.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), path
        unlabelled = pg.evaluate("""Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea'))
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id || e.name)""")
        assert unlabelled == [], (path, unlabelled)
        pg.keyboard.press("Tab")  # the first stop is the skip link, which moves focus to the content
        assert pg.evaluate("document.activeElement.textContent") == "Skip to content"
        pg.keyboard.press("Enter")
        assert pg.evaluate("document.activeElement.id") == "main"
    context.close()
    assert not errors, f"console errors: {errors}"


def test_the_dashboard_is_behind_the_servers_keys(project):
    """With keys, every /ui page needs one: a login form turns a key into a cookie (httpx, no browser)."""
    from slmforge.serve import create_app
    from slmforge.ui import project as ui_project

    app = create_app({}, api_keys={"sk-ui-test"}, ui=[ui_project(project / "slmforge.yaml")])
    with LiveServer(app) as url, httpx.Client(base_url=url) as client:
        r = client.get("/ui/")
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")
        assert client.get("/ui/p/p0/jobs/x/events").status_code == 401
        assert client.post("/ui/p/p0/jobs", data={"stage": "data"}).status_code == 403
        assert client.post("/ui/login", data={"key": "wrong", "next": "/ui/"}).status_code == 401
        r = client.post("/ui/login", data={"key": "sk-ui-test", "next": "/ui/"})
        assert r.status_code == 303 and "slmforge_key" in r.cookies
        page = client.get("/ui/")
        assert page.status_code == 200 and "garden-slm" in page.text
        # a form posted from another site is refused even with the cookie
        forged = client.post("/ui/p/p0/jobs", data={"stage": "data"},
                             headers={"Origin": "http://evil.example"})
        assert forged.status_code == 403
        assert client.get("/ui/", headers={"Authorization": "Bearer sk-ui-test"}).status_code == 200


def test_cancel_interrupts_a_run_and_keeps_finished_work(server, page, project):
    """Cancel is Ctrl-C: training saves a checkpoint and stops; finished artifacts stay intact."""
    from slmforge.artifacts import verify_artifact
    from slmforge.ui import _jobs

    argv = ["run", "--from", "train", "--until", "train", "--force", "-c", str(project / "slmforge.yaml"),
            "--set", "train.out=runs/train-c", "--set", "train.max_steps=100000"]
    job = _jobs.start(project / "runs", argv, "long training", "run", cwd=project)
    page.goto(f"{server}/ui/p/p0/jobs/{job.id}")
    page.locator(".bar").first.wait_for(timeout=120_000)  # training has started
    page.get_by_role("button", name="Cancel").click()
    page.locator("#status").filter(has_text="cancelled").wait_for(timeout=120_000)
    assert "stopped" in page.locator("#log").inner_text()
    assert not (project / "runs" / "train-c" / "manifest.json").exists()
    assert verify_artifact(project / "runs" / "train") == []
