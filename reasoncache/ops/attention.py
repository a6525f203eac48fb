"""``reasoncache.prefix_attention``: the public front door of the fused op."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import is_int_at_least
from . import backends
from .custom_op import prefix_attention_fwd
from .varlen import check_cu_seqlens, varlen_attention

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, sliding_window) -> None:
    named = {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v}
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t, rank, layout in (
        ("q", q, 4, "[B, Hq, Nq, D]"),
        ("k", k, 4, "[B, Hkv, Nk, D]"),
        ("v", v, 4, "[B, Hkv, Nk, D]"),
        ("prefix_k", prefix_k, 3, "[Hkv, P, D]"),
        ("prefix_v", prefix_v, 3, "[Hkv, P, D]"),
    ):
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    B, Hq, _, D = q.shape
    if D == 0:
        raise ValueError(f"q {tuple(q.shape)} has head dim D=0; D must be at least 1")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} must be [B={B}, Hkv, Nk, D={D}] to match q {tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have the shape of k {tuple(k.shape)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"q heads Hq={Hq} must be a multiple of k/v heads Hkv={Hkv} (q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    if prefix_k.shape[0] != Hkv or prefix_k.shape[2] != D:
        raise ValueError(f"prefix_k {tuple(prefix_k.shape)} must be [Hkv={Hkv}, P, D={D}] to match k {tuple(k.shape)}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v {tuple(prefix_v.shape)} must have the shape of prefix_k {tuple(prefix_k.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; expected one of fp16, bf16, fp32 (fp64 on the torch backend)")
    for name, t in named.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all five tensors must share a dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all tensors must share a device")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            got = key_padding_mask.dtype if isinstance(key_padding_mask, Tensor) else type(key_padding_mask).__name__
            raise TypeError(f"key_padding_mask must be a bool tensor (True = real key), got {got}")
        if tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask {tuple(key_padding_mask.shape)} must be [B, Nk] = {(B, k.shape[2])}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if sliding_window is not None:
        if not is_int_at_least(sliding_window, 1):
            raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
        if not causal:
            raise ValueError("sliding_window needs causal=True (it limits how far back a query looks)")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")


def _check_varlen(q, k, v, key_padding_mask, cu_q, cu_k, max_q, max_k):
    """Validate the varlen arguments; returns (cu_q, cu_k, max_q, max_k) as host values."""
    for name, t, layout in (("q", q, "[Tq, Hq, D]"), ("k", k, "[Tk, Hkv, D]"), ("v", v, "[Tk, Hkv, D]")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"with cu_seqlens, {name} must be 3-D {layout} (packed), got shape {tuple(t.shape)}")
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask and cu_seqlens exclude each other: packed segments have no padding")
    bounds_q = check_cu_seqlens(cu_q, "cu_seqlens_q", q.shape[0], q.device)
    bounds_k = check_cu_seqlens(cu_k, "cu_seqlens_k", k.shape[0], q.device)
    if len(bounds_q) != len(bounds_k):
        raise ValueError(
            f"cu_seqlens_q has {len(bounds_q) - 1} segments but cu_seqlens_k has {len(bounds_k) - 1}; they must match"
        )
    longest = []
    for name, bounds, given in (("max_seqlen_q", bounds_q, max_q), ("max_seqlen_k", bounds_k, max_k)):
        actual = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
        if given is not None and (not isinstance(given, int) or given < actual):
            raise ValueError(f"{name}={given!r} is below the longest segment ({actual})")
        longest.append(actual)
    return bounds_q, bounds_k, longest[0], longest[1]


def _check_cache_ids(cache_ids, prefix_k, prefix_v, rows: int, rows_name: str, device) -> None:
    """A bank of caches: prefix_k/v ``[C, Hkv, P, D]`` and ``cache_ids`` choosing one per row."""
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"with cache_ids, {name} must be a bank [C, Hkv, P, D], got {got}")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v {tuple(prefix_v.shape)} must have the shape of prefix_k {tuple(prefix_k.shape)}")
    if prefix_k.shape[0] == 0:
        raise ValueError(f"the bank prefix_k {tuple(prefix_k.shape)} holds no cache (C = 0); it needs at least one")
    if not isinstance(cache_ids, Tensor) or cache_ids.dtype not in (torch.int32, torch.int64):
        got = cache_ids.dtype if isinstance(cache_ids, Tensor) else type(cache_ids).__name__
        raise TypeError(f"cache_ids must be an int32 or int64 tensor [{rows_name}], got {got}")
    if cache_ids.dim() != 1 or cache_ids.numel() != rows:
        raise ValueError(f"cache_ids must be [{rows_name}] = [{rows}], got shape {tuple(cache_ids.shape)}")
    if cache_ids.device != device:
        raise ValueError(f"cache_ids is on {cache_ids.device} but q is on {device}")
    C = prefix_k.shape[0]
    if rows and not (0 <= int(cache_ids.min()) and int(cache_ids.max()) < C):
        raise ValueError(
            f"cache_ids must lie in [0, C={C}), got values from {int(cache_ids.min())} to {int(cache_ids.max())}"
        )


def _per_cache(attend, q, k, v, prefix_k, prefix_v, cache_ids, key_padding_mask, **kw) -> tuple[Tensor, Tensor]:
    """The batched op once per cache in use, on the rows that chose it (so each cache's
    prefix is still shared by its rows: one prefix pass per cache at decode), then the rows
    put back in order. Differentiable; each cache's gradient sums over its rows."""
    if cache_ids.numel() == 0:  # an empty batch: one call on cache 0 gives the empty results
        return attend(q, k, v, prefix_k[0], prefix_v[0], key_padding_mask=key_padding_mask, return_lse=True, **kw)
    order = torch.argsort(cache_ids, stable=True)
    counts = torch.bincount(cache_ids, minlength=prefix_k.shape[0]).tolist()
    outs, lses, start = [], [], 0
    for c, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        mask = None if key_padding_mask is None else key_padding_mask[rows]
        out, lse = attend(q[rows], k[rows], v[rows], prefix_k[c], prefix_v[c], key_padding_mask=mask,
                          return_lse=True, **kw)  # fmt: skip
        outs.append(out)
        lses.append(lse)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(outs)[back], torch.cat(lses)[back]


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    return_lse: bool = False,
    sliding_window: int | None = None,
    backend: str | None = None,
    cu_seqlens_q: Tensor | None = None,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    cache_ids: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over a learned prefix shared by the batch, then over each sequence's own keys.

    Every query attends, in one softmax, to all ``P`` prefix keys and to its own keys.

    Args:
        q: ``[B, Hq, Nq, D]``, any strides (HF's transposed ``[B, N, H, D]`` views are fine).
        k, v: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` (MHA, GQA, MQA).
        prefix_k, prefix_v: ``[Hkv, P, D]``, one prefix for the whole batch (``P >= 0``;
            ``P = 0`` is plain attention). Never copied per sequence.
        causal: own keys are bottom-right aligned: query ``i`` sees own key ``j`` iff
            ``j <= i + Nk - Nq`` (so decode, ``Nq = 1``, and chunked prefill work).
        softmax_scale: defaults to ``1 / sqrt(D)``.
        key_padding_mask: optional ``[B, Nk]`` bool, True = real key (left or right
            padding). The prefix is never masked.
        return_lse: also return the log-sum-exp of each query's scores.
        sliding_window: with ``causal``, query ``i`` sees only own keys ``j`` with
            ``i + Nk - Nq - sliding_window < j`` (Mistral/Gemma-style local layers). The
            prefix stays visible to every query.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or None (automatic; the
            ``REASONCACHE_BACKEND`` environment variable overrides the automatic choice).
        cu_seqlens_q, cu_seqlens_k: packed sequences in FlashAttention's varlen convention:
            q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]``, and int32 ``[S + 1]`` offsets from 0 to
            the token count (``cu_seqlens_k`` defaults to ``cu_seqlens_q``). Each segment sees
            the whole prefix and, bottom-right causally, its own keys only. Exact on every
            backend; today it runs as a left-padded batch (``reasoncache/ops/varlen.py``).
        max_seqlen_q, max_seqlen_k: the longest segments, optional (checked if given).
        cache_ids: several caches in one batch: prefix_k/v a bank ``[C, Hkv, P, D]`` and
            ``cache_ids`` int ``[B]`` (with cu_seqlens: ``[S]``, one per segment) choosing
            each sequence's cache. Runs the op once per cache in use, on its sequences, so
            each cache's prefix stays shared by its own sequences; gradients reach each
            cache from its sequences only. ``C = 1`` is the single-cache op.

    Returns:
        ``out [B, Hq, Nq, D]`` in q's dtype; with ``return_lse``, also ``lse [B, Hq, Nq]``
        fp32 (natural log). A query that sees no key at all gets zeros and ``lse = -inf``.
        With ``cu_seqlens``: ``out [Tq, Hq, D]`` and ``lse [Tq, Hq]``.

    Gradients flow to q, k, v, prefix_k and prefix_v; the prefix gradient is summed over
    the batch and is bitwise reproducible from run to run.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    kw = dict(causal=causal, softmax_scale=softmax_scale, sliding_window=sliding_window, backend=backend)
    if cache_ids is not None and (cu_seqlens_q is None and cu_seqlens_k is None):
        if not isinstance(q, Tensor) or q.dim() != 4:
            raise ValueError(f"q must be 4-D [B, Hq, Nq, D], got {getattr(q, 'shape', type(q).__name__)}")
        _check_cache_ids(cache_ids, prefix_k, prefix_v, q.shape[0], "B", q.device)
        out, lse = _per_cache(prefix_attention, q, k, v, prefix_k, prefix_v, cache_ids, key_padding_mask, **kw)
        return (out, lse) if return_lse else out
    if cache_ids is None and isinstance(prefix_k, Tensor) and prefix_k.dim() == 4:
        raise ValueError(
            f"prefix_k must be 3-D [Hkv, P, D] for one cache, got shape {tuple(prefix_k.shape)}; "
            "for a bank [C, Hkv, P, D] pass cache_ids to say which cache each sequence uses"
        )
    if cu_seqlens_q is not None or cu_seqlens_k is not None:
        if cu_seqlens_q is None:
            raise ValueError("cu_seqlens_k needs cu_seqlens_q (the query segments)")
        cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        bounds_q, bounds_k, max_q, max_k = _check_varlen(
            q, k, v, key_padding_mask, cu_seqlens_q, cu_k, max_seqlen_q, max_seqlen_k
        )
        if cache_ids is not None:
            _check_cache_ids(cache_ids, prefix_k, prefix_v, len(bounds_q) - 1, "S", q.device)
        out, lse = varlen_attention(
            prefix_attention, q, k, v, prefix_k, prefix_v, bounds_q, bounds_k, max_q, max_k,
            causal, softmax_scale, sliding_window, backend, cache_ids,
        )  # fmt: skip
        return (out, lse) if return_lse else out
    if max_seqlen_q is not None or max_seqlen_k is not None:
        raise ValueError("max_seqlen_q / max_seqlen_k only go with cu_seqlens_q / cu_seqlens_k")
    _check_inputs(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, sliding_window)
    name = backends.check_name(backend)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    window = sliding_window or 0
    args = (q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, window)
    if _eager_inference(q, k, v, prefix_k, prefix_v, key_padding_mask):
        out, lse, _ = backends.forward(name, q, *args)  # what the custom op runs, without its dispatch
    else:
        out, lse, _ = prefix_attention_fwd(*args, name)
    return (out, lse) if return_lse else out


def _eager_inference(*tensors: Tensor | None) -> bool:
    """True when no autograd graph and no tracer needs the custom op: plain tensors (a
    Parameter is one; FakeTensor, DTensor and functional wrappers are not), no gradient
    wanted, not under torch.compile. Then the op calls the backend directly and skips the
    custom op's dispatch (roughly 30 us per call on the CPU, timed on a shared machine; a
    decode step's CPU attention itself takes about 60 us at SmolLM2's shape)."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    return True


_PLAIN = (Tensor, torch.nn.Parameter)
