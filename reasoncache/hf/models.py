"""What reasoncache needs to know about a Hugging Face decoder: its attention modules,
KV geometry, how it encodes positions, and a fingerprint of its config."""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

# Models whose positions are absolute embeddings, not rotations of q and k: a prefix built
# from demonstrations is exact only if the queries' positions are shifted past it.
ABSOLUTE_POSITION_MODELS = {"gpt2"}

# Config keys that do not change what a prefix means for the model.
_VOLATILE_KEYS = {
    "_attn_implementation",
    "_attn_implementation_internal",
    "_attn_implementation_autoset",
    "attn_implementation",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "use_cache",
    "architectures",
    "_commit_hash",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "attention_dropout",
    "attn_pdrop",
    "quantization_config",
}


@dataclass(frozen=True)
class ModelShape:
    """The geometry a per-layer prefix must match."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def differences(self, other: ModelShape) -> list[str]:
        """One ``"field: cache has X, model has Y"`` line per field where the two shapes differ."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: cache has {mine[k]!r}, model has {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def text_config(model: nn.Module):
    """The config of ``model``'s text decoder (the nested one for multimodal models)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules in layer order (each has ``layer_idx``). Raises if none, and for
    an encoder-decoder or a bidirectional (encoder) model: a prefix is learned for causal decoders."""
    if hasattr(model, "config") and getattr(text_config(model), "is_encoder_decoder", False):
        raise TypeError(
            f"{type(model).__name__} is an encoder-decoder model; reasoncache patches decoder-only models "
            "(Llama, Qwen2/3, Mistral, Gemma, Gemma 3, GPT-2, ...)"
        )
    mods = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention")
        and isinstance(getattr(m, "layer_idx", None), int)
        and not getattr(m, "is_cross_attention", False)
    ]
    mods.sort(key=lambda m: m.layer_idx)
    if not mods:
        raise TypeError(
            f"{type(model).__name__} has no attention modules with a layer_idx; reasoncache patches Hugging Face "
            "decoders whose attention dispatches through transformers' AttentionInterface (Llama, Qwen2/3, "
            "Mistral, Gemma, Gemma 3, GPT-2, ...)"
        )
    if not any(getattr(m, "is_causal", True) for m in mods):
        raise TypeError(
            f"{type(model).__name__}'s attention is bidirectional (is_causal=False: an encoder); reasoncache "
            "patches causal decoder-only models"
        )
    idx = [m.layer_idx for m in mods]
    if idx != list(range(len(mods))):
        raise TypeError(f"{type(model).__name__}: attention layer indices {idx} are not 0..{len(mods) - 1}")
    return mods


def model_shape(model: nn.Module) -> ModelShape:
    """``model``'s ``ModelShape``: its type, attention-layer count, KV heads (``Hkv``, after GQA) and head dim ``D``."""
    cfg = text_config(model)
    mods = attention_modules(model)
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(mods[0], "head_dim", None)
    if head_dim is None:
        head_dim = (getattr(cfg, "hidden_size", None) or cfg.n_embd) // heads
    return ModelShape(str(cfg.model_type), len(mods), int(kv_heads), int(head_dim))


def fingerprint(model: nn.Module) -> str:
    """sha256 of the config, minus fields that do not change the model's function."""
    cfg = text_config(model).to_dict()
    clean = {k: v for k, v in sorted(cfg.items()) if k not in _VOLATILE_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def uses_absolute_positions(model: nn.Module) -> bool:
    """Whether ``model`` adds learned absolute position embeddings (GPT-2 and kin) instead of
    rotating keys with RoPE."""
    return text_config(model).model_type in ABSOLUTE_POSITION_MODELS


def rotate_keys(model: nn.Module, layer_idx: int, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Rotate post-RoPE keys ``[Hkv, P, D]`` by ``shift`` positions with the model's own
    rotary embedding (RoPE composes: R(a) R(b) = R(a + b)). Identity for models without RoPE."""
    if shift == 0 or uses_absolute_positions(model):
        return keys
    rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if rotary is None:
        raise TypeError(f"{type(model).__name__}: found no rotary_emb module to re-position the prefix keys")
    attn = attention_modules(model)[layer_idx]
    apply = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if apply is None:
        raise TypeError(f"{type(attn).__module__} has no apply_rotary_pos_emb")
    P = keys.shape[1]
    pos = torch.full((1, P), shift, dtype=torch.long, device=keys.device)
    x = keys.new_zeros(1, P, keys.shape[-1])
    layer_types = getattr(text_config(model), "layer_types", None)
    params = inspect.signature(rotary.forward).parameters
    if layer_types is not None and "layer_type" in params:
        cos, sin = rotary(x, pos, layer_types[layer_idx])
    else:
        cos, sin = rotary(x, pos)
    _, rotated = apply(keys[None], keys[None], cos.to(keys.dtype), sin.to(keys.dtype))
    return rotated[0]
