"""Pure-PyTorch prefix attention: the test oracle and the CPU path.

Short on purpose. It materialises the score matrix, computes in fp32 (fp64 when given
fp64) and never copies the prefix per sequence: the prefix scores come from one einsum
against the shared ``[Hkv, P, D]`` tensors, so autograd sums the prefix gradient over
the batch by itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def prefix_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    sliding_window: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Naive prefix attention.

    Args:
        q: ``[B, Hq, Nq, D]``.
        k, v: ``[B, Hkv, Nk, D]``, ``Hq % Hkv == 0``.
        prefix_k, prefix_v: ``[Hkv, P, D]``, shared by the whole batch.
        causal: own keys bottom-right aligned: query ``i`` sees key ``j`` iff
            ``j <= i + Nk - Nq``.
        softmax_scale: defaults to ``1/sqrt(D)``.
        key_padding_mask: ``[B, Nk]`` bool, True marks a real key. Never masks the prefix.
        sliding_window: with ``causal``, query ``i`` also needs ``j > i + Nk - Nq - sliding_window``
            (own keys only; the prefix stays visible).
        compute_dtype: defaults to fp32 (fp64 stays fp64).

    Returns:
        ``out [B, Hq, Nq, D]`` in ``compute_dtype`` and ``lse [B, Hq, Nq]`` (natural log,
        ``-inf`` for a query that sees no key at all; its output row is 0).
    """
    qg, k, v, pk, pv, p, lse, scale = _probs(
        q, k, v, prefix_k, prefix_v, causal, softmax_scale, key_padding_mask, sliding_window, compute_dtype
    )
    P = pk.shape[1]
    out = torch.einsum("bhgqp,hpd->bhgqd", p[..., :P], pv)
    out = out + torch.einsum("bhgqk,bhkd->bhgqd", p[..., P:], v)
    return out.reshape(q.shape), lse.reshape(q.shape[:3])


def prefix_attention_ref_bwd(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    key_padding_mask: Tensor | None = None,
    sliding_window: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Explicit backward of ``prefix_attention_ref`` (the same math as the kernels).

    ``dout [B, Hq, Nq, D]``, ``dlse [B, Hq, Nq]`` or None. Returns ``dq, dk, dv,
    dprefix_k, dprefix_v`` in the compute dtype; the prefix gradients ``[Hkv, P, D]``
    are summed over the batch by the einsum contraction, without a per-sequence copy.
    """
    qg, k, v, pk, pv, p, lse, scale = _probs(
        q, k, v, prefix_k, prefix_v, causal, softmax_scale, key_padding_mask, sliding_window, None
    )
    P = pk.shape[1]
    do = dout.to(qg.dtype).reshape(qg.shape)
    dp = torch.cat([torch.einsum("bhgqd,hpd->bhgqp", do, pv), torch.einsum("bhgqd,bhkd->bhgqk", do, v)], dim=-1)
    delta = (p * dp).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(qg.dtype).reshape(lse.shape)
    ds = p * (dp - delta) * scale  # p = 0 on masked keys and on rows that see no key
    dq = torch.einsum("bhgqp,hpd->bhgqd", ds[..., :P], pk) + torch.einsum("bhgqk,bhkd->bhgqd", ds[..., P:], k)
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds[..., P:], qg)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p[..., P:], do)
    dpk = torch.einsum("bhgqp,bhgqd->hpd", ds[..., :P], qg)
    dpv = torch.einsum("bhgqp,bhgqd->hpd", p[..., :P], do)
    return dq.reshape(q.shape), dk, dv, dpk, dpv


def _probs(q, k, v, prefix_k, prefix_v, causal, softmax_scale, key_padding_mask, sliding_window, compute_dtype):
    """Upcast, score against prefix and own keys, mask, softmax.

    Returns the grouped ``qg [B, Hkv, G, Nq, D]``, upcast k, v, prefix_k, prefix_v,
    ``p [B, Hkv, G, Nq, P + Nk]``, ``lse [B, Hkv, G, Nq, 1]`` and the scale.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)

    qg = q.to(compute_dtype).reshape(B, Hkv, Hq // Hkv, Nq, D)
    k, v = k.to(compute_dtype), v.to(compute_dtype)
    pk, pv = prefix_k.to(compute_dtype), prefix_v.to(compute_dtype)

    s_pre = torch.einsum("bhgqd,hpd->bhgqp", qg, pk) * scale
    s_own = torch.einsum("bhgqd,bhkd->bhgqk", qg, k) * scale

    visible = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(diagonal=Nk - Nq)
        if sliding_window is not None:
            visible = visible.triu(diagonal=Nk - Nq - sliding_window + 1)
    visible = visible.expand(B, 1, 1, Nq, Nk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, None, :]

    s = torch.cat([s_pre, s_own.masked_fill(~visible, float("-inf"))], dim=-1)
    # A row with no visible key at all (P == 0 and everything masked) gets a zero output
    # and lse = -inf. Softmax runs on a finite stand-in row so neither value nor
    # gradient is NaN.
    empty = torch.isinf(s).all(dim=-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True).masked_fill(empty, float("-inf"))
    return qg, k, v, pk, pv, p, lse, scale
