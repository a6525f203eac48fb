"""pytest-benchmark microbenchmarks of the op (``pytest bench/ --benchmark-only``).

Kept out of the test suite (``testpaths = tests``): they measure, they do not check.
Correctness is the tests' job; the suites in this folder check every method before timing.
"""

import pytest
import torch

import reasoncache

CUDA = torch.cuda.is_available()
SHAPES = {"train": (4, 16, 4, 512, 64, 64), "decode": (64, 16, 4, 1, 64, 64)}  # B, Hq, Hkv, Nq, P, D


def _inputs(B, Hq, Hkv, Nq, P, D, device, dtype):
    Nk = max(Nq, 512)
    g = torch.Generator(device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)
    return r(B, Hq, Nq, D), r(B, Hkv, Nk, D), r(B, Hkv, Nk, D), r(Hkv, P, D), r(Hkv, P, D)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if CUDA else []))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward(benchmark, shape, backend):
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    args = _inputs(*SHAPES[shape], device, dtype)

    def run():
        with torch.no_grad():
            out = reasoncache.prefix_attention(*args, backend=backend)
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark(run)
