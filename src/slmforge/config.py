"""The project file: typed sections, one per stage, that reject unknown keys.

Merge order: defaults -> project file (``slmforge.yaml``) -> ``--set section.key=value``.
Every field's description doubles as the comment written by ``slmforge init``,
so the template can never drift from the code.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from slmforge.errors import ConfigError

PROJECT_FILE = "slmforge.yaml"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- project


class ProjectSection(Section):
    name: str = Field("my-slm", description="Name of the project; used in reports and model cards.")
    out_dir: str = Field(
        "runs",
        description="Folder (relative to this file) where every stage writes its artifact folder.",
    )
    seed: int = Field(0, description="Seed for everything random (splits, sampling, initialisation).")
    stages: list[Literal["data", "tokenizer", "bio-data", "bio-tokenizer", "train", "sft", "bio-sample", "bio-mlm",
                         "bio-property", "encoder", "quantize", "eval", "report"]] = Field(
        ["data", "tokenizer", "train", "sft", "eval", "report"],
        description="Stages `slmforge run` runs, in this order (encoder and quantize are optional; the bio-* "
        "stages are the smiles and protein recipes').",
    )


# --------------------------------------------------------------------------- data


class PythonDocsSource(Section):
    docstrings: bool = Field(True, description="Docstrings of the standard library (modules, classes, functions).")
    topics: bool = Field(True, description="The language reference topics of pydoc_data.topics.")
    module_source: bool = Field(False, description="Also the source code of standard-library modules (a code corpus).")
    max_modules: int | None = Field(
        None, ge=1, description="Read at most this many stdlib modules (null = all); for quick trials."
    )


class CleanConfig(Section):
    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFKC", description="Unicode normalisation applied to every document."
    )
    strip_boilerplate: bool = Field(
        True,
        description="Drop navigation, headers, footers and scripts from HTML, and lines that repeat across "
        "many documents of a source (cookie notices, 'Back to top', licence footers).",
    )
    max_line_chars: int = Field(
        10_000, ge=80, description="Lines longer than this (minified code, base64 blobs) are removed and counted."
    )
    max_file_mb: float = Field(50.0, gt=0, description="Files larger than this are skipped and counted.")


class DedupConfig(Section):
    exact: bool = Field(True, description="Drop documents whose normalised text is identical to an earlier one.")
    near: bool = Field(True, description="Drop near-duplicates found with MinHash LSH.")
    near_threshold: float = Field(
        0.8, gt=0, lt=1, description="Estimated Jaccard similarity above which two documents are near-duplicates."
    )
    shingle_size: int = Field(5, ge=1, le=32, description="Words per shingle for near-duplicate detection.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more = more accurate, slower).")


class FilterConfig(Section):
    min_chars: int | None = Field(40, ge=0, description="Drop documents shorter than this many characters (null = off).")
    max_chars: int | None = Field(200_000, ge=1, description="Drop documents longer than this (null = off).")
    max_symbol_ratio: float | None = Field(
        0.35, ge=0, le=1, description="Drop documents where more than this share of characters are symbols."
    )
    min_alpha_word_ratio: float | None = Field(
        0.5, ge=0, le=1, description="Drop documents where fewer than this share of words contain a letter."
    )
    max_repeated_line_ratio: float | None = Field(
        0.3, ge=0, le=1, description="Drop documents where more than this share of lines are repeats."
    )
    max_repeated_ngram_ratio: float | None = Field(
        0.3, ge=0, le=1, description="Drop documents where more than this share of word n-grams are repeats."
    )
    repeated_ngram_size: int = Field(3, ge=1, le=20, description="n for the repeated n-gram filter.")
    languages: list[str] | None = Field(
        ["en"],
        description="Keep documents whose detected language is one of these (en, de, fr, es, it, pt, nl); "
        "null = any. Detection is a stopword heuristic.",
    )
    min_language_score: float = Field(
        0.05, ge=0, le=1, description="Share of words that must be stopwords of the detected language."
    )


PiiType = Literal["email", "phone", "ip_address", "credit_card", "secret"]


class PiiConfig(Section):
    enabled: bool = Field(True, description="Replace personal data and secrets with typed placeholders like <EMAIL>.")
    types: list[PiiType] = Field(
        ["email", "phone", "ip_address", "credit_card", "secret"], description="Which kinds of PII to scrub."
    )


class CodeConfig(Section):
    strip_licences: bool = Field(
        True, description="Remove licence and copyright comment blocks from the top of code files."
    )
    function_dedup: bool = Field(
        True, description="Remove functions and methods already seen in an earlier code file (same syntax tree)."
    )
    min_function_lines: int = Field(4, ge=1, description="Shorter functions are never removed as duplicates.")
    decontaminate: list[str] = Field(
        ["humaneval"],
        description="Drop documents sharing a 13-word sequence with these evaluation sets: humaneval, or suite "
        ".yaml/.jsonl files (fields input, target).",
    )


class SplitConfig(Section):
    val: float = Field(0.05, ge=0, lt=1, description="Share of documents held out for validation.")
    test: float = Field(0.05, ge=0, lt=1, description="Share of documents held out for testing.")


class TeacherConfig(Section):
    base_url: str = Field(description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1.")
    model: str = Field(description="Model name sent to the endpoint.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable that holds the API key (never the key itself)."
    )
    allow_insecure_http: bool = Field(
        False, description="Allow sending the key over plain http to a host other than this machine (else an error)."
    )
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature of the teacher.")
    max_tokens: int = Field(800, ge=16, description="Most tokens the teacher may write per document.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for one teacher answer.")
    concurrency: int = Field(4, ge=1, le=64, description="Requests sent to the teacher at once.")


class SynthConfig(Section):
    method: Literal["template", "teacher"] = Field(
        "template",
        description="template: questions from names, headings and definitions in the documents; "
        "teacher: ask an OpenAI-compatible model (set synth.teacher).",
    )
    max_pairs_per_document: int = Field(3, ge=1, le=50, description="Most Q/A pairs made from one document.")
    max_documents: int | None = Field(None, ge=1, description="Make pairs from at most this many documents.")
    system_prompt: str | None = Field(
        None, description="System message put first in every conversation (null = none)."
    )
    max_heldout_overlap: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Drop a training pair when this share of its answer's 8-grams appear in validation/test "
        "documents (keeps evaluation clean).",
    )
    teacher: TeacherConfig | None = Field(None, description="The teacher model, for method: teacher.")


class ClassificationConfig(Section):
    label_from: Literal["field", "folder", "source"] = Field(
        "field",
        description="field: the label field of JSONL/CSV records; folder: the document's parent folder name; "
        "source: the source it came from (file type, or docstring/topic for python-docs).",
    )


class NerConfig(Section):
    gazetteer: dict[str, list[str]] = Field(
        {}, description="Entity label -> terms; every occurrence of a term is tagged B-/I-label."
    )
    builtin_gazetteer: Literal["none", "python"] = Field(
        "none", description="python: tag stdlib module names (MODULE) and builtins (BUILTIN)."
    )
    max_tokens: int = Field(128, ge=8, description="Documents are cut into examples of at most this many words.")


DataFormat = Literal["text", "chat", "classification", "ner"]


class DataConfig(Section):
    sources: list[str] = Field(
        [],
        description="Files or folders (relative to this file) of .txt .md .rst .html .jsonl .parquet .csv .py .pdf, "
        "and built-in sources: python-docs.",
    )
    python_docs: PythonDocsSource = Field(default_factory=PythonDocsSource, description="The python-docs source.")
    text_fields: list[str] = Field(
        ["text", "content", "body"], description="JSONL/CSV fields read as the document text (first present wins)."
    )
    label_field: str = Field("label", description="JSONL/CSV field read as the classification label.")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Cleaning.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Deduplication.")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Quality filters.")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="PII scrubbing.")
    code: CodeConfig = Field(
        default_factory=CodeConfig, description="Code curation: licence headers, function dedup, decontamination."
    )
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/validation/test split by document.")
    formats: list[DataFormat] = Field(["text", "chat"], description="Outputs to write: text, chat, classification, ner.")
    synth: SynthConfig = Field(default_factory=SynthConfig, description="Synthetic instruction data (the chat output).")
    classification: ClassificationConfig = Field(
        default_factory=ClassificationConfig, description="The classification output."
    )
    ner: NerConfig = Field(default_factory=NerConfig, description="The NER output.")
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/data).")
    engine: Literal["local", "ray"] = Field(
        "local",
        description="local: this process; ray: deduplication sharded over a Ray cluster (the same kept documents; "
        "`pip install slmforge[scale]`).",
    )
    ray_workers: int = Field(2, ge=1, description="engine ray: CPUs of the local Ray cluster started for the stage.")
    ray_address: str | None = Field(
        None, description="engine ray: a running Ray cluster to join (e.g. ray://head:10001; null = start one)."
    )

    def fingerprint_config(self) -> dict[str, Any]:
        """The section as the data stage's fingerprint covers it: keys added later are left out while they
        hold their defaults, so the datasets (and every model after them) of existing projects stay current.
        Where the work ran (engine, ray_*) never counts: the kept documents are the same."""
        at_default = {"code"} if self.code == CodeConfig() else set()
        at_default |= {"engine", "ray_workers", "ray_address"}
        return self.model_dump(mode="json", exclude=at_default)


# --------------------------------------------------------------------------- tokenizer


class SpecialTokens(Section):
    bos: str = Field("<|bos|>", description="Beginning of a sequence.")
    eos: str = Field("<|eos|>", description="End of a document.")
    pad: str = Field("<|pad|>", description="Padding.")
    chat_start: str = Field("<|im_start|>", description="Opens a chat message (ChatML role marker).")
    chat_end: str = Field("<|im_end|>", description="Closes a chat message; ends an assistant turn.")


class TokenizerConfig(Section):
    method: Literal["train", "extend"] = Field(
        "train", description="train: a new byte-level BPE; extend: add domain terms to the tokenizer in `base`."
    )
    base: str | None = Field(None, description="For extend: a Hugging Face tokenizer folder (or a hub id when online).")
    vocab_size: int = Field(8192, ge=300, le=1_000_000, description="Final vocabulary size, domain terms included.")
    min_frequency: int = Field(2, ge=1, description="A merge must occur at least this often in the training text.")
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens, description="Special tokens.")
    domain_terms: list[str] = Field([], description="Words that must each be a single token.")
    domain_terms_top_n: int = Field(
        0, ge=0, description="Also make single tokens of the N most frequent words the BPE would otherwise split."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template saved with the tokenizer (null = the built-in ChatML template)."
    )
    max_training_chars: int | None = Field(
        None, ge=1000, description="Train on at most this many characters of the training split (null = all)."
    )
    data: str | None = Field(None, description="The data artifact to train on (null = <project.out_dir>/data).")
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/tokenizer).")


# --------------------------------------------------------------------------- model


class ModelConfig(Section):
    preset: Literal["nano", "micro", "small", "base", "custom"] = Field(
        "micro",
        description="Llama-architecture size: nano ~1M, micro ~5M, small ~25M, base ~100M parameters "
        "(with an 8k vocabulary); custom = the keys below.",
    )
    hidden_size: int | None = Field(None, ge=8, description="Width of the residual stream (null = preset).")
    num_layers: int | None = Field(None, ge=1, description="Transformer blocks (null = preset).")
    num_heads: int | None = Field(None, ge=1, description="Attention heads (null = preset).")
    num_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads; fewer than num_heads = grouped-query attention (null = preset)."
    )
    intermediate_size: int | None = Field(None, ge=8, description="MLP width (null = preset).")
    activation: Literal["silu", "gelu", "relu"] = Field("silu", description="MLP activation (SwiGLU with silu).")
    norm: Literal["rmsnorm", "layernorm"] = Field("rmsnorm", description="Normalisation layers.")
    rope_theta: float = Field(10_000.0, gt=0, description="Rotary embedding base.")
    max_position_embeddings: int = Field(1024, ge=16, description="Longest sequence the model is built for.")
    tie_embeddings: bool = Field(True, description="Share the input embedding and output projection.")
    base: str | None = Field(
        None,
        description="Start from an existing causal LM instead of a fresh one: a local Hugging Face folder, "
        "a hub id (online only), or a .gguf file (architectures transformers can read). Training then continues "
        "its pretraining with its own tokenizer (no tokenizer stage needed), and the architecture keys above "
        "are ignored.",
    )
    trim_vocab: bool = Field(
        False, description="With base: first keep only the tokens the training text uses (as `slmforge model "
        "trim-vocab`): a smaller, faster model that splits the domain text exactly as the base did.",
    )


# --------------------------------------------------------------------------- training


class LoopConfig(Section):
    """Hyperparameters of the one training loop (pretraining, SFT and encoder heads share it)."""

    seq_len: int = Field(256, ge=8, description="Tokens per training sequence.")
    batch_size: int = Field(16, ge=1, description="Sequences per optimizer micro-step.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    max_minutes: float | None = Field(
        None, gt=0, description="Stop (and save) after this many minutes of training, even before max_steps; "
        "the cosine decay then follows the clock, so the run ends annealed."
    )
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at lr * this.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (null = off).")
    eval_every: int = Field(100, ge=1, description="Validation loss every N steps.")
    eval_batches: int = Field(20, ge=1, description="Validation batches per evaluation.")
    save_every: int = Field(200, ge=1, description="Checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the last K checkpoints.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the CPU/GPU supports it, else fp32."
    )
    compile: bool = Field(False, description="torch.compile the model (~30 s once; faster steps after).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU.")


class DistributedConfig(Section):
    """How a run spreads over processes (``slmforge train --nproc N`` or ``--launcher accelerate``). It
    changes where the work happens, not what is learned: it is left out of fingerprints and resume keys."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="ddp: every process holds the whole model (torch DDP); fsdp: parameters, gradients and "
        "optimizer state sharded over the processes (torch FSDP2 fully_shard); deepspeed: ZeRO through "
        "accelerate (CUDA, `pip install deepspeed`; needs --launcher accelerate).",
    )
    num_processes: int = Field(
        2, ge=1, description="Processes per machine under --launcher accelerate when --nproc is not given."
    )
    num_machines: int = Field(1, ge=1, description="Machines taking part (accelerate's num_machines).")
    machine_rank: int = Field(0, ge=0, description="This machine's rank among num_machines (0 = the main one).")
    main_process_ip: str | None = Field(None, description="The main machine's address when num_machines > 1.")
    main_process_port: int | None = Field(
        None, ge=1, le=65535, description="The rendezvous port (null = a free port on this machine)."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="auto: follow the section's precision key; bf16; fp16 (deepspeed only: it scales the loss); "
        "no. Written into the accelerate (and DeepSpeed) config.",
    )
    zero_stage: Literal[1, 2, 3] = Field(
        2, description="deepspeed: ZeRO stage (1 optimizer state, 2 + gradients, 3 + parameters sharded)."
    )
    offload: bool = Field(
        False,
        description="Offload to CPU memory: deepspeed the optimizer state (and parameters at ZeRO-3), fsdp the "
        "parameters (FSDP2 CPUOffloadPolicy).",
    )


class TrainConfig(LoopConfig):
    data: str | None = Field(None, description="Data artifact (null = <project.out_dir>/data).")
    tokenizer: str | None = Field(None, description="Tokenizer artifact (null = <project.out_dir>/tokenizer).")
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/train).")
    fim_rate: float = Field(
        0.0, ge=0, le=1, description="Code models: share of the documents in each training window rearranged as "
        "fill-in-the-middle examples (prefix, suffix, then middle; sentinel tokens added when the tokenizer lacks "
        "them). 0 = off.",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Several processes or machines: strategy and launcher."
    )

    def fingerprint_config(self) -> dict[str, Any]:
        """The section as the train stage's fingerprint covers it: keys added later are left out while they
        are off, so the models of existing projects stay current; how the run was spread (distributed) never
        counts."""
        return self.model_dump(mode="json", exclude={"distributed"} | (set() if self.fim_rate else {"fim_rate"}))


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters.",
    )


class SftConfig(LoopConfig):
    method: Literal["full", "lora", "qlora"] = Field(
        "full", description="full: every weight; lora: adapters only (peft); qlora: 4-bit base + adapters (CUDA)."
    )
    base: str | None = Field(
        None, description="Model to fine-tune: a model folder, hub id or .gguf (null = the train stage's output)."
    )
    tokenizer: str | None = Field(
        None,
        description="A tokenizer to use instead of the base model's, e.g. one extended with domain terms "
        "(tokenizer.method: extend); the model's embeddings grow to fit, new rows at the mean of the old.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (method lora/qlora).")
    adapter_name: str = Field("default", description="Name of the adapter; several can sit over one base.")
    data: str | None = Field(None, description="Data artifact with chat/ output (null = <project.out_dir>/data).")
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/sft).")
    seq_len: int = Field(512, ge=8, description="Longest conversation in tokens (longer ones are cut).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    max_steps: int = Field(300, ge=1, description="Optimizer steps.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only).")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Several processes or machines: strategy and launcher."
    )

    def fingerprint_config(self) -> dict[str, Any]:
        """The section as the sft stage's fingerprint covers it: how the run was spread never counts."""
        return self.model_dump(mode="json", exclude={"distributed"})


class EncoderConfig(LoopConfig):
    task: Literal["classification", "ner"] = Field("classification", description="Which head to train.")
    base: str | None = Field(
        None, description="A Hugging Face encoder folder to fine-tune (null = a fresh small BERT on our tokenizer)."
    )
    hidden_size: int = Field(128, ge=8, description="Width of a fresh encoder.")
    num_layers: int = Field(2, ge=1, description="Layers of a fresh encoder.")
    num_heads: int = Field(4, ge=1, description="Heads of a fresh encoder.")
    data: str | None = Field(None, description="Data artifact (null = <project.out_dir>/data).")
    tokenizer: str | None = Field(None, description="Tokenizer for a fresh encoder (null = <project.out_dir>/tokenizer).")
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/encoder-<task>).")
    seq_len: int = Field(128, ge=8, description="Tokens per example (longer ones are cut).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    eval_every: int = Field(50, ge=1, description="Validation every N steps.")


# --------------------------------------------------------------------------- generation


class SamplingProfile(Section):
    max_new_tokens: int = Field(128, ge=1, description="Most tokens to generate.")
    temperature: float = Field(0.0, ge=0, le=5, description="0 = greedy; higher = more random.")
    top_k: int | None = Field(None, ge=1, description="Sample from the k most likely tokens (null = off).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling: smallest set with this mass.")
    num_beams: int = Field(1, ge=1, description="Beam search width (1 = off; greedy beams when temperature is 0).")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages repeating tokens.")
    stop: list[str] = Field([], description="Stop when any of these strings appears (not included in the output).")
    seed: int | None = Field(None, description="Seed for sampling (null = random).")


def _default_profiles() -> dict[str, SamplingProfile]:
    return {
        "factual": SamplingProfile(temperature=0.0, repetition_penalty=1.1),
        "balanced": SamplingProfile(temperature=0.7, top_p=0.9, repetition_penalty=1.1),
        "creative": SamplingProfile(temperature=1.0, top_p=0.95, top_k=100),
    }


class EndpointConfig(Section):
    base_url: str = Field(description="The endpoint's API root as written in URL#MODEL references, e.g. "
                          "https://api.example.com/v1.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding this endpoint's key (never the key itself); null = no key "
        "(OPENAI_API_KEY for https://api.openai.com)."
    )
    allow_insecure_http: bool = Field(
        False, description="Allow sending the key over plain http to a host other than this machine (else an error)."
    )


class GenerateConfig(Section):
    endpoints: list[EndpointConfig] = Field(
        [], description="HTTP endpoints used as models (URL#MODEL in generate, chat, eval, serve): the key each one "
        "gets. A key goes only to its own endpoint; unlisted endpoints get none (OpenAI's API: OPENAI_API_KEY)."
    )
    profiles: dict[str, SamplingProfile] = Field(
        default_factory=_default_profiles,
        description="Named sampling profiles, saved into each model's generation_config.json; pick with --profile.",
    )
    default_profile: str = Field("factual", description="Profile used when none is named.")


# --------------------------------------------------------------------------- evaluation


class EvalConfig(Section):
    suites: list[str] = Field(
        ["python-docs-qa", "perplexity"],
        description="Suites to run: built-in names (python-docs-qa, humaneval, arithmetic, gsm8k, sentiment), "
        "paths to suite YAML files, or perplexity (held-out text).",
    )
    gates: list[str] = Field(
        [], description="Rules the model must meet, e.g. 'python-docs-qa.token_f1 >= 0.2', 'ppl_delta_pct <= 1.0'."
    )
    regression_vs: str | None = Field(
        None, description="Baseline for *_delta gates: parent (the model this one was made from) or a model path."
    )
    batch_size: int = Field(8, ge=1, description="Prompts generated together.")
    limit: int | None = Field(None, ge=1, description="Evaluate at most this many items per suite (null = the suite's own).")
    allow_weak_sandbox: bool = Field(
        False, description="Run code suites' generated programs even where the kernel refuses the sandbox's "
        "namespaces (read-only filesystem, network, pid): only an audit hook then stands in, and the results "
        "and report say the sandbox was weak. Off: such a machine refuses to run generated code."
    )
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/eval).")


# --------------------------------------------------------------------------- compression and export


class QuantizeConfig(Section):
    method: Literal["int8_weight_only", "int8_dynamic", "int4_weight_only", "smoothquant", "ternary"] = Field(
        "int8_weight_only",
        description="int8_weight_only / int8_dynamic (PyTorch), int4_weight_only (group-wise), smoothquant (W8A8, "
        "calibrated), ternary (BitNet b1.58-style quantization-aware fine-tune; experimental).",
    )
    group_size: int = Field(64, ge=8, description="Weights per scale for int4 (and ternary).")
    embeddings: Literal["auto", "int8_weight_only", "int4_weight_only", "none"] = Field(
        "auto",
        description="The token embedding and the output head (one table when tied): auto = int8 rows for the int8 "
        "methods and smoothquant, int4 groups for int4_weight_only, float for ternary; or a weight-only format; "
        "none = keep them float (as folders written before this setting).",
    )
    smoothquant_alpha: float = Field(0.5, ge=0, le=1, description="SmoothQuant migration strength.")
    calibration_samples: int = Field(32, ge=1, description="Domain sequences used to calibrate activations.")
    ternary_steps: int = Field(100, ge=1, description="Fine-tuning steps of the ternary method.")
    plan: dict[str, str] = Field(
        {}, description="Mixed precision: module name (or prefix) -> method or 'none', e.g. from `slmforge quantize --sensitivity`."
    )
    max_ppl_increase_pct: float = Field(
        2.0, ge=0, description="Gate: the quantized model passes only if its perplexity rises by at most this much."
    )
    model: str | None = Field(None, description="Model to quantize (null = the sft output, else train).")
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/quantize-<method>).")


class OnnxExportConfig(Section):
    precision: Literal["fp32", "int8", "int4"] = Field("fp32", description="Weights of the exported graph.")
    optimization: Literal["disabled", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level baked into the saved model."
    )
    providers: list[str] = Field(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        description="Execution providers in order of preference; the first available one runs.",
    )


class GgufExportConfig(Section):
    type: Literal["F32", "F16", "Q8_0", "Q4_0"] = Field("Q8_0", description="Tensor type of the GGUF file.")
    verify: bool = Field(
        True, description="Load the written file in llama.cpp and record its tokenization and greedy parity with "
        "the source model in the manifest (a file llama.cpp cannot load fails the export). Seconds on small "
        "models; turn off for big ones if it is too slow."
    )


class OllamaExportConfig(Section):
    system: str | None = Field(None, description="SYSTEM message of the Modelfile.")
    profile: str = Field("factual", description="Generation profile written as PARAMETER lines.")


class ExportConfig(Section):
    model: str | None = Field(None, description="Model to export (null = the sft output, else train).")
    onnx: OnnxExportConfig = Field(default_factory=OnnxExportConfig, description="`slmforge export onnx`.")
    gguf: GgufExportConfig = Field(default_factory=GgufExportConfig, description="`slmforge export gguf`.")
    ollama: OllamaExportConfig = Field(default_factory=OllamaExportConfig, description="`slmforge export ollama`.")
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/export-<format>).")


# --------------------------------------------------------------------------- report


class ReportConfig(Section):
    model: str | None = Field(
        None, description="Model to report on (null = the sft output if it exists, else the train output)."
    )
    heldout_split: Literal["val", "test"] = Field("test", description="Held-out split for perplexity.")
    questions: list[str] = Field(
        [], description="Questions to answer in the report, besides a few from the held-out chat split."
    )
    heldout_questions: int = Field(3, ge=0, description="Questions taken from the held-out chat split.")
    profiles: list[str] = Field(["factual", "creative"], description="Generation profiles to answer with.")
    max_new_tokens: int = Field(80, ge=1, description="Length cap of each sample answer.")
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/report).")


# --------------------------------------------------------------------------- knowledge (RAG)


class RagConfig(Section):
    sources: list[str] | None = Field(
        None, description="Files or folders to index, read like data.sources (null = data.sources)."
    )
    chunker: Literal["fixed", "recursive", "sentence", "semantic"] = Field(
        "recursive",
        description="fixed: tokens with overlap; recursive: headings, paragraphs, code blocks kept whole; "
        "sentence: whole sentences; semantic: split where neighbouring sentences' embeddings drift apart.",
    )
    chunk_tokens: int = Field(200, ge=8, description="Largest chunk, in the embedder's tokens.")
    overlap_tokens: int = Field(40, ge=0, description="Tokens shared by neighbouring fixed-size chunks.")
    semantic_percentile: float = Field(
        25.0, gt=0, lt=100, description="semantic: split where neighbour similarity is below this percentile."
    )
    embedder: str | None = Field(
        None,
        description="A sentence-transformers folder, or an OpenAI-compatible base URL (http...) with "
        "embedder_model (null = the offline all-MiniLM-L6-v2 of the rag extra).",
    )
    embedder_model: str | None = Field(None, description="The model name to ask an /embeddings endpoint for.")
    store: Literal["lancedb", "qdrant", "faiss", "chroma"] = Field(
        "lancedb", description="The vector store: lancedb (embedded, default), qdrant, faiss or chroma."
    )
    store_url: str | None = Field(None, description="qdrant: a server URL (null = its local mode in the index).")
    mode: Literal["dense", "bm25", "hybrid"] = Field(
        "hybrid", description="Retrieval: dense vectors, BM25 keywords, or both fused by reciprocal rank."
    )
    top_k: int = Field(5, ge=1, description="Chunks given to the model as sources.")
    mmr: float | None = Field(
        None, ge=0, le=1, description="MMR trade-off (1 = relevance only); null = no diversity step."
    )
    rerank: Literal["none", "cross-encoder", "generator"] = Field(
        "none", description="Rerank candidates with a cross-encoder folder (reranker) or the model's log-likelihood."
    )
    reranker: str | None = Field(None, description="rerank: cross-encoder: a sentence-transformers CrossEncoder folder.")
    min_score: float = Field(
        0.25, ge=-1, le=1,
        description="Dense cosine similarity below which a chunk is not relevant; with none relevant the "
        "answer is 'not in the documents'.",
    )
    max_new_tokens: int = Field(200, ge=1, description="Length cap of an answer.")
    out: str | None = Field(None, description="Index folder (null = <project.out_dir>/rag).")


class MemoryConfig(Section):
    path: str | None = Field(None, description="The memory file (SQLite; null = <project.out_dir>/memory/memory.sqlite).")
    embedder: str | None = Field(
        None, description="A sentence-transformers folder, or hashing-DIM (no model) (null = the offline all-MiniLM-L6-v2)."
    )
    recall_k: int = Field(5, ge=1, description="Memories given to the model per request.")
    extract: bool = Field(True, description="In the server: store the facts and preferences users state.")
    window_tokens: int = Field(
        1024, ge=16, description="In the server, for a request naming a session: its newest turns kept whole up to "
        "this many tokens; older ones are summarised."
    )


class SpecialistConfig(Section):
    description: str = Field(description="What it is for (the router reads this to choose).")
    tools: list[str] = Field([], description="Its built-in tools (as agent.tools).")
    model: str | None = Field(None, description="Its model (folder, .gguf or URL#MODEL; null = the run's model).")
    adapter: str | None = Field(None, description="A LoRA adapter folder over its model (torch engine).")


class AgentConfig(Section):
    mode: Literal["native", "react"] = Field(
        "native", description="native: every turn a schema-constrained tool call (the answer too); react: "
        "thought + action JSON, observations as user turns."
    )
    tools: list[str] = Field(
        ["calculator"], description="Built-in tools: calculator, python (sandbox), files (workspace), sql "
        "(database), search (rag index), http (allow_hosts)."
    )
    workspace: str = Field("workspace", description="The folder the files tool is confined to.")
    database: str | None = Field(None, description="The SQLite file the sql tool reads (read-only).")
    knowledge: str | None = Field(None, description="The rag index the search tool searches (null = rag.out).")
    allow_hosts: list[str] = Field([], description="Hosts the http tool may fetch from (empty: no http tool).")
    max_steps: int = Field(8, ge=1, description="Model turns before the run stops without an answer.")
    max_tokens: int = Field(4096, ge=1, description="Generated tokens, all turns together.")
    max_seconds: float = Field(300.0, gt=0, description="Wall clock of a run, tools included.")
    max_new_tokens: int = Field(256, ge=1, description="Tokens per turn.")
    specialists: dict[str, SpecialistConfig] = Field(
        {}, description="`slmforge agent run --route`: name -> a specialist agent with its own tools and model or "
        "adapter; the run's model routes each task to one."
    )


class ReasonConfig(Section):
    strategy: str = Field(
        "auto", description="The default strategy (direct, cot, sc, bon, tot, refine, adaptive, auto); a "
        "request's `strategy` field or a model-name prefix such as sc8- overrides it."
    )
    n: int = Field(5, ge=1, description="Samples for self-consistency and best-of-N.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the samples.")
    max_tokens: int = Field(4096, ge=1, description="Generated tokens per request, all internal calls together.")
    max_seconds: float = Field(120.0, gt=0, description="Wall clock per request.")
    extract: str = Field(
        "auto", description="How an answer is read from a reply for voting: auto (the last number, else the first "
        "line) or an eval extraction method (last_number, first_line, regex...)."
    )


class RoiConfig(Section):
    monthly_input_tokens: float = Field(200e6, ge=0, description="Prompt tokens a month today.")
    monthly_output_tokens: float = Field(50e6, ge=0, description="Generated tokens a month today.")
    growth_per_month: float = Field(0.05, ge=-0.5, description="Volume growth a month, compounded.")
    tokens_per_s: float | None = Field(
        None, gt=0, description="Output tokens/s one machine serves (null = from `slmforge roi --bench FILE`, the "
        "JSON of `slmforge bench serve --json`)."
    )
    utilization: float = Field(0.5, gt=0, le=1, description="Share of a machine's capacity usable (traffic is not flat).")
    prefill_speedup: float = Field(10.0, gt=0, description="A prompt token costs 1/this of an output token's time.")
    hardware_usd: float = Field(2000.0, ge=0, description="One serving machine, bought.")
    hardware_life_months: int = Field(36, ge=1, description="When a machine is replaced.")
    power_watts: float = Field(150.0, ge=0, description="One machine under load.")
    usd_per_kwh: float = Field(0.15, ge=0, description="Electricity price.")
    ops_usd_per_month: float = Field(100.0, ge=0, description="Operations and hosting a month.")
    years: int = Field(5, ge=1, le=10, description="Horizon of the projection.")


# --------------------------------------------------------------------------- serving


class VllmConfig(Section):
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    max_model_len: int | None = Field(None, ge=16, description="Longest sequence vLLM plans for (null = the model's).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs to shard the model over.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field("auto", description="Weights and activations.")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences in vLLM's running batch (null = vLLM's).")
    extra_args: list[str] = Field([], description="More `vllm serve` arguments, passed as they are.")
    startup_timeout_s: float = Field(600.0, gt=0, description="Seconds to wait for `vllm serve` to become ready.")


class ServeModelConfig(Section):
    name: str = Field(description="The name clients send as `model`.")
    path: str | None = Field(
        None, description="Model folder, .gguf file, ONNX export folder, sentence-transformers folder or hub id "
        "(not used by engine openai)."
    )
    engine: Literal["auto", "torch", "onnx", "llama.cpp", "embedding", "openai", "vllm"] = Field(
        "auto", description="auto (from the path: .gguf -> llama.cpp, ONNX folder -> onnx, else torch), embedding "
        "(sentence-transformers, for /v1/embeddings), openai (proxy to base_url), vllm (a managed `vllm serve`)."
    )
    knowledge: str | None = Field(
        None, description="Answer every request to this name from this knowledge base (a serve.knowledge name), "
        "with citations: unmodified OpenAI clients get grounded answers. Another entry may serve the same path "
        "without it (the model loads once).",
    )
    adapters: dict[str, str] = Field(
        {}, description="LoRA adapters over this model: served name -> adapter folder (torch engine; they share "
        "the base weights in memory and batch together)."
    )
    profile: str | None = Field(
        None, description="Sampling profile for requests to this model (from the model folder or generate.profiles; "
        "request fields override it). null = plain request defaults."
    )
    base_url: str | None = Field(None, description="engine openai: the upstream endpoint, e.g. https://api.example.com/v1.")
    upstream_model: str | None = Field(None, description="engine openai: the model name sent upstream (null = name).")
    api_key_env: str | None = Field(None, description="engine openai: environment variable holding the upstream key.")
    allow_insecure_http: bool = Field(
        False, description="engine openai: allow sending the key over plain http to a host other than this machine."
    )
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="engine vllm: how `vllm serve` is started.")


class ServeCostConfig(Section):
    hardware_usd_per_hour: float = Field(
        0.10, ge=0, description="What the serving machine costs per hour (cloud price or amortised hardware + power)."
    )
    api_usd_per_1m_input_tokens: float = Field(0.15, ge=0, description="Price of the API this replaces, per 1M prompt tokens.")
    api_usd_per_1m_output_tokens: float = Field(0.60, ge=0, description="Price of the API this replaces, per 1M output tokens.")
    api_name: str = Field("gpt-4o-mini", description="Name of the API in cost reports.")


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 for every interface; needs api_keys).")
    shared_state: str | None = Field(
        None, description="A Redis URL (redis://host:6379/0): replicas given the same one share keys' limits, "
        "quotas and usage (pip install slmforge[scale]); null keeps them in this process."
    )
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    models: list[ServeModelConfig] = Field(
        [], description="Models to serve (empty = the project's sft output, else its train output); each "
        "{name, path, engine, adapters, profile, base_url, upstream_model, api_key_env, vllm}, e.g. "
        "[{name: docs-slm, path: runs/sft, adapters: {sql: runs/sft-sql}}]."
    )
    api_keys: str | None = Field(None, description="Keys file from `slmforge keys add` (null = no authentication, loopback only).")
    public_metrics: bool = Field(
        False, description="With api_keys: serve /metrics, /openapi.json, /docs and /redoc without a key (by default "
        "they need one; /health and /ready are always open)."
    )
    usage_file: str | None = Field(None, description="Where the usage per key is written (JSON) on shutdown.")
    max_batch_size: int = Field(
        16, ge=1, le=256, description="Continuous batching: most sequences decoded together per torch or ONNX "
        "model (1 = one request at a time); GGUF models get this many llama.cpp slots."
    )
    max_prompt_chars: int | None = Field(None, ge=1, description="Refuse longer prompts with a 413 (null = no limit).")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Refuse prompts of more tokens with a 413 (null = context).")
    request_timeout_s: float | None = Field(None, gt=0, description="Seconds of generation per request before a 504.")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="On SIGTERM/Ctrl-C, how long in-flight requests may finish.")
    memory: bool = Field(
        False, description="Per-user memory (the memory section): each chat request gets what the server remembers "
        "about its API key's user, and what they state is remembered.",
    )
    knowledge: dict[str, str] = Field(
        {}, description="Knowledge bases a chat request may name ({\"knowledge\": {\"base\": NAME}}): NAME -> a "
        "`slmforge rag index` folder, searched with rag.embedder and rag's retrieval settings.",
    )
    cost: ServeCostConfig = Field(default_factory=ServeCostConfig, description="Prices for `slmforge bench serve`.")


# --------------------------------------------------------------------------- biomolecules (smiles, protein)


class BioDataConfig(Section):
    sources: list[str] = Field(
        ["rdkit-nci"],
        description="Molecules: built-in rdkit-nci (4,999 NCI SMILES in the rdkit wheel), rdkit-wehi (10,000), "
        "rdkit-chembl-activity, or .smi/.csv/.sdf files; proteins: .fasta/.fa/.faa files or folders of them.",
    )
    max_records: int | None = Field(None, ge=1, description="Keep at most this many molecules or sequences (null = all).")
    max_length: int = Field(
        120, ge=8, description="Drop SMILES of more tokens than this; proteins longer than this are cut into pieces."
    )
    augment: int = Field(
        1, ge=1, le=50,
        description="SMILES written per training molecule: the canonical one plus augment - 1 randomized ones "
        "(RDKit, seeded), so a small set teaches the grammar rather than the strings (1 = canonical only).",
    )
    split: SplitConfig = Field(
        default_factory=SplitConfig,
        description="Held-out shares: molecules split by Bemis-Murcko scaffold (no scaffold in two splits), "
        "proteins by sequence.",
    )
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/bio-data).")


class BioSampleConfig(Section):
    model: str | None = Field(None, description="The SMILES model to sample (null = the train stage's output).")
    n: int = Field(1000, ge=1, description="Molecules to sample.")
    temperature: float = Field(1.0, gt=0, le=5, description="Sampling temperature.")
    top_k: int | None = Field(None, ge=1, description="Sample from the k most likely tokens (null = off).")
    max_new_tokens: int = Field(120, ge=4, description="Longest SMILES sampled, in tokens.")
    batch_size: int = Field(250, ge=1, description="Molecules sampled together.")
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/bio-sample).")


class BioEncoderShape(LoopConfig):
    """A small ESM-style encoder (rotary positions) trained on the one loop."""

    hidden_size: int = Field(128, ge=8, description="Width of a fresh encoder.")
    num_layers: int = Field(4, ge=1, description="Layers of a fresh encoder.")
    num_heads: int = Field(4, ge=1, description="Attention heads of a fresh encoder.")
    seq_len: int = Field(128, ge=8, description="Tokens per example (longer ones are cut).")
    batch_size: int = Field(32, ge=1, description="Examples per optimizer micro-step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    max_steps: int = Field(400, ge=1, description="Optimizer steps.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    eval_every: int = Field(100, ge=1, description="Validation every N steps.")


class BioMlmConfig(BioEncoderShape):
    mask_rate: float = Field(0.15, gt=0, lt=1, description="Share of tokens masked (BERT's 80/10/10 rule).")
    masks_per_sequence: int = Field(
        4, ge=1, description="Different seeded maskings of each training sequence (dynamic masking, resumable)."
    )
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/bio-mlm).")


class BioPropertyConfig(BioEncoderShape):
    source: str = Field(
        "rdkit-chembl-activity",
        description="Molecules with a measured value: rdkit-chembl-activity (1,017 pIC50s in the rdkit wheel), "
        "rdkit-tpsa (computed TPSA), or a .csv (smiles + value columns) or .sdf (value field) file.",
    )
    value_field: str | None = Field(
        None, description="The CSV column or SDF field holding the value (null = the source's own, else the first numeric one)."
    )
    base: str | None = Field(
        None, description="Start the encoder from a bio-mlm folder (a SMILES MLM) instead of fresh weights."
    )
    ridge_alphas: list[float] = Field(
        [0.1, 1.0, 10.0, 100.0], description="Ridge strengths of the fingerprint baseline (picked on validation)."
    )
    fingerprint_bits: int = Field(2048, ge=64, description="Morgan fingerprint length (radius 2).")
    out: str | None = Field(None, description="Output folder (null = <project.out_dir>/bio-property).")


class BioConfig(Section):
    kind: Literal["smiles", "protein"] = Field(
        "smiles", description="smiles: molecules (SMILES GPT, property head); protein: sequences (masked protein LM)."
    )
    data: BioDataConfig = Field(default_factory=BioDataConfig, description="`slmforge bio data`.")
    tokenizer_out: str | None = Field(
        None, description="`slmforge bio tokenizer` output folder (null = <project.out_dir>/bio-tokenizer)."
    )
    sample: BioSampleConfig = Field(default_factory=BioSampleConfig, description="`slmforge bio sample`.")
    mlm: BioMlmConfig = Field(default_factory=BioMlmConfig, description="`slmforge bio mlm`: a masked LM.")
    property: BioPropertyConfig = Field(
        default_factory=BioPropertyConfig, description="`slmforge bio property`: a regression head vs baselines."
    )

# --------------------------------------------------------------------------- the whole file


class ProjectConfig(Section):
    """The whole project file. Paths in it are relative to the file's folder."""

    project: ProjectSection = Field(default_factory=ProjectSection, description="The project.")
    data: DataConfig = Field(default_factory=DataConfig, description="`slmforge data`: sources -> clean datasets.")
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig, description="`slmforge tokenizer train`: a domain BPE tokenizer."
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="`slmforge train` and `slmforge model estimate`: the architecture."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="`slmforge train`: pretraining from scratch.")
    sft: SftConfig = Field(
        default_factory=SftConfig, description="`slmforge train sft`: supervised fine-tuning on chat data."
    )
    encoder: EncoderConfig = Field(
        default_factory=EncoderConfig, description="`slmforge train encoder`: classification / NER heads."
    )
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="`slmforge generate|chat`: sampling.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="`slmforge eval`: suites, gates, comparisons.")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="`slmforge quantize`: compression.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="`slmforge export onnx|gguf|ollama`.")
    report: ReportConfig = Field(
        default_factory=ReportConfig, description="`slmforge report`: perplexity, samples and plots of a model."
    )
    rag: RagConfig = Field(default_factory=RagConfig, description="`slmforge rag`: index documents, cited answers.")
    memory: MemoryConfig = Field(default_factory=MemoryConfig, description="`slmforge memory`: per-user memory.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="`slmforge agent`: tools, loop, budgets.")
    reason: ReasonConfig = Field(default_factory=ReasonConfig, description="`slmforge reason` and `slmforge proxy`.")
    roi: RoiConfig = Field(default_factory=RoiConfig, description="`slmforge roi`: owned vs API (API prices: serve.cost).")
    bio: BioConfig = Field(
        default_factory=BioConfig, description="`slmforge bio`: the smiles and protein recipes' stages."
    )
    serve: ServeConfig = Field(
        default_factory=ServeConfig, description="`slmforge serve` and `slmforge bench serve`: the OpenAI-compatible server."
    )

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr("defaults")

    @property
    def base_dir(self) -> Path:
        """The folder relative paths in the config are resolved against."""
        return self._base_dir

    @property
    def source(self) -> str:
        """Where the config came from (file path, or 'defaults')."""
        return self._source

    def rooted_at(self, base_dir: str | Path) -> ProjectConfig:
        """A copy whose relative paths resolve against ``base_dir``, as if its project file were there.

        ``load_config`` roots a config at its file's folder; a config built in code (a test, a
        benchmark script) is rooted at the working directory until it is given a folder this way.
        """
        cfg = self.model_copy(deep=True)
        cfg._base_dir = Path(base_dir)
        return cfg

    def resolve(self, path: str | Path) -> Path:
        """Resolve a path from the config against the project file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    def stage_dir(self, stage: str, override: str | None = None) -> Path:
        """The artifact folder of a stage: its ``out`` key, else ``<project.out_dir>/<stage>``."""
        if override:
            return self.resolve(override)
        return self.resolve(self.project.out_dir) / stage


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> ProjectConfig:
    """Load the project file, apply ``--set`` overrides and validate.

    Args:
        path: The project file. ``None`` uses ``./slmforge.yaml`` when it exists, else the defaults.
        overrides: ``"section.key=value"`` strings; values are parsed as YAML (``3``, ``true``, ``[a, b]``).

    Returns:
        The validated config, with paths resolved against the file's folder.

    Raises:
        ConfigError: The file is missing or malformed, or a key or value is invalid. The message
            names the key path, the line in the file, the bad value and the allowed values.
    """
    text = ""
    source = "defaults"
    base_dir = Path.cwd()
    if path is None and Path(PROJECT_FILE).is_file():
        path = PROJECT_FILE
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(
                f"Project file {file} not found. Create one with `slmforge init {file.parent or '.'}` "
                "or pass the right path with -c."
            )
        text = file.read_text(encoding="utf-8")
        source = str(file)
        base_dir = file.resolve().parent
    raw = _parse_yaml(text, source)
    from_set = _apply_overrides(raw, overrides)
    try:
        cfg = ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, text, source, from_set)) from None
    cfg._base_dir = base_dir
    cfg._source = source
    return cfg


def with_overrides(cfg: ProjectConfig, overrides: typing.Sequence[str]) -> ProjectConfig:
    """A copy of ``cfg`` with ``"section.key=value"`` overrides applied (as ``--set`` does), validated, its
    paths still resolving against the same folder.

    Raises:
        ConfigError: A bad key or value, named.
    """
    raw = cfg.model_dump(mode="json")
    from_set = _apply_overrides(raw, overrides)
    try:
        out = ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, "", cfg.source, from_set)) from None
    out._base_dir, out._source = cfg.base_dir, cfg.source
    return out


def _apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[tuple[str, ...], str]:
    """Set each ``"section.key=value"`` in ``raw``; returns key path -> the override (for error messages)."""
    from_set = {}
    for item in overrides:
        key_path, value = _parse_override(item)
        _set_path(raw, key_path, value, item)
        from_set[key_path] = item
    return from_set


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{source} is not valid YAML{where}: {problem}. Fix the file (check indentation and quoting) "
            "and run again."
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source} must be a mapping of sections (project:, data:, tokenizer:, ...), "
            f"but its top level is a {type(raw).__name__}."
        )
    return raw


def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"--set {item!r} is not of the form section.key=value (for example --set data.split.val=0.1)."
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value  # not YAML: take it as a plain string
    return tuple(key.split(".")), parsed


def _set_path(raw: dict[str, Any], key_path: tuple[str, ...], value: Any, item: str) -> None:
    node = raw
    for i, part in enumerate(key_path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(key_path[: i + 1])
            raise ConfigError(f"--set {item!r}: {where} is a value, not a section, so it has no key {key_path[i + 1]!r}.")
        node = child
    node[key_path[-1]] = value


def _format_validation_error(
    exc: ValidationError, text: str, source: str, from_set: dict[tuple[str, ...], str]
) -> str:
    lines = [f"Invalid configuration in {source}:"]
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        where = _where(loc, text, source, from_set)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"- unknown key `{dotted}`{where}{hint}.")
            continue
        value = err.get("input")
        shown = "" if err["type"] == "missing" else f" = {value!r}"
        lines.append(f"- `{dotted}`{shown}{where}: {err['msg']}.")
    lines.append("Fix these keys in the project file (or the --set value) and run again; "
                 "`slmforge init` writes a file with every key documented.")
    return "\n".join(lines)


def _where(loc: tuple[str, ...], text: str, source: str, from_set: dict[tuple[str, ...], str]) -> str:
    for key_path, item in from_set.items():
        if tuple(loc[: len(key_path)]) == key_path:
            return f" (from --set {item})"
    line = _line_of(loc, text)
    return f" (line {line} of {source})" if line else ""


def _line_of(loc: tuple[str, ...], text: str) -> int | None:
    """1-based line of the deepest node of ``loc`` that exists in the YAML text."""
    if not text.strip():
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if str(key_node.value) == part:
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _section_class(annotation: Any) -> type[Section] | None:
    """The Section subclass inside an annotation like ``X``, ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_class(arg)
            if found:
                return found
    return None


def _allowed_keys(loc: tuple[str, ...]) -> list[str]:
    cls: type[Section] | None = ProjectConfig
    for part in loc:
        field = cls.model_fields.get(part) if cls else None
        cls = _section_class(field.annotation) if field else None
        if cls is None:
            return []
    return list(cls.model_fields) if cls else []


# --------------------------------------------------------------------------- templates

TEMPLATES = ("quickstart", "adapt", "code", "smiles", "protein", "blank")


def _template_values(template: str) -> ProjectConfig:
    if template == "quickstart":
        cfg = ProjectConfig()
        cfg.project.name = "python-docs-slm"
        cfg.data.sources = ["python-docs"]
        cfg.data.formats = ["text", "chat", "classification", "ner"]
        cfg.data.classification.label_from = "source"
        cfg.data.ner.builtin_gazetteer = "python"
        cfg.tokenizer.domain_terms = ["asyncio", "dataclass", "coroutine", "iterable", "subprocess", "namedtuple"]
        cfg.tokenizer.domain_terms_top_n = 64
        # Sized for 2 CPU cores: the whole pipeline in under 10 minutes.
        cfg.model.preset = "micro"
        cfg.train.max_steps = 360  # ~0.8 s a step here with bf16 + compile: about 5 minutes
        cfg.train.max_minutes = 6.0  # a slower machine stops here, with its checkpoint, instead
        cfg.train.compile = True
        cfg.train.eval_every = 150
        cfg.train.save_every = 150
        cfg.sft.method = "full"
        cfg.sft.max_steps = 150
        cfg.sft.max_minutes = 2.0
        cfg.sft.lr = 5e-4  # gentler than the default: keeps more of the pretrained text modelling
        cfg.sft.batch_size = 16
        cfg.sft.eval_every = 50
        cfg.sft.save_every = 50
        cfg.report.questions = ["What does `json.dumps` do?", "What is the `asyncio` module for?"]
        cfg.eval.limit = 48
        return cfg
    if template == "adapt":
        return _adapt_values()
    if template == "code":
        return _code_values()
    if template in ("smiles", "protein"):
        return _bio_values(template)
    if template == "blank":
        return ProjectConfig()
    raise ConfigError(f"Unknown template {template!r}; choose one of: {', '.join(TEMPLATES)}.")


def _adapt_values() -> ProjectConfig:
    """A pretrained base (Gemma 3 270M, offline) specialised on the python-docs domain: its vocabulary
    trimmed to the domain, continued pretraining on the domain text, a LoRA on its Q/A pairs, then
    evaluated against the base. About 30 minutes of training on 2 cores."""
    cfg = ProjectConfig()
    cfg.project.name = "python-docs-adapt"
    cfg.project.stages = ["data", "train", "sft", "eval"]
    cfg.data.sources = ["python-docs"]
    cfg.data.formats = ["text", "chat"]
    cfg.model.base = "base/gemma-3-270m"  # `slmforge quickstart --recipe adapt` writes it from the offline package
    cfg.model.trim_vocab = True
    t = cfg.train
    t.seq_len, t.batch_size, t.grad_accum = 256, 4, 2
    t.lr, t.warmup_steps, t.weight_decay, t.min_lr_ratio = 5e-5, 20, 0.0, 0.2
    t.max_steps, t.max_minutes = 400, 25.0  # 2 cores: ~25 minutes; a faster machine stops at max_steps
    t.eval_every, t.eval_batches, t.save_every = 50, 10, 50
    f = cfg.sft  # then a LoRA on the domain's Q/A pairs, over the continued model: what answering needs
    f.method, f.lr, f.batch_size, f.seq_len, f.max_steps, f.max_minutes = "lora", 2e-4, 8, 256, 300, 4.0
    f.eval_every, f.eval_batches, f.save_every = 50, 10, 50
    cfg.eval.suites = ["perplexity", "python-docs-qa"]
    cfg.eval.regression_vs = "base/gemma-3-270m"  # the untrimmed base: the comparison the recipe is about
    cfg.eval.limit = 48
    return cfg


def _code_values() -> ProjectConfig:
    """A code model: Gemma 3 270M (offline) adapted to Python source (the standard library's, and your
    repositories added to data.sources) with fill-in-the-middle, then evaluated against the base on held-out
    code perplexity, next-line completion and HumanEval. About 20 minutes of training on 2 cores."""
    cfg = _adapt_values()
    cfg.project.name = "python-code"
    cfg.project.stages = ["data", "train", "eval"]
    cfg.data.formats = ["text"]
    cfg.data.python_docs.docstrings, cfg.data.python_docs.topics = False, False
    cfg.data.python_docs.module_source = True  # the stdlib's code; add your repositories' folders to sources
    cfg.data.code.decontaminate = ["humaneval"]
    cfg.data.pii.types = ["email", "secret"]  # code is full of IP addresses and numbers that are not personal
    cfg.train.fim_rate = 0.5  # half the training pieces as fill-in-the-middle (what an editor asks for)
    cfg.train.max_minutes = 20.0
    cfg.eval.suites = ["perplexity", "next-line", "humaneval"]
    return cfg


def _bio_values(template: str) -> ProjectConfig:
    """The biomolecular recipes, each a few minutes on 2 cores. smiles: the 4,999 NCI molecules of the rdkit
    wheel split by scaffold, a SMILES GPT (the train stage on the bio-data and bio-tokenizer artifacts) sampled
    and scored, and a property head on measured ChEMBL pIC50s against fingerprint + ridge. protein: a masked
    protein LM on the ~220 protein sequences among Biopython's test files (downloaded once from PyPI)."""
    cfg = ProjectConfig()
    cfg.bio.kind = "smiles" if template == "smiles" else "protein"
    cfg.project.name = f"{template}-slm"
    if template == "smiles":
        cfg.project.stages = ["bio-data", "bio-tokenizer", "train", "bio-sample", "bio-property"]
        cfg.train.data, cfg.train.tokenizer = "runs/bio-data", "runs/bio-tokenizer"  # the SMILES GPT's inputs
        # nano: on 5 minutes of 2 busy cores it reaches a lower validation loss than micro (more steps)
        cfg.model.preset, cfg.model.max_position_embeddings = "nano", 256
        # 5 spellings a molecule: 1.7x the valid, unique, novel samples of canonical-only training, which
        # memorises its 3,908 strings (docs/BENCHMARKS.md, "Biomolecular recipes")
        cfg.bio.data.augment = 5
        t = cfg.train
        t.seq_len, t.batch_size, t.lr, t.warmup_steps = 128, 32, 3e-3, 30
        t.max_steps, t.max_minutes, t.eval_every, t.save_every = 1500, 5.0, 200, 200
        cfg.bio.property.max_steps, cfg.bio.property.max_minutes = 400, 3.0
        return cfg
    cfg.project.stages = ["bio-data", "bio-tokenizer", "bio-mlm"]
    cfg.bio.data.sources = ["biopython-tests"]
    cfg.bio.data.max_length = 126  # proteins are cut into pieces that fit bio.mlm.seq_len with BOS and EOS
    cfg.bio.data.split.val, cfg.bio.data.split.test = 0.1, 0.1
    m = cfg.bio.mlm
    m.hidden_size, m.num_layers, m.num_heads, m.seq_len, m.batch_size, m.lr = 64, 3, 4, 128, 32, 3e-3
    m.max_steps, m.max_minutes, m.eval_every, m.save_every = 1000, 4.0, 100, 100
    return cfg


def render_template(template: str = "quickstart") -> str:
    """The text of a project file with every section and key commented.

    Args:
        template: ``quickstart`` (the built-in python-docs domain), ``adapt`` (Gemma 3 270M specialised on it),
            ``code`` (Gemma 3 270M adapted to Python code, with fill-in-the-middle), ``smiles`` or ``protein`` (the
            biomolecular recipes) or ``blank`` (bring your own sources).
    """
    cfg = _template_values(template)
    head = [
        f"# slmforge project file ({template} template).",
        "# Run every stage:      slmforge run",
        "# Show resolved config: slmforge config show",
        "# Override any key:     slmforge <command> --set data.split.val=0.1",
        "",
    ]
    return "\n".join(head + _render_section(cfg, 0)) + "\n"


def _render_section(section: Section, indent: int) -> list[str]:
    out: list[str] = []
    pad = "  " * indent
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if field.description:
            out.append(f"{pad}# {field.description}")
        if isinstance(value, Section):
            out.append(f"{pad}{name}:")
            out.extend(_render_section(value, indent + 1))
            if indent == 0:
                out.append("")
            continue
        if value is None and (example := _section_class(field.annotation)) is not None:
            out.append(f"{pad}{name}: null")
            out.extend(f"{pad}#   {line}" for line in _example_lines(example))
            continue
        if isinstance(value, dict) and value and all(isinstance(v, Section) for v in value.values()):
            out.append(f"{pad}{name}:")  # named sub-sections (profiles): one flow mapping per line
            out.extend(f"{pad}  {k}: {_yaml_value(v.model_dump(mode='json'))}" for k, v in value.items())
            continue
        out.append(f"{pad}{name}: {_yaml_value(value)}")
    return out


def _yaml_value(value: Any) -> str:
    """One value in YAML flow style, on one line."""
    text: str = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 16).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _example_lines(cls: type[Section]) -> list[str]:
    """Commented example of a section that is off by default (its required keys and defaults)."""
    lines = []
    for name, field in cls.model_fields.items():
        example = field.default if not field.is_required() else f"<{name}>"
        lines.append(f"{name}: {example if example is not None else 'null'}")
    return lines


def init_project(directory: str | Path, template: str = "quickstart", force: bool = False) -> Path:
    """Write ``DIR/slmforge.yaml`` from a template and return its path.

    Raises:
        ConfigError: The file exists and ``force`` is false, or the template is unknown.
    """
    text = render_template(template)
    target = Path(directory) / PROJECT_FILE
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; pass --force to overwrite it.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target


def dump_config(cfg: ProjectConfig) -> str:
    """The resolved config as YAML."""
    text: str = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=100)
    return text
