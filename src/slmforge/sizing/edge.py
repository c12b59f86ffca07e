"""Edge targets: ``slmforge export edge --target raspberry-pi-5``.

For a device (its memory an app may use and its published memory bandwidth), pick the GGUF type (Q8_0 when
it fits with headroom, else Q4_0), check the memory at a context length (weights + KV cache + runtime),
estimate decode tokens/s as ``EFFICIENCY x bandwidth / bytes read per token``, and write the bundle: the
GGUF file (llama.cpp runs on every target), a run script, and ``edge.json`` with the plan.

``EFFICIENCY`` is the share of the memory bandwidth llama.cpp's batch-1 decoding turns into weight reads;
``benchmarks/edge_estimate.py`` checks the method on this machine (predicted vs measured llama.cpp speed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmforge.errors import ConfigError, ModelError
from slmforge.sizing.fit import GB, ModelShape

EFFICIENCY = 0.6  # llama.cpp decode: share of memory bandwidth turned into weight reads (see edge_estimate.py)
HEADROOM = 0.8  # a choice must leave 20% of the usable memory free
RUNTIME_BYTES = 0.3 * GB  # llama.cpp, its buffers and the app around it
SMALL_BYTES = 64 * 1024**2  # below this, weights stay in cache and the bandwidth model overestimates
GGUF_BYTES = {"F16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}  # bytes a weight, block scales included


@dataclass(frozen=True)
class Device:
    name: str
    ram_gb: float
    usable_gb: float  # what one app may hold (the OS and, on phones, the memory killer take the rest)
    bandwidth_gbs: float  # published peak memory bandwidth
    accelerator: str
    threads: int
    source: str  # where the figures come from


# Published figures (peak bandwidth = transfer rate x bus width); usable memory is a rule of thumb per OS.
DEVICES: dict[str, Device] = {
    "raspberry-pi-5": Device("Raspberry Pi 5, 8 GB", 8, 7.0, 17.1, "CPU: 4x Cortex-A76 (NEON)", 4,
                             "LPDDR4X-4267, 32-bit bus"),
    "jetson-orin-nano": Device("Jetson Orin Nano, 8 GB", 8, 6.5, 68.0, "GPU: Ampere, 1024 CUDA cores (shared memory)",
                               6, "LPDDR5, 128-bit bus (NVIDIA: 68 GB/s)"),
    "android-8gb": Device("Android phone, 8 GB (Snapdragon 8 Gen 2 class)", 8, 4.0, 67.0,
                          "CPU: 1x X3 + 4x A715/A710 + 3x A510", 4, "LPDDR5X-8400, 64-bit bus"),
    "iphone-15": Device("iPhone 15 (A16), 6 GB", 6, 3.0, 51.2, "CPU: 2 performance + 4 efficiency cores; Metal GPU",
                        2, "LPDDR5-6400, 64-bit bus"),
}


@dataclass
class EdgePlan:
    target: str
    device: dict[str, Any]
    gguf_type: str | None  # None: nothing fits
    context: int
    memory_bytes: dict[str, float]  # per GGUF type: weights + KV cache + runtime
    fits: dict[str, bool]
    decode_tokens_per_s: float | None
    reason: str


def plan(shape: ModelShape, target: str, context: int = 2048) -> EdgePlan:
    """The GGUF type, memory and decode estimate of ``shape`` on ``target``.

    Raises:
        ConfigError: An unknown target.
    """
    device = DEVICES.get(target)
    if device is None:
        raise ConfigError(f"Unknown edge target {target!r}; choose one of {', '.join(DEVICES)}.")
    usable = device.usable_gb * GB
    memory = {t: shape.params * b + shape.kv_bytes(context) + RUNTIME_BYTES for t, b in GGUF_BYTES.items()}
    fits = {t: m <= usable for t, m in memory.items()}
    chosen = next((t for t in ("Q8_0", "Q4_0") if memory[t] <= usable * HEADROOM), None)
    if chosen is None and fits["Q4_0"]:
        chosen = "Q4_0"
    if chosen is None:
        reason = (f"even Q4_0 needs {memory['Q4_0'] / GB:.2f} GB at context {context}; the device leaves an app "
                  f"{device.usable_gb:g} GB: a smaller model or a shorter context")
        return EdgePlan(target, asdict(device), None, context, memory, fits, None, reason)
    per_token = shape.params * GGUF_BYTES[chosen] + shape.kv_bytes(context // 2)
    tps = EFFICIENCY * device.bandwidth_gbs * 1e9 / per_token
    reason = ("Q8_0 fits with 20% headroom (near-lossless)" if chosen == "Q8_0" else
              "Q8_0 does not fit with headroom; Q4_0 does (expect some quality loss: check it with slmforge eval)")
    if per_token < SMALL_BYTES:
        reason += ("; the weights are small enough to sit in the CPU's caches, where per-token overhead, not "
                   "memory, limits speed: the estimate is an upper bound")
    return EdgePlan(target, asdict(device), chosen, context, memory, fits, tps, reason)


def write_bundle(model_dir: Path, out: Path, p: EdgePlan) -> dict[str, Any]:
    """The GGUF file of the chosen type, ``run.sh`` (llama.cpp's CLI, or its server) and ``edge.json``.

    Raises:
        ModelError: Nothing fits the target, or the model cannot be converted.
    """
    from slmforge.export.gguf import export_gguf

    if p.gguf_type is None:
        raise ModelError(f"Nothing to bundle for {p.target}: {p.reason}.")
    out.mkdir(parents=True, exist_ok=True)
    gguf = export_gguf(model_dir, out / f"{model_dir.name}-{p.gguf_type}.gguf", p.gguf_type)
    threads = p.device["threads"]
    script = out / "run.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"# {p.device['name']}: {p.gguf_type}, context {p.context}; estimated "
        f"{p.decode_tokens_per_s:.0f} tokens/s (edge.json)\n"
        "# Needs llama.cpp's llama-cli / llama-server on the device (build it there, or use a release).\n"
        f'MODEL="$(dirname "$0")/{gguf.name}"\n'
        'if [ "$1" = "serve" ]; then\n'
        f'  exec llama-server -m "$MODEL" -c {p.context} -t {threads} --host 127.0.0.1 --port 8080\n'
        "fi\n"
        f'exec llama-cli -m "$MODEL" -c {p.context} -t {threads} -cnv\n')
    script.chmod(0o755)
    record = {**asdict(p), "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
    (out / "edge.json").write_text(json.dumps(record, indent=1) + "\n")
    return record
