"""The torch backend's fast CPU path: PyTorch's fused CPU flash-attention kernel, split
the Hydragen way so the shared prefix is never copied per sequence.

- own keys: each sequence's queries (the GROUP query heads of a KV head stacked on the
  row axis) against its own keys, with the exact causal / window / padding mask;
- prefix: every query of the whole batch against the one ``[Hkv, P, D]`` prefix;
- merge by log-sum-exp.

The backward calls the kernel's backward once per part with the *merged* output and
log-sum-exp: its probabilities are then ``exp(s - lse_total)`` and its row term
``rowsum(dO * O_total)``, exactly the full softmax's gradient (FlashAttention's split-KV
backward). Used only where that is exact: a non-empty prefix (so every row sees a key),
fp32/bf16, and no gradient flowing into ``lse``; everything else takes the reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reference import causal_visibility

_fwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_bwd = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def supported(q: Tensor, prefix_k: Tensor) -> bool:
    """Whether the CPU flash path takes these inputs: a non-empty ``q [B, Hq, T, D]`` fp32 or bf16 on
    the CPU, a non-empty prefix ``prefix_k [Hkv, P, D]``, and a torch that has aten's CPU flash
    kernels (which die with SIGFPE on zero query rows, so an empty q takes the reference)."""
    return (
        q.numel() > 0
        and _fwd is not None
        and _bwd is not None
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and prefix_k.shape[1] > 0
    )


def _own_mask(q, k, kpm, causal, window) -> tuple[Tensor | None, Tensor | None]:
    """Additive mask ``[B|1, 1, G*Nq, Nk]`` in q's dtype for the own-key part and which rows
    see at least one own key ``[B|1, 1, G*Nq]`` (both None: every row sees every own key,
    as a causal decode step does when no window cuts its cache)."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    visible = None
    if causal and not (Nq == 1 and (not window or window >= Nk)):
        visible = causal_visibility(Nq, Nk, window, q.device).repeat(Hq // Hkv, 1)[None, None]
    if kpm is not None:
        pad = kpm[:, None, None, :]
        visible = pad if visible is None else visible & pad
    if visible is None:
        return None, None
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    return mask, visible.any(-1)


def _grouped(t: Tensor, hkv: int) -> Tensor:
    """``[B, Hq, N, D]`` -> ``[B, Hkv, G*N, D]`` (row ``g * N + i``)."""
    B, H, N = t.shape[:3]
    return t.reshape(B, hkv, (H // hkv) * N, *t.shape[3:])


def _batch_rows(t: Tensor) -> Tensor:
    """``[B, Hkv, M, ...]`` -> ``[1, Hkv, B*M, ...]``: every sequence's rows against the shared prefix."""
    B, H, M = t.shape[:3]
    return t.transpose(0, 1).reshape(1, H, B * M, *t.shape[3:])


def _unbatch_rows(t: Tensor, B: int) -> Tensor:
    H, BM = t.shape[1], t.shape[2]
    return t.reshape(H, B, BM // B, *t.shape[3:]).transpose(0, 1)


def fwd(q, k, v, pk, pv, kpm, causal, scale, window):
    """out ``[B, Hq, Nq, D]`` (q's dtype) and lse ``[B, Hq, Nq]`` fp32."""
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    qg = _grouped(q, Hkv)
    o_pre, l_pre = _fwd(_batch_rows(qg), pk[None], pv[None], 0.0, False, scale=scale)
    o_pre, l_pre = _unbatch_rows(o_pre, B).float(), _unbatch_rows(l_pre, B)
    # aten's kernel treats a row whose scores are all NaN as fully masked (out 0, lse 0), so a
    # prefix head that is all NaN (a diverged training) would be dropped without a trace; the
    # reference and the kernels give NaN there, and so does this path (the sum is the cheap test:
    # 2 us against 16 for the per-head mask on a decode step's prefix).
    if math.isnan(pk.sum().item()):
        l_pre = l_pre.masked_fill(torch.isnan(pk).flatten(1).any(1)[None, :, None], float("nan"))
    if k.shape[2] == 0:
        return o_pre.to(q.dtype).reshape(B, Hq, Nq, D), l_pre.reshape(B, Hq, Nq).contiguous()
    mask, seen = _own_mask(q, k, kpm, causal, window)
    o_own, l_own = _fwd(qg, k, v, 0.0, False, attn_mask=mask, scale=scale)
    # A decode step whose every row sees an own key (the readback is free on the CPU): one
    # lerp by the prefix's share exp(l_pre - lse). Prefill keeps the weighted sum below, so a
    # padded, a packed and a lone sequence round alike (the trainer's packing check needs it).
    if Nq == 1 and (seen is None or bool(seen.all())):
        out = torch.lerp(o_own.float(), o_pre, torch.sigmoid(l_pre - l_own)[..., None])
        return out.to(q.dtype).reshape(B, Hq, Nq, D), torch.logaddexp(l_pre, l_own).reshape(B, Hq, Nq)
    if seen is not None:  # the kernel's lse for a row with every own key masked is not -inf
        l_own = l_own.masked_fill(~seen, float("-inf"))
    lse = torch.logaddexp(l_pre, l_own)
    w_own = torch.exp(l_own - lse)[..., None]
    own = torch.where(w_own > 0, o_own.float() * w_own, 0.0)  # weight 0: ignore whatever o_own holds
    out = o_pre * torch.exp(l_pre - lse)[..., None] + own
    return out.to(q.dtype).reshape(B, Hq, Nq, D), lse.reshape(B, Hq, Nq)


def bwd(dout, q, k, v, pk, pv, kpm, out, lse, causal, scale, window):
    """dq, dk, dv, dprefix_k, dprefix_v (inputs' dtypes; prefix gradients summed over the batch)."""
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    qg, og, dog = _grouped(q, Hkv), _grouped(out, Hkv), _grouped(dout.to(q.dtype), Hkv)
    lg = lse.reshape(B, Hkv, -1).to(torch.float32)
    dq_pre, dpk, dpv = _bwd(
        _batch_rows(dog), _batch_rows(qg), pk[None], pv[None], _batch_rows(og), _batch_rows(lg), 0.0, False, scale=scale
    )
    dq = _unbatch_rows(dq_pre, B)
    if k.shape[2]:
        mask, _ = _own_mask(q, k, kpm, causal, window)
        dq_own, dk, dv = _bwd(dog, qg, k, v, og, lg, 0.0, False, attn_mask=mask, scale=scale)
        dq = dq + dq_own
    else:
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    return dq.reshape(B, Hq, Nq, D), dk, dv, dpk[0], dpv[0]
