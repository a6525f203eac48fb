"""Shared pieces of the Triton kernels: the visibility rule, tile configs, dot precision,
head-dim padding."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

if __package__ != "reasoncache.kernels":
    # The repository root on sys.path makes this folder findable as a top-level ``kernels``
    # (transformers takes that name for the Hugging Face hub-kernels package). Without an
    # __init__.py it is only an empty namespace there, and its modules refuse to load.
    raise ImportError(f"the Triton kernels are reasoncache.kernels; import them as that, not as {__package__!r}")

# exp(x) = exp2(x * LOG2E), ln(x) = log2(x) * LN2. constexpr, because a kernel reads module
# globals only as constexpr; host code takes ``.value``.
LOG2E = tl.constexpr(1 / math.log(2))
LN2 = tl.constexpr(math.log(2))


@triton.jit
def own_visible(visible, offs_n, qi, diag, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Narrow ``visible`` ``[M, N]`` to the own keys ``offs_n [N]`` that packed rows of query
    index ``qi [M]`` may see: key j iff ``j <= i + diag`` (CAUSAL, bottom-right, ``diag = Nk - Nq``)
    and ``j > i + diag - window`` (WINDOW). The twin of ``causal_visibility`` in
    ``reasoncache/ops/reference.py`` and ``own_visible`` in ``csrc/common.cuh``."""
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= qi[:, None] + diag)
    if WINDOW:
        visible = visible & (offs_n[None, :] > qi[:, None] + diag - window)
    return visible


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 dots (not TF32): fp32 callers asked for fp32 accuracy."""
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_meta(q: torch.Tensor) -> dict:
    """Head dim, padded to the power of two that tl.arange and tl.dot need (>= 16)."""
    d = q.shape[-1]
    return {"HEAD_DIM": d, "BLOCK_D": max(16, triton.next_power_of_2(d))}


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# The interpreter runs one config; small tiles make short test sequences cross several
# tile boundaries (prefix tail, causal diagonal, padding) so every masked path runs.
_INTERPRETER_CONFIGS = [_cfg(16, 16, 1, 1)]


def fwd_configs() -> list[triton.Config]:
    if interpreting():
        return _INTERPRETER_CONFIGS
    return [
        _cfg(128, 64, 8, 3),  # FA2-style default for D <= 128 on A100/H100
        _cfg(128, 128, 8, 2),  # long sequences, D = 64: fewer loop trips
        _cfg(64, 64, 4, 3),  # D = 256 (shared memory) and small grids
        _cfg(64, 32, 4, 2),  # decode / tiny Nq * GROUP: less wasted rows
        _cfg(16, 64, 4, 2),  # decode with GROUP <= 16: one tile holds the group
    ]


def bwd_configs() -> list[triton.Config]:
    if interpreting():
        return _INTERPRETER_CONFIGS
    return [
        _cfg(64, 64, 4, 2),  # D <= 128: register-resident dK/dV accumulators
        _cfg(64, 128, 8, 2),  # D = 64, long key blocks
        _cfg(32, 64, 4, 2),  # D = 256 (register pressure)
        _cfg(128, 64, 8, 2),  # many rows per key block (large GROUP)
    ]
