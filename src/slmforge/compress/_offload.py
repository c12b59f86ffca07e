"""Running a model larger than memory: accelerate's big-model dispatch.

Weights that do not fit the budget stay on disk (memory-mapped from the model's
own safetensors, or copied to ``offload_folder``) and are brought in, layer by
layer, on every forward pass. ``benchmarks/offload.py`` measures what that costs.
"""

from __future__ import annotations

from pathlib import Path


def load_offloaded(path: str | Path, memory_bytes: int | None, offload_folder: str | Path,
                   cpu_bytes: int | None = None, dtype: str = "float32"):
    """Load a causal LM with at most ``memory_bytes`` of its weights on the compute device.

    On a machine with a CUDA GPU the compute device is GPU 0: weights beyond the budget go
    to CPU RAM (at most ``cpu_bytes``; unlimited when None) and then to disk. On a CPU-only
    machine the budget is CPU RAM and everything beyond it goes to disk.

    Args:
        path: A Hugging Face model folder (safetensors).
        memory_bytes: Weight budget on the compute device; None loads normally, no offload.
        offload_folder: Where weights that must be converted for disk offload are written.
        cpu_bytes: CPU RAM budget when the compute device is a GPU.
        dtype: ``float32`` or ``bfloat16``.

    Returns:
        The model; ``model.hf_device_map`` says where each block went (``disk`` for offloaded ones).
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if memory_bytes is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
    if torch.cuda.is_available():
        max_memory: dict = {0: int(memory_bytes)}
        if cpu_bytes is not None:
            max_memory["cpu"] = int(cpu_bytes)
    else:
        max_memory = {"cpu": int(memory_bytes)}
    Path(offload_folder).mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, device_map="auto", max_memory=max_memory, offload_folder=str(offload_folder),
    )
    return model.eval()
