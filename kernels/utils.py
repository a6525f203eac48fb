"""Shared launch helpers for the Triton kernels: tile configs, dot precision, head-dim padding."""

from __future__ import annotations

import os

import torch
import triton

LOG2E = 1.4426950408889634


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
