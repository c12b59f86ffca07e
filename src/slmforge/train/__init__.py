"""Training: pretraining from scratch, supervised fine-tuning (full, LoRA, QLoRA)
and adapter merging, all on one loop (``_loop.run_loop``).

    from slmforge import load_config
    from slmforge.train import pretrain, finetune
    cfg = load_config("slmforge.yaml")
    base = pretrain(cfg)              # runs/train: a Hugging Face model folder + manifest
    tuned = finetune(cfg)             # runs/sft: full model, or a LoRA adapter over the base

Each run keeps checkpoints in ``<out>-work/checkpoints`` and resumes from the
latest one when re-run with the same settings (after Ctrl-C or kill -9).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmforge.artifacts import ArtifactWriter, Plan, model_ref, output_dir, parent_ref, read_manifest
from slmforge.config import ProjectConfig
from slmforge.errors import ArtifactError, TrainError

__all__ = ["TrainResult", "pretrain", "pretrain_plan", "finetune", "finetune_plan", "merge_adapter", "work_dir_for",
           "plot_losses", "run_loop", "LoopResult", "right_padded"]

# The training loop and batching import torch, so they are served on first use: `import slmforge.train`
# stays cheap, and compress/ (the ternary fine-tune) and reasoning/ (CoT fine-tuning) use them through
# these public names.
_LAZY = {"run_loop": "slmforge.train._loop", "LoopResult": "slmforge.train._loop",
         "right_padded": "slmforge.train._data"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


@dataclass
class TrainResult:
    path: Path
    kind: str  # "model" or "adapter"
    metrics: dict[str, Any]


def work_dir_for(out: Path) -> Path:
    """Where a run keeps its checkpoints and log while it trains: ``<out>-work``."""
    return out.parent / f"{out.name}-work"


def plot_losses(log: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training and validation loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    steps = [r["step"] for r in log]
    ax.plot(steps, [r["loss"] for r in log], color="#3b75af", linewidth=1, label="train loss")
    val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", color="#d62728", markersize=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _write_log(folder: Path, log: list[dict[str, Any]], title: str) -> None:
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    if log:
        plot_losses(log, folder / "loss.png", title)


def _loop_metrics(res) -> dict[str, Any]:
    m = {
        "steps": res.steps,
        "train_loss": round(res.final_loss, 5),
        "tokens": res.tokens,
        "seconds": round(res.seconds, 2),
        "tokens_per_s": round(res.tokens_per_s, 1),
        "stopped_early": res.stopped_early,
    }
    if res.val_loss is not None:
        m["val_loss"] = round(res.val_loss, 5)
        m["val_ppl"] = round(math.exp(min(res.val_loss, 50)), 3)
    if res.resumed_from is not None:
        m["resumed_from_step"] = res.resumed_from
    if res.processes > 1:
        m["processes"] = res.processes
        m["strategy"] = res.strategy
    return m


def _dataset_dir(cfg: ProjectConfig, override: str | None, explicit: str | Path | None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return cfg.resolve(override) if override else output_dir(cfg, "data")


# --------------------------------------------------------------------------- pretraining


def _pretrain_inputs(cfg: ProjectConfig, data, tokenizer) -> tuple[Path, Path]:
    tcfg = cfg.train
    data_dir = _dataset_dir(cfg, tcfg.data, data)
    tok_dir = Path(tokenizer) if tokenizer else (cfg.resolve(tcfg.tokenizer) if tcfg.tokenizer else output_dir(cfg, "tokenizer"))
    return data_dir, tok_dir


def _continued_base(cfg: ProjectConfig) -> str | None:
    """``model.base`` as a path when it is a local one (resolved against the project file), else as given."""
    if not cfg.model.base:
        return None
    resolved = cfg.resolve(cfg.model.base)
    return str(resolved) if resolved.exists() else cfg.model.base


def pretrain_plan(cfg: ProjectConfig, data=None, tokenizer=None) -> Plan:
    """What ``pretrain`` would write: what decides whether an existing model is current. With ``model.base``
    (continued pretraining) the base model and its own tokenizer take the tokenizer artifact's place."""
    data_dir, tok_dir = _pretrain_inputs(cfg, data, tokenizer)
    # model.trim_vocab came later: while off it is left out, so the models of existing projects stay current
    model = cfg.model.model_dump(mode="json", exclude=None if cfg.model.trim_vocab else {"trim_vocab"})
    config = {"model": model, "train": cfg.train.fingerprint_config(), "seed": cfg.project.seed}
    base = _continued_base(cfg)
    start = model_ref(base) if base else parent_ref(tok_dir, "tokenizer")
    return Plan("model", config, [parent_ref(data_dir, "dataset"), start])


def _trimmed_base(base: str, texts: Iterable[str], work: Path) -> str:
    """The base trimmed to ``texts``, kept in the work folder under a name made of the base's identity and
    the texts (a resumed run, or another process of the same run, finds it made). ``texts`` is read in passes,
    a batch at a time (here and by ``trim_vocab``)."""
    import hashlib

    from slmforge.model.trim import trim_vocab

    h = hashlib.sha256(model_ref(base)["fingerprint"].encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    folder = work / f"trimmed-base-{h.hexdigest()[:12]}"
    if not (folder / "manifest.json").is_file():
        trim_vocab(base, texts, folder, progress=False)
    return str(folder)


def _starting_model(cfg: ProjectConfig, tok_dir: Path, texts: Iterable[str], work: Path) -> tuple[Any, Any, int]:
    """(model, tokenizer, parameters): ``model.base`` with its own tokenizer (continued pretraining; its
    vocabulary first trimmed to ``texts`` with ``model.trim_vocab``), else a fresh ``cfg.model`` on the
    project's tokenizer."""
    from slmforge.model import build_model, estimate, load_causal_lm
    from slmforge.tokenizer import load_tokenizer
    from slmforge.tokenizer.fim import add_fim_tokens

    base = _continued_base(cfg)
    if base:
        if cfg.model.trim_vocab:
            base = _trimmed_base(base, texts, work)
        model, tok = load_causal_lm(base)
        if cfg.train.fim_rate and add_fim_tokens(tok):
            _resize_embeddings(model, tok)
        model.train()
        return model, tok, sum(p.numel() for p in model.parameters())
    tok = load_tokenizer(tok_dir)
    if cfg.train.fim_rate:
        add_fim_tokens(tok)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    model = build_model(cfg.model, len(tok), ids, seed=cfg.project.seed)
    return model, tok, estimate(cfg.model, len(tok), cfg.train.seq_len, cfg.train.batch_size).params


def _pretrain_streams(cfg: ProjectConfig, data_dir: Path, tok: Any, work: Path) -> tuple[Any, Any]:
    """The training and validation token streams, from the token cache in ``work``: the splits are read from
    disk a line at a time, tokenized 512 documents at a time into the cache and come back memory-mapped, so
    memory does not grow with the corpus."""
    from slmforge.tokenizer.packing import jsonl_texts, tokenize_documents

    return (tokenize_documents(jsonl_texts(data_dir / "text" / "train.jsonl"), tok, work / "cache"),
            tokenize_documents(jsonl_texts(data_dir / "text" / "val.jsonl"), tok, work / "cache"))


def _training_windows(cfg: ProjectConfig, stream: Any, tok: Any, bos: int | None) -> Any:
    """The training stream in windows of ``train.seq_len``, with ``train.fim_rate`` of their pieces as
    fill-in-the-middle examples (``FimWindows``)."""
    from slmforge.tokenizer.fim import FimWindows
    from slmforge.tokenizer.packing import PackedTokens

    windows = PackedTokens(stream, cfg.train.seq_len, bos)
    return FimWindows(windows, cfg.train.fim_rate, tok, cfg.project.seed) if cfg.train.fim_rate else windows


def pretrain(
    cfg: ProjectConfig,
    data: str | Path | None = None,
    tokenizer: str | Path | None = None,
    out: str | Path | None = None,
    command: list[str] | None = None,
    progress: bool = True,
    log=None,
) -> TrainResult:
    """Pretrain a fresh model (``cfg.model``) as a causal LM on the data stage's ``text`` output, or continue
    pretraining ``model.base`` (a folder, .gguf or hub id) with its own tokenizer.

    Raises:
        ArtifactError: The data or tokenizer artifact is missing.
        ModelError: ``model.base`` cannot be loaded.
        TrainError: Too little text for one training sequence.
    """
    from slmforge.model import pick_device, save_model_folder
    from slmforge.tokenizer.packing import PackedTokens, jsonl_texts, unigram_perplexity, window_bos_id
    from slmforge.train._loop import run_loop, world

    tcfg = cfg.train
    data_dir, tok_dir = _pretrain_inputs(cfg, data, tokenizer)
    out_dir = Path(out) if out else output_dir(cfg, "train")
    plan = pretrain_plan(cfg, data, tokenizer)
    work = work_dir_for(out_dir)
    team = world(pick_device(tcfg.device))  # under torchrun: this process's rank; (0, 1) otherwise
    if not team.main:
        team.barrier()  # the first process tokenizes and fills the cache; the others read it
    model, tok, params = _starting_model(cfg, tok_dir, jsonl_texts(data_dir / "text" / "train.jsonl"), work)
    train_stream, val_stream = _pretrain_streams(cfg, data_dir, tok, work)
    if team.main:
        team.barrier()
    if len(train_stream) < tcfg.seq_len + 1:
        raise TrainError(
            f"The training text in {data_dir} has {len(train_stream)} tokens, fewer than one sequence of "
            f"train.seq_len={tcfg.seq_len}. Add data or lower train.seq_len."
        )
    bos = window_bos_id(model, tok)
    train_src = _training_windows(cfg, train_stream, tok, bos)
    val_src = PackedTokens(val_stream, tcfg.seq_len, bos) if len(val_stream) >= tcfg.seq_len else None
    run_key = {"config": plan.config, "parents": [p["fingerprint"] for p in plan.parents]}
    res = run_loop(model, train_src, val_src, tcfg, work, cfg.project.seed, run_key, "pretraining", progress, log)
    metrics = _loop_metrics(res)
    metrics["params"] = params
    metrics["train_tokens_available"] = int(len(train_stream))
    metrics["epochs"] = round(res.tokens / max(len(train_src) * tcfg.seq_len, 1), 3)
    if val_src is not None:
        metrics["unigram_val_ppl"] = round(unigram_perplexity(train_stream, val_stream[: len(val_src) * tcfg.seq_len], len(tok)), 3)
    if not team.main:  # the replicas are identical: the first process writes the model
        return TrainResult(out_dir.resolve(), "model", metrics)
    model.to("cpu")
    with plan.writer(out_dir, command) as w:
        save_model_folder(model, tok, w.path, cfg.generate.profiles, cfg.generate.default_profile)
        _write_log(w.path, res.log, f"{'continued ' if cfg.model.base else ''}pretraining {params / 1e6:.1f}M parameters")
        w.metrics.update(metrics)
    return TrainResult(out_dir.resolve(), "model", metrics)


# --------------------------------------------------------------------------- fine-tuning


def _base_spec(cfg: ProjectConfig, base: str | Path | None) -> tuple[str, list[dict[str, str]]]:
    """The model to fine-tune (explicit, ``sft.base``, or the train stage's output) and its lineage entry."""
    spec = str(base) if base is not None else (cfg.sft.base or str(output_dir(cfg, "train")))
    resolved = cfg.resolve(spec)
    path = resolved if resolved.exists() else Path(spec)
    if path.exists():
        return str(path), [model_ref(path)]
    if base is None and cfg.sft.base is None:
        raise ArtifactError(
            f"No model to fine-tune: {path} does not exist. Run `slmforge train` first, or set sft.base "
            "to a model folder, hub id or .gguf file."
        )
    return spec, [model_ref(spec)]


def finetune_plan(cfg: ProjectConfig, base=None, data=None) -> Plan:
    """What ``finetune`` would write: what decides whether an existing model or adapter is current."""
    spec, base_parents = _base_spec(cfg, base)
    data_dir = _dataset_dir(cfg, cfg.sft.data, data)
    kind = "adapter" if cfg.sft.method in ("lora", "qlora") else "model"
    config = {"sft": cfg.sft.fingerprint_config(), "base": spec, "seed": cfg.project.seed}
    parents = base_parents + [parent_ref(data_dir, "dataset")]
    if cfg.sft.tokenizer:
        parents.append(parent_ref(cfg.resolve(cfg.sft.tokenizer), "tokenizer"))
    return Plan(kind, config, parents)


def _resize_embeddings(model, tok) -> dict[str, Any]:
    """Grow the embeddings when the tokenizer has more tokens than the model (an extended tokenizer).

    A new token's input row starts at the mean of the rows of the words in its name (``<|fim_suffix|>``:
    "fim suffix" as the old vocabulary splits it), or at the mean of all old rows when its name has no words
    (transformers' mean_resizing, which alone starts every new row at the same point: Gemma 3 270M's three FIM
    sentinels were still 0.03 apart, against row norms of about 1, after 80 steps at lr 5e-5, so the model
    could not tell the prefix's sentinel from the middle's)."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if len(tok) <= old:
        return {}
    model.resize_token_embeddings(len(tok), mean_resizing=True)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for token_id in range(old, len(tok)):
            words = " ".join(re.findall(r"[A-Za-z0-9]+", tok.convert_ids_to_tokens(token_id)))
            pieces = [i for i in tok(words, add_special_tokens=False)["input_ids"] if i < old] if words else []
            if pieces:
                weight[token_id] = weight[pieces].mean(0)
    return {"embeddings_resized": {"from": old, "to": len(tok)}}


def finetune(
    cfg: ProjectConfig,
    base: str | Path | None = None,
    data: str | Path | None = None,
    out: str | Path | None = None,
    command: list[str] | None = None,
    progress: bool = True,
    log=None,
) -> TrainResult:
    """Supervised fine-tuning on the data stage's ``chat`` output, loss on assistant tokens only.

    ``sft.method`` full trains every weight and writes a model folder; lora trains peft
    adapters and writes only the adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``, kind ``adapter``), loadable over the base or mergeable
    with ``merge_adapter``; qlora does the same over a 4-bit base and needs CUDA + bitsandbytes.

    Raises:
        TrainError: QLoRA without CUDA/bitsandbytes, no chat examples, or a template without
            generation markers.
    """
    from slmforge.data import read_jsonl
    from slmforge.model import pick_device, save_model_folder
    from slmforge.train._data import ChatExamples
    from slmforge.train._loop import run_loop, world

    scfg = cfg.sft
    if scfg.method == "qlora":
        _check_qlora()
    from slmforge.model import load_causal_lm

    data_dir = _dataset_dir(cfg, scfg.data, data)
    out_dir = Path(out) if out else output_dir(cfg, "sft")
    plan = finetune_plan(cfg, base, data)
    team = world(pick_device(scfg.device))  # under torchrun: this process's rank; (0, 1) otherwise
    base_spec = plan.config["base"]
    model, tok = load_causal_lm(base_spec, four_bit=scfg.method == "qlora")
    if scfg.tokenizer:
        from slmforge.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.resolve(scfg.tokenizer))
    resized = _resize_embeddings(model, tok)
    train_records = read_jsonl(data_dir / "chat" / "train.jsonl")
    if not train_records:
        raise TrainError(f"{data_dir / 'chat' / 'train.jsonl'} has no conversations; add `chat` to data.formats.")
    train_src = ChatExamples(train_records, tok, scfg.seq_len)
    val_records = read_jsonl(data_dir / "chat" / "val.jsonl")
    val_src = ChatExamples(val_records, tok, scfg.seq_len) if val_records else None
    if len(train_src) == 0:
        raise TrainError(f"Every conversation is longer than sft.seq_len={scfg.seq_len} before its answer starts.")
    if scfg.method in ("lora", "qlora"):
        model = _add_lora(model, scfg, bool(resized), cfg.project.seed)
    run_key = {"config": plan.config, "parents": [p["fingerprint"] for p in plan.parents]}
    res = run_loop(model, train_src, val_src, scfg, work_dir_for(out_dir), cfg.project.seed, run_key,
                   f"fine-tuning ({scfg.method})", progress, log)
    metrics = _loop_metrics(res) | resized
    metrics["examples"] = len(train_src)
    metrics["examples_cut_off"] = train_src.skipped
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics["trainable_params"] = trainable
    if not team.main:  # the replicas are identical: the first process writes the model or adapter
        return TrainResult(out_dir.resolve(), plan.kind, metrics)
    if not getattr(model, "is_loaded_in_4bit", False):
        model.to("cpu")
    with plan.writer(out_dir, command) as w:
        if plan.kind == "adapter":
            model.save_pretrained(w.path, selected_adapters=None)
            tok.save_pretrained(w.path)
            (w.path / "slmforge_adapter.json").write_text(
                json.dumps({"base": base_spec, "adapter_name": scfg.adapter_name}, indent=1) + "\n"
            )
        else:
            save_model_folder(model, tok, w.path, cfg.generate.profiles, cfg.generate.default_profile)
        _write_log(w.path, res.log, f"fine-tuning ({scfg.method})")
        w.metrics.update(metrics)
    return TrainResult(out_dir.resolve(), plan.kind, metrics)


def _check_qlora() -> None:
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        have = "a CUDA GPU" if torch.cuda.is_available() else "no CUDA GPU"
        bnb = "bitsandbytes installed" if importlib.util.find_spec("bitsandbytes") else "no bitsandbytes"
        raise TrainError(
            f"sft.method qlora needs a CUDA GPU and the bitsandbytes package; this machine has {have} and {bnb}. "
            "Use sft.method lora (same adapters, full-precision base) or run on a GPU machine with "
            "`pip install bitsandbytes`."
        )


def _add_lora(model, scfg, resized: bool, seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    targets = [t for t in scfg.lora.target_modules if t in names]
    if not targets:
        raise TrainError(
            f"None of sft.lora.target_modules {scfg.lora.target_modules} exist in this model; its linear layers "
            f"include: {sorted(n for n in names if n.endswith('proj'))[:12]}."
        )
    if scfg.method == "qlora":
        model = prepare_model_for_kbit_training(model)
    lcfg = LoraConfig(
        r=scfg.lora.r,
        lora_alpha=scfg.lora.alpha,
        lora_dropout=scfg.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        # New token rows must learn too, or the extended vocabulary stays at its mean init.
        modules_to_save=["embed_tokens", "lm_head"] if resized else None,
    )
    # Trained under peft's "default" slot so the files sit at the top of the folder; the
    # name the user chose is recorded in slmforge_adapter.json and used when loading.
    torch.manual_seed(seed)  # LoRA's A matrices start random: the same in every run and every process
    return get_peft_model(model, lcfg)


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, command: list[str] | None = None) -> Path:
    """Merge a LoRA adapter into its base and write a full model folder (kind ``model``)."""
    from peft import PeftModel

    from slmforge.model import load_causal_lm, read_profiles, save_model_folder

    adapter = Path(adapter)
    read_manifest(adapter, "adapter")
    model, tok = load_causal_lm(base)
    adapter_tok_file = adapter / "tokenizer.json"
    if adapter_tok_file.exists():
        from slmforge.tokenizer import load_tokenizer

        tok = load_tokenizer(adapter)
    _resize_embeddings(model, tok)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    base_path = Path(str(base))
    profiles, default = read_profiles(base_path) if base_path.is_dir() else ({}, None)
    parents = [parent_ref(adapter, "adapter")]
    if base_path.is_dir() and (base_path / "manifest.json").exists():
        parents.insert(0, parent_ref(base_path))
    with ArtifactWriter(Path(out), kind="model", config={"merge": {"base": str(base), "adapter": str(adapter)}},
                        parents=parents, command=command) as w:
        save_model_folder(merged, tok, w.path, profiles or None, default)
        w.metrics["merged"] = True
    return Path(out).resolve()
