"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

Per-token int8 activations lose the small channels when a few channels are huge.
SmoothQuant divides each input channel j of a group of linears by
``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` and multiplies the weights' column j
by the same ``s_j``; the division is folded into whatever produces X (a norm's weight,
or the rows of the previous linear), so the float model computes exactly what it did.

The groups found in a Llama-style decoder layer (Llama, Qwen2, Mistral names):
    input_layernorm          -> q_proj, k_proj, v_proj
    post_attention_layernorm -> gate_proj, up_proj
    up_proj (rows)           -> down_proj   (down sees act(gate) * up, linear in up)
o_proj is left unsmoothed: its input comes from the attention mix of v_proj heads,
which grouped-query attention shares between heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SmoothGroup:
    previous: str  # the module whose output is the linears' input: a norm, or a Linear whose rows scale
    linears: list[str]  # linears that read that input


def find_smoothing_groups(model: nn.Module) -> list[SmoothGroup]:
    """Every (producer -> linears) pair in the model's Llama-style decoder layers."""

    def linear(parent, name: str) -> bool:
        return isinstance(getattr(parent, name, None), nn.Linear)

    groups = []
    for name, module in model.named_modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if attn is not None and hasattr(module, "input_layernorm") and all(
            linear(attn, p) for p in ("q_proj", "k_proj", "v_proj")
        ):
            qkv = [f"{name}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
            groups.append(SmoothGroup(f"{name}.input_layernorm", qkv))
        if mlp is not None and all(linear(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            if hasattr(module, "post_attention_layernorm"):
                gate_up = [f"{name}.mlp.gate_proj", f"{name}.mlp.up_proj"]
                groups.append(SmoothGroup(f"{name}.post_attention_layernorm", gate_up))
            groups.append(SmoothGroup(f"{name}.mlp.up_proj", [f"{name}.mlp.down_proj"]))
    return groups


@torch.no_grad()
def input_absmax(model: nn.Module, batches: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |activation| each named linear sees over the batches."""
    found: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args):
            x = args[0].detach()
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()  # (in,)
            found[name] = torch.maximum(found[name], m) if name in found else m

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


def _outlier_ratio(channel_max: torch.Tensor) -> float:
    """Largest channel max over the median one: how far the worst outlier sticks out."""
    return float(channel_max.max() / channel_max.median().clamp_min(1e-8))


@torch.no_grad()
def smooth(model: nn.Module, groups: list[SmoothGroup], act_max: dict[str, torch.Tensor], alpha: float) -> dict:
    """Apply the migration to every group (in place) and return before/after outlier ratios."""
    before, after = [], []
    for g in groups:
        a = torch.stack([act_max[n] for n in g.linears]).amax(dim=0)  # (in,)
        lins = [model.get_submodule(n) for n in g.linears]
        w = torch.stack([lin.weight.detach().abs().amax(dim=0).float() for lin in lins]).amax(dim=0)  # (in,)
        s = (a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)  # (in,)
        prev = model.get_submodule(g.previous)
        if isinstance(prev, nn.Linear):  # its output rows are our input channels
            prev.weight.div_(s.to(prev.weight.dtype)[:, None])
            if prev.bias is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        else:  # a norm: y = normalize(x) * weight (+ bias)
            prev.weight.div_(s.to(prev.weight.dtype))
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s.to(prev.bias.dtype))
        for lin in lins:
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])
        before.append(_outlier_ratio(a))
        after.append(_outlier_ratio(a / s))
    n = max(len(groups), 1)
    return {"smoothed_groups": len(groups), "act_outlier_ratio_before": round(sum(before) / n, 3),
            "act_outlier_ratio_after": round(sum(after) / n, 3)}
