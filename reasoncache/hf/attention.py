"""The attention and mask functions reasoncache registers with transformers.

``reasoncache_mask`` (an ``AttentionMaskInterface`` entry) asks transformers' own
``sdpa_mask`` for the model's mask pattern and, when that pattern is bottom-right causal
(optionally with the layer's sliding window) plus key padding, hands the attention
function ``None`` (no padding) or a compact key-padding mask: a ``[B, 1, 1, Nk]`` bool
tensor tagged ``_reasoncache_fused`` (a 4-D tensor, so transformers passes it through
untouched, also when ``generate`` precomputes masks for static caches). Packed sequences
(a block-diagonal causal pattern, as transformers builds from position_ids that restart
at 0) become a tagged marker holding varlen ``cu_seqlens``, and the attention function
runs the fused op on the segments. Any other pattern (static-cache prefill, custom
overlays) stays transformers' own ``[B, 1, Nq, Nk]`` mask and takes the explicit-mask
path, so nothing is silently approximated.

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
    if (
        pattern is not None
        and pattern.dim() == 4
        and kpm is None
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length
        and not torch.compiler.is_compiling()
    ):
        for window in (None, getattr(kwargs.get("config"), "sliding_window", None)):
            packed = _packed_segments(pattern.expand(kwargs["batch_size"], -1, -1, -1), window)
            if packed is not None:
                return _varlen_marker(*packed, window, kwargs["batch_size"])
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


def _cu_seqlens(new: Tensor) -> tuple[Tensor, int] | None:
    """Varlen ``cu_seqlens`` (int32) over the ``B x N`` flattened tokens of ``new [B, N]``
    (True where a segment starts; column 0 always does) and the longest segment, or None
    when every row is one sequence (not packed: the plain causal paths take it)."""
    starts = new.flatten().nonzero().flatten()
    if starts.numel() == new.shape[0]:
        return None
    cu = torch.cat([starts, starts.new_tensor([new.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _packed_segments(pattern: Tensor, window: int | None = None) -> tuple[Tensor, int] | None:
    """If ``pattern [B, 1, N, N]`` is block-diagonal causal (every row sees exactly the keys
    of its own segment up to itself, and with ``window`` only the last ``window`` of them:
    packed sequences, as transformers builds them from position_ids that restart), the
    segments as varlen ``cu_seqlens`` over the ``B x N`` flattened tokens (int32) and the
    longest segment; else None (also for one sequence a row)."""
    B, _, N, M = pattern.shape
    if N != M or N == 0:
        return None
    rows = pattern[:, 0]
    i = torch.arange(N, device=pattern.device)
    # A row starts a segment iff it cannot see the key just before it (window 1: every row
    # sees only itself, so any segmentation describes it).
    new = torch.ones(B, N, dtype=torch.bool, device=pattern.device)
    new[:, 1:] = ~rows[:, i[1:], i[1:] - 1]
    seg = new.cumsum(-1)
    expected = (seg[:, :, None] == seg[:, None, :]) & (i[None, None, :] <= i[None, :, None])
    if window is not None:
        expected &= i[None, None, :] > i[None, :, None] - window
    if not torch.equal(rows, expected):
        return None
    return _cu_seqlens(new)


def _segments_from_position_ids(position_ids: Tensor, batch: int) -> tuple[Tensor, int] | None:
    """Packed segments from position ids ``[B or 1, N]`` by transformers' own rule (a new
    segment wherever the position does not follow the previous one by 1), as varlen
    ``cu_seqlens`` over the ``B x N`` tokens and the longest segment; None when every row
    is one sequence. Computed once per forward: the result is kept on the tensor, which
    every layer receives."""
    cached = getattr(position_ids, "_rc_segments", False)
    if cached is not False:
        return cached
    pos = position_ids.expand(batch, -1)
    new = torch.ones_like(pos, dtype=torch.bool)
    new[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    found = _cu_seqlens(new)
    try:
        position_ids._rc_segments = found
    except (AttributeError, RuntimeError):  # a tensor that takes no attributes: recompute next time
        pass
    return found


def _packed_with_padding(found: tuple[Tensor, int], kpm: Tensor, N: int) -> tuple[Tensor, int] | None:
    """Packed segments ``found`` in rows that also carry padding ``kpm [B, N]`` (True =
    real): the segments when some row packs two or more sequences and, inside every
    segment, real tokens come before padding (causality then hides the padding from every
    real token, so the varlen op is exact for them); None when no row is packed. Raises
    when padding precedes real tokens inside a segment: no fused form is exact then."""
    cu, _ = found
    flat = kpm.flatten()
    seg = torch.zeros_like(flat, dtype=torch.long)
    seg[cu[1:-1].long()] = 1
    seg = seg.cumsum(0)  # segment of every token
    real_in_seg = torch.zeros(cu.numel() - 1, dtype=torch.long, device=flat.device).index_add_(0, seg, flat.long())
    rows = (cu[:-1] // N).long()
    if int(torch.bincount(rows[real_in_seg > 0], minlength=kpm.shape[0]).max()) < 2:
        return None  # one real sequence a row: ordinary padding
    if bool((flat[1:] & ~flat[:-1] & (seg[1:] == seg[:-1])).any()):
        raise ValueError(
            "packed sequences with padding before real tokens inside a sequence: pad each packed sequence at its "
            "end (or give pads their own position ids), or pass no attention_mask"
        )
    return found


def _varlen_marker(cu: Tensor, longest: int, window: int | None, batch: int) -> Tensor:
    """The packed segments (and the window the pattern was checked with) as a tagged 4-D
    tensor that transformers passes to every layer of that mask's kind."""
    marker = cu.new_ones(batch, 1, 1, 1, dtype=torch.bool)
    marker._reasoncache_varlen = (cu, longest, window)
    return marker


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _explicit_mask_attention(query, key, value, pk, pv, mask: Tensor, scaling) -> Tensor:
    """Fallback for masks the fused op cannot express: the prefix copied per sequence plus
    the model's own 4-D mask, through SDPA. Correct, not fast."""
    B, Hq, Nq, _ = query.shape
    P = pk.shape[-2]
    kc = torch.cat([pk.expand(B, -1, -1, -1), key], dim=2)  # pk: [Hkv, P, D] shared, or [B, Hkv, P, D]
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
    ids = None
    if cache is not None:
        pk, pv = cache.layer(layer)
        pk, pv = pk.to(query.dtype), pv.to(query.dtype)
        if pk.dim() == 4:  # a ReasonCacheBank: each sequence uses the cache its id names
            ids = getattr(cache, "cache_ids", None)
            if ids is None:
                raise ValueError(
                    "this model is patched with a ReasonCacheBank: say which cache each sequence uses, "
                    "model.generate(..., cache_ids=...) or `with reasoncache.hf.use_caches(model, cache_ids):`"
                )
            if ids.numel() != query.shape[0]:
                raise ValueError(f"cache_ids has {ids.numel()} entries for a batch of {query.shape[0]} sequences")
    else:
        pk = pv = query.new_zeros(key.shape[1], 0, key.shape[-1])
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))

    varlen = getattr(attention_mask, "_reasoncache_varlen", None)
    position_ids = kwargs.get("position_ids")
    fused_kpm = attention_mask is not None and getattr(attention_mask, "_reasoncache_fused", False)
    cu_kw = kwargs.get("cu_seq_lens_q")
    if isinstance(cu_kw, Tensor) and query.shape[2] == key.shape[2] and attention_mask is None:
        # DataCollatorWithFlattening(return_flash_attn_kwargs=True) hands the segments over.
        longest = kwargs.get("max_length_q")
        varlen = (cu_kw.to(torch.int32), None if longest is None else int(longest), kwargs.get("sliding_window"))
    elif (
        varlen is None
        and (attention_mask is None or fused_kpm)
        and isinstance(position_ids, Tensor)
        and position_ids.shape[-1] == query.shape[2] == key.shape[2]
        and not torch.compiler.is_compiling()
    ):
        # transformers builds the packed mask only without a cache and without padding;
        # otherwise the mask says plain causal (plus padding), and the position ids tell.
        found = _segments_from_position_ids(position_ids, query.shape[0])
        if found is not None and fused_kpm:
            found = _packed_with_padding(found, attention_mask[:, 0, 0, :], query.shape[2])
        varlen = None if found is None else (*found, kwargs.get("sliding_window"))
    if varlen is not None and key.shape[2] == query.shape[2]:
        # Packed sequences: the fused op walks the segments (reasoncache_mask found them).
        cu, longest, window = varlen
        B, Hq, N, D = query.shape
        packed = lambda x: x.transpose(1, 2).reshape(B * N, x.shape[1], D)
        seg_ids = None if ids is None else ids[(cu[:-1] // N).long()]  # each segment takes its row's cache
        out = prefix_attention(
            packed(query), packed(key), packed(value), pk, pv,
            causal=causal, softmax_scale=scaling, cu_seqlens_q=cu, max_seqlen_q=longest, sliding_window=window,
            cache_ids=seg_ids,
        )  # fmt: skip
        return out.view(B, N, Hq, D), None
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
            cache_ids=ids,
        )
    else:
        _warn_once(
            "explicit",
            "reasoncache: this attention mask pattern (static-cache prefill or a custom mask) "
            "is not expressible as causal + padding; using the slower explicit-mask path",
        )
        if ids is not None:  # per-sequence prefixes [B, Hkv, P, D]
            pk, pv = pk[ids], pv[ids]
        out = _explicit_mask_attention(query, key, value, pk, pv, attention_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register both entries with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, reasoncache_attention)
    AttentionMaskInterface.register(NAME, reasoncache_mask)
