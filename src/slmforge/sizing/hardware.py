"""What this machine is: CPU, instruction sets, memory, disk, GPUs, runtimes; and two measurements that decide
local inference speed (memory bandwidth, matmul throughput).

Every probe is best effort: a field it cannot read is None (an unknown), never a guess.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The instruction sets that decide which kernels run (x86 flags in /proc/cpuinfo; "asimd" is NEON on arm64).
_ISA = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI",
        "avx512_bf16": "AVX-512 BF16", "avx_vnni": "AVX-VNNI", "amx_tile": "AMX", "amx_bf16": "AMX BF16",
        "amx_int8": "AMX INT8", "asimd": "NEON", "sve": "SVE", "sve2": "SVE2"}


@dataclass
class Gpu:
    name: str
    memory_bytes: int
    kind: str  # "cuda", "rocm", "mps"


@dataclass
class Hardware:
    """A machine, as probed here or described by hand (the fit rules take either)."""

    cpu: str = "unknown"
    cores: int = 1
    isa: list[str] = field(default_factory=list)
    ram_bytes: int = 0
    ram_available_bytes: int = 0
    disk_free_bytes: int | None = None
    gpus: list[Gpu] = field(default_factory=list)
    blas: str | None = None
    torch_cpu_capability: str | None = None
    onnxruntime_providers: list[str] = field(default_factory=list)
    llamacpp_features: list[str] = field(default_factory=list)
    bandwidth_gbs: float | None = None  # measured, one thread (what batch-1 decoding on CPU approaches)
    matmul_gflops: float | None = None  # measured, all threads, fp32

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def probe(path: str | Path = ".") -> Hardware:
    """This machine, without measuring (fast)."""
    hw = Hardware(cpu=_cpu_name(), cores=os.cpu_count() or 1, isa=_isa())
    hw.ram_bytes, hw.ram_available_bytes = _meminfo()
    try:
        hw.disk_free_bytes = shutil.disk_usage(Path(path).resolve()).free
    except OSError:
        pass
    try:
        import torch

        hw.torch_cpu_capability = torch.backends.cpu.get_cpu_capability()
        found = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
        hw.blas = found.group(1) if found else None
        hw.gpus = _gpus(torch)
    except ImportError:
        pass
    try:
        import onnxruntime

        hw.onnxruntime_providers = list(onnxruntime.get_available_providers())
    except ImportError:
        pass
    try:
        import xllamacpp

        info = xllamacpp.get_system_info()
        hw.llamacpp_features = [k.strip() for k, v in re.findall(r"([\w ]+?) = (\d+)", info) if v == "1"]
    except (ImportError, AttributeError):
        pass
    return hw


def measure(hw: Hardware, seconds: float = 2.0) -> Hardware:
    """Fill in the measured memory bandwidth (a STREAM-like triad, one thread) and fp32 matmul GFLOP/s."""
    hw.bandwidth_gbs = bandwidth_gbs()
    hw.matmul_gflops = matmul_gflops(seconds)
    return hw


def bandwidth_gbs(mb: int = 256, runs: int = 5) -> float:
    """Memory bandwidth of one thread in GB/s: ``a = b + s*c`` over three arrays of ``mb`` MiB (far beyond any
    cache), the bytes moved over the fastest of ``runs``. A batch-1 decoder that reads every weight once per
    token approaches at most bandwidth / bytes of weights."""
    import numpy as np

    n = mb * 1024 * 1024 // 8
    b, c = np.ones(n), np.full(n, 2.0)
    a = np.empty(n)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        np.multiply(c, 3.0, out=a)
        np.add(a, b, out=a)
        times.append(time.perf_counter() - t0)
    return 4 * n * 8 / min(times) / 1e9  # read c, write a, read a + b, write a


def matmul_gflops(seconds: float = 2.0, size: int = 1024) -> float:
    """fp32 matrix multiplication throughput of torch on all its threads, GFLOP/s (best of a few)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _isa() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ["NEON"] if platform.machine() in ("arm64", "aarch64") else []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return [name for flag, name in _ISA.items() if flag in flags]


def _meminfo() -> tuple[int, int]:
    try:
        values = {k: int(v.split()[0]) * 1024 for k, v in
                  (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)}
        return values.get("MemTotal", 0), values.get("MemAvailable", values.get("MemFree", 0))
    except (OSError, ValueError):
        return 0, 0


def _gpus(torch: Any) -> list[Gpu]:
    out = []
    if torch.cuda.is_available():
        kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(Gpu(p.name, int(p.total_memory), kind))
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append(Gpu("Apple GPU (MPS, unified memory)", _meminfo()[0], "mps"))
    return out
