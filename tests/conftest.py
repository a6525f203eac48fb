"""Test setup: without a GPU, Triton runs on the CPU through its interpreter (with one, the
kernels run on it and tests/test_gpu.py runs too); seeds are fixed, and freshly allocated
kernel outputs are poisoned with NaN so an unwritten element shows."""

import os
import tempfile
from pathlib import Path

import torch  # noqa: E402  (does not import Triton)

# Must be set before Triton is imported anywhere. TRITON_INTERPRET=1 forces the interpreter
# on a GPU machine too (the GPU tests then skip).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh compile cache per run: torch's on-disk AOTAutograd/Inductor caches do not key on a
# custom op's schema, so a graph cached by an older reasoncache could call the op wrongly.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="reasoncache-inductor-"))

import pytest  # noqa: E402


def pytest_report_header(config):
    import reasoncache

    return f"reasoncache {reasoncache.__version__} from {Path(reasoncache.__file__).parent}"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped elsewhere")
    config.addinivalue_line("markers", "interpreter: runs Triton on CPU tensors; skipped where a GPU turns it off")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison_empty(monkeypatch):
    """Make torch.empty / empty_like return NaN-filled float tensors for one test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: _fill(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _fill(real_empty_like(*a, **kw)))
