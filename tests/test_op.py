"""The op's contract: custom-op machinery, backend choice and bad-input errors."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import reasoncache
from helpers import INTERPRETING, Case, make_inputs, max_err, oracle, requires_interpreter
from reasoncache.ops import backends

ROOT = Path(__file__).resolve().parent.parent


BACKENDS_HERE = ["torch", pytest.param("triton", marks=requires_interpreter)]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_opcheck(backend):
    tensors, mask = make_inputs(Case(B=2, Hq=4, Hkv=2, Nq=7, Nk=9, P=3, D=16, pad="left"))
    args = (*tensors, mask, True, 0.25, 0, backend)
    torch.library.opcheck(torch.ops.reasoncache.prefix_attention_fwd.default, args)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_compile_fullgraph_forward_and_backward(backend):
    case = Case(Nq=9, Nk=9, P=3)
    tensors, _ = make_inputs(case)

    def loss_fn(q, k, v, pk, pv):
        return reasoncache.prefix_attention(q, k, v, pk, pv, backend=backend).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*tensors), tensors)
    want = torch.autograd.grad(loss_fn(*tensors), tensors)
    for g, w in zip(got, want):
        assert max_err(g, w) < 1e-5


def test_compile_fullgraph_with_inductor():
    """The default backend too: Inductor compiles the graph around the opaque custom op."""
    case = Case(Nq=9, Nk=9, P=3, D=16)
    tensors, _ = make_inputs(case)

    def loss_fn(q, k, v, pk, pv):
        return (reasoncache.prefix_attention(q, k, v, pk, pv) * 2).square().sum()

    got = torch.autograd.grad(torch.compile(loss_fn, fullgraph=True)(*tensors), tensors)
    want = torch.autograd.grad(loss_fn(*tensors), tensors)
    for g, w in zip(got, want):
        assert max_err(g, w) < 1e-5


def test_inference_calls_the_backend_directly_and_everything_else_the_custom_op(monkeypatch):
    """Eager inference skips the custom op's dispatch and gives the same bits; a call that
    needs autograd, a compile (also without grad) or a fake tensor goes through the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import reasoncache.ops.attention as attention

    tensors, mask = make_inputs(Case(B=2, Hq=4, Hkv=2, Nq=1, Nk=9, P=3, D=16, pad="left"))
    want = reasoncache.prefix_attention(*tensors, key_padding_mask=mask)
    calls = []
    real = attention.prefix_attention_fwd

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(attention, "prefix_attention_fwd", counted)
    with torch.no_grad():
        got = reasoncache.prefix_attention(*tensors, key_padding_mask=mask)
    assert calls == [] and torch.equal(got, want)
    params = [torch.nn.Parameter(t) for t in tensors[3:]]  # a module's prefix, outside no_grad
    with torch.no_grad():
        assert torch.equal(reasoncache.prefix_attention(*tensors[:3], *params, key_padding_mask=mask), want)
    assert calls == []
    reasoncache.prefix_attention(*tensors[:3], *params, key_padding_mask=mask)  # the prefix wants a gradient
    assert calls == [1]
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(reasoncache.prefix_attention, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(*tensors, key_padding_mask=mask), want)
    assert len(calls) > 1  # traced through the custom op
    before = len(calls)
    with FakeTensorMode() as mode, torch.no_grad():
        fake = [mode.from_tensor(t) for t in tensors]
        assert reasoncache.prefix_attention(*fake).shape == want.shape
    assert len(calls) == before + 1


@pytest.mark.parametrize("window", [None, 7])
def test_torch_backend_matches_fp64_oracle_with_padding_and_lse_grad(window):
    case = Case(Hq=8, Hkv=2, Nq=11, Nk=23, P=5, D=24, pad="left")
    tensors, mask = make_inputs(case)
    dout, dlse = torch.randn(case.B, case.Hq, case.Nq, case.D), torch.randn(case.B, case.Hq, case.Nq)
    ref_out, ref_lse, ref_grads = oracle(tensors, mask, dout, dlse, True, window=window)
    out, lse = reasoncache.prefix_attention(
        *tensors, key_padding_mask=mask, return_lse=True, sliding_window=window, backend="torch"
    )
    assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5
    for g, r in zip(torch.autograd.grad((out, lse), tensors, (dout, dlse)), ref_grads):
        assert max_err(g, r) < 1e-5


def test_reference_equals_explicit_concatenation():
    """The oracle itself: the prefix copied in front of every sequence with a full mask."""
    case = Case(Hq=4, Hkv=2, Nq=6, Nk=10, P=4, D=8, pad="left")
    (q, k, v, pk, pv), mask = make_inputs(case)
    q, k, v, pk, pv = [t.detach().double() for t in (q, k, v, pk, pv)]
    G = case.Hq // case.Hkv
    kc = torch.cat([pk.expand(case.B, -1, -1, -1), k], 2).repeat_interleave(G, 1)
    vc = torch.cat([pv.expand(case.B, -1, -1, -1), v], 2).repeat_interleave(G, 1)
    allowed = torch.ones(case.B, case.Nq, case.P + case.Nk, dtype=torch.bool)
    for i in range(case.Nq):
        allowed[:, i, case.P + i + case.Nk - case.Nq + 1 :] = False
    allowed[:, :, case.P :] &= mask[:, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=allowed[:, None])
    got, _ = reasoncache.prefix_attention_ref(q, k, v, pk, pv, key_padding_mask=mask)
    assert max_err(got, want) < 1e-12


def test_reference_sliding_window_matches_explicit_mask():
    case = Case(B=1, Hq=2, Hkv=1, Nq=5, Nk=9, P=3, D=8)
    (q, k, v, pk, pv), _ = make_inputs(case)
    q, k, v, pk, pv = [t.detach().double() for t in (q, k, v, pk, pv)]
    W = 3
    allowed = torch.zeros(case.Nq, case.P + case.Nk, dtype=torch.bool)
    allowed[:, : case.P] = True
    for i in range(case.Nq):
        last = i + case.Nk - case.Nq  # bottom-right causal
        allowed[i, case.P + max(0, last - W + 1) : case.P + last + 1] = True
    kc, vc = torch.cat([pk[None], k], 2).repeat_interleave(2, 1), torch.cat([pv[None], v], 2).repeat_interleave(2, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=allowed)
    got, _ = reasoncache.prefix_attention_ref(q, k, v, pk, pv, sliding_window=W)
    assert max_err(got, want) < 1e-12


def test_fully_masked_query_sees_prefix_and_never_nan():
    case = Case(B=1, Hq=2, Hkv=1, Nq=3, Nk=3, P=2, D=8)
    tensors, _ = make_inputs(case)
    mask = torch.zeros(1, 3, dtype=torch.bool)
    out = reasoncache.prefix_attention(*tensors, key_padding_mask=mask, backend="torch")
    # Only the prefix is visible: softmax over the prefix alone.
    q, _, _, pk, pv = [t.detach() for t in tensors]
    p = torch.softmax(q @ pk.transpose(-1, -2) * 8**-0.5, -1)
    assert max_err(out, p @ pv) < 1e-6
    no_prefix = [*tensors[:3], tensors[3][:, :0], tensors[4][:, :0]]
    out0, lse0 = reasoncache.prefix_attention(*no_prefix, key_padding_mask=mask, return_lse=True, backend="torch")
    assert torch.equal(out0, torch.zeros_like(out0)) and torch.isneginf(lse0).all()
    grads = torch.autograd.grad(out0.sum(), tensors[:3])
    assert all(torch.isfinite(g).all() for g in grads)


def test_prefix_gradient_is_batch_summed():
    case = Case(B=3, Nq=5, Nk=5, P=2, D=8)
    tensors, _ = make_inputs(case)
    out = reasoncache.prefix_attention(*tensors, backend="torch")
    dpk = torch.autograd.grad(out.sum(), tensors[3])[0]
    per_seq = []
    for b in range(case.B):
        single = [t[b : b + 1] for t in tensors[:3]] + tensors[3:]
        per_seq.append(torch.autograd.grad(reasoncache.prefix_attention(*single, backend="torch").sum(), tensors[3])[0])
    assert max_err(dpk, sum(per_seq)) < 1e-5


# ------------------------------------------------------------------ backend choice
@pytest.mark.skipif(not INTERPRETING, reason="REASONCACHE_BACKEND=triton on CPU tensors needs the interpreter")
def test_auto_on_cpu_is_the_reference_and_env_overrides(monkeypatch):
    q = torch.randn(1, 2, 3, 8)
    assert backends.resolve("auto", q)[0].name == "torch"
    monkeypatch.setenv("REASONCACHE_BACKEND", "triton")
    assert backends.resolve("auto", q)[0].name == "triton"
    assert backends.resolve("torch", q)[0].name == "torch", "an explicit argument beats the environment"
    monkeypatch.setenv("REASONCACHE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="REASONCACHE_BACKEND"):
        backends.resolve("auto", q)


def test_unsupported_backend_says_why():
    tensors, _ = make_inputs(Case(Nq=3, Nk=3, P=1, D=8), dtype=torch.float64)
    with pytest.raises(reasoncache.BackendUnavailable, match="dtype torch.float64"):
        reasoncache.prefix_attention(*tensors, backend="triton")
    with pytest.raises(reasoncache.BackendUnavailable, match="the CUDA kernels need a CUDA device"):
        reasoncache.prefix_attention(*tensors, backend="cuda")
    with pytest.raises(ValueError, match="backend='flash'"):
        reasoncache.prefix_attention(*tensors, backend="flash")


def test_triton_interpreter_refuses_a_numpy_it_cannot_loop_with(monkeypatch):
    """Triton before 3.7 interprets a loop bound as a one-element array, which numpy 2.4
    will not turn into an int: the backend says so and how to fix it, instead of failing
    inside the first kernel."""
    import numpy
    import triton

    tensors, _ = make_inputs(Case(Nq=3, Nk=3, P=1, D=8))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    with pytest.raises(reasoncache.BackendUnavailable, match=r"numpy 2\.4\.6 \(fixed in Triton 3\.7\): pip install"):
        reasoncache.prefix_attention(*tensors, backend="triton")
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert backends._interpreter_reason() is None
    monkeypatch.setattr(numpy, "__version__", "2.4.0rc1")
    monkeypatch.setattr(triton, "__version__", "3.7.0+git1a2b")
    assert backends._interpreter_reason() is None


def test_auto_lists_every_reason_when_nothing_fits(monkeypatch):
    q = torch.randn(1, 2, 3, 8)
    monkeypatch.setattr(backends._BACKENDS["torch"], "not_supported_reasons", lambda q: ["pretend it cannot"])
    with pytest.raises(reasoncache.BackendUnavailable) as e:
        backends.resolve("auto", q)
    msg = str(e.value)
    assert "cuda:" in msg and "triton:" in msg and "torch: pretend it cannot" in msg


def test_auto_falls_back_to_reference_with_a_warning_when_a_kernel_fails(monkeypatch):
    tensors, _ = make_inputs(Case(Nq=3, Nk=3, P=1, D=8))
    triton_backend = backends._BACKENDS["triton"]
    monkeypatch.setattr(triton_backend, "auto_devices", ("cpu",))
    monkeypatch.setattr(triton_backend, "not_supported_reasons", lambda q: [])

    def broken(*args):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(triton_backend, "fwd", broken)
    monkeypatch.setattr(triton_backend, "bwd", broken)
    monkeypatch.setattr(backends, "_failed_auto", set())
    with pytest.warns(RuntimeWarning, match="falling back to the PyTorch reference"):
        out = reasoncache.prefix_attention(*tensors)
    want = reasoncache.prefix_attention(*tensors, backend="torch")
    assert torch.equal(out, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second failure, no second warning
        reasoncache.prefix_attention(*tensors)
        out.sum().backward()  # the forward ran the reference, so the backward does too
    with pytest.raises(RuntimeError, match="PTX"):
        reasoncache.prefix_attention(*tensors, backend="triton")


@pytest.mark.skipif(not INTERPRETING, reason="Triton on CPU tensors needs the interpreter")
def test_backward_runs_the_backend_that_ran_the_forward(monkeypatch):
    """The backward does not choose again: the environment changing in between, as here,
    must not send the gradients of a Triton forward through another backend."""
    tensors, _ = make_inputs(Case(Nq=5, Nk=5, P=2, D=8))
    monkeypatch.setenv("REASONCACHE_BACKEND", "triton")
    out = reasoncache.prefix_attention(*tensors)
    monkeypatch.delenv("REASONCACHE_BACKEND")
    ran = []
    for name in ("torch", "triton"):
        b = backends._BACKENDS[name]
        monkeypatch.setattr(b, "bwd", lambda *a, _real=b.bwd, _name=name: ran.append(_name) or _real(*a))
    out.sum().backward()
    assert ran == ["triton"]


# ------------------------------------------------------------------ bad input
def _good():
    (q, k, v, pk, pv), _ = make_inputs(Case(B=2, Hq=4, Hkv=2, Nq=5, Nk=6, P=3, D=8))
    return dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)


BAD = {
    "q rank": (lambda t: t.update(q=t["q"][0]), ValueError, r"q must be 4-D \[B, Hq, Nq, D\], got shape \(4, 5, 8\)"),
    "prefix rank": (lambda t: t.update(prefix_k=t["prefix_k"][None]), ValueError, "prefix_k must be 3-D"),
    "heads": (lambda t: t.update(q=torch.randn(2, 3, 5, 8)), ValueError, "Hq=3 must be a multiple of k/v heads Hkv=2"),
    "k batch": (lambda t: t.update(k=t["k"][:1]), ValueError, r"k \(1, 2, 6, 8\) must be \[B=2"),
    "kv length": (lambda t: t.update(v=t["v"][:, :, :4]), ValueError, r"v \(2, 2, 4, 8\) must have the shape of k"),
    "prefix heads": (
        lambda t: t.update(prefix_k=torch.randn(1, 3, 8)),
        ValueError,
        r"prefix_k \(1, 3, 8\) must be \[Hkv=2",
    ),
    "prefix dim": (lambda t: t.update(prefix_k=torch.randn(2, 3, 16)), ValueError, "D=8"),
    "prefix_v": (lambda t: t.update(prefix_v=torch.randn(2, 4, 8)), ValueError, "prefix_v .* shape of prefix_k"),
    "dtype": (lambda t: t.update(v=t["v"].half()), TypeError, "v has dtype torch.float16 but q has torch.float32"),
    "int dtype": (lambda t: t.update(q=t["q"].long()), TypeError, "q has dtype torch.int64"),
    "not a tensor": (lambda t: t.update(k=[1, 2]), TypeError, "k must be a torch.Tensor, got list"),
    "device": (
        lambda t: t.update(prefix_v=t["prefix_v"].to("meta")),
        ValueError,
        "prefix_v is on meta but q is on cpu",
    ),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_names_the_argument(name):
    mutate, exc, pattern = BAD[name]
    t = _good()
    mutate(t)
    with pytest.raises(exc, match=pattern):
        reasoncache.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"])


@pytest.mark.parametrize(
    "mask, exc, pattern",
    [
        (torch.ones(2, 5, dtype=torch.bool), ValueError, r"key_padding_mask \(2, 5\) must be \[B, Nk\] = \(2, 6\)"),
        (torch.ones(2, 6), TypeError, "key_padding_mask must be a bool tensor"),
    ],
    ids=["shape", "dtype"],
)
def test_bad_padding_mask(mask, exc, pattern):
    t = _good()
    with pytest.raises(exc, match=pattern):
        reasoncache.prefix_attention(*t.values(), key_padding_mask=mask)


def test_bad_scalars():
    t = _good()
    with pytest.raises(TypeError, match="causal must be a bool"):
        reasoncache.prefix_attention(*t.values(), causal=1)
    with pytest.raises(ValueError, match="softmax_scale"):
        reasoncache.prefix_attention(*t.values(), softmax_scale=float("nan"))
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        reasoncache.prefix_attention(*t.values(), sliding_window=0)
    with pytest.raises(ValueError, match="sliding_window needs causal=True"):
        reasoncache.prefix_attention(*t.values(), sliding_window=4, causal=False)
    with pytest.raises(TypeError, match="return_lse must be a bool, got 'yes'"):
        reasoncache.prefix_attention(*t.values(), return_lse="yes")


def test_zero_head_dim_is_refused_by_name():
    e = torch.empty
    with pytest.raises(ValueError, match=r"q \(1, 2, 3, 0\) has head dim D=0"):
        reasoncache.prefix_attention(e(1, 2, 3, 0), e(1, 2, 3, 0), e(1, 2, 3, 0), e(2, 1, 0), e(2, 1, 0))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, Nq, Nk", [(0, 5, 6), (2, 0, 6), (2, 0, 0), (0, 0, 0)], ids=str)
def test_empty_batch_or_no_queries_gives_empty_results_and_zero_gradients(backend, dtype, B, Nq, Nk):
    """An empty batch, or sequences with no queries, is a valid call: empty out and lse, and
    gradients of the inputs' shapes, zero for the keys and the prefix (aten's CPU flash kernel,
    which the torch backend uses for fp32/bf16, dies with SIGFPE on zero query rows)."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the interpreter refuses bf16")
    tensors, _ = make_inputs(Case(B=B, Hq=4, Hkv=2, Nq=Nq, Nk=Nk, P=3, D=8), dtype=dtype)
    out, lse = reasoncache.prefix_attention(*tensors, return_lse=True, backend=backend)
    assert out.shape == (B, 4, Nq, 8) and out.dtype == dtype and lse.shape == (B, 4, Nq)
    grads = torch.autograd.grad(out.float().sum() + lse.sum(), tensors)
    for g, t in zip(grads, tensors):
        assert g.shape == t.shape and not g.any()
    with torch.no_grad():
        assert reasoncache.prefix_attention(*tensors, backend=backend).shape == out.shape


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_a_nan_prefix_head_gives_nan_as_in_the_reference(backend):
    """A prefix head that is all NaN (what a diverged training leaves) must show up as NaN in
    that head's rows, as the fp64 reference gives, not vanish: aten's CPU flash kernel treats
    a row of all-NaN scores as fully masked, and the torch backend's fast path once returned
    finite numbers there."""
    from reasoncache.ops.reference import prefix_attention_ref

    (q, k, v, pk, pv), _ = make_inputs(Case(B=2, Hq=4, Hkv=2, Nq=5, Nk=6, P=3, D=8))
    pk = pk.detach().clone()
    pk[0] = float("nan")
    ref, ref_lse = prefix_attention_ref(q.double(), k.double(), v.double(), pk.double(), pv.double())
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out, lse = reasoncache.prefix_attention(q, k, v, pk, pv, return_lse=True, backend=backend)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(lse.isnan(), ref_lse.isnan())
        assert out[:, :2].isnan().all() and not out[:, 2:].isnan().any()  # KV head 0 holds query heads 0, 1


def test_kernels_never_import_as_a_top_level_module():
    """From the repository root our Triton kernels never load as a top-level `kernels`:
    without the Hugging Face hub-kernels package, `kernels` is only an empty namespace (no
    __init__.py) that transformers does not mistake for that package, and `kernels.fwd`
    refuses to load under any name but reasoncache.kernels; with the hub package installed
    (transformers 5.25 requires it), `kernels` is that package and ours stays out of reach."""
    code = (
        "import importlib.metadata as md, kernels\n"
        "try:\n"
        "    md.distribution('kernels'); hub = True\n"
        "except md.PackageNotFoundError:\n"
        "    hub = False\n"
        "ours = kernels.__file__ is None\n"
        "assert ours != hub and not hasattr(kernels, 'fwd'), (kernels, hub)\n"
        "from transformers.utils import is_kernels_available\n"
        "print('hub kernels installed:', hub, 'available:', is_kernels_available())\n"
        "try:\n"
        "    import kernels.fwd\n"
        "except ImportError as e:\n"
        "    print('refused:', e)\n"
        "import reasoncache.kernels.fwd as f\n"
        "print(f.__name__, callable(f.prefix_attention_fwd))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    hub = "hub kernels installed: True" in res.stdout
    assert f"hub kernels installed: {hub} available: {hub}" in res.stdout
    if hub:  # our kernels/ is not on the hub package's path
        assert "refused: No module named 'kernels.fwd'" in res.stdout
    else:
        assert "refused: the Triton kernels are reasoncache.kernels" in res.stdout
    assert "reasoncache.kernels.fwd True" in res.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "case, window, pad",
    [
        (Case(B=3, Hq=6, Hkv=2, Nq=1, Nk=40, P=5, D=32), None, None),  # decode: no mask is built
        (Case(B=3, Hq=6, Hkv=2, Nq=1, Nk=40, P=5, D=32), 40, None),  # a window that keeps the whole cache
        (Case(B=3, Hq=6, Hkv=2, Nq=1, Nk=40, P=5, D=32), 9, None),  # a window that cuts it
        (Case(B=3, Hq=6, Hkv=2, Nq=1, Nk=40, P=5, D=32, pad="left"), None, "left"),
        (Case(B=2, Hq=4, Hkv=1, Nq=13, Nk=13, P=4, D=16), None, None),  # prefill: the causal mask
    ],
    ids=str,
)
def test_torch_backend_cpu_flash_path_matches_fp64_oracle(case, window, pad, dtype):
    """The torch backend's CPU path (PyTorch's flash kernel around the shared prefix, merged
    by lse) against the fp64 oracle: forward, lse and the five gradients (no lse gradient,
    so the backward runs the same path), decode steps included."""
    from reasoncache.ops import cpu_flash

    tensors, mask = make_inputs(case, dtype=dtype)
    assert cpu_flash.supported(tensors[0], tensors[3])
    dout = torch.randn(case.B, case.Hq, case.Nq, case.D)
    no_dlse = torch.zeros(case.B, case.Hq, case.Nq)
    ref_out, ref_lse, ref_grads = oracle(tensors, mask, dout, no_dlse, True, window=window)
    out, lse = reasoncache.prefix_attention(
        *tensors, key_padding_mask=mask, return_lse=True, sliding_window=window, backend="torch"
    )
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype and max_err(out, ref_out) < tol and max_err(lse, ref_lse) < 1e-4
    for g, r in zip(torch.autograd.grad(out, tensors, dout.to(dtype)), ref_grads):
        assert max_err(g, r) < tol * 4
    built = cpu_flash._own_mask(tensors[0], tensors[1], mask, True, window or 0)[0] is not None
    assert built == (pad is not None or case.Nq > 1 or (window or 0) < case.Nk and window is not None)
