"""Packed sequences (FlashAttention's varlen convention) through the fused op: every segment
equals running it alone, forward, lse and all five gradients, on the torch backend (CPU)
and Triton (interpreter); bad cu_seqlens are refused by name."""

import pytest
import torch

import reasoncache
from helpers import INTERPRETING, max_err

BACKENDS = ["torch"] + (["triton"] if INTERPRETING else [])


def _segments(lengths_q, lengths_k, Hq=4, Hkv=2, P=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    q = leaf(sum(lengths_q), Hq, D)
    k, v = leaf(sum(lengths_k), Hkv, D), leaf(sum(lengths_k), Hkv, D)
    pk, pv = leaf(Hkv, P, D), leaf(Hkv, P, D)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32)
    return (q, k, v, pk, pv), cu(lengths_q), cu(lengths_k)


def _alone(tensors, cu_q, cu_k, window):
    """Each segment through the dense op by itself: out [Tq, Hq, D], lse [Tq, Hq]."""
    q, k, v, pk, pv = tensors
    outs, lses = [], []
    for (a, b), (c, d) in zip(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()), zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
        seg = lambda x, lo, hi: x[lo:hi].transpose(0, 1)[None]  # [1, H, n, D]
        out, lse = reasoncache.prefix_attention_ref(
            seg(q, a, b), seg(k, c, d), seg(v, c, d), pk, pv, sliding_window=window
        )
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


CASES = [
    ([5, 1, 0, 9, 3], [5, 1, 0, 9, 3], None),  # training packs: a one-token and an empty segment
    ([7], [7], None),  # a single segment is the dense op
    ([2, 1, 4], [6, 3, 4], None),  # chunked: fewer queries than keys, bottom-right per segment
    ([6, 8], [6, 8], 3),  # sliding window inside each segment
    ([1, 1, 1], [0, 4, 2], None),  # decode-like rows; a segment without own keys sees only the prefix
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq,lk,window", CASES, ids=lambda x: str(x))
def test_packed_segments_equal_running_each_alone(lq, lk, window, backend):
    tensors, cu_q, cu_k = _segments(lq, lk)
    ref_out, ref_lse = _alone(tensors, cu_q, cu_k, window)
    dtype = torch.float64 if backend == "torch" else torch.float32
    leaves = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out, lse = reasoncache.prefix_attention(
        *leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, sliding_window=window, return_lse=True, backend=backend
    )
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert max_err(out, ref_out) < tol and max_err(lse, ref_lse) < max(tol, 1e-6)  # lse is always fp32
    dout, dlse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
    want = torch.autograd.grad((ref_out, ref_lse), tensors, (dout, dlse), allow_unused=True)
    got = torch.autograd.grad((out, lse), leaves, (dout.to(dtype), dlse.float()), allow_unused=True)
    for name, g, w in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), got, want):
        w = torch.zeros_like(g) if w is None else w
        assert max_err(g, w) < max(10 * tol, 1e-6), f"{name}: {max_err(g, w):.2e}"


def test_cu_seqlens_k_defaults_to_cu_seqlens_q_and_max_seqlen_is_checked():
    tensors, cu, _ = _segments([3, 4], [3, 4])
    a = reasoncache.prefix_attention(*tensors, cu_seqlens_q=cu, backend="torch")
    b = reasoncache.prefix_attention(*tensors, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4, backend="torch")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="max_seqlen_q=3 is below the longest segment"):
        reasoncache.prefix_attention(*tensors, cu_seqlens_q=cu, max_seqlen_q=3, backend="torch")
    with pytest.raises(ValueError, match="only go with cu_seqlens"):
        reasoncache.prefix_attention(*tensors, max_seqlen_q=4, backend="torch")


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.tensor([0, 3, 7], dtype=torch.int64), "cu_seqlens_q must be int32"),
        (torch.tensor([0, 5, 3, 7], dtype=torch.int32), "cu_seqlens_q must be non-decreasing"),
        (torch.tensor([0, 3, 6], dtype=torch.int32), "cu_seqlens_q must end at the token count 7"),
        (torch.tensor([1, 3, 7], dtype=torch.int32), "cu_seqlens_q must start at 0"),
        (torch.tensor([[0, 3, 7]], dtype=torch.int32), "cu_seqlens_q must be 1-D"),
        (torch.tensor([0, 3, 7], dtype=torch.int32, device="meta"), "cu_seqlens_q is on meta"),
        (torch.tensor([0, 7], dtype=torch.int32), "cu_seqlens_q has 1 segments but cu_seqlens_k has 2"),
    ],
)
def test_bad_cu_seqlens_are_refused_by_name(bad, match):
    tensors, _, cu_k = _segments([3, 4], [3, 4])
    with pytest.raises((ValueError, TypeError), match=match):
        reasoncache.prefix_attention(*tensors, cu_seqlens_q=bad, cu_seqlens_k=cu_k, backend="torch")


def test_varlen_shapes_and_padding_mask_are_refused():
    tensors, cu, _ = _segments([3, 4], [3, 4])
    q = tensors[0]
    with pytest.raises(ValueError, match=r"q must be 3-D \[Tq, Hq, D\]"):
        reasoncache.prefix_attention(q[None], *tensors[1:], cu_seqlens_q=cu, backend="torch")
    with pytest.raises(ValueError, match="key_padding_mask and cu_seqlens exclude each other"):
        kpm = torch.ones(2, 7, dtype=torch.bool)
        reasoncache.prefix_attention(*tensors, cu_seqlens_q=cu, key_padding_mask=kpm, backend="torch")
