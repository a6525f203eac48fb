"""The attention and mask functions reasoncache registers with transformers.

``reasoncache_mask`` (an ``AttentionMaskInterface`` entry) asks transformers' own
``sdpa_mask`` for the model's mask pattern and, when that pattern is bottom-right causal
(optionally with the layer's sliding window) plus key padding, hands the attention
function ``None`` (no padding) or a compact key-padding mask: a ``[B, 1, 1, Nk]`` bool
tensor tagged ``_reasoncache_fused`` (a 4-D tensor, so transformers passes it through
untouched, also when ``generate`` precomputes masks for static caches). Any other
pattern (packed sequences, static-cache prefill, custom overlays) stays transformers'
own ``[B, 1, Nq, Nk]`` mask and takes the explicit-mask path, so nothing is silently
approximated.

``reasoncache_attention`` (an ``AttentionInterface`` entry) reads the layer's shared
prefix from the ``ReasonCache`` attached by ``patch`` and calls the fused op.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import prefix_attention
from ..ops.reference import causal_visibility

NAME = "reasoncache"


def _fused(kpm: Tensor) -> Tensor:
    """Key padding ``[B, Nk]`` as the tagged ``[B, 1, 1, Nk]`` mask the attention function fuses."""
    mask = kpm[:, None, None, :].contiguous()
    mask._reasoncache_fused = True
    return mask


def _key_padding(padding: Tensor | None, kv_length: int, kv_offset: int) -> Tensor | None:
    """The 2-D padding mask ``[B, kv_offset + kv_length]`` cut to this layer's keys ``[B, Nk]``.
    Taken from the padding mask itself, not from a 4-D mask (some transformers versions
    un-mask fully padded query rows there)."""
    if padding is None:
        return None
    padding = padding.to(torch.bool)
    missing = kv_offset + kv_length - padding.shape[-1]
    if missing > 0:  # a static cache longer than the tokens seen: unwritten slots are not keys
        padding = F.pad(padding, (0, missing), value=False)
    kpm = padding[:, kv_offset : kv_offset + kv_length]
    if not torch.compiler.is_compiling() and bool(kpm.all()):
        return None
    return kpm


def reasoncache_mask(*args, **kwargs):
    """Mask-interface entry: ``None`` (causal, no padding), a tagged key-padding mask, or
    transformers' own 4-D mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    q_length, kv_length = kwargs.get("q_length"), kwargs["kv_length"]
    q_offset, kv_offset = kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    if q_length is None:  # older transformers: cache_position instead of q_length/q_offset
        q_length = kwargs["cache_position"].shape[0]
    kpm = _key_padding(kwargs.get("attention_mask"), kv_length, kv_offset)
    if (
        kwargs.get("mask_function") is causal_mask_function
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset + q_length == kv_offset + kv_length
    ):
        return None if kpm is None else _fused(kpm)
    # Any other pattern: compare transformers' own mask (without padding) with what the fused
    # op computes; use the op only where they agree exactly.
    pattern = sdpa_mask(*args, **{**kwargs, "attention_mask": None})
    if pattern is not None and pattern.dim() == 4:
        seen = pattern.any(dim=-2, keepdim=True)  # keys some query may see (not unwritten cache slots)
        for window in (None, getattr(kwargs.get("config"), "sliding_window", None)):
            expected = causal_visibility(pattern.shape[-2], pattern.shape[-1], window, pattern.device) & seen
            if torch.equal(pattern, expected.expand_as(pattern)):
                if kpm is None and bool(seen.all()):
                    return None
                cols = seen[:, 0, 0].expand(kwargs["batch_size"], -1)
                return _fused(cols if kpm is None else kpm & cols)
    return sdpa_mask(*args, **kwargs)


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _explicit_mask_attention(query, key, value, pk, pv, mask: Tensor, scaling) -> Tensor:
    """Fallback for masks the fused op cannot express: the prefix copied per sequence plus
    the model's own 4-D mask, through SDPA. Correct, not fast."""
    B, Hq, Nq, _ = query.shape
    P = pk.shape[1]
    kc = torch.cat([pk.expand(B, -1, -1, -1), key], dim=2)
    vc = torch.cat([pv.expand(B, -1, -1, -1), value], dim=2)
    if mask.dtype == torch.bool:
        pre = torch.ones(*mask.shape[:-1], P, dtype=torch.bool, device=mask.device)
    else:
        pre = torch.zeros(*mask.shape[:-1], P, dtype=mask.dtype, device=mask.device)
    m = torch.cat([pre, mask[..., -key.shape[2] :]], dim=-1)
    g = Hq // key.shape[1]
    if g > 1:
        kc, vc = kc.repeat_interleave(g, 1), vc.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(query, kc, vc, attn_mask=m, scale=scaling)


def reasoncache_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention-interface entry. query ``[B, Hq, Nq, D]``, key/value ``[B, Hkv, Nk, D]``
    (post-RoPE, after the cache update). Returns ``([B, Nq, Hq, D], None)``."""
    if kwargs.get("softcap") is not None:
        raise ValueError("reasoncache attention does not support attention logit softcapping (softcap=...)")
    if dropout:
        _warn_once("dropout", f"reasoncache attention does not apply attention dropout (p={dropout}); it is skipped")
    layer = module.layer_idx
    recorder = getattr(module, "_rc_recorder", None)
    if recorder is not None:
        recorder[layer] = (key.detach(), value.detach())
    cache = getattr(module, "_rc_cache", None)
    if cache is not None:
        pk, pv = cache.layer(layer)
        pk, pv = pk.to(query.dtype), pv.to(query.dtype)
    else:
        pk = pv = query.new_zeros(key.shape[1], 0, key.shape[-1])
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))

    if attention_mask is None or getattr(attention_mask, "_reasoncache_fused", False):
        kpm = None if attention_mask is None else attention_mask[:, 0, 0, :]
        # reasoncache_mask checked the pattern against this layer's window (config.sliding_window)
        window = kwargs.get("sliding_window")
        out = prefix_attention(
            query,
            key,
            value,
            pk,
            pv,
            causal=causal,
            softmax_scale=scaling,
            key_padding_mask=kpm,
            sliding_window=window,
        )
    else:
        _warn_once(
            "explicit",
            "reasoncache: this attention mask pattern (packed sequences, static-cache prefill or a custom mask) "
            "is not expressible as causal + padding; using the slower explicit-mask path",
        )
        out = _explicit_mask_attention(query, key, value, pk, pv, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register both entries with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, reasoncache_attention)
    AttentionMaskInterface.register(NAME, reasoncache_mask)
