"""The CUDA kernel source (csrc/fwd.cu, csrc/bwd.cu, csrc/bindings.cpp) run on the CPU
through csrc/emu/cuda_emu.h and compared with the fp64 oracle: forward, lse, decode
(Hydragen prefix pass, split own cache, log-sum-exp merge) and all five gradients.

The emulator runs every CUDA thread of a block as a fiber that switches only at
barriers (decode's one-warp tiles included). mma.sync, ldmatrix and cp.async run with the PTX ISA's per-lane fragment
layouts and copy semantics, and their shared-memory addresses go through a bank model.
It checks the kernels' indexing, masking, tiling, fragment layouts, online
softmax, barrier and cp.async wait placement, bank conflicts and the bindings' glue; it
cannot check speed or register pressure. tests/test_gpu.py runs the same comparisons on
a real GPU.
"""

import math
import platform
import shutil
from pathlib import Path

import pytest
import torch

import reasoncache
from helpers import Case, make_inputs, max_err, oracle
from reasoncache.ops import backends

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or shutil.which("c++") is None, reason="the emulator needs Linux (ucontext) and c++"
)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulated extension, compiled once per test session (about a minute)."""
    from torch.utils.cpp_extension import load

    src = ROOT / "csrc" / "emu"
    return load(
        name="reasoncache_emu",
        sources=[str(src / f) for f in ("emu_fwd.cpp", "emu_bwd.cpp", "emu_bindings.cpp")],
        extra_cflags=["-DRC_EMULATE", "-O3", "-std=c++20", "-Wno-unknown-pragmas", f"-I{ROOT / 'csrc'}"],
        build_directory=str(tmp_path_factory.mktemp("emu_build")),
    )


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CASES = [
    (Case(B=2, Hq=4, Hkv=2, Nq=70, Nk=70, P=17, D=64), "fp16"),
    (Case(B=2, Hq=2, Hkv=1, Nq=40, Nk=100, P=70, D=128, pad="left"), "bf16"),  # chunked prefill, 2 prefix tiles
    (Case(B=1, Hq=2, Hkv=2, Nq=33, Nk=33, P=5, D=64, causal=False, pad="right"), "bf16"),
    (Case(B=2, Hq=4, Hkv=1, Nq=90, Nk=90, P=0, D=64, window=20), "fp16"),  # no prefix, window, MQA
    (Case(B=2, Hq=2, Hkv=1, Nq=80, Nk=60, P=3, D=64), "fp16"),  # Nq > Nk: the first rows see only the prefix
]


def _rel_tol(dtype):
    return 2e-2 if dtype == torch.bfloat16 else 4e-3


def _check(name, got, want, dtype):
    if want.numel() == 0:
        assert got.shape == want.shape, name
        return
    scale = max(1.0, want.abs().max().item())
    assert max_err(got, want) <= _rel_tol(dtype) * scale, f"{name}: error {max_err(got, want):.3g}"


@pytest.mark.parametrize("case,dt", CASES, ids=[f"{c}-{d}" for c, d in CASES])
def test_forward_and_backward_match_the_oracle(emu, case, dt):
    dtype = DTYPES[dt]
    tensors, mask = make_inputs(case, dtype=dtype)
    q, k, v, pk, pv = [t.detach() for t in tensors]
    dout = torch.randn_like(q)
    dlse = torch.randn(case.B, case.Hq, case.Nq)
    scale = 1 / math.sqrt(case.D)
    ref_out, ref_lse, ref_grads = oracle(tensors, mask, dout, dlse, case.causal, window=case.window)

    out, lse = emu.fwd(q, k, v, pk, pv, mask, case.causal, scale, case.window or 0)
    _check("out", out, ref_out, dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    _check("lse", lse[finite], ref_lse[finite], dtype)

    dlse_in = dlse.masked_fill(~finite, 0)
    grads = emu.bwd(dout, dlse_in, q, k, v, pk, pv, mask, out, lse, case.causal, scale, case.window or 0)
    for name, g, r, t in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads, tensors):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        _check(name, g, r, dtype)


DECODE = [
    (Case(B=3, Hq=4, Hkv=2, Nq=1, Nk=150, P=40, D=64, pad="left"), 0),
    (Case(B=2, Hq=8, Hkv=2, Nq=5, Nk=200, P=300, D=128), 3),  # 3 own splits; the prefix split over blocks
    (Case(B=2, Hq=2, Hkv=1, Nq=16, Nk=16, P=0, D=64, window=6), 0),
    (Case(B=2, Hq=4, Hkv=2, Nq=1, Nk=0, P=70, D=64, causal=False), 0),  # no own keys: one empty own split merges
    (Case(B=1, Hq=2, Hkv=1, Nq=2, Nk=400, P=20, D=64), 5),  # 5 own splits (64-key chunks) + 1 prefix part
    # G x Nq = 16: one-warp (16-row) tiles in the own pass, 64-row tiles in the prefix pass (B x 16 rows)
    (Case(B=2, Hq=8, Hkv=2, Nq=4, Nk=100, P=70, D=128), 2),
]


@pytest.mark.parametrize("case,splits", DECODE, ids=[f"{c}-splits{s}" for c, s in DECODE])
def test_decode_matches_the_oracle(emu, case, splits):
    tensors, mask = make_inputs(case, dtype=torch.float16)
    q, k, v, pk, pv = [t.detach() for t in tensors]
    ref_out, ref_lse = reasoncache.prefix_attention_ref(
        *[t.double() for t in (q, k, v, pk, pv)], causal=case.causal, key_padding_mask=mask, sliding_window=case.window
    )
    for _ in range(2):  # the in-kernel merge's tickets must be back at 0 for the second call
        out, lse = emu.decode(q, k, v, pk, pv, mask, case.causal, 1 / math.sqrt(case.D), case.window or 0, splits)
        _check("out", out, ref_out, torch.float16)
        _check("lse", lse, ref_lse, torch.float16)


def test_row_that_sees_nothing_gets_zero_and_minus_inf(emu):
    case = Case(B=2, Hq=2, Hkv=1, Nq=20, Nk=20, P=0, D=64)
    tensors, _ = make_inputs(case, dtype=torch.float16)
    q, k, v, pk, pv = [t.detach() for t in tensors]
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    out, lse = emu.fwd(q, k, v, pk, pv, mask, True, 0.125, 0)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all() and torch.isfinite(lse[0]).all()
    dq, dk, dv, _, _ = emu.bwd(torch.randn_like(q), None, q, k, v, pk, pv, mask, out, lse, True, 0.125, 0)
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()


def test_the_op_runs_the_cuda_backend_glue(emu, monkeypatch):
    """reasoncache.prefix_attention(backend="cuda") end to end (custom op, autograd, the
    decode dispatch, non-contiguous inputs) with the emulated extension standing in."""
    monkeypatch.setattr(backends, "cuda_extension", lambda: emu)
    monkeypatch.setattr(backends._BACKENDS["cuda"], "not_supported_reasons", lambda q: [])
    for case in (Case(B=2, Hq=4, Hkv=2, Nq=24, Nk=24, P=9, D=64), Case(B=2, Hq=4, Hkv=2, Nq=3, Nk=40, P=9, D=64)):
        tensors, _ = make_inputs(case, dtype=torch.float16, transposed_q=True)
        out = reasoncache.prefix_attention(*tensors, backend="cuda")
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, tensors, dout)
        ref_out, _, ref_grads = oracle(tensors, None, dout, torch.zeros(case.B, case.Hq, case.Nq), True)
        _check("out", out, ref_out, torch.float16)
        for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
            _check(name, g, r, torch.float16)


def test_packed_segments_and_cache_banks_run_on_the_cuda_backend(emu, monkeypatch):
    """Varlen (cu_seqlens, with a one-token and an empty segment) and a bank of caches
    chosen per segment, through prefix_attention(backend="cuda") with the emulated
    extension: each segment equals running it alone with its cache, out and gradients."""
    monkeypatch.setattr(backends, "cuda_extension", lambda: emu)
    monkeypatch.setattr(backends._BACKENDS["cuda"], "not_supported_reasons", lambda q: [])
    g = torch.Generator().manual_seed(0)
    lengths, D = [5, 1, 0, 20], 64
    T = sum(lengths)
    leaf = lambda *s: torch.randn(*s, generator=g).half().requires_grad_()
    q, k, v = leaf(T, 4, D), leaf(T, 2, D), leaf(T, 2, D)
    bank_k, bank_v = leaf(2, 2, 9, D), leaf(2, 2, 9, D)
    cu = torch.tensor([0, 5, 6, 6, 26], dtype=torch.int32)
    ids = torch.tensor([1, 0, 0, 1])
    out = reasoncache.prefix_attention(q, k, v, bank_k, bank_v, cu_seqlens_q=cu, cache_ids=ids, backend="cuda")
    dout = torch.randn(out.shape, generator=g).half()
    grads = torch.autograd.grad(out, (q, k, v, bank_k, bank_v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bank_k, bank_v)]
    want = []
    for s, c in enumerate(ids.tolist()):
        a, b = cu[s].item(), cu[s + 1].item()
        seg = [x[a:b].transpose(0, 1)[None] for x in leaves[:3]]
        want.append(reasoncache.prefix_attention_ref(*seg, leaves[3][c], leaves[4][c])[0][0].transpose(0, 1))
    want = torch.cat(want)
    ref_grads = torch.autograd.grad(want, leaves, dout.double())
    _check("out", out, want, torch.float16)
    for name, got, ref in zip(("dq", "dk", "dv", "dbank_k", "dbank_v"), grads, ref_grads):
        _check(name, got, ref, torch.float16)


def test_cache_banks_at_decode_run_the_cuda_decode_kernels(emu, monkeypatch):
    """One new token per sequence (the CUDA decode path: prefix pass, split-KV, in-kernel
    merge) with a bank of caches: each sequence equals decoding with its cache alone."""
    monkeypatch.setattr(backends, "cuda_extension", lambda: emu)
    monkeypatch.setattr(backends._BACKENDS["cuda"], "not_supported_reasons", lambda q: [])
    case = Case(B=3, Hq=4, Hkv=2, Nq=1, Nk=70, P=9, D=64)
    tensors, _ = make_inputs(case, dtype=torch.float16)
    q, k, v = [t.detach() for t in tensors[:3]]
    g = torch.Generator().manual_seed(3)
    bank_k, bank_v = (torch.randn(2, 2, 9, 64, generator=g).half() for _ in range(2))
    ids = torch.tensor([1, 0, 1])
    out = reasoncache.prefix_attention(q, k, v, bank_k, bank_v, cache_ids=ids, backend="cuda")
    for b, c in enumerate(ids.tolist()):
        want, _ = reasoncache.prefix_attention_ref(
            *[x[b : b + 1].double() for x in (q, k, v)], bank_k[c].double(), bank_v[c].double()
        )
        _check("out", out[b : b + 1], want, torch.float16)


def test_the_bank_model_counts_what_a_gpu_serializes(emu):
    """The emulator's bank model, checked on hand-made phases of 8 x 16-byte accesses."""
    row = 128  # bytes in a D=64 row of 16-bit elements
    assert emu.extra_wavefronts([r * row for r in range(8)]) == 7  # one column of 8 rows: 8-way conflict
    assert emu.extra_wavefronts([r * row + 16 * (r % 8) for r in range(8)]) == 0  # swizzled: chunk 0 of row r at r
    assert emu.extra_wavefronts([16 * c for c in range(8)]) == 0  # 8 chunks of one row
    assert emu.extra_wavefronts([0] * 8) == 0  # one address: a broadcast
    assert emu.extra_wavefronts([0, 256, 512, 768, 16, 32, 48, 64]) == 3


@pytest.mark.parametrize("D,dt", [(64, "fp16"), (128, "bf16")])
def test_shared_memory_accesses_are_conflict_free(emu, D, dt):
    """Every ldmatrix (plain and transposed) and every cp.async of the forward, decode and
    backward, as the emulator saw them lane by lane, needs one wavefront per 8-lane phase:
    the swizzle works for every tile the kernels touch."""
    case = Case(B=1, Hq=2, Hkv=1, Nq=70, Nk=70, P=17, D=D)
    tensors, _ = make_inputs(case, dtype=DTYPES[dt])
    q, k, v, pk, pv = [t.detach() for t in tensors]
    scale = 1 / math.sqrt(D)
    emu.smem_stats(reset=True)
    out, lse = emu.fwd(q, k, v, pk, pv, None, True, scale, 0)
    emu.decode(q[:, :, -2:].contiguous(), k, v, pk, pv, None, True, scale, 0, 2)
    emu.bwd(torch.randn_like(q), None, q, k, v, pk, pv, None, out, lse, True, scale, 0)
    stats = emu.smem_stats(reset=True)
    assert stats["ldmatrix_requests"] > 0 and stats["cp_async_requests"] > 0, stats
    assert stats["ldmatrix_extra_wavefronts"] == 0, stats
    assert stats["cp_async_extra_wavefronts"] == 0, stats
