"""``bio-mlm``: a small masked language model (ESM-style: a BERT encoder with rotary positions, as in
ESM-2) trained on the ``bio-data`` sequences with the one training loop, and measured on held-out ones.

Masking follows BERT: ``mask_rate`` of the residues (never BOS/EOS) are targets; of those 80% become
``<mask>``, 10% a random residue, 10% stay. Each training sequence is masked ``masks_per_sequence``
ways, each a pure function of (seed, sequence, variant), so batches stay a function of the step and a
killed run resumes exactly.

Perplexity here is the *masked* perplexity: every held-out sequence is masked ``mask_rate`` (seeded,
all targets replaced by ``<mask>``) and the model's cross-entropy on the masked residues is
exponentiated. It is not the pseudo-perplexity of Salazar et al. (one position masked at a time),
which is one forward pass per residue; the unigram baseline is scored on the same masked positions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slmforge.artifacts import Plan, output_dir, parent_ref
from slmforge.bio.sources import AMINO_ACIDS
from slmforge.bio.stages import BioResult
from slmforge.config import ProjectConfig
from slmforge.errors import TrainError

PROTEIN_ALPHABET = frozenset(AMINO_ACIDS + "X")


def encoder_config(shape: Any, tok: Any, num_labels: int | None = None) -> Any:
    """An ``EsmConfig`` of ``shape`` (hidden_size, num_layers, num_heads, seq_len) over ``tok``'s vocabulary;
    with ``num_labels`` a regression/classification head's config."""
    from transformers import EsmConfig

    config = EsmConfig(vocab_size=len(tok), hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
                       num_attention_heads=shape.num_heads, intermediate_size=4 * shape.hidden_size,
                       max_position_embeddings=shape.seq_len + 2, position_embedding_type="rotary",
                       pad_token_id=tok.pad_token_id, mask_token_id=tok.mask_token_id, token_dropout=False)
    if num_labels is not None:
        config.num_labels = num_labels
        config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    return config


def encode(texts: Sequence[str], tok: Any, seq_len: int) -> list[list[int]]:
    """``[bos] + tokens + [eos]`` per text, cut to ``seq_len``."""
    ids = tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return [[tok.bos_token_id] + row[: seq_len - 2] + [tok.eos_token_id] for row in ids]


def _mask(ids: list[int], rng: Any, rate: float, mask_id: int, residue_ids: Sequence[int],
          bert_mix: bool) -> tuple[list[int], list[int]]:
    """(inputs, labels) with ``rate`` of the inner positions as targets (at least one)."""
    inner = list(range(1, len(ids) - 1))
    chosen = [i for i in inner if rng.random() < rate] or ([int(rng.choice(inner))] if inner else [])
    inputs, labels = list(ids), [-100] * len(ids)
    for i in chosen:
        labels[i] = ids[i]
        roll = rng.random() if bert_mix else 0.0
        inputs[i] = mask_id if roll < 0.8 else int(rng.choice(residue_ids)) if roll < 0.9 else ids[i]
    return inputs, labels


class MaskedExamples:
    """A ``BatchSource`` of masked sequences: ``variants`` seeded maskings of each one."""

    def __init__(self, encoded: list[list[int]], tok: Any, rate: float, seed: int, variants: int = 1,
                 bert_mix: bool = True) -> None:
        self.encoded, self.rate, self.seed, self.variants, self.bert_mix = encoded, rate, seed, variants, bert_mix
        self.pad, self.mask_id = tok.pad_token_id, tok.mask_token_id
        self.residue_ids = [i for t, i in tok.get_vocab().items() if not (t.startswith("<") and t.endswith(">"))]

    def __len__(self) -> int:
        return len(self.encoded) * self.variants

    def example(self, index: int) -> tuple[list[int], list[int]]:
        import numpy as np

        seq, variant = divmod(index, self.variants)
        rng = np.random.default_rng([self.seed, seq, variant])
        return _mask(self.encoded[seq], rng, self.rate, self.mask_id, self.residue_ids, self.bert_mix)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        import torch

        from slmforge.train import right_padded

        items = [tuple(torch.tensor(x, dtype=torch.long) for x in self.example(i)) for i in indices]
        return right_padded(items, self.pad)

    def tokens_in(self, batch: dict[str, Any]) -> int:
        return int(batch["attention_mask"].sum())


def masked_scores(model: Any, source: MaskedExamples, unigram: Any, batch_size: int = 32) -> dict[str, float]:
    """Masked perplexity and fill accuracy of the model and of the unigram baseline on the same targets,
    and the share of the model's fills that are residues (not special tokens)."""
    import torch

    nll = base_nll = 0.0
    hits = base_hits = in_alphabet = count = 0
    log_unigram = torch.log(torch.as_tensor(unigram, dtype=torch.float64))
    residue = torch.zeros(len(unigram), dtype=torch.bool)
    residue[source.residue_ids] = True
    model.eval()
    with torch.no_grad():
        for start in range(0, len(source), batch_size):
            b = source.batch(list(range(start, min(len(source), start + batch_size))))
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
            where = b["labels"] != -100
            gold, picked = b["labels"][where], logits[where]  # (N,), (N, V)
            nll -= float(torch.log_softmax(picked, -1).gather(1, gold[:, None]).sum())
            base_nll -= float(log_unigram[gold].sum())
            pred = picked.argmax(-1)
            hits += int((pred == gold).sum())
            base_hits += int((gold == int(log_unigram.argmax())).sum())
            in_alphabet += int(residue[pred].sum())
            count += int(where.sum())
    n = max(count, 1)
    return {"masked_ppl": round(math.exp(nll / n), 4), "unigram_masked_ppl": round(math.exp(base_nll / n), 4),
            "fill_accuracy": round(hits / n, 4), "unigram_fill_accuracy": round(base_hits / n, 4),
            "fills_in_alphabet": round(in_alphabet / n, 4), "masked_targets": count}


def unigram_frequencies(encoded: list[list[int]], vocab_size: int, residue_ids: Sequence[int]) -> list[float]:
    """Residue frequencies of the training sequences, add-one smoothed over the residues (specials get 0+)."""
    counts = [0.0] * vocab_size
    for row in encoded:
        for t in row[1:-1]:
            counts[t] += 1
    for i in residue_ids:
        counts[i] += 1
    total = sum(counts)
    return [max(c / total, 1e-12) for c in counts]


def generate_by_unmasking(model: Any, tok: Any, n: int, length: int, seed: int) -> list[str]:
    """Sequences written by the MLM from all-``<mask>`` inputs, one position at a time in a seeded random
    order, each sampled from the model's distribution over residues (special tokens excluded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, length + 2), tok.mask_token_id, dtype=torch.long)  # (B, L+2)
    ids[:, 0], ids[:, -1] = tok.bos_token_id, tok.eos_token_id
    special = torch.tensor([i for t, i in tok.get_vocab().items() if t.startswith("<") and t.endswith(">")])
    model.eval()
    with torch.no_grad():
        for pos in (torch.randperm(length, generator=g) + 1).tolist():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, pos]  # (B, V)
            logits[:, special] = float("-inf")
            ids[:, pos] = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
    return tok.batch_decode(ids[:, 1:-1], skip_special_tokens=True)


def alphabet_report(sequences: Sequence[str], alphabet: frozenset[str] = PROTEIN_ALPHABET) -> dict[str, Any]:
    """How far ``sequences`` keep to ``alphabet`` (default: the 20 amino acids and X)."""
    chars = "".join(sequences)
    outside = sorted(set(chars) - alphabet)
    return {"sequences": len(sequences), "residues": len(chars),
            "residues_in_alphabet": round(sum(c in alphabet for c in chars) / max(len(chars), 1), 4),
            "sequences_in_alphabet": sum(1 for s in sequences if set(s) <= alphabet), "outside": outside}


def mlm_plan(cfg: ProjectConfig) -> Plan:
    """What ``train_mlm`` would write. Raises ArtifactError when bio-data or bio-tokenizer is missing."""
    parents = [parent_ref(output_dir(cfg, "bio-data"), "dataset"), parent_ref(output_dir(cfg, "bio-tokenizer"), "tokenizer")]
    return Plan("masked-lm", {"mlm": cfg.bio.mlm.model_dump(mode="json"), "seed": cfg.project.seed}, parents)


def _texts(data: Path, split: str) -> list[str]:
    from slmforge.data import read_jsonl

    return [r["text"] for r in read_jsonl(data / "text" / f"{split}.jsonl")]


def train_mlm(cfg: ProjectConfig, command: list[str] | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None) -> BioResult:
    """Train the masked LM of ``bio.mlm`` and write ``bio-mlm``: a Hugging Face ``EsmForMaskedLM`` folder,
    held-out masked perplexity against the unigram baseline, and (proteins) the alphabet check of fills
    and of sequences generated by unmasking.

    Raises:
        ArtifactError: bio-data or bio-tokenizer is missing.
        TrainError: No held-out sequences to measure on.
    """
    from transformers import EsmForMaskedLM
    from transformers.utils import logging as hf_logging

    from slmforge.tokenizer import load_tokenizer
    from slmforge.train import plot_losses, run_loop, work_dir_for

    m, plan = cfg.bio.mlm, mlm_plan(cfg)
    data, tok = output_dir(cfg, "bio-data"), load_tokenizer(output_dir(cfg, "bio-tokenizer"))
    train_ids = encode(_texts(data, "train"), tok, m.seq_len)
    heldout_ids = encode(_texts(data, "test") or _texts(data, "val"), tok, m.seq_len)
    if not heldout_ids:
        raise TrainError(f"{data} has no val or test sequences to measure the masked LM on; raise bio.data.split.")
    import torch

    torch.manual_seed(cfg.project.seed)
    model = EsmForMaskedLM(encoder_config(m, tok))
    train_src = MaskedExamples(train_ids, tok, m.mask_rate, cfg.project.seed, m.masks_per_sequence)
    val_src = MaskedExamples(encode(_texts(data, "val"), tok, m.seq_len), tok, m.mask_rate, cfg.project.seed + 1)
    out = output_dir(cfg, "bio-mlm")
    run_key = {"config": plan.config, "parents": [p["fingerprint"] for p in plan.parents]}
    res = run_loop(model, train_src, val_src if len(val_src) else None, m, work_dir_for(out), cfg.project.seed,
                   run_key, "masked LM", progress, log)
    model.to("cpu")
    metrics = _mlm_metrics(model, tok, train_src, heldout_ids, cfg, res)
    with plan.writer(out, command) as w:
        hf_logging.disable_progress_bar()  # its "Writing model shards" bar would interleave with our log
        model.save_pretrained(str(w.path))
        tok.save_pretrained(str(w.path))
        (w.path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in res.log))
        if res.log:
            plot_losses(res.log, w.path / "loss.png", f"masked LM, {metrics['params'] / 1e6:.2f}M parameters")
        w.metrics.update(metrics)
    if log:
        log(f"bio-mlm: masked perplexity {metrics['masked_ppl']} vs unigram {metrics['unigram_masked_ppl']} -> {out}")
    return BioResult(out.resolve(), dict(w.metrics))


def _mlm_metrics(model: Any, tok: Any, train_src: MaskedExamples, heldout_ids: list[list[int]], cfg: ProjectConfig,
                 res: Any) -> dict[str, Any]:
    m = cfg.bio.mlm
    heldout = MaskedExamples(heldout_ids, tok, m.mask_rate, cfg.project.seed + 2, variants=3, bert_mix=False)
    unigram = unigram_frequencies(train_src.encoded, len(tok), train_src.residue_ids)
    metrics: dict[str, Any] = {"steps": res.steps, "train_loss": round(res.final_loss, 5), "seconds": round(res.seconds, 2),
                               "params": sum(p.numel() for p in model.parameters()), "heldout_sequences": len(heldout_ids),
                               "perplexity": "masked (mask_rate of each held-out sequence, 3 seeded maskings)",
                               **masked_scores(model, heldout, unigram, m.batch_size)}
    if res.val_loss is not None:
        metrics["val_loss"] = round(res.val_loss, 5)
    if cfg.bio.kind == "protein":
        generated = generate_by_unmasking(model, tok, 16, min(64, m.seq_len - 2), cfg.project.seed)
        metrics["generated"] = alphabet_report(generated)
        metrics["generated_examples"] = generated[:4]
    return metrics
