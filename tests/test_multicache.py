"""Several caches in one batch: prefix_k/v a bank [C, Hkv, P, D] and cache_ids choosing each
sequence's (or packed segment's) cache. Every sequence equals running it with its cache
alone, forward, lse and gradients, on the torch backend and Triton (interpreter)."""

import pytest
import torch

import reasoncache
from helpers import INTERPRETING, max_err

BACKENDS = ["torch"] + (["triton"] if INTERPRETING else [])


def _leaf(*shape, g):
    return torch.randn(*shape, generator=g).requires_grad_()


def _inputs(B=5, C=3, Hq=4, Hkv=2, Nq=6, Nk=9, P=5, D=16):
    g = torch.Generator().manual_seed(0)
    q, k, v = _leaf(B, Hq, Nq, D, g=g), _leaf(B, Hkv, Nk, D, g=g), _leaf(B, Hkv, Nk, D, g=g)
    bank_k, bank_v = _leaf(C, Hkv, P, D, g=g), _leaf(C, Hkv, P, D, g=g)
    return q, k, v, bank_k, bank_v


@pytest.mark.parametrize("Nq", [6, 1], ids=["prefill", "decode"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_sequence_equals_running_it_with_its_cache_alone(backend, Nq):
    q, k, v, bank_k, bank_v = _inputs(Nq=Nq)
    ids = torch.tensor([2, 0, 2, 1, 0])
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[3, :4] = False  # left padding on one sequence
    out, lse = reasoncache.prefix_attention(
        q, k, v, bank_k, bank_v, cache_ids=ids, key_padding_mask=mask, return_lse=True, backend=backend
    )
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out, lse), (q, k, v, bank_k, bank_v), (dout, dlse))
    want_out, want_lse = [], []
    for b, c in enumerate(ids.tolist()):
        o, l = reasoncache.prefix_attention_ref(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], bank_k[c], bank_v[c], key_padding_mask=mask[b : b + 1]
        )
        want_out.append(o)
        want_lse.append(l)
    want_out, want_lse = torch.cat(want_out), torch.cat(want_lse)
    want = torch.autograd.grad((want_out, want_lse), (q, k, v, bank_k, bank_v), (dout, dlse))
    assert max_err(out, want_out) < 1e-5 and max_err(lse, want_lse) < 1e-5
    for name, a, w in zip(("dq", "dk", "dv", "dbank_k", "dbank_v"), got, want):
        assert max_err(a, w) < 2e-5, name


def test_one_cache_is_the_single_cache_op_and_an_unused_cache_gets_no_gradient():
    q, k, v, bank_k, bank_v = _inputs(C=1)
    ids = torch.zeros(5, dtype=torch.long)
    a = reasoncache.prefix_attention(q, k, v, bank_k, bank_v, cache_ids=ids, backend="torch")
    b = reasoncache.prefix_attention(q, k, v, bank_k[0], bank_v[0], backend="torch")
    assert torch.equal(a, b)
    q, k, v, bank_k, bank_v = _inputs(C=3)
    out = reasoncache.prefix_attention(q, k, v, bank_k, bank_v, cache_ids=torch.tensor([0, 2, 0, 2, 2]))
    (gk,) = torch.autograd.grad(out.sum(), bank_k)
    assert gk[1].abs().max() == 0 and gk[0].abs().max() > 0 and gk[2].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_segments_choose_their_cache(backend):
    g = torch.Generator().manual_seed(1)
    lengths = [3, 5, 2]
    T = sum(lengths)
    q, k, v = _leaf(T, 4, 16, g=g), _leaf(T, 2, 16, g=g), _leaf(T, 2, 16, g=g)
    bank_k, bank_v = _leaf(2, 2, 4, 16, g=g), _leaf(2, 2, 4, 16, g=g)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    ids = torch.tensor([1, 0, 1])
    out = reasoncache.prefix_attention(q, k, v, bank_k, bank_v, cu_seqlens_q=cu, cache_ids=ids, backend=backend)
    for s, c in enumerate(ids.tolist()):
        a, b = cu[s].item(), cu[s + 1].item()
        seg = [x[a:b].transpose(0, 1)[None] for x in (q, k, v)]
        want = reasoncache.prefix_attention_ref(*seg, bank_k[c], bank_v[c])[0]
        assert max_err(out[a:b], want[0].transpose(0, 1)) < 1e-5


@pytest.mark.parametrize(
    "ids,match",
    [
        (torch.tensor([0, 1, 0, 1, 0], dtype=torch.float32), "cache_ids must be an int32 or int64 tensor"),
        (torch.tensor([0, 1, 0]), r"cache_ids must be \[B\] = \[5\]"),
        (torch.tensor([0, 1, 3, 1, 0]), r"cache_ids must lie in \[0, C=3\), got values from 0 to 3"),
        (torch.tensor([0, -1, 0, 1, 0]), r"got values from -1 to 1"),
    ],
)
def test_bad_cache_ids_are_refused_by_name(ids, match):
    q, k, v, bank_k, bank_v = _inputs()
    with pytest.raises((TypeError, ValueError), match=match):
        reasoncache.prefix_attention(q, k, v, bank_k, bank_v, cache_ids=ids, backend="torch")


def test_a_bank_needs_cache_ids_and_cache_ids_need_a_bank():
    q, k, v, bank_k, bank_v = _inputs()
    with pytest.raises(ValueError, match="pass cache_ids"):
        reasoncache.prefix_attention(q, k, v, bank_k, bank_v, backend="torch")
    with pytest.raises(ValueError, match=r"prefix_k must be a bank \[C, Hkv, P, D\]"):
        reasoncache.prefix_attention(q, k, v, bank_k[0], bank_v[0], cache_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"the bank prefix_k \(0, 2, 5, 16\) holds no cache"):
        reasoncache.prefix_attention(q, k, v, bank_k[:0], bank_v[:0], cache_ids=torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_batch_with_a_bank_gives_empty_results(backend):
    """No sequence chose any cache: empty out and lse, a zero gradient for the bank, padded or packed."""
    q, k, v, bank_k, bank_v = (t[:0] if i < 3 else t for i, t in enumerate(_inputs()))
    none = torch.zeros(0, dtype=torch.long)
    out, lse = reasoncache.prefix_attention(q, k, v, bank_k, bank_v, cache_ids=none, return_lse=True, backend=backend)
    assert out.shape == (0, 4, 6, 16) and lse.shape == (0, 4, 6)
    assert not torch.autograd.grad(out.sum(), bank_k)[0].any()
    packed = [torch.zeros(0, h, 16) for h in (4, 2, 2)]  # q [Tq=0, Hq, D], k and v [Tk=0, Hkv, D]
    cu = torch.zeros(1, dtype=torch.int32)
    out = reasoncache.prefix_attention(*packed, bank_k, bank_v, cu_seqlens_q=cu, cache_ids=none, backend=backend)
    assert out.shape == (0, 4, 16)
