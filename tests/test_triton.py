"""Triton kernels against the fp64 oracle, under TRITON_INTERPRET=1 on the CPU."""

import pytest
import torch

import reasoncache
from helpers import Case, make_inputs, max_err, oracle, requires_interpreter

pytestmark = requires_interpreter

CASES = [
    Case(),  # GQA 2, odd lengths, prefix crossing a tile
    Case(Hq=2, Hkv=2, Nq=63, Nk=63, P=1, D=64),  # MHA, P = 1
    Case(Hq=8, Hkv=1, Nq=1, Nk=63, P=17, D=64),  # MQA decode
    Case(Hq=8, Hkv=1, Nq=1, Nk=1, P=0, D=32),  # decode on a single key, no prefix
    Case(Hq=4, Hkv=2, Nq=5, Nk=63, P=17, D=40),  # chunked prefill (Nq < Nk), head dim 40 (padded)
    Case(Hq=4, Hkv=2, Nq=37, Nk=37, P=0, D=32),  # P = 0 is plain causal attention
    Case(Hq=4, Hkv=4, Nq=63, Nk=37, P=17, D=32, causal=False),  # not causal, Nq > Nk
    Case(Hq=4, Hkv=2, Nq=37, Nk=17, P=0, D=32),  # causal Nq > Nk: early queries see no key
    Case(Hq=8, Hkv=1, Nq=20, Nk=37, P=17, D=64, pad="left"),  # left padding, MQA
    Case(Hq=4, Hkv=2, Nq=37, Nk=37, P=1, D=32, causal=False, pad="right"),
    Case(Hq=4, Hkv=2, Nq=37, Nk=37, P=0, D=32, pad="left"),  # padded rows with no key at all
    Case(B=1, Hq=2, Hkv=1, Nq=9, Nk=9, P=3, D=8),  # smallest head dim (padded to 16)
    Case(Hq=4, Hkv=2, Nq=63, Nk=63, P=17, D=32, window=20),  # sliding window (Mistral/Gemma local layers)
    Case(Hq=4, Hkv=1, Nq=9, Nk=63, P=0, D=32, window=5, pad="left"),  # chunked prefill, window, padding
    Case(B=1, Hq=2, Hkv=1, Nq=9, Nk=9, P=3, D=256),  # largest head dim
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_lse_and_five_grads_match_fp64(case, poison_empty):
    tensors, mask = make_inputs(case)
    dout = torch.randn(case.B, case.Hq, case.Nq, case.D)
    dlse = torch.randn(case.B, case.Hq, case.Nq)
    ref_out, ref_lse, ref_grads = oracle(tensors, mask, dout, dlse, case.causal, window=case.window)

    out, lse = reasoncache.prefix_attention(
        *tensors,
        causal=case.causal,
        key_padding_mask=mask,
        return_lse=True,
        sliding_window=case.window,
        backend="triton",
    )
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert max_err(out, ref_out) < 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly where a query sees no key"
    assert max_err(lse[finite], ref_lse[finite]) < 1e-5
    assert not out.isnan().any()

    grads = torch.autograd.grad((out, lse[finite]), tensors, (dout, dlse[finite]))
    for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        assert g.shape == r.shape, name
        assert max_err(g, r) < 2e-5, f"{name}: max error {max_err(g, r):.2e}"


def test_transposed_q_view_is_read_through_its_strides():
    case = Case(Hq=4, Hkv=2, Nq=20, Nk=20, P=5, D=32)
    tensors, _ = make_inputs(case, transposed_q=True)
    assert not tensors[0].is_contiguous()
    out = reasoncache.prefix_attention(*tensors, backend="triton")
    ref, _, _ = oracle(tensors, None, torch.zeros_like(out), torch.zeros(case.B, case.Hq, case.Nq), True)
    assert max_err(out, ref) < 1e-5


@pytest.mark.parametrize("scale", [0.3, 0.0, -0.3])
def test_custom_softmax_scale(scale):
    """The interior loop takes the row max on raw scores and folds the scale into one FMA;
    that needs the max of ``qk * scale`` to be the max of ``qk`` times the scale, so a
    negative scale takes the min. Lengths give whole interior blocks of prefix and own keys;
    large scores make a wrong running max overflow exp2 instead of cancelling out."""
    case = Case(Nq=40, Nk=40, P=33)
    tensors, _ = make_inputs(case)
    with torch.no_grad():
        tensors[0].mul_(30.0)
    out, lse = reasoncache.prefix_attention(*tensors, softmax_scale=scale, return_lse=True, backend="triton")
    zeros = torch.zeros(case.B, case.Hq, case.Nq)
    ref, ref_lse, _ = oracle(tensors, None, torch.zeros_like(out), zeros, True, scale=scale)
    # Scores reach ~200: fp32 rounding of the scores alone is ~1e-5 (the torch backend's error too).
    assert max_err(out, ref) < 1e-4 and max_err(lse, ref_lse) < 2e-4


def test_backward_is_bitwise_deterministic():
    case = Case(B=3, Nq=33, Nk=33, P=17)
    tensors, _ = make_inputs(case)
    dout = torch.randn(case.B, case.Hq, case.Nq, case.D)
    runs = []
    for _ in range(2):
        out = reasoncache.prefix_attention(*tensors, backend="triton")
        runs.append(torch.autograd.grad(out, tensors, dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("splits", [1, 3])
def test_prefix_gradient_split_count_only_changes_rounding(splits):
    """The batch-summed prefix gradient is the same whatever the number of partial sums."""
    from reasoncache.kernels.bwd import prefix_attention_bwd
    from reasoncache.kernels.fwd import prefix_attention_fwd

    case = Case(B=3, Nq=20, Nk=20, P=17)
    tensors, _ = make_inputs(case)
    q, k, v, pk, pv = [t.detach() for t in tensors]
    out, lse = prefix_attention_fwd(q, k, v, pk, pv, None, True, case.D**-0.5)
    dout = torch.randn_like(out)
    grads = prefix_attention_bwd(dout, None, q, k, v, pk, pv, None, out, lse, True, case.D**-0.5, splits=splits)
    _, _, ref = oracle(tensors, None, dout, torch.zeros_like(lse), True)
    assert max_err(grads[3], ref[3]) < 2e-5 and max_err(grads[4], ref[4]) < 2e-5


def test_fp16_forward():
    dtype = torch.float16
    case = Case(Nq=20, Nk=20, P=5)
    tensors, _ = make_inputs(case, dtype=dtype)
    out = reasoncache.prefix_attention(*tensors, backend="triton")
    assert out.dtype == dtype
    ref, _, _ = oracle(tensors, None, torch.zeros_like(out), torch.zeros(case.B, case.Hq, case.Nq), True)
    low, _ = reasoncache.prefix_attention_ref(*[t.detach() for t in tensors], compute_dtype=dtype)
    # flash-attention's rule: at most ~2x the error of the same math done naively in low precision.
    assert max_err(out, ref) <= 2 * max_err(low, ref) + 1e-3


def test_bf16_on_the_interpreter_is_refused_not_wrong():
    tensors, _ = make_inputs(Case(Nq=4, Nk=4, P=2), dtype=torch.bfloat16)
    with pytest.raises(reasoncache.BackendUnavailable, match="bf16"):
        reasoncache.prefix_attention(*tensors, backend="triton")


def test_expanded_upstream_gradients():
    """autograd hands over d(out.sum()) as stride-0 expanded tensors; read them as such."""
    case = Case(Nq=9, Nk=9, P=3)
    tensors, _ = make_inputs(case)
    out, lse = reasoncache.prefix_attention(*tensors, return_lse=True, backend="triton")
    got = torch.autograd.grad(out.sum() + lse.sum(), tensors)
    _, _, want = oracle(
        tensors, None, torch.ones(case.B, case.Hq, case.Nq, case.D), torch.ones(case.B, case.Hq, case.Nq), True
    )
    for g, w in zip(got, want):
        assert max_err(g, w) < 2e-5


DECODE_CASES = [
    Case(B=3, Hq=8, Hkv=2, Nq=1, Nk=40, P=70, D=32),  # five prefix tiles: two splits merged in the own pass
    Case(B=2, Hq=4, Hkv=1, Nq=3, Nk=20, P=33, D=64, pad="left"),  # speculative verification, padded own keys
    Case(B=3, Hq=4, Hkv=2, Nq=2, Nk=50, P=17, D=32, window=8),  # sliding window on own keys only
    Case(B=1, Hq=2, Hkv=1, Nq=1, Nk=5, P=40, D=16),  # one sequence: the pass still splits the prefix
    Case(B=2, Hq=2, Hkv=2, Nq=1, Nk=0, P=20, D=32, causal=False),  # no own keys at all
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_shared_prefix_pass_equals_the_plain_forward_and_the_oracle(case):
    """Decode's shared-prefix pass (all sequences' rows of a KV head as one tile problem
    against the prefix, split over prefix tiles, merged into the own-key pass) against the
    fp64 oracle, forced on and off; the op's own choice takes it at these shapes."""
    from reasoncache.kernels.fwd import prefix_attention_fwd, shared_prefix_plan

    tensors, mask = make_inputs(case)
    plain = [t.detach() for t in tensors]
    ref_out, ref_lse, _ = oracle(tensors, mask, torch.zeros(case.B, case.Hq, case.Nq, case.D),
                                 torch.zeros(case.B, case.Hq, case.Nq), case.causal, window=case.window)  # fmt: skip
    args = (*plain, mask, case.causal, case.D**-0.5, case.window or 0)
    for forced in (True, False):
        out, lse = prefix_attention_fwd(*args, shared_prefix=forced)
        assert max_err(out, ref_out) < 1e-5, f"shared_prefix={forced}"
        assert max_err(lse, ref_lse) < 1e-5, f"shared_prefix={forced}"
    plan = shared_prefix_plan(case.B, case.Nq * case.Hq // case.Hkv, case.P, case.Hkv, 32, plain[0].device)
    assert plan is not None and plan[1] == 2, "the op takes the pass, split in two, at decode shapes"


def test_shared_prefix_pass_is_skipped_where_it_cannot_help():
    from reasoncache.kernels.fwd import SHARED_PREFIX_MAX_ROWS, shared_prefix_plan

    cpu = torch.device("cpu")
    assert shared_prefix_plan(4, SHARED_PREFIX_MAX_ROWS + 1, 64, 2, 64, cpu) is None  # prefill-sized rows
    assert shared_prefix_plan(4, 4, 0, 2, 64, cpu) is None  # no prefix
    assert shared_prefix_plan(1, 4, 10, 2, 64, cpu) is None  # one sequence, one prefix tile
    assert shared_prefix_plan(1, 4, 10, 2, 64, cpu, force=True) is not None


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["prefix-pass", "per-sequence-prefix"])
@pytest.mark.parametrize("case", [
    Case(B=2, Hq=4, Hkv=2, Nq=1, Nk=300, P=40, D=32),  # three own-key splits of 128 keys
    Case(B=1, Hq=8, Hkv=1, Nq=2, Nk=270, P=0, D=16, pad="right"),  # no prefix, a padded tail
    Case(B=2, Hq=2, Hkv=1, Nq=3, Nk=260, P=20, D=32, window=100),  # the window leaves early splits empty
], ids=str)  # fmt: skip
def test_split_kv_decode_merges_its_splits_exactly(case, shared_prefix):
    """Split-KV over the own keys (the last split of a tile to finish merges all of them)
    against the fp64 oracle, with and without the shared-prefix pass; a second call reuses
    the tickets, so they must have been left at 0."""
    from reasoncache.kernels.fwd import _TICKETS, prefix_attention_fwd

    tensors, mask = make_inputs(case)
    plain = [t.detach() for t in tensors]
    ref_out, ref_lse, _ = oracle(tensors, mask, torch.zeros(case.B, case.Hq, case.Nq, case.D),
                                 torch.zeros(case.B, case.Hq, case.Nq), case.causal, window=case.window)  # fmt: skip
    args = (*plain, mask, case.causal, case.D**-0.5, case.window or 0)
    for _ in range(2):
        out, lse = prefix_attention_fwd(*args, shared_prefix=shared_prefix, kv_splits=3)
        assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5
    assert not _TICKETS[plain[0].device].any(), "every ticket is back at 0"


@pytest.mark.parametrize("case", [
    Case(B=2, Hq=4, Hkv=2, Nq=70, Nk=70, P=40, D=32),  # whole prefix and own blocks, then the boundary
    Case(B=2, Hq=8, Hkv=1, Nq=40, Nk=100, P=70, D=40, pad="left"),  # D padded in the box, padding mask
    Case(B=1, Hq=4, Hkv=2, Nq=70, Nk=70, P=0, D=32, window=33),  # no prefix, the window's mask on interiors
    Case(B=2, Hq=4, Hkv=2, Nq=1, Nk=300, P=40, D=32),  # decode: prefix pass, then split own keys
], ids=str)  # fmt: skip
def test_tma_descriptor_loads_equal_pointer_loads_and_the_oracle(case):
    """The forward's interior K/V tiles through tensor descriptors (TMA on sm_90; the
    interpreter runs the descriptors' semantics: box loads, zero fill past the head dim)
    against the fp64 oracle and against the pointer path."""
    from reasoncache.kernels.fwd import prefix_attention_fwd, tma_unusable

    tensors, mask = make_inputs(case)
    plain = [t.detach() for t in tensors]
    assert tma_unusable(*plain[1:]) is None
    ref_out, ref_lse, _ = oracle(tensors, mask, torch.zeros(case.B, case.Hq, case.Nq, case.D),
                                 torch.zeros(case.B, case.Hq, case.Nq), case.causal, window=case.window)  # fmt: skip
    args = (*plain, mask, case.causal, case.D**-0.5, case.window or 0)
    out, lse = prefix_attention_fwd(*args, tma=True)
    assert max_err(out, ref_out) < 1e-5 and max_err(lse, ref_lse) < 1e-5
    out_ptr, lse_ptr = prefix_attention_fwd(*args, tma=False)
    assert max_err(out, out_ptr) < 1e-6 and max_err(lse, lse_ptr) < 1e-6


def test_tma_refuses_with_the_reason_where_descriptors_cannot_load():
    from reasoncache.kernels.fwd import prefix_attention_fwd, tma_unusable

    case = Case(B=1, Hq=2, Hkv=1, Nq=8, Nk=8, P=4, D=32)
    q, k, v, pk, pv = (t.detach() for t in make_inputs(case)[0])
    odd = torch.randn(1, 1, 8, 33)[..., :32]  # rows of 33 floats: 132 bytes, not a multiple of 16
    assert "16-byte" in tma_unusable(odd, v, pk, pv)
    assert "innermost stride" in tma_unusable(k.transpose(-1, -2), v, pk, pv)
    with pytest.raises(ValueError, match="tma=True.*16-byte"):
        prefix_attention_fwd(q, odd, v, pk, pv, None, True, 32**-0.5, tma=True)


def test_tma_keeps_a_callers_allocator_and_sets_one_where_none_is():
    import triton
    from triton.runtime import _allocation

    from reasoncache.kernels import fwd

    mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)
    triton.set_allocator(mine)
    assert fwd._allocator_ready() and _allocation._allocator.get() is mine
    triton.set_allocator(_allocation.NullAllocator())
    assert fwd._allocator_ready() and _allocation._allocator.get() is fwd._scratch
