"""Triton backward of prefix attention.

Four launches, each owning its outputs (no float atomics, so every run is bitwise
identical):

1. ``_bwd_preprocess``: ``delta = rowsum(dO * O) - dlse``.
2. ``_bwd_dkdv_kernel``: one program per (own-key block, batch, KV head) loops over the
   packed rows (all GROUP query heads) that can see its keys (under a sliding window, only
   the rows whose window reaches them). Tiles are computed transposed, K and V on the left
   as in the Triton tutorial, so dV += P^T dO and dK += dS^T Q take P^T and dS^T as they
   come out of the dot, with no transpose through shared memory.
3. ``_bwd_dq_kernel``: one program per packed row block sweeps the prefix, then its own keys.
4. ``_bwd_dprefix_kernel``: one program per (prefix block, KV head, split) loops over
   its share of every sequence's row blocks (transposed tiles, as dK/dV), so the prefix gradient is summed over the
   batch inside the kernel. ``SPLITS`` (fixed by the grid, never by the batch) fp32
   partials are then summed in a fixed order: scratch is ``[SPLITS, Hkv, P, D]``, never
   ``[B, Hkv, P, D]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    DKDV_SPACE,
    DQ_SPACE,
    LOG2E,
    configs,
    dot_precision,
    dprefix_tile,
    interpreting,
    launch_meta,
    own_visible,
    pruner,
    tune_bucket,
)


@triton.jit
def _bwd_preprocess(
    O, DO, DLse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // H).to(tl.int64)  # 64-bit batch offsets
    h = tl.program_id(1) % H
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    lse_off = b * stride_lb + h * stride_lh + offs_m * stride_lm
    if HAS_DLSE:
        delta -= tl.load(DLse + lse_off, mask=offs_m < N_Q, other=0.0)
    tl.store(Delta + lse_off, delta, mask=offs_m < N_Q)


@triton.jit
def _load_row_tile(
    Q, DO, Lse, Delta, b, hk, start_m,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    N_Q,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Load one packed row tile: q, dO, lse (base 2, +inf on dead rows so p = 0), delta."""
    rows = start_m + tl.arange(0, BLOCK_M)
    qi = rows // GROUP
    h = hk * GROUP + rows % GROUP
    row_ok = qi < N_Q
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h[:, None] * stride_doh + qi[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    lse_off = b * stride_lb + h * stride_lh + qi * stride_lm
    lse = tl.load(Lse + lse_off, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(Delta + lse_off, mask=row_ok, other=0.0)
    return q, do, lse2, delta, qi, h, row_ok


@triton.jit
def _probs_and_dscores(q, do, lse2, delta, k, v, visible, qk_scale, MASKED: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """p = softmax probabilities [M, N] and dS = p * (dP - delta) for one tile pair;
    ``MASKED`` as in ``_probs_and_dscores_t``."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _probs_and_dscores_t(q, do, lse2, delta, k, v, visible_t, qk_scale, MASKED: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """The same pair transposed: p^T [N, M] and dS^T = p^T * (dP^T - delta), with K and V as
    the left operands, ready for dV += p^T dO and dK += dS^T Q. Dead rows carry lse = +inf,
    so their p is 0 already; ``MASKED`` also zeroes p^T where ``visible_t`` is False
    (otherwise ``visible_t`` is unused)."""
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
    if MASKED:
        p_t = tl.where(visible_t, p_t, 0.0)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    return p_t, ds_t


@triton.jit
def _load_key_tile(K, stride_kn, stride_kd, offs_n, n_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   mask=n_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, KPM, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mn,
    stride_gb, stride_gh, stride_gn, stride_gd,
    H_KV, N_Q, N_K, WINDOW, qk_scale, sm_scale,
    TUNE_ROWS, TUNE_NK,  # size classes for the autotune key only (utils.tune_bucket)
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = (tl.program_id(1) // H_KV).to(tl.int64)  # 64-bit batch offsets
    hk = tl.program_id(1) % H_KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_K
    k = _load_key_tile(K + b * stride_kb + hk * stride_kh, stride_kn, stride_kd, offs_n, n_ok, HEAD_DIM, BLOCK_D)
    v = _load_key_tile(V + b * stride_vb + hk * stride_vh, stride_vn, stride_vd, offs_n, n_ok, HEAD_DIM, BLOCK_D)
    col_ok = n_ok
    if HAS_KPM:
        col_ok = col_ok & (tl.load(KPM + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    diag = N_K - N_Q
    row_start = 0
    row_end = N_Q * GROUP
    if IS_CAUSAL:
        # Query i sees key j iff i >= j - diag: skip row blocks entirely above the diagonal.
        first_q = tl.maximum(pid_n * BLOCK_N - diag, 0)
        row_start = ((first_q * GROUP) // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        # ... and iff i < j - diag + WINDOW: stop after the last row whose window reaches the
        # block, so a window costs O(N * WINDOW), not O(N^2).
        end_q = tl.minimum(pid_n * BLOCK_N + BLOCK_N - 1 - diag + WINDOW, N_Q)
        row_end = tl.minimum(row_end, tl.maximum(end_q, 0) * GROUP)
    for start_m in range(row_start, row_end, BLOCK_M):
        q, do, lse2, delta, qi, h, row_ok = _load_row_tile(
            Q, DO, Lse, Delta, b, hk, start_m,
            stride_qb, stride_qh, stride_qm, stride_qd,
            stride_dob, stride_doh, stride_dom, stride_dod,
            stride_lb, stride_lh, stride_lm, N_Q,
            GROUP, HEAD_DIM, BLOCK_D, BLOCK_M)
        visible_t = own_visible(col_ok[:, None], offs_n[:, None], qi[None, :], diag, WINDOW, IS_CAUSAL, HAS_WINDOW)
        p_t, ds_t = _probs_and_dscores_t(q, do, lse2, delta, k, v, visible_t, qk_scale, True, DOT_PRECISION)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    offs_d = tl.arange(0, BLOCK_D)
    out_off = b * stride_gb + hk * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd
    mask = n_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_tile_loop(
    dq, q, do, lse2, delta, qi, K, V, KPM,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    start, end, n_limit, diag, window, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ over keys [start, end). Keys past ``n_limit`` load as 0 and so add 0 to dQ: only
    the causal, window and padding rules need a select, and without them there is none."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_limit
        k = _load_key_tile(K, stride_kn, stride_kd, offs_n, n_ok, HEAD_DIM, BLOCK_D)
        v = _load_key_tile(V, stride_vn, stride_vd, offs_n, n_ok, HEAD_DIM, BLOCK_D)
        if CAUSAL_MASK or WINDOW_MASK or HAS_KPM:
            visible = own_visible(n_ok[None, :], offs_n[None, :], qi[:, None], diag, window, CAUSAL_MASK, WINDOW_MASK)
            if HAS_KPM:
                visible = visible & (tl.load(KPM + offs_n * stride_mn, mask=n_ok, other=0) != 0)[None, :]
            p, ds = _probs_and_dscores(q, do, lse2, delta, k, v, visible, qk_scale, True, DOT_PRECISION)
        else:
            p, ds = _probs_and_dscores(q, do, lse2, delta, k, v, None, qk_scale, False, DOT_PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, PK, PV, DO, Lse, Delta, KPM, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkh, stride_pkn, stride_pkd,
    stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H_KV, N_Q, N_K, P, WINDOW, qk_scale, sm_scale,
    TUNE_ROWS, TUNE_NK, TUNE_P,  # size classes for the autotune key only (utils.tune_bucket)
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = (tl.program_id(1) // H_KV).to(tl.int64)  # 64-bit batch offsets
    hk = tl.program_id(1) % H_KV
    q, do, lse2, delta, qi, h, row_ok = _load_row_tile(
        Q, DO, Lse, Delta, b, hk, pid_m * BLOCK_M,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_dob, stride_doh, stride_dom, stride_dod,
        stride_lb, stride_lh, stride_lm, N_Q,
        GROUP, HEAD_DIM, BLOCK_D, BLOCK_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_tile_loop(
        dq, q, do, lse2, delta, qi, PK + hk * stride_pkh, PV + hk * stride_pvh, KPM,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd, stride_mn,
        0, P, P, 0, 0, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, False, False, DOT_PRECISION)
    diag = N_K - N_Q
    start = 0
    end = N_K
    if IS_CAUSAL:
        qi_hi = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, N_Q - 1)
        end = tl.maximum(tl.minimum(qi_hi + diag + 1, N_K), 0)
    if HAS_WINDOW:
        start = (tl.maximum((pid_m * BLOCK_M) // GROUP + diag - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
    dq = _dq_tile_loop(
        dq, q, do, lse2, delta, qi, K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh,
        KPM + b * stride_mb,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        start, end, N_K, diag, WINDOW, qk_scale,
        HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW, HAS_KPM, DOT_PRECISION)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(DQ + b * stride_dqb + h[:, None] * stride_dqh + qi[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _bwd_dprefix_kernel(
    Q, PK, PV, DO, Lse, Delta, DPK, DPV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_pkh, stride_pkn, stride_pkd,
    stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_gs, stride_gh, stride_gn, stride_gd,
    B, N_Q, P, SPLITS, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < P
    pk = _load_key_tile(PK + hk * stride_pkh, stride_pkn, stride_pkd, offs_n, n_ok, HEAD_DIM, BLOCK_D)
    pv = _load_key_tile(PV + hk * stride_pvh, stride_pvn, stride_pvd, offs_n, n_ok, HEAD_DIM, BLOCK_D)
    dpk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dpv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Work units are (sequence, row block) pairs; this split takes a contiguous share.
    m_blocks = tl.cdiv(N_Q * GROUP, BLOCK_M)
    units = B * m_blocks
    for u in range(split * units // SPLITS, (split + 1) * units // SPLITS):
        b = (u // m_blocks).to(tl.int64)  # 64-bit batch offsets
        q, do, lse2, delta, qi, h, row_ok = _load_row_tile(
            Q, DO, Lse, Delta, b, hk, (u % m_blocks) * BLOCK_M,
            stride_qb, stride_qh, stride_qm, stride_qd,
            stride_dob, stride_doh, stride_dom, stride_dod,
            stride_lb, stride_lh, stride_lm, N_Q,
            GROUP, HEAD_DIM, BLOCK_D, BLOCK_M)
        # Every row sees every prefix key; keys past P load as 0 and their rows are not stored.
        p_t, ds_t = _probs_and_dscores_t(q, do, lse2, delta, pk, pv, None, qk_scale, False, DOT_PRECISION)
        dpv = tl.dot(p_t.to(do.dtype), do, dpv, input_precision=DOT_PRECISION)
        dpk = tl.dot(ds_t.to(q.dtype), q, dpk, input_precision=DOT_PRECISION)

    offs_d = tl.arange(0, BLOCK_D)
    out_off = split * stride_gs + hk * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd
    mask = n_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(DPK + out_off, dpk * sm_scale, mask=mask)
    tl.store(DPV + out_off, dpv, mask=mask)


# Tuned per head dim, GQA group, mask kind and size class; pruned to the tiles the static
# audit clears on this device and the shape needs. The prefix-gradient kernel is not tuned
# (utils.dprefix_tile), so the prefix gradient's summation order never depends on timing.
_KEY = ["BLOCK_D", "GROUP", "DOT_PRECISION", "IS_CAUSAL", "HAS_WINDOW", "HAS_KPM", "TUNE_ROWS", "TUNE_NK"]
_dkdv_autotuned = triton.autotune(
    configs=configs(DKDV_SPACE),
    key=_KEY,
    prune_configs_by={"early_config_prune": pruner(DKDV_SPACE, "BLOCK_N", lambda a, kw: a["N_K"])},
)(_bwd_dkdv_kernel)
_dq_autotuned = triton.autotune(
    configs=configs(DQ_SPACE),
    key=_KEY + ["TUNE_P"],
    prune_configs_by={"early_config_prune": pruner(DQ_SPACE, "BLOCK_M", lambda a, kw: a["N_Q"] * kw["GROUP"])},
)(_bwd_dq_kernel)


def _prefix_splits(units: int, p_blocks: int, hkv: int, device: torch.device) -> int:
    """How many deterministic partial sums the prefix gradient is split into.

    Enough programs to fill the GPU about twice, never more than the work units, and
    independent of run-to-run state, so the summation order is fixed for a given shape.
    """
    if interpreting() or device.type != "cuda":
        return min(units, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(units, (2 * sms) // max(1, p_blocks * hkv), 64))


def prefix_attention_bwd(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    window: int = 0,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels. Inputs are validated by the caller.

    Shapes as in the forward; dout ``[B, Hq, Nq, D]``, dlse ``[B, Hq, Nq]`` fp32 or None,
    out/lse the forward's outputs, window as in the forward. ``splits`` overrides the prefix-gradient split count
    (tests use it to exercise the partial-sum path). Returns contiguous
    ``dq, dk, dv, dprefix_k, dprefix_v`` in their inputs' dtypes; the prefix gradients
    are summed over the batch.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, P = k.shape[1], k.shape[2], prefix_k.shape[1]
    group = Hq // Hkv
    dev = q.device
    dq = torch.empty((B, Hq, Nq, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Hkv, Nk, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hkv, Nk, D), dtype=v.dtype, device=dev)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_(), torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)

    meta = launch_meta(q)
    prec = dot_precision(q.dtype)
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q.new_empty((1, 1), dtype=torch.uint8)
    has_kpm = key_padding_mask is not None
    qk_scale = softmax_scale * LOG2E.value

    # dlse is indexed with lse's strides; autograd may hand it over expanded (stride 0).
    dlse = dlse.float().contiguous() if dlse is not None else None
    delta = torch.empty_like(lse)
    pre_block = 64 if not interpreting() else 16
    _bwd_preprocess[(triton.cdiv(Nq, pre_block), B * Hq)](
        out, dout, dlse if dlse is not None else lse, delta,
        *out.stride(), *dout.stride(), *lse.stride(), Hq, Nq,
        BLOCK=pre_block, HAS_DLSE=dlse is not None, **meta)

    if Nk > 0:
        _dkdv_autotuned[lambda c: (triton.cdiv(Nk, c["BLOCK_N"]), B * Hkv)](
            q, k, v, dout, lse, delta, kpm, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(), *kpm.stride(), *dk.stride(),
            Hkv, Nq, Nk, window, qk_scale, softmax_scale, tune_bucket(Nq * group), tune_bucket(Nk),
            GROUP=group, IS_CAUSAL=causal, HAS_WINDOW=window > 0, HAS_KPM=has_kpm, DOT_PRECISION=prec, **meta)

    _dq_autotuned[lambda c: (triton.cdiv(Nq * group, c["BLOCK_M"]), B * Hkv)](
        q, k, v, prefix_k, prefix_v, dout, lse, delta, kpm, dq,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
        *dout.stride(), *lse.stride(), *kpm.stride(), *dq.stride(),
        Hkv, Nq, Nk, P, window, qk_scale, softmax_scale, tune_bucket(Nq * group), tune_bucket(Nk), tune_bucket(P),
        GROUP=group, IS_CAUSAL=causal, HAS_WINDOW=window > 0, HAS_KPM=has_kpm, DOT_PRECISION=prec, **meta)

    if P == 0:
        return dq, dk, dv, torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    # A fixed tile (never autotuned) and a split count from the shape and the device alone:
    # the summation order, hence the bits, cannot change with what the autotuner picks.
    tile = dprefix_tile(meta["BLOCK_D"])
    p_blocks = triton.cdiv(P, tile.block_n)
    n_splits = splits or _prefix_splits(B * triton.cdiv(Nq * group, tile.block_m), p_blocks, Hkv, dev)
    part_k = torch.empty((n_splits, Hkv, P, D), dtype=torch.float32, device=dev)
    part_v = torch.empty_like(part_k)
    _bwd_dprefix_kernel[(p_blocks, Hkv, n_splits)](
        q, prefix_k, prefix_v, dout, lse, delta, part_k, part_v,
        *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *dout.stride(), *lse.stride(), *part_k.stride(),
        B, Nq, P, n_splits, qk_scale, softmax_scale,
        GROUP=group, DOT_PRECISION=prec, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        num_warps=tile.warps, num_stages=tile.stages, **meta)
    return dq, dk, dv, part_k.sum(0).to(prefix_k.dtype), part_v.sum(0).to(prefix_v.dtype)
