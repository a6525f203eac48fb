"""Inputs, the fp64 oracle and a divergence injector shared by the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from reasoncache.ops.reference import prefix_attention_ref

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available() and not INTERPRETING
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
requires_interpreter = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not INTERPRETING, reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1 (off on a GPU)"),
]


@dataclass(frozen=True)
class Case:
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    Nq: int = 37
    Nk: int = 37
    P: int = 17
    D: int = 32
    causal: bool = True
    pad: str | None = None  # "left" or "right": the first sequence loses a third of its keys
    window: int | None = None  # causal sliding window over own keys

    def __str__(self):
        mode = "causal" if self.causal else "full"
        s = f"B{self.B}-h{self.Hq}/{self.Hkv}-q{self.Nq}-k{self.Nk}-P{self.P}-d{self.D}-{mode}"
        s += f"-{self.pad}pad" if self.pad else ""
        return s + (f"-win{self.window}" if self.window else "")


def make_inputs(c: Case, dtype=torch.float32, device="cpu", transposed_q=False):
    """Leaf tensors q, k, v, prefix_k, prefix_v (requires_grad) and the padding mask."""

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()

    if transposed_q:  # HF hands over q as a transposed view of [B, N, H, D]
        q = torch.randn(c.B, c.Nq, c.Hq, c.D, dtype=dtype, device=device).transpose(1, 2).detach().requires_grad_()
    else:
        q = leaf(c.B, c.Hq, c.Nq, c.D)
    tensors = [
        q,
        leaf(c.B, c.Hkv, c.Nk, c.D),
        leaf(c.B, c.Hkv, c.Nk, c.D),
        leaf(c.Hkv, c.P, c.D),
        leaf(c.Hkv, c.P, c.D),
    ]
    mask = None
    if c.pad:
        mask = torch.ones(c.B, c.Nk, dtype=torch.bool, device=device)
        cut = max(1, c.Nk // 3)
        if c.pad == "left":
            mask[0, :cut] = False
        else:
            mask[0, c.Nk - cut :] = False
    return tensors, mask


def oracle(tensors, mask, dout, dlse, causal, scale=None, window=None):
    """fp64 reference outputs and the five gradients (out, lse, [dq, dk, dv, dpk, dpv])."""
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    out, lse = prefix_attention_ref(
        *leaves, causal=causal, softmax_scale=scale, key_padding_mask=mask, sliding_window=window
    )
    finite = torch.isfinite(lse)
    grads = torch.autograd.grad((out, lse[finite]), leaves, (dout.double(), dlse.double()[finite]), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return out, lse, grads


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def poison_step(monkeypatch, at: int) -> None:
    """Make the trainer's completion loss NaN on optimizer step ``at`` (1-based, one micro-batch
    per step), as a diverged run's is."""
    from reasoncache.app import trainer

    real, calls = trainer.completion_loss, {"n": 0}

    def loss(model, batch):
        calls["n"] += 1
        value, n = real(model, batch)
        return (value * float("nan") if calls["n"] == at else value), n

    monkeypatch.setattr(trainer, "completion_loss", loss)
