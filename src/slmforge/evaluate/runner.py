"""Run a suite against any ``Generator``: batched generation, answer extraction,
per-item scores (for paired A/B comparison) and aggregate metrics, cached by
(model, suite, settings) so that running it again is free."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmforge.config import ProjectConfig
from slmforge.errors import EvalError
from slmforge.evaluate.suites import SuiteSpec, load_items

CACHE_VERSION = 1


@dataclass
class SuiteResult:
    suite: str
    task: str
    model: str
    metrics: dict[str, float]
    items: list[dict[str, Any]]  # id, prompt, output, answer, target, scores{metric: value}
    primary: str  # the metric paired comparisons use
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    cached: bool = False
    sandbox: dict[str, Any] | None = None  # code suites: what the executions ran under (sandbox.sandbox_record)

    def scores(self, metric: str | None = None) -> dict[str, float]:
        """Per-item scores of a metric, by item id."""
        m = metric or self.primary
        return {it["id"]: it["scores"][m] for it in self.items}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def model_identity(model: str | Path) -> str:
    """What identifies a model for caching: its manifest fingerprint, else file sizes and times."""
    from slmforge.artifacts import model_ref

    return model_ref(model)["fingerprint"]


def build_prompt(spec: SuiteSpec, item: dict[str, Any]) -> str:
    from slmforge.evaluate.suites import render_prompt

    try:
        return render_prompt(spec, item)
    except KeyError as exc:
        raise EvalError(f"Suite {spec.name}: the prompt uses the field {exc} that item {item.get('id')} lacks.") from None


def run_suite(
    generator,
    spec: SuiteSpec,
    base: Path,
    model: str | Path,
    cfg: ProjectConfig | None = None,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    allow_weak_sandbox: bool = False,
) -> SuiteResult:
    """Evaluate ``generator`` (the model at ``model``) on a suite.

    ``allow_weak_sandbox``: code suites run generated programs even where the kernel
    refuses the sandbox's namespaces (the result's ``sandbox`` record then says ``weak``).

    Raises:
        EvalError: Bad items, prompts or settings for this generator.
        SandboxError: A code suite on a machine with a weak sandbox, not opted in.
    """
    from slmforge.config import GenerateConfig
    from slmforge.generate import SamplingParams, resolve_profile

    items = load_items(spec, base, cfg)
    if not items:
        raise EvalError(f"Suite {spec.name} has no items.")
    model_dir = Path(str(model))
    profile = spec.sampling or resolve_profile(
        spec.profile, model_dir if (model_dir / "generation_config.json").exists() else None,
        cfg.generate if cfg else GenerateConfig())
    n = spec.n_samples if spec.task == "code" else 1
    params = SamplingParams.from_profile(profile, max_new_tokens=spec.max_new_tokens, stop=spec.stop or None, n=n,
                                         seed=profile.seed if profile.seed is not None else 0)
    settings = {"suite": spec.model_dump(mode="json"), "params": asdict(params), "items": len(items),
                "items_digest": hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()}
    if spec.task == "code":
        from slmforge.evaluate.sandbox import VERDICT_VERSION

        settings["verdict"] = VERDICT_VERSION  # results from before the verdict harness are not reused
    key = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "model": model_identity(model), **settings},
                                    sort_keys=True, default=str).encode()).hexdigest()[:24]
    cache_file = cache_dir / f"{spec.name}-{key}.json" if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        data = json.loads(cache_file.read_text())
        data["cached"] = True
        return SuiteResult(**data)
    t0 = time.monotonic()
    sandbox = None
    if spec.task == "code":
        from slmforge.evaluate.sandbox import SandboxLimits, require_strong_sandbox

        require_strong_sandbox(SandboxLimits(timeout_s=spec.timeout_s), allow_weak_sandbox)  # before generating
        metrics, rows, primary, sandbox = _run_code(generator, spec, items, params, batch_size, progress,
                                                    allow_weak_sandbox)
    else:
        runner = {"generate": _run_generate, "multiple_choice": _run_multiple_choice}[spec.task]
        metrics, rows, primary = runner(generator, spec, items, params, batch_size, progress)
    result = SuiteResult(spec.name, spec.task, str(model), metrics, rows, primary, round(time.monotonic() - t0, 2),
                         {"params": settings["params"], "items": len(items)}, sandbox=sandbox)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_json()))
        tmp.replace(cache_file)
    return result


def _batches(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _generate_all(generator, spec: SuiteSpec, prompts: list[str], params, batch_size: int, progress: bool):
    """Completions for every prompt, batched where the engine can batch."""
    from slmforge._progress import progress_bar
    from slmforge.generate import as_engine

    engine = as_engine(generator)
    outputs: list[list[str]] = []
    with progress_bar(progress) as bar:
        task = bar.add_task(f"eval {spec.name}", total=len(prompts), info="")
        for chunk in _batches(prompts, batch_size):
            if spec.chat:
                got = engine.chat_batch([[{"role": "user", "content": p}] for p in chunk], params)
            else:
                got = engine.complete_batch(chunk, params)
            outputs.extend([c.text for c in completions] for completions in got)
            bar.update(task, advance=len(chunk))
    return outputs


def _run_generate(generator, spec, items, params, batch_size, progress):
    from slmforge.evaluate import metrics as M

    prompts = [build_prompt(spec, it) for it in items]
    outputs = _generate_all(generator, spec, prompts, params, batch_size, progress)
    answers = [M.extract_answer(outs[0], spec.extract.method, spec.extract.arg) or "" for outs in outputs]
    targets = [str(it["target"]) for it in items]
    scores, agg, primary = M.score_items(spec.metrics, answers, targets)
    rows = [{"id": it["id"], "prompt": prompt, "output": outs[0], "answer": answer, "target": target, "scores": s}
            for it, prompt, outs, answer, target, s in zip(items, prompts, outputs, answers, targets, scores)]
    return agg, rows, primary


def _run_multiple_choice(generator, spec, items, params, batch_size, progress):
    from slmforge.evaluate import metrics as M
    from slmforge.generate import as_engine

    engine = as_engine(generator)
    if not engine.capabilities.loglikelihood:
        raise EvalError(f"Suite {spec.name} scores choices by log-likelihood, which this engine does not provide.")
    rows, gold, pred = [], [], []
    labels: list[str] = []
    requests, spans = [], []
    for it in items:
        choices = it.get("choices") or spec.choices
        if not choices:
            raise EvalError(f"Suite {spec.name}: item {it['id']} has no choices and the suite sets none.")
        prompt = build_prompt(spec, it)
        spans.append((len(requests), choices, prompt))
        requests += [(prompt, spec.choice_prefix + c) for c in choices]
        labels += [c for c in choices if c not in labels]
    lls = engine.loglikelihood(requests, batch_size=batch_size)
    for it, (start, choices, prompt) in zip(items, spans):
        scores_c = lls[start : start + len(choices)]
        best = choices[max(range(len(choices)), key=lambda i: scores_c[i])]
        gold.append(str(it["target"]))
        pred.append(best)
        rows.append({"id": it["id"], "prompt": prompt, "output": best, "answer": best, "target": str(it["target"]),
                     "loglikelihoods": dict(zip(choices, scores_c))})
    # Every multiple-choice metric, whichever the suite lists: they come from the same choices.
    scores, agg, primary = M.score_items(M.suite_metrics("multiple_choice"), pred, gold, labels)
    for row, s in zip(rows, scores):
        row["scores"] = s
    return agg, rows, primary


def _run_code(generator, spec, items, params, batch_size, progress, allow_weak_sandbox=False):
    from slmforge.evaluate import metrics as M
    from slmforge.evaluate.sandbox import SandboxLimits, run_many, sandbox_record

    prompts = [build_prompt(spec, it) for it in items]
    outputs = _generate_all(generator, spec, prompts, params, batch_size, progress)
    jobs, owners = [], []
    for idx, (it, prompt, outs) in enumerate(zip(items, prompts, outputs)):
        if "test" not in it:
            raise EvalError(f"Suite {spec.name}: code item {it['id']} has no 'test' field.")
        for out in outs:
            jobs.append((prompt + out, it["test"], it.get("entry_point")))
            owners.append(idx)
    results = run_many(jobs, SandboxLimits(timeout_s=spec.timeout_s), workers=2, allow_weak=allow_weak_sandbox)
    rows = []
    for idx, (it, prompt, outs) in enumerate(zip(items, prompts, outputs)):
        mine = [r for r, o in zip(results, owners) if o == idx]
        c = sum(r.status == "passed" for r in mine)
        scores = {f"pass@{k}": M.pass_at_k(len(mine), c, k) for k in spec.k}
        rows.append({"id": it["id"], "prompt": prompt, "output": outs[0], "answer": outs[0], "target": it["target"],
                     "statuses": [r.status for r in mine], "scores": scores})
    agg = {f"pass@{k}": sum(r["scores"][f"pass@{k}"] for r in rows) / len(rows) for k in spec.k}
    return agg, rows, f"pass@{spec.k[0]}", sandbox_record(results)
