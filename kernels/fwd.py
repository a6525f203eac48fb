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

import os

import torch
import triton
import triton.language as tl

from .utils import (
    FWD_SPACE,
    LN2,
    LOG2E,
    configs,
    dot_precision,
    fwd_pass_tile,
    interpreting,
    launch_meta,
    own_visible,
    pruner,
    tune_bucket,
)


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, qi,
    PK, PV, K, V, KPM, KD, VD,
    stride_pkn, stride_pkd, stride_pvn, stride_pvd,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    n_blocks, n_prefix_blocks, prefix_start, own_start, P, N_K, diag, window, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
    SCALE_POSITIVE: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over ``n_blocks`` key blocks in one loop: the
    first ``n_prefix_blocks`` of the prefix from ``prefix_start``, then the own keys from
    ``own_start``. One loop, so the software pipeline runs across the prefix-to-own seam.

    ``MASKED=False`` is the interior: every key exists and every row sees it (the caller
    guarantees it), so there is no bounds mask, no select, and the scale folds into one FMA,
    ``qk * scale - m`` (the row max is taken on raw scores, so it needs ``SCALE_POSITIVE``;
    otherwise the min). Padding and window masks, where present, still apply to own keys.
    ``MASKED=True`` handles the prefix's partial last block and the causal diagonal blocks.

    ``USE_TMA`` (interior only): K and V tiles come through the tensor descriptors ``KD``/``VD``
    ``[keys, HEAD_DIM]`` (TMA on sm_90) instead of pointers; a descriptor covers one tensor,
    so the caller runs the prefix's blocks and the own blocks as two calls.
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
        if USE_TMA:
            tl.static_assert(not MASKED, "the descriptor path serves whole interior blocks only")
            kt = tl.trans(KD.load([key0, 0]))
            vt = VD.load([key0, 0])
        elif MASKED:
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
def _normalise(acc, l_i, m_i):
    """The online-softmax state as (out, lse): out = acc / l, lse = ln(sum exp); a row that
    saw no key (l = 0) gets 0 and lse = -inf."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    return out, lse


@triton.jit
def _merge_partials(
    acc, l_i, m_i, PartO, PartL, b, h, qi, offs_d, io_mask, row_ok, n,
    stride_s, stride_b, stride_h, stride_m, stride_d, stride_ls, stride_lb, stride_lh, stride_lm,
):
    """Merge ``n`` normalised partials ``PartO [n, B, Hq, Nq, D]`` with their lse ``PartL``
    into the online-softmax state, in order: partial ``s`` is the state (o_s, lse_s in base
    2, 1). Loads go through L2 (``.cg``): other programs may have just written them."""
    for s in range(0, n):
        o_s = tl.load(PartO + s * stride_s + b * stride_b + h[:, None] * stride_h + qi[:, None] * stride_m
                      + offs_d[None, :] * stride_d, mask=io_mask, other=0.0, cache_modifier=".cg")
        m_s = tl.load(PartL + s * stride_ls + b * stride_lb + h * stride_lh + qi * stride_lm,
                      mask=row_ok, other=float("-inf"), cache_modifier=".cg") * LOG2E
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        beta = tl.math.exp2(m_s - m_safe)
        acc = acc * alpha[:, None] + o_s * beta[:, None]
        l_i = l_i * alpha + beta
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, KPM, Out, Lse, OInit, LInit, SplitO, SplitL, Tickets,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkh, stride_pkn, stride_pkd,
    stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_is, stride_ib, stride_ih, stride_im, stride_id,
    stride_js, stride_jb, stride_jh, stride_jm,
    stride_ss, stride_sb, stride_sh, stride_sm, stride_sd,
    stride_ts, stride_tb, stride_th, stride_tm,
    H_KV, N_Q, N_K, P, WINDOW, qk_scale, INIT_SPLITS, KV_CHUNK,
    TUNE_ROWS, TUNE_NK, TUNE_P,  # size classes for the autotune key only (utils.tune_bucket)
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, SCALE_POSITIVE: tl.constexpr,
    HAS_INIT: tl.constexpr, SPLIT_KV: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    TMA_MIN_ROWS: tl.constexpr,
):
    """One (row tile, batch x KV head, own-key split) program. ``HAS_INIT``: start from
    ``INIT_SPLITS`` partial results ``OInit [S, B, Hq, Nq, D]`` (normalised) and ``LInit
    [S, B, Hq, Nq]`` (their lse) instead of from nothing; the shared-prefix pass leaves the
    prefix's part there and this kernel then runs with ``P = 0``.

    ``SPLIT_KV`` (decode with few sequences): split ``s`` takes own keys ``[s x KV_CHUNK,
    (s + 1) x KV_CHUNK)`` (``KV_CHUNK`` a multiple of every ``BLOCK_N``), split 0 also the
    prefix or its partials; each writes a normalised partial to ``SplitO``/``SplitL``, and
    the last of a tile's splits to finish (a ticket per tile in ``Tickets``, left at 0
    again) merges them in split order into ``Out``/``Lse``.

    ``USE_TMA``: the interior blocks load K/V through device-side tensor descriptors (TMA on
    sm_90; the launcher checks the strides and alignment TMA needs and sets the allocator
    for the descriptors' scratch), the prefix's and the own blocks in two loops. The
    boundary blocks keep pointer loads with their masks. Tiles under ``TMA_MIN_ROWS`` rows ignore it."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    first = split == 0
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
    if HAS_INIT:
        # A normalised partial o_s with lse_s is the state (acc = o_s, m = lse_s in base 2,
        # l = 1); states merge like any two key blocks of the online softmax.
        acc, l_i, m_i = _merge_partials(
            acc, l_i, m_i, OInit, LInit, b, h, qi, offs_d, io_mask, row_ok, tl.where(first, INIT_SPLITS, 0),
            stride_is, stride_ib, stride_ih, stride_im, stride_id, stride_js, stride_jb, stride_jh, stride_jm)

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
    if SPLIT_KV:  # this split's share of the own keys; only split 0 takes the prefix
        split_end = (split + 1) * KV_CHUNK
        own_lo = tl.minimum(tl.maximum(own_lo, split * KV_CHUNK), split_end)  # <= split_end: empty, not negative
        full_end = tl.minimum(tl.maximum(full_end, own_lo), split_end)
        own_end = tl.minimum(tl.maximum(own_end, full_end), split_end)
        n_prefix_full = tl.where(first, n_prefix_full, 0)
        prefix_tail = tl.where(first, prefix_tail, 0)
    n_own_full = (full_end - own_lo) // BLOCK_N
    n_own_edge = tl.cdiv(tl.maximum(own_end - full_end, 0), BLOCK_N)
    PK_h = PK + hk * stride_pkh
    PV_h = PV + hk * stride_pvh
    WINDOW_MASK: tl.constexpr = IS_CAUSAL and HAS_WINDOW
    # TMA for the wgmma tiles only (TMA_MIN_ROWS = 64): the 16- and 32-row mma.sync tiles
    # (decode, short chunks) gain little from it, and at D=128 two of them spilled 8 bytes in
    # the loop with it. The interpreter passes 1, so its pinned 16-row tile tests the path.
    TMA: tl.constexpr = USE_TMA and BLOCK_M >= TMA_MIN_ROWS
    if TMA:
        # Shapes of at least 1 row: a descriptor of an empty tensor is never read, but must be valid.
        pkd = tl.make_tensor_descriptor(PK_h, [tl.maximum(P, 1), HEAD_DIM], [stride_pkn, 1], [BLOCK_N, BLOCK_D])
        pvd = tl.make_tensor_descriptor(PV_h, [tl.maximum(P, 1), HEAD_DIM], [stride_pvn, 1], [BLOCK_N, BLOCK_D])
        kd = tl.make_tensor_descriptor(K_b, [tl.maximum(N_K, 1), HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        vd = tl.make_tensor_descriptor(V_b, [tl.maximum(N_K, 1), HEAD_DIM], [stride_vn, 1], [BLOCK_N, BLOCK_D])
        acc, l_i, m_i = _fwd_blocks(  # the prefix's whole blocks: no own-key masks
            acc, l_i, m_i, q, qi, PK_h, PV_h, K_b, V_b, KPM_b, pkd, pvd,
            stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
            n_prefix_full, n_prefix_full, 0, own_lo, P, N_K, diag, WINDOW, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, False, False, False, SCALE_POSITIVE, DOT_PRECISION, True)
        acc, l_i, m_i = _fwd_blocks(  # the own blocks every row sees whole
            acc, l_i, m_i, q, qi, PK_h, PV_h, K_b, V_b, KPM_b, kd, vd,
            stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
            n_own_full, 0, 0, own_lo, P, N_K, diag, WINDOW, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, False, WINDOW_MASK, HAS_KPM, SCALE_POSITIVE, DOT_PRECISION, True)
    else:
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, qi, PK_h, PV_h, K_b, V_b, KPM_b, PK_h, PV_h,
            stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
            n_prefix_full + n_own_full, n_prefix_full, 0, own_lo, P, N_K, diag, WINDOW, qk_scale,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, False, WINDOW_MASK, HAS_KPM, SCALE_POSITIVE, DOT_PRECISION, False)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, qi, PK_h, PV_h, K_b, V_b, KPM_b, PK_h, PV_h,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        prefix_tail + n_own_edge, prefix_tail, n_prefix_full * BLOCK_N, full_end, P, N_K, diag, WINDOW, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, WINDOW_MASK, HAS_KPM, SCALE_POSITIVE, DOT_PRECISION, False)

    # A row that saw no key (P == 0, all own keys masked) gets 0 and lse = -inf.
    out, lse = _normalise(acc, l_i, m_i)
    out_ptrs = Out + b * stride_ob + h[:, None] * stride_oh + qi[:, None] * stride_om + offs_d[None, :] * stride_od
    lse_ptrs = Lse + b * stride_lb + h * stride_lh + qi * stride_lm
    if SPLIT_KV:
        tl.store(SplitO + split * stride_ss + b * stride_sb + h[:, None] * stride_sh + qi[:, None] * stride_sm
                 + offs_d[None, :] * stride_sd, out, mask=io_mask)
        tl.store(SplitL + split * stride_ts + b * stride_tb + h * stride_th + qi * stride_tm, lse, mask=row_ok)
        # CUTLASS's semaphore pattern: every thread's partial is written before the CTA
        # barrier, and the ticket's atomic (acq_rel, GPU scope) publishes them; the last
        # split to take a ticket reads all partials (.cg: from L2, not a stale L1).
        tl.debug_barrier()
        ticket_ptr = Tickets + pid_bh * tl.num_programs(0) + pid_m
        n_splits = tl.num_programs(2)
        if tl.atomic_add(ticket_ptr, 1) == n_splits - 1:
            m_f = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            l_f = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc_f = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            acc_f, l_f, m_f = _merge_partials(
                acc_f, l_f, m_f, SplitO, SplitL, b, h, qi, offs_d, io_mask, row_ok, n_splits,
                stride_ss, stride_sb, stride_sh, stride_sm, stride_sd, stride_ts, stride_tb, stride_th, stride_tm)
            out, lse = _normalise(acc_f, l_f, m_f)
            tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=io_mask)
            tl.store(lse_ptrs, lse, mask=row_ok)
            tl.atomic_xchg(ticket_ptr, 0)  # ready for the next launch
    else:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=io_mask)
        tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _prefix_pass_kernel(
    Q, PK, PV, OP, LP,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_pkh, stride_pkn, stride_pkd,
    stride_pvh, stride_pvn, stride_pvd,
    stride_os, stride_ob, stride_oh, stride_om, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lm,
    N_Q, ROWS, P, BLOCKS_PER_SPLIT, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_POSITIVE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Decode's shared-prefix pass (Hydragen's inter-sequence batching): the rows of
    EVERY sequence of one KV head, ``ROWS = B x N_Q x GROUP``, form one tile problem
    against the prefix, so a prefix tile is read once per ``BLOCK_M`` rows of the whole
    batch instead of once per sequence. Program (row tile, KV head, split) covers prefix
    blocks ``[split x BLOCKS_PER_SPLIT, ...)`` and writes its normalised partial and lse
    to ``OP [S, B, Hq, Nq, D]``, ``LP [S, B, Hq, Nq]`` (fp32)."""
    pid_m = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < ROWS
    per_seq = N_Q * GROUP
    b = (rows // per_seq).to(tl.int64)  # 64-bit batch offsets
    qi = (rows % per_seq) // GROUP
    h = hk * GROUP + rows % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b[:, None] * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    PK_h = PK + hk * stride_pkh
    PV_h = PV + hk * stride_pvh
    n_full = P // BLOCK_N
    j_lo = split * BLOCKS_PER_SPLIT
    j_hi = tl.minimum(j_lo + BLOCKS_PER_SPLIT, tl.cdiv(P, BLOCK_N))
    whole = tl.maximum(tl.minimum(j_hi, n_full) - j_lo, 0)
    tail = ((n_full < j_hi) & (P % BLOCK_N != 0)).to(tl.int32)
    # Own-key arguments are unused: every block here is a prefix block.
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, qi, PK_h, PV_h, PK_h, PV_h, PK_h, PK_h, PV_h,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_pkn, stride_pkd, stride_pvn, stride_pvd, 0,
        whole, whole, j_lo * BLOCK_N, 0, P, 0, 0, 0, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, False, False, False, SCALE_POSITIVE, DOT_PRECISION, False)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, qi, PK_h, PV_h, PK_h, PV_h, PK_h, PK_h, PV_h,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_pkn, stride_pkd, stride_pvn, stride_pvd, 0,
        tail, tail, n_full * BLOCK_N, 0, P, 0, 0, 0, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, False, False, False, SCALE_POSITIVE, DOT_PRECISION, False)
    out, lse = _normalise(acc, l_i, m_i)
    tl.store(OP + split * stride_os + b[:, None] * stride_ob + h[:, None] * stride_oh + qi[:, None] * stride_om
             + offs_d[None, :] * stride_od, out, mask=io_mask)
    tl.store(LP + split * stride_ls + b * stride_lb + h * stride_lh + qi * stride_lm, lse, mask=row_ok)


# Up to this many packed rows per sequence (Nq x GROUP), the forward first runs the
# shared-prefix pass across the batch (decode, speculative verification, short chunks).
SHARED_PREFIX_MAX_ROWS = 64


def shared_prefix_plan(B: int, rows: int, P: int, hkv: int, block_d: int, device: torch.device, force: bool = False):
    """(tile, splits, blocks per split) of the shared-prefix pass for ``B`` sequences of
    ``rows`` packed rows each, or None where the plain forward is the better launch: more
    rows per sequence than ``SHARED_PREFIX_MAX_ROWS``, no prefix, or one sequence with a
    single prefix tile. Fixed, never autotuned: no timing decides it, so nothing is looked
    up or benchmarked per decode step. Splits over the prefix fill about two waves of the
    GPU when the batch alone does not. ``force``: a plan for one sequence with one prefix
    tile too. Rows above the limit never get one, so the own-key pass that merges the
    partials always runs a tile of at most that many rows (the audit checks those)."""
    if P == 0 or rows > SHARED_PREFIX_MAX_ROWS:
        return None
    tile = fwd_pass_tile(B * rows, block_d, device)
    p_blocks = triton.cdiv(P, tile.block_n)
    if B == 1 and p_blocks == 1 and not force:
        return None
    programs = triton.cdiv(B * rows, tile.block_m) * hkv
    if device.type == "cuda":
        want = triton.cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, programs)
    else:
        want = 2  # the interpreter: exercise the merge
    per_split = triton.cdiv(p_blocks, max(1, min(want, p_blocks, 16)))
    return tile, triton.cdiv(p_blocks, per_split), per_split


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
    shared_prefix: bool | None = None,
    kv_splits: int | None = None,
    tma: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs are validated by the caller.

    Shapes: q ``[B, Hq, Nq, D]`` (any strides), k/v ``[B, Hkv, Nk, D]``, prefix_k/v
    ``[Hkv, P, D]``, key_padding_mask ``[B, Nk]`` bool or None, window > 0 a causal sliding
    window over own keys (0: none). ``shared_prefix``: run the prefix as one tile problem
    across the batch first (``_prefix_pass_kernel``); None decides by ``shared_prefix_plan``
    (decode-sized rows), True also for one sequence with one prefix tile, False never
    (tests and benchmarks compare both). ``kv_splits``: force the split-KV count of
    decode-sized rows (None: ``own_split_plan`` decides from the device). ``tma``: load the
    interior K/V tiles through tensor descriptors (``tma_unusable`` says when they cannot
    be); None follows ``REASONCACHE_TRITON_TMA`` (off unless set to 1, until a GPU has
    measured it), True insists and raises with the reason where they cannot be used.
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
    qk_scale = softmax_scale * LOG2E.value
    prec = dot_precision(q.dtype)

    plan = None
    if shared_prefix is not False:
        plan = shared_prefix_plan(B, Nq * group, P, Hkv, meta["BLOCK_D"], q.device, force=bool(shared_prefix))
    if plan is not None:
        tile, splits, per_split = plan
        part_o = torch.empty((splits, B, Hq, Nq, D), dtype=torch.float32, device=q.device)
        part_l = torch.empty((splits, B, Hq, Nq), dtype=torch.float32, device=q.device)
        _prefix_pass_kernel[(triton.cdiv(B * Nq * group, tile.block_m), Hkv, splits)](
            q, prefix_k, prefix_v, part_o, part_l,
            *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *part_o.stride(), *part_l.stride(),
            Nq, B * Nq * group, P, per_split, qk_scale,
            GROUP=group, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, SCALE_POSITIVE=softmax_scale >= 0,
            DOT_PRECISION=prec, num_warps=tile.warps, num_stages=tile.stages, **meta)
        own_p = 0  # the prefix is done: the own-key pass starts from its partials
    else:
        part_o = part_l = lse  # unused
        splits, own_p = 0, P

    use_tma = _want_tma(tma, k, v, prefix_k, prefix_v)
    kv_splits, chunk = own_split_plan(B, Nq * group, Nk, Hkv, q.device, kv_splits)
    if kv_splits > 1:
        split_o = torch.empty((kv_splits, B, Hq, Nq, D), dtype=torch.float32, device=q.device)
        split_l = torch.empty((kv_splits, B, Hq, Nq), dtype=torch.float32, device=q.device)
        # one ticket per (row tile, batch x KV head); the smallest tile has 16 rows
        tickets = _tickets(B * Hkv * triton.cdiv(Nq * group, 16), q.device)
    else:
        split_o = split_l = tickets = lse  # unused

    def grid(cfg):
        return (triton.cdiv(Nq * group, cfg["BLOCK_M"]), B * Hkv, kv_splits)

    init_o = part_o.stride() if plan is not None else (0,) * 5
    init_l = part_l.stride() if plan is not None else (0,) * 4
    _fwd_autotuned[grid](
        q, k, v, prefix_k, prefix_v, kpm, out, lse, part_o, part_l, split_o, split_l, tickets,
        *q.stride(), *k.stride(), *v.stride(),
        *prefix_k.stride(), *prefix_v.stride(), *kpm.stride(),
        *out.stride(), *lse.stride(), *init_o, *init_l,
        *(split_o.stride() if kv_splits > 1 else (0,) * 5), *(split_l.stride() if kv_splits > 1 else (0,) * 4),
        Hkv, Nq, Nk, own_p, window, qk_scale, splits, chunk,
        tune_bucket(Nq * group), tune_bucket(Nk), tune_bucket(own_p),
        GROUP=group, IS_CAUSAL=causal, HAS_WINDOW=window > 0, HAS_KPM=key_padding_mask is not None,
        SCALE_POSITIVE=softmax_scale >= 0, HAS_INIT=plan is not None, SPLIT_KV=kv_splits > 1,
        DOT_PRECISION=prec, USE_TMA=use_tma, TMA_MIN_ROWS=1 if interpreting() else TMA_MIN_ROWS, **meta,
    )
    return out, lse


# The smallest row tile whose interior K/V loads go through TMA descriptors (the wgmma tiles).
TMA_MIN_ROWS = 64


def tma_unusable(*tensors: torch.Tensor) -> str | None:
    """Why the forward's K/V tiles cannot come through TMA descriptors, or None where they
    can: the Triton build has no ``tl.make_tensor_descriptor``, the device is not sm_90 or
    newer (the interpreter runs descriptors on the CPU), a tensor's innermost stride is not
    1 or its address or another stride not a multiple of 16 bytes (TMA's rules), or no
    scratch allocator for the descriptors can be made sure of. Tensors: ``[..., D]`` each."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"Triton {triton.__version__} has no tl.make_tensor_descriptor"
    dev = tensors[0].device
    if not interpreting() and (dev.type != "cuda" or torch.cuda.get_device_capability(dev)[0] < 9):
        return f"TMA needs an sm_90 or newer GPU, got {dev}"
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1:
            return f"innermost stride {t.stride(-1)} of a {tuple(t.shape)} tensor (TMA needs 1)"
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return f"a {tuple(t.shape)} tensor with strides {t.stride()} or its address is not 16-byte aligned"
    if not _allocator_ready():  # last: it sets our allocator where none is
        return f"cannot tell whether Triton {triton.__version__} has a scratch allocator (runtime._allocation)"
    return None


def _want_tma(tma: bool | None, *tensors: torch.Tensor) -> bool:
    """The launch's ``USE_TMA``: ``tma`` or, for None, ``REASONCACHE_TRITON_TMA=1``; True with
    a reason it cannot run raises (a silent fallback would measure the wrong kernel)."""
    if tma is None:  # the environment asks for every launch; those that cannot, load by pointer
        return os.environ.get("REASONCACHE_TRITON_TMA", "0") == "1" and tma_unusable(*tensors) is None
    if not tma:
        return False
    reason = tma_unusable(*tensors)
    if reason is not None:
        raise ValueError(f"tma=True, but the forward cannot use TMA descriptors here: {reason}")
    return True


def _scratch(size: int, alignment: int, stream):
    """Global scratch for device-side tensor descriptors (128 bytes per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _allocator_ready() -> bool:
    """Make sure Triton has an allocator for the descriptors' scratch: ours is set when none
    is; a caller's own allocator is kept and used. Reads Triton's private allocation module
    (a ContextVar since 3.3, a plain module global before); False where it is neither."""
    try:
        from triton.runtime import _allocation
    except ImportError:
        return False
    current = getattr(_allocation, "_allocator", None)
    current = current.get() if hasattr(current, "get") else current
    null = getattr(_allocation, "NullAllocator", None)
    if current is None or null is None:
        return False
    if isinstance(current, null):
        triton.set_allocator(_scratch)
    return True


# Split-KV chunks are multiples of this many own keys: a multiple of every BLOCK_N, so a
# chunk boundary is a block boundary.
KV_CHUNK_ALIGN = 128
_TICKETS: dict = {}


def _tickets(n: int, device: torch.device) -> torch.Tensor:
    """At least ``n`` zeroed int32 tickets on ``device``, allocated once and grown when
    needed (the kernel leaves them at 0), so a decode step allocates nothing for them.
    Shared by every launch on the device: two split-KV launches must not run concurrently
    on different streams."""
    buf = _TICKETS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _TICKETS[device] = buf
    return buf


def own_split_plan(B: int, rows: int, Nk: int, hkv: int, device: torch.device, splits: int | None = None):
    """(splits, keys per split) over the own keys for the forward's grid. Only decode-sized
    rows (at most ``SHARED_PREFIX_MAX_ROWS`` per sequence) split, and only when the
    sequences and KV heads alone leave the GPU under two waves and every split gets at
    least 256 keys; at most 16 splits. ``splits`` forces a count (tests, benchmarks)."""
    whole = (1, max(Nk, 1))
    if rows > SHARED_PREFIX_MAX_ROWS or Nk == 0:
        return whole
    if splits is None:
        if device.type != "cuda":
            return whole
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = min(16, triton.cdiv(2 * sms, B * hkv), Nk // 256)
    if splits <= 1:
        return whole
    chunk = triton.cdiv(triton.cdiv(Nk, splits), KV_CHUNK_ALIGN) * KV_CHUNK_ALIGN
    splits = triton.cdiv(Nk, chunk)
    return (splits, chunk) if splits > 1 else whole


# Tuned per head dim, GQA group, mask kind and size class of rows (Nq x GROUP), own keys and
# prefix; pruned to the tiles the static audit clears on this device and the rows need.
_fwd_autotuned = triton.autotune(
    configs=configs(FWD_SPACE),
    key=["BLOCK_D", "GROUP", "IS_CAUSAL", "HAS_WINDOW", "HAS_KPM", "HAS_INIT", "SPLIT_KV", "DOT_PRECISION",
         "USE_TMA", "TUNE_ROWS", "TUNE_NK", "TUNE_P"],
    prune_configs_by={"early_config_prune": pruner(FWD_SPACE, "BLOCK_M", lambda a, kw: a["N_Q"] * kw["GROUP"])},
)(_fwd_kernel)
