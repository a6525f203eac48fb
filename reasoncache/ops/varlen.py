"""Packed (variable-length) sequences for the fused op, in FlashAttention's varlen convention.

q ``[Tq, Hq, D]`` and k, v ``[Tk, Hkv, D]`` hold several sequences back to back;
``cu_seqlens_q`` / ``cu_seqlens_k`` (int32, ``[S + 1]``, from 0 to the token count) say
where each one starts. Every segment attends to the whole shared prefix, then, bottom-right
causally, to its own keys only, never across segments.

How it runs today, on every backend: the segments are gathered into a batch, each
LEFT-padded to the longest, with the padded keys masked. Left padding of both queries and
keys keeps every segment's bottom-right diagonal in place (query ``i`` of a segment with
``nq`` queries and ``nk`` keys sits at ``i + maxq - nq`` and key ``j`` at ``j + maxk - nk``,
so ``j' <= i' + maxk - maxq`` iff ``j <= i + nk - nq``; the sliding window likewise), so
the result is exact. The cost is that of the padded batch (``S x maxq x maxk``), not of the
segments alone; kernels that walk the segments directly are not written yet.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_cu_seqlens(cu: Tensor, name: str, total: int, device: torch.device) -> list[int]:
    """Validate one ``cu_seqlens`` argument and return it as a host list (one sync)."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be an int32 tensor [num_segments + 1], got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (FlashAttention's varlen convention), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D [num_segments + 1], got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}; all tensors must share a device")
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be non-decreasing (segment lengths >= 0), got {values}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the token count {total}, got {values[-1]}")
    return values


def _left_padded_index(bounds: list[int], width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For segments ``bounds`` (cu_seqlens as a list) left-padded to ``width``: the packed
    row of every slot ``[S, width]`` (the pad slots point at row ``bounds[-1]``, a zero row
    the caller appends) and which slots are real ``[S, width]``."""
    starts = torch.tensor(bounds[:-1], dtype=torch.long, device=device)
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], dtype=torch.long, device=device)
    slot = torch.arange(width, device=device)
    offset = slot[None, :] - (width - lengths)[:, None]  # position within the segment, < 0 for pads
    real = offset >= 0
    index = torch.where(real, starts[:, None] + offset, torch.full_like(offset, bounds[-1]))
    return index, real


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """``x [T, H, D]`` -> ``[S, H, W, D]`` with the slots of ``index [S, W]`` (row T is zeros)."""
    padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return padded[index].transpose(1, 2)


def varlen_attention(
    attend, q, k, v, prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, causal, scale, window, backend, cache_ids=None
) -> tuple[Tensor, Tensor]:
    """Run ``attend`` (the batched op) on the left-padded batch of segments (each segment
    its cache from ``cache_ids [S]`` when given); returns ``out [Tq, Hq, D]`` and
    ``lse [Tq, Hq]``. Arguments validated by the caller."""
    device = q.device
    index_q, real_q = _left_padded_index(cu_q, max_q, device)
    index_k, real_k = _left_padded_index(cu_k, max_k, device)
    out, lse = attend(
        _gather(q, index_q),
        _gather(k, index_k),
        _gather(v, index_k),
        prefix_k,
        prefix_v,
        causal=causal,
        softmax_scale=scale,
        key_padding_mask=real_k,
        return_lse=True,
        sliding_window=window,
        backend=backend,
        cache_ids=cache_ids,
    )
    # Real slots in row-major order are the packed tokens in order.
    return out.transpose(1, 2)[real_q], lse.transpose(1, 2)[real_q]
