"""Triton forward of prefix attention (flash-attention style online softmax).

Row packing: a program owns ``BLOCK_M`` *packed rows* of one (batch, KV head). Packed
row ``r`` is query ``r // GROUP`` of query head ``hk * GROUP + r % GROUP``, so the
``GROUP = Hq / Hkv`` query heads that share a KV head read each K/V tile once. This is
also the decode path: with ``Nq = 1`` a tile holds the whole GQA group instead of one
row padded to ``BLOCK_M``.

Each program runs two loops of one shape, each over prefix blocks then own-key blocks
(the shared prefix ``[P, D]`` of its KV head first, then its own keys):

- the interior: the whole blocks of the prefix and the own blocks that every row of the
  tile sees whole. No bounds mask, no select; the softmax scale folds into one FMA with
  exp2. One loop, so the software pipeline does not drain at the prefix-to-own seam.
- the boundary: the prefix's partial last block and the causal diagonal (or the tail of a
  non-causal row), with the masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import FWD_SPACE, LN2, LOG2E, configs, dot_precision, launch_meta, own_visible, pruner, tune_bucket


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, qi,
    PK, PV, K, V, KPM,
    stride_pkn, stride_pkd, stride_pvn, stride_pvd,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    n_blocks, n_prefix_blocks, prefix_start, own_start, P, N_K, diag, window, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
    SCALE_POSITIVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over ``n_blocks`` key blocks in one loop: the
    first ``n_prefix_blocks`` of the prefix from ``prefix_start``, then the own keys from
    ``own_start``. One loop, so the software pipeline runs across the prefix-to-own seam.

    ``MASKED=False`` is the interior: every key exists and every row sees it (the caller
    guarantees it), so there is no bounds mask, no select, and the scale folds into one FMA,
    ``qk * scale - m`` (the row max is taken on raw scores, so it needs ``SCALE_POSITIVE``;
    otherwise the min). Padding and window masks, where present, still apply to own keys.
    ``MASKED=True`` handles the prefix's partial last block and the causal diagonal blocks.
    """
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # Rows whose keys may all be hidden in a block need the -inf guards below.
    ANY_MASK: tl.constexpr = MASKED or WINDOW_MASK or HAS_KPM
    for j in range(0, n_blocks):
        in_prefix = j < n_prefix_blocks
        key0 = tl.where(in_prefix, prefix_start + j * BLOCK_N, own_start + (j - n_prefix_blocks) * BLOCK_N)
        offs_n = key0 + tl.arange(0, BLOCK_N)
        kbase = tl.where(in_prefix, PK, K)
        vbase = tl.where(in_prefix, PV, V)
        skn = tl.where(in_prefix, stride_pkn, stride_kn)
        skd = tl.where(in_prefix, stride_pkd, stride_kd)
        svn = tl.where(in_prefix, stride_pvn, stride_vn)
        svd = tl.where(in_prefix, stride_pvd, stride_vd)
        k_ptrs = kbase + offs_n[None, :] * skn + offs_d[:, None] * skd
        v_ptrs = vbase + offs_n[:, None] * svn + offs_d[None, :] * svd
        if MASKED:
            n_ok = offs_n < tl.where(in_prefix, P, N_K)
            kt = tl.load(k_ptrs, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            vt = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            kt = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            vt = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if ANY_MASK:
            if MASKED:
                visible = n_ok[None, :]
            else:
                visible = offs_n[None, :] >= 0
            own = own_visible(visible, offs_n[None, :], qi[:, None], diag, window, CAUSAL_MASK, WINDOW_MASK)
            if HAS_KPM:
                real = tl.load(KPM + offs_n * stride_mn, mask=(offs_n < N_K) & (j >= n_prefix_blocks), other=0)
                own = own & (real[None, :] != 0)
            visible = tl.where(in_prefix, visible, own)
            s = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that have seen no key yet keep m = -inf; exponentiate against 0 instead
            # so that hidden scores give 0 rather than NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        else:
            if SCALE_POSITIVE:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(vt.dtype), vt, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, KPM, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkh, stride_pkn, stride_pkd,
    stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    H_KV, N_Q, N_K, P, WINDOW, qk_scale,
    TUNE_ROWS, TUNE_NK, TUNE_P,  # size classes for the autotune key only (utils.tune_bucket)
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SCALE_POSITIVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # 64-bit batch offsets: a batch may hold >= 2^31 elements
    hk = pid_bh % H_KV

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    h = hk * GROUP + rows % GROUP
    row_ok = qi < N_Q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Keys in two loops of the same shape, each running prefix blocks then own blocks:
    #   interior: the whole prefix blocks, then the own blocks every row of the tile sees whole;
    #   boundary: the prefix's partial last block, then the causal diagonal (or the tail).
    # Own keys are bottom-right causal: query i sees key j iff j <= i + diag (and, with a
    # sliding window, j > i + diag - WINDOW).
    K_b = K + b * stride_kb + hk * stride_kh
    V_b = V + b * stride_vb + hk * stride_vh
    KPM_b = KPM + b * stride_mb
    diag = N_K - N_Q
    n_prefix_full = P // BLOCK_N
    prefix_tail = (P % BLOCK_N != 0).to(tl.int32)
    own_lo = 0
    if IS_CAUSAL:
        qi_lo = (pid_m * BLOCK_M) // GROUP
        qi_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, N_Q - 1)
        full_end = tl.maximum(tl.minimum(qi_lo + diag + 1, N_K), 0)
        full_end = (full_end // BLOCK_N) * BLOCK_N
        own_end = tl.maximum(tl.minimum(qi_hi + diag + 1, N_K), 0)
        if HAS_WINDOW:
            own_lo = (tl.maximum(qi_lo + diag - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
            full_end = tl.maximum(full_end, own_lo)
    else:
        full_end = (N_K // BLOCK_N) * BLOCK_N
        own_end = N_K
    n_own_full = (full_end - own_lo) // BLOCK_N
    n_own_edge = tl.cdiv(tl.maximum(own_end - full_end, 0), BLOCK_N)
    PK_h = PK + hk * stride_pkh
    PV_h = PV + hk * stride_pvh
    WINDOW_MASK: tl.constexpr = IS_CAUSAL and HAS_WINDOW
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, qi, PK_h, PV_h, K_b, V_b, KPM_b,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        n_prefix_full + n_own_full, n_prefix_full, 0, own_lo, P, N_K, diag, WINDOW, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, False, WINDOW_MASK, HAS_KPM, SCALE_POSITIVE, DOT_PRECISION)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, qi, PK_h, PV_h, K_b, V_b, KPM_b,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        prefix_tail + n_own_edge, prefix_tail, n_prefix_full * BLOCK_N, full_end, P, N_K, diag, WINDOW, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, WINDOW_MASK, HAS_KPM, SCALE_POSITIVE, DOT_PRECISION)

    # A row that saw no key (P == 0, all own keys masked) gets 0 and lse = -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(Out + b * stride_ob + h[:, None] * stride_oh + qi[:, None] * stride_om
             + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty), mask=io_mask)
    tl.store(Lse + b * stride_lb + h * stride_lh + qi * stride_lm, lse, mask=row_ok)


def prefix_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs are validated by the caller.

    Shapes: q ``[B, Hq, Nq, D]`` (any strides), k/v ``[B, Hkv, Nk, D]``, prefix_k/v
    ``[Hkv, P, D]``, key_padding_mask ``[B, Nk]`` bool or None, window > 0 a causal sliding
    window over own keys (0: none).
    Returns out ``[B, Hq, Nq, D]`` (contiguous, q's dtype) and lse ``[B, Hq, Nq]`` fp32.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, P = k.shape[1], k.shape[2], prefix_k.shape[1]
    out = torch.empty((B, Hq, Nq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q.new_empty((1, 1), dtype=torch.uint8)
    meta = launch_meta(q)
    group = Hq // Hkv

    def grid(cfg):
        return (triton.cdiv(Nq * group, cfg["BLOCK_M"]), B * Hkv)

    _fwd_autotuned[grid](
        q, k, v, prefix_k, prefix_v, kpm, out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        *prefix_k.stride(), *prefix_v.stride(), *kpm.stride(),
        *out.stride(), *lse.stride(),
        Hkv, Nq, Nk, P, window, softmax_scale * LOG2E.value,
        tune_bucket(Nq * group), tune_bucket(Nk), tune_bucket(P),
        GROUP=group, IS_CAUSAL=causal, HAS_WINDOW=window > 0, HAS_KPM=key_padding_mask is not None,
        SCALE_POSITIVE=softmax_scale >= 0,
        DOT_PRECISION=dot_precision(q.dtype), **meta,
    )
    return out, lse


# Tuned per head dim, GQA group, mask kind and size class of rows (Nq x GROUP), own keys and
# prefix; pruned to the tiles the static audit clears on this device and the rows need.
_fwd_autotuned = triton.autotune(
    configs=configs(FWD_SPACE),
    key=["BLOCK_D", "GROUP", "IS_CAUSAL", "HAS_WINDOW", "HAS_KPM", "DOT_PRECISION", "TUNE_ROWS", "TUNE_NK", "TUNE_P"],
    prune_configs_by={"early_config_prune": pruner(FWD_SPACE, "BLOCK_M", lambda a, kw: a["N_Q"] * kw["GROUP"])},
)(_fwd_kernel)
