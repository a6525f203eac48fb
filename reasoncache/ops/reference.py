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
    B, Hq, Nq, D = q.shape
    cd = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    qg, s_pre, s_own, pk, pv, v = _scores(
        q, k, v, prefix_k, prefix_v, causal, softmax_scale, key_padding_mask, sliding_window, cd
    )
    m = torch.full(s_own.shape[:-1], float("-inf"), dtype=cd, device=q.device)
    for s in (s_pre, s_own):
        if s.shape[-1]:
            m = torch.maximum(m, s.amax(-1))
    m = m.masked_fill(torch.isneginf(m), 0.0)  # a row with no visible key: all scores -inf
    e_pre, e_own = (s_pre - m[..., None]).exp_(), (s_own - m[..., None]).exp_()
    l = e_pre.sum(-1) + e_own.sum(-1)
    empty = l == 0  # such a row gets output 0 and lse -inf, with finite gradients
    l = l.masked_fill(empty, 1.0)
    out = (torch.einsum("bhmp,hpd->bhmd", e_pre, pv) + e_own @ v) / l[..., None]
    lse = (m + torch.log(l)).masked_fill(empty, float("-inf"))
    return out.reshape(B, Hq, Nq, D), lse.reshape(B, Hq, Nq)


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
    out: Tensor | None = None,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Explicit backward of ``prefix_attention_ref`` (the same math as the kernels).

    ``dout [B, Hq, Nq, D]``, ``dlse [B, Hq, Nq]`` or None; ``out``/``lse`` the forward's
    outputs (recomputed when not given). Returns ``dq, dk, dv, dprefix_k, dprefix_v`` in
    the compute dtype; the prefix gradients ``[Hkv, P, D]`` are summed over the batch by
    the einsum contraction, without a per-sequence copy.
    """
    if out is None or lse is None:
        out, lse = prefix_attention_ref(
            q,
            k,
            v,
            prefix_k,
            prefix_v,
            causal=causal,
            softmax_scale=softmax_scale,
            key_padding_mask=key_padding_mask,
            sliding_window=sliding_window,
        )
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg, s_pre, s_own, pk, pv, v = _scores(
        q, k, v, prefix_k, prefix_v, causal, softmax_scale, key_padding_mask, sliding_window, cd
    )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    M = (Hq // Hkv) * Nq  # rows per KV head (written out: reshape cannot infer -1 when B = 0)
    lse = lse.to(cd).reshape(B, Hkv, M)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))[..., None]  # rows that saw nothing: p = 0
    p_pre, p_own = (s_pre - lse).exp_(), (s_own - lse).exp_()
    do = dout.to(cd).reshape(B, Hkv, M, D)
    delta = (do * out.to(cd).reshape(B, Hkv, M, D)).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.to(cd).reshape(B, Hkv, M, 1)
    ds_pre = (torch.einsum("bhmd,hpd->bhmp", do, pv) - delta).mul_(p_pre)
    ds_own = (do @ v.transpose(-1, -2) - delta).mul_(p_own)
    dq = (torch.einsum("bhmp,hpd->bhmd", ds_pre, pk) + ds_own @ k.to(cd)) * scale
    dk = ds_own.transpose(-1, -2) @ qg  # qg carries the scale
    dv = p_own.transpose(-1, -2) @ do
    dpk = torch.einsum("bhmp,bhmd->hpd", ds_pre, qg)
    dpv = torch.einsum("bhmp,bhmd->hpd", p_pre, do)
    return dq.reshape(B, Hq, Nq, D), dk, dv, dpk, dpv


def causal_visibility(nq: int, nk: int, sliding_window: int | None, device) -> Tensor:
    """Which own keys each query sees under the op's causal rule, ``[Nq, Nk]`` bool:
    bottom-right aligned (query ``i`` sees key ``j`` iff ``j <= i + Nk - Nq``) and, with a
    window ``W``, also ``j > i + Nk - Nq - W``. The one definition every path uses."""
    visible = torch.ones(nq, nk, dtype=torch.bool, device=device).tril(nk - nq)
    return visible.triu(nk - nq - sliding_window + 1) if sliding_window else visible


def _scores(q, k, v, prefix_k, prefix_v, causal, softmax_scale, key_padding_mask, sliding_window, cd):
    """Scaled scores against the prefix ``[B, Hkv, G*Nq, P]`` and the own keys
    ``[B, Hkv, G*Nq, Nk]`` (masked keys -inf). Query heads of a KV head are grouped on the
    row axis (row ``g * Nq + i``), so every product is one batched matmul and the prefix
    is never expanded per sequence. Also returns the scaled grouped queries and the
    upcast prefix_k, prefix_v and v."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qg = (q.to(cd) * scale).reshape(B, Hkv, (Hq // Hkv) * Nq, D)
    pk, pv = prefix_k.to(cd), prefix_v.to(cd)
    s_pre = torch.einsum("bhmd,hpd->bhmp", qg, pk)
    s_own = qg @ k.to(cd).transpose(-1, -2)
    visible = causal_visibility(Nq, Nk, sliding_window, q.device) if causal else None
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, None, :]
        visible = kpm if visible is None else visible & kpm
    if visible is not None:
        s_own.view(B, Hkv, Hq // Hkv, Nq, Nk).masked_fill_(~visible, float("-inf"))
    return qg, s_pre, s_own, pk, pv, v.to(cd)
