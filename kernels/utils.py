"""Shared pieces of the Triton kernels: the visibility rule, tile configs, dot precision,
head-dim padding."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

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
def own_visible(visible, key, row, diag, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Narrow ``visible`` to the own keys of index ``key`` that packed rows of query index
    ``row`` may see: key j iff ``j <= i + diag`` (CAUSAL, bottom-right, ``diag = Nk - Nq``) and
    ``j > i + diag - window`` (WINDOW). ``key`` and ``row`` come broadcastable, ``[1, N]`` and
    ``[M, 1]`` for a row-major tile or ``[N, 1]`` and ``[1, M]`` for a transposed one. The twin
    of ``causal_visibility`` in ``reasoncache/ops/reference.py`` and ``own_visible`` in
    ``csrc/common.cuh``."""
    if CAUSAL:
        visible = visible & (key <= row + diag)
    if WINDOW:
        visible = visible & (key > row + diag - window)
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


@dataclass(frozen=True)
class Tile:
    """One autotune configuration and where it may run: ``fits`` maps the compute-capability
    major (9: sm_90, 8: sm_80 and the other sm_8x) to the padded head dims at which the static
    audit (``python -m bench audit``) found it free of spills inside loops and within that
    architecture's shared memory under both Triton 3.6 (the GPU machine's) and Triton 3.8: their
    register allocations differ, and 7 tiles clean under 3.8 spilled inside the loop under 3.6.
    A few tiles park a value or two in local memory once before the key loop; the audit's table
    lists those bytes. Head dims below 64 count as 64."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    fits: dict

    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, self.warps, self.stages)

    def allows(self, major: int, block_d: int) -> bool:
        return max(64, block_d) in self.fits.get(9 if major == 9 else 8, ())


_ALL = (64, 128, 256)

# Every list is pruned on the device by ``Tile.allows`` and by what the shape can use
# (``shape_prune``); on sm_90 8-warp tiles below 128x128 are left out where a 4-warp or a
# 128x128 tile does the job (the Triton tutorial's Hopper rule), except for D = 256.
FWD_SPACE = [
    Tile(128, 128, 8, 3, {9: (64,)}),  # sm_90, D <= 64: the tutorial's headline tile (spills 96 B at D = 128)
    Tile(128, 64, 8, 3, {9: (64, 128), 8: (64,)}),  # FA2-style default; on sm_80 it spills at D = 128
    Tile(64, 64, 4, 3, {9: (64, 128)}),  # sm_90: one warpgroup, 64-row tiles for small grids
    Tile(64, 64, 8, 2, {8: _ALL}),  # sm_80: the 64-row tile that fits every head dim
    Tile(128, 32, 8, 2, {9: (256,)}),  # sm_90, D = 256: the one 128-row tile without spills
    Tile(64, 32, 4, 3, {9: (64, 128), 8: (64, 128)}),  # short row counts (decode with a large GROUP)
    Tile(32, 32, 4, 2, {9: _ALL, 8: _ALL}),  # the fallback that fits everywhere
    Tile(16, 64, 4, 2, {9: _ALL, 8: _ALL}),  # decode with GROUP <= 16: one tile holds the group
]
DKDV_SPACE = [  # BLOCK_N: own keys whose dK, dV stay in registers (the MMA's M side); BLOCK_M: rows per trip
    Tile(32, 128, 8, 3, {9: (64, 128), 8: (64,)}),  # the Triton tutorial's dK/dV tile (3.6, sm_80, D=128: 16 B)
    Tile(64, 128, 8, 2, {9: (64,)}),  # Triton 3.6 spills 32-80 B in the loop at the other head dims and on sm_80
    Tile(64, 64, 8, 2, {9: (64, 128), 8: (128,)}),  # Triton 3.6, sm_80, D = 64: 80 B in the loop
    Tile(64, 128, 8, 3, {9: (64,)}),  # sm_90: three row-tile stages in flight (81 KiB at D = 64)
    Tile(64, 64, 8, 3, {9: (64,)}),  # sm_90: the same at 64 keys (Triton 3.6, D = 128: 16 B in the loop)
    Tile(32, 64, 4, 2, {9: (64, 128), 8: (64, 128)}),  # short sequences, one warpgroup
    Tile(128, 32, 8, 2, {9: _ALL, 8: (64,)}),  # sm_90, D = 256 (mma.sync: 32 keys are too few for wgmma)
    Tile(16, 32, 4, 2, {9: _ALL, 8: _ALL}),  # the fallback that fits everywhere (sm_80, D = 256)
]
DQ_SPACE = [  # BLOCK_M: rows whose dQ stays in registers; BLOCK_N: keys per loop trip
    Tile(128, 64, 8, 3, {9: (64, 128)}),  # sm_90: three K/V stages in flight (160 KiB at D = 128)
    Tile(128, 64, 8, 2, {9: (64, 128), 8: (64,)}),
    Tile(64, 64, 8, 3, {9: (128,)}),  # sm_90, D = 128: 64 rows, three stages (128 KiB)
    Tile(64, 128, 8, 2, {9: (64, 128), 8: (128,)}),
    Tile(64, 64, 8, 2, {9: (64, 128), 8: _ALL}),
    Tile(128, 32, 8, 2, {9: _ALL, 8: (64, 128)}),  # sm_90, D = 256
    Tile(32, 64, 4, 2, {9: (64, 256), 8: _ALL}),  # fallback; on sm_90 at D = 128 it spills 8 B
    Tile(16, 64, 4, 2, {9: _ALL, 8: _ALL}),  # decode-sized row counts
]

# The interpreter runs one pinned tile; small tiles make short test sequences cross several
# tile boundaries (prefix tail, causal diagonal, padding) so every masked path runs.
_INTERPRETER_TILE = Tile(16, 16, 1, 1, {9: _ALL, 8: _ALL})


def configs(space: list[Tile]) -> list[triton.Config]:
    """The autotune list for ``space``: the pinned tile under the interpreter."""
    return [_INTERPRETER_TILE.config()] if interpreting() else [t.config() for t in space]


def dprefix_tile(block_d: int) -> Tile:
    """The prefix-gradient kernel's tile. Fixed, never autotuned: the order in which the batch
    is summed into the prefix gradient depends on it, so a fixed tile makes that gradient
    bitwise identical across processes whatever the other kernels' autotuner picks."""
    if interpreting():
        return _INTERPRETER_TILE
    if block_d <= 128:  # 64 x 64 spilled 56 B in the loop on sm_80 at D = 64 under Triton 3.6
        return Tile(32, 64, 8, 2, {9: (64, 128), 8: (64, 128)})
    return Tile(16, 32, 4, 2, {9: _ALL, 8: _ALL})


def fwd_pass_tile(rows: int, block_d: int, device: torch.device) -> Tile:
    """The shared-prefix pass's tile (kernels/fwd.py), chosen by rule, not by timing: the
    first forward tile the audit clears on this device at this head dim whose row count
    the rows can fill (else the smallest), as the autotuner's pruning would keep."""
    if interpreting() or device.type != "cuda":
        return _INTERPRETER_TILE
    major = torch.cuda.get_device_capability(device)[0]
    fit = [t for t in FWD_SPACE if t.allows(major, block_d)]
    need = max(16, triton.next_power_of_2(max(1, rows)))
    return next((t for t in fit if t.block_m <= need), min(fit, key=lambda t: t.block_m))


def tune_bucket(n: int) -> int:
    """Coarse size class for the autotune keys (0, 16, 64, 256, 1024, 4096): a new class
    tunes again, a new length within one does not. The kernels take these as ``TUNE_*``
    arguments that only the autotuner reads."""
    bucket = 0
    for edge in (16, 64, 256, 1024, 4096):
        if n > bucket:
            bucket = edge
    return bucket


def pruner(space: list[Tile], tiled: str, extent):
    """``early_config_prune`` for a kernel tiled over ``tiled`` ("BLOCK_M" or "BLOCK_N"):
    keep the tiles the audit allows on this device at this head dim, then those no larger
    than ``extent(named_args, kwargs)`` (the rows or keys there are) rounded up to a power of
    two, or else the smallest."""
    by_key = {(t.block_m, t.block_n, t.warps, t.stages): t for t in space}

    def prune(cfgs, named_args, **kwargs):
        if interpreting():
            return cfgs
        major = torch.cuda.get_device_capability(named_args["Q"].device)[0]
        tile = lambda c: by_key[(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)]
        fit = [c for c in cfgs if tile(c).allows(major, kwargs["BLOCK_D"])]
        need = max(16, triton.next_power_of_2(max(1, extent(named_args, kwargs))))
        return [c for c in fit if c.kwargs[tiled] <= need] or sorted(fit, key=lambda c: c.kwargs[tiled])[:1]

    return prune
