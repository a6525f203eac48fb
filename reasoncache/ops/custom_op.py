"""The ``torch.library`` custom ops behind ``reasoncache.prefix_attention``.

``reasoncache::prefix_attention_fwd`` and ``reasoncache::prefix_attention_bwd`` are
opaque to ``torch.compile`` (no graph breaks), have fake implementations for shape
propagation, and the forward has its backward registered, so autograd, AOTAutograd and
``torch.library.opcheck`` all see one op. Which implementation runs is decided at run
time by ``backends.forward``; the forward returns which one ran (a small CPU tensor, as
SDPA returns its dropout seed), and the backward runs that same one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends


@torch.library.custom_op("reasoncache::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    softmax_scale: float,
    sliding_window: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """out ``[B, Hq, Nq, D]`` (q's dtype, contiguous), lse ``[B, Hq, Nq]`` fp32 and ``ran``
    (CPU int64 ``[2]``: the backend that ran, see ``backends.forward``). ``sliding_window`` 0: none."""
    return backends.forward(
        backend, q, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, sliding_window
    )


@prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, sliding_window, backend):
    B, Hq, Nq, D = q.shape
    ran = torch.empty(2, dtype=torch.int64, device="cpu")
    return q.new_empty((B, Hq, Nq, D)), q.new_empty((B, Hq, Nq), dtype=torch.float32), ran


@torch.library.custom_op("reasoncache::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(
    dout: Tensor,
    dlse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    causal: bool,
    softmax_scale: float,
    sliding_window: int,
    ran: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, dprefix_k, dprefix_v (contiguous, inputs' dtypes; prefix grads summed over
    batch), on the backend the forward recorded in ``ran``."""
    args = (dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, softmax_scale, sliding_window)
    return backends.backward(ran, q, *args)


@prefix_attention_bwd.register_fake
def _(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, softmax_scale, sliding_window, ran):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, prefix_k, prefix_v))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, softmax_scale, sliding_window, _backend = inputs
    out, lse, ran = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, ran)
    ctx.args = (causal, softmax_scale, sliding_window)


def _backward(ctx, dout, dlse, _dran):
    q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, ran = ctx.saved_tensors
    grads = prefix_attention_bwd(dout, dlse, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, *ctx.args, ran)
    return (*grads, None, None, None, None, None)


prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
