"""Kernels on a real GPU in bf16/fp16 at larger shapes. Skipped without CUDA.

On a machine with a CUDA device, plain ``python -m pytest`` runs them (conftest turns the
Triton interpreter on only where there is no GPU).
"""

import pytest
import torch

import reasoncache
from helpers import Case, make_inputs, max_err, oracle, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]

GPU_CASES = [
    Case(B=2, Hq=32, Hkv=8, Nq=1000, Nk=1000, P=256, D=128),
    Case(B=3, Hq=8, Hkv=1, Nq=97, Nk=1000, P=17, D=64, pad="left"),
    Case(B=2, Hq=16, Hkv=16, Nq=63, Nk=63, P=1, D=64, causal=False, pad="right"),
    Case(B=4, Hq=32, Hkv=8, Nq=1, Nk=513, P=2048, D=128),  # decode
    Case(B=2, Hq=4, Hkv=2, Nq=37, Nk=37, P=0, D=256),
    Case(B=2, Hq=4, Hkv=1, Nq=129, Nk=129, P=17, D=72),
    Case(B=5, Hq=8, Hkv=2, Nq=16, Nk=700, P=100, D=128, pad="left"),  # multi-token decode, split own cache
    Case(B=2, Hq=8, Hkv=2, Nq=300, Nk=300, P=64, D=64, window=77),
]
BACKENDS = ["triton", "cuda"]


def _skip_unsupported(backend, case):
    if backend == "cuda":
        from reasoncache.ops import backends

        reasons = backends._cuda_reasons(torch.empty(1, 1, 1, case.D, dtype=torch.float16, device="cuda"))
        if reasons:
            pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_kernel_error_at_most_twice_naive_low_precision(case, dtype, backend):
    _skip_unsupported(backend, case)
    tensors, mask = make_inputs(case, dtype=dtype, device="cuda")
    dout = torch.randn(case.B, case.Hq, case.Nq, case.D, dtype=dtype, device="cuda")
    dlse = torch.zeros(case.B, case.Hq, case.Nq, device="cuda")
    ref_out, ref_lse, ref_grads = oracle(tensors, mask, dout, dlse, case.causal, window=case.window)

    # The same math done naively in the low precision: the yardstick (flash-attention's rule).
    low = [t.detach().clone().requires_grad_() for t in tensors]
    low_out, _ = reasoncache.prefix_attention_ref(
        *low, key_padding_mask=mask, causal=case.causal, sliding_window=case.window, compute_dtype=dtype
    )
    low_grads = torch.autograd.grad(low_out, low, dout)

    out, lse = reasoncache.prefix_attention(
        *tensors,
        causal=case.causal,
        key_padding_mask=mask,
        sliding_window=case.window,
        return_lse=True,
        backend=backend,
    )
    grads = torch.autograd.grad(out, tensors, dout)
    assert max_err(out, ref_out) <= 2 * max_err(low_out, ref_out) + 1e-5
    finite = torch.isfinite(ref_lse)
    assert max_err(lse[finite], ref_lse[finite]) < 1e-2
    for name, g, lg, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, low_grads, ref_grads):
        assert max_err(g, r) <= 2 * max_err(lg, r) + 1e-4, name


def test_fp32_is_not_tf32():
    case = Case(B=2, Hq=8, Hkv=2, Nq=200, Nk=200, P=33, D=64)
    tensors, _ = make_inputs(case, device="cuda")
    ref, _ = reasoncache.prefix_attention_ref(*[t.detach().double() for t in tensors])
    out = reasoncache.prefix_attention(*tensors, backend="triton")
    assert max_err(out, ref) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_bitwise_deterministic_on_gpu(backend):
    case = Case(B=8, Hq=16, Hkv=4, Nq=512, Nk=512, P=256, D=128)
    _skip_unsupported(backend, case)
    tensors, _ = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn(case.B, case.Hq, case.Nq, case.D, dtype=torch.bfloat16, device="cuda")
    runs = [
        torch.autograd.grad(reasoncache.prefix_attention(*tensors, backend=backend), tensors, dout) for _ in range(3)
    ]
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_and_a_nan_prefix_head_on_gpu(backend):
    """An empty batch or no queries gives empty results and zero key/prefix gradients; a
    prefix head of NaN shows as NaN in exactly the rows the fp64 reference gives NaN."""
    _skip_unsupported(backend, Case(B=1, Hq=1, Hkv=1, Nq=1, Nk=1, P=1, D=64))
    for B, Nq, Nk in ((0, 5, 6), (2, 0, 6)):
        tensors, _ = make_inputs(Case(B=B, Hq=4, Hkv=2, Nq=Nq, Nk=Nk, P=3, D=64), torch.bfloat16, "cuda")
        out = reasoncache.prefix_attention(*tensors, backend=backend)
        assert out.shape == (B, 4, Nq, 64)
        for g, t in zip(torch.autograd.grad(out.float().sum(), tensors), tensors):
            assert g.shape == t.shape and not g.any()
    (q, k, v, pk, pv), _ = make_inputs(Case(B=2, Hq=4, Hkv=2, Nq=40, Nk=40, P=3, D=64), torch.bfloat16, "cuda")
    pk = pk.detach().clone()
    pk[0] = float("nan")
    ref, _ = reasoncache.prefix_attention_ref(*[t.detach().double() for t in (q, k, v, pk, pv)])
    out = reasoncache.prefix_attention(q, k, v, pk, pv, backend=backend)
    assert torch.equal(out.isnan(), ref.isnan()) and out[:, :2].isnan().all()


def test_auto_picks_triton_on_cuda():
    tensors, _ = make_inputs(Case(B=1, Hq=2, Hkv=1, Nq=8, Nk=8, P=2, D=64), dtype=torch.float16, device="cuda")
    from reasoncache.ops import backends

    assert backends.resolve("auto", tensors[0])[0].name == "triton"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    Case(B=2, Hq=32, Hkv=8, Nq=1, Nk=3000, P=512, D=128),  # few sequences: split-KV and the in-kernel merge
    Case(B=64, Hq=32, Hkv=8, Nq=1, Nk=512, P=2048, D=128),  # many sequences: the shared-prefix pass carries it
], ids=str)  # fmt: skip
def test_decode_step_replays_in_a_cuda_graph(case, backend):
    """Once warmed up (autotuned, tickets allocated), a decode step captures into a CUDA
    graph; replays with new queries written into the captured input give the eager result
    (the merge tickets must be back at 0 after every replay)."""
    _skip_unsupported(backend, case)
    tensors, _ = make_inputs(case, dtype=torch.bfloat16, device="cuda")
    q, k, v, pk, pv = [t.detach() for t in tensors]
    step = lambda: reasoncache.prefix_attention(q, k, v, pk, pv, backend=backend)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, step()), "a replay equals the eager step bit for bit"
