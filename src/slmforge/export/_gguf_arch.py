"""GGUF export, per architecture: hyperparameters checked and written, weights renamed and reshaped.

Private to ``slmforge.export.gguf`` (see its docstring for what is covered and why).
"""

from __future__ import annotations

from typing import Any

from slmforge.errors import ModelError


def _rope_theta(config: dict[str, Any], layer_type: str | None = None, default: float = 10_000.0) -> float:
    """rope_theta from a transformers 5 ``rope_parameters`` (flat or per layer type) or a 4.x config."""
    rope = config.get("rope_parameters") or {}
    if layer_type and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    return float(rope.get("rope_theta", config.get("rope_theta", default)))


def _rope_scaling(config: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if layer_type and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    kind = rope.get("rope_type", rope.get("type", "default"))
    return {} if kind == "default" else dict(rope, rope_type=kind)


# --------------------------------------------------------------------------- llama


def _llama_hparams(config: dict[str, Any]) -> dict[str, Any]:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"llama.cpp's llama graph is SwiGLU (silu); this model uses hidden_act={act!r}.")
    if config.get("mlp_bias"):
        raise ModelError("llama.cpp's llama graph has no MLP biases; this model has mlp_bias=true.")
    scaling = _rope_scaling(config)
    if scaling and scaling["rope_type"] != "linear":
        raise ModelError(f"Rope scaling {scaling['rope_type']!r} is not covered by the GGUF export (default and linear are).")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return {
        "vocab_size": int(config["vocab_size"]),
        "hidden": hidden,
        "layers": int(config["num_hidden_layers"]),
        "heads": heads,
        "kv_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or hidden // heads),
        "ffn": int(config["intermediate_size"]),
        "context": int(config.get("max_position_embeddings", 2048)),
        "eps": float(config.get("rms_norm_eps", 1e-5)),
        "rope_theta": _rope_theta(config),
        "rope_scaling": scaling,
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


def _write_llama_hparams(writer, hp: dict[str, Any]) -> None:
    import gguf

    writer.add_vocab_size(hp["vocab_size"])
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["heads"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    if hp["rope_scaling"]:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp["rope_scaling"]["factor"]))


def _permute_for_rope(w, n_head: int):
    """HF's rotate-half rotary layout -> llama.cpp's interleaved pairs, per head (rows of q/k)."""
    # (out, in) -> (n_head, 2, head_dim/2, in) -> swap the half axis with the pair axis -> (out, in)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _mapped(tensors: dict[str, Any], arch_name: str, layers: int) -> dict[str, tuple[str, Any]]:
    """HF tensor name -> (GGUF tensor name, array), through gguf-py's name table."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_name.upper()], layers)
    out = {}
    unknown = []
    for hf_name, array in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp
        new = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            unknown.append(hf_name)
        else:
            out[hf_name] = (new, array)
    if unknown:
        raise ModelError(
            f"The GGUF export does not know where these weights go in llama.cpp's {arch_name} graph: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}."
        )
    return out


def _llama_weights(tensors: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for hf_name, (name, array) in _mapped(tensors, "llama", hp["layers"]).items():
        if name.endswith("attn_q.weight") or name.endswith("attn_q.bias"):
            array = _permute_for_rope(array, hp["heads"])
        elif name.endswith("attn_k.weight") or name.endswith("attn_k.bias"):
            array = _permute_for_rope(array, hp["kv_heads"])
        if name == "output.weight" and hp["tied"]:
            continue  # llama.cpp uses token_embd when output.weight is absent
        out[name] = array
    if "token_embd.weight" not in out:
        raise ModelError("The model has no embedding table (model.embed_tokens.weight).")
    return out


# --------------------------------------------------------------------------- gemma3


def _gemma3_hparams(config: dict[str, Any]) -> dict[str, Any]:
    if config.get("attn_logit_softcapping") is not None or config.get("final_logit_softcapping") is not None:
        raise ModelError("Gemma 3 in llama.cpp has no logit soft-capping; this config sets it.")
    act = config.get("hidden_activation", config.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise ModelError(f"llama.cpp's gemma3 graph uses GELU (tanh); this model uses {act!r}.")
    head_dim = int(config.get("head_dim", 256))
    scalar = config.get("query_pre_attn_scalar", head_dim)
    if scalar != head_dim:
        # llama.cpp scales attention by 1/sqrt(head_dim) for every size but 27B.
        raise ModelError(f"query_pre_attn_scalar={scalar} differs from head_dim={head_dim}; llama.cpp assumes they match.")
    layer_types = config.get("layer_types")
    if layer_types:
        expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(layer_types))]
        if list(layer_types) != expected:
            raise ModelError("This Gemma 3 model's sliding/global layer pattern is not llama.cpp's (every 6th layer global).")
    scaling = _rope_scaling(config, "full_attention")
    if scaling and scaling["rope_type"] != "linear":
        raise ModelError(f"Rope scaling {scaling['rope_type']!r} is not covered for Gemma 3 (linear is).")
    return {
        "vocab_size": int(config["vocab_size"]),
        "hidden": int(config["hidden_size"]),
        "layers": int(config["num_hidden_layers"]),
        "heads": int(config["num_attention_heads"]),
        "kv_heads": int(config.get("num_key_value_heads", 4)),
        "head_dim": head_dim,
        "ffn": int(config["intermediate_size"]),
        "context": int(config.get("max_position_embeddings", 131072)),
        "eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": _rope_theta(config, "full_attention", 1_000_000.0),
        "rope_theta_local": float(config.get("rope_local_base_freq") or _rope_theta(config, "sliding_attention")),
        "rope_scaling": scaling,
        "sliding_window": int(config.get("sliding_window") or 512),
        "tied": bool(config.get("tie_word_embeddings", True)),
    }


def _write_gemma3_hparams(writer, hp: dict[str, Any]) -> None:
    import gguf

    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_layer_norm_rms_eps(hp["eps"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_rope_freq_base_swa(hp["rope_theta_local"])
    writer.add_sliding_window(hp["sliding_window"])
    if hp["rope_scaling"]:  # applied to the global layers only, as in transformers
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp["rope_scaling"]["factor"]))


def _gemma3_weights(tensors: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
    tensors = {k.replace("model.language_model.", "model.").replace("language_model.", ""): v
               for k, v in tensors.items() if "vision" not in k and "multi_modal" not in k}
    out = {}
    for hf_name, (name, array) in _mapped(tensors, "gemma3", hp["layers"]).items():
        if name.endswith("norm.weight"):
            array = array + 1.0  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w
        if name == "output.weight" and hp["tied"]:
            continue
        if name == "token_embd.weight":
            array = array[: hp["vocab_size"]]
        out[name] = array
    return out


# --------------------------------------------------------------------------- tensor types


def _tensor_type(name: str, array, wanted, tied: bool):
    import gguf

    ggml = gguf.GGMLQuantizationType
    if array.ndim < 2 or wanted == ggml.F32:
        return ggml.F32
    if wanted == ggml.F16:
        return ggml.F16
    if wanted == ggml.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        wanted = ggml.Q8_0  # the output projection at higher precision, as llama-quantize does
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if array.shape[-1] % block:
        return ggml.F16  # a row that is not whole blocks cannot be block-quantized
    return wanted
