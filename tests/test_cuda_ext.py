"""The CUDA C++ extension without a GPU: it is built, it imports, and its bindings reject
bad input (naming the argument) before touching a device. Kernel results are checked
against the reference in tests/test_gpu.py, on a GPU."""

import os
import shutil

import pytest
import torch

import reasoncache
from reasoncache.ops import backends

# setup.py builds reasoncache._C under exactly these conditions; then it must import.
BUILDABLE = (
    torch.version.cuda is not None
    and (shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME")))
    and os.environ.get("REASONCACHE_SKIP_CUDA_BUILD", "0") != "1"
)


def _ext():
    try:
        return backends.cuda_extension()
    except ImportError as e:
        if BUILDABLE:
            raise AssertionError(f"nvcc and a CUDA torch are present, so setup.py should have built it: {e}") from e
        pytest.skip(str(e))


def test_extension_imports_when_buildable():
    C = _ext()
    assert {"fwd", "bwd", "decode"} <= set(dir(C))
    assert "prefix" in C.__doc__


def _inputs(B=2, Hq=4, Hkv=2, Nq=8, Nk=8, P=3, D=64, dtype=torch.float16):
    q = torch.zeros(B, Hq, Nq, D, dtype=dtype)
    k = torch.zeros(B, Hkv, Nk, D, dtype=dtype)
    pk = torch.zeros(Hkv, P, D, dtype=dtype)
    return [q, k, k.clone(), pk, pk.clone()]


def _call(fn, args, kpm=None, window=0, **kw):
    C = _ext()
    return getattr(C, fn)(*args, kpm, True, 0.125, window, **kw)


def _replace(i, t):
    args = _inputs()
    args[i] = t
    return args


def _misaligned(shape, dtype=torch.float16):
    n = int(torch.tensor(shape).prod())
    return torch.zeros(n + 1, dtype=dtype)[1:].view(shape)


BAD = [
    ("q 3-d", _replace(0, torch.zeros(4, 8, 64, dtype=torch.float16)), {}, ValueError, "q must be [B, Hq, Nq, D]"),
    ("k batch", _replace(1, torch.zeros(3, 2, 8, 64, dtype=torch.float16)), {}, ValueError, "k and v must have"),
    ("v shape", _replace(2, torch.zeros(2, 2, 9, 64, dtype=torch.float16)), {}, ValueError, "k and v must have"),
    ("heads", _replace(0, torch.zeros(2, 3, 8, 64, dtype=torch.float16)), {}, ValueError, "multiple of k's heads"),
    ("prefix heads", _replace(3, torch.zeros(3, 3, 64, dtype=torch.float16)), {}, ValueError, "prefix_k and prefix_v"),
    ("prefix dims", _replace(4, torch.zeros(2, 3, 64, 1, dtype=torch.float16)), {}, ValueError, "prefix_v must be"),
    ("q fp32", [t.float() for t in _inputs()], {}, TypeError, "q must be float16 or bfloat16"),
    ("v dtype", _replace(2, torch.zeros(2, 2, 8, 64, dtype=torch.bfloat16)), {}, TypeError, "v must have q's dtype"),
    (
        "k strided",
        _replace(1, torch.zeros(2, 8, 2, 64, dtype=torch.float16).transpose(1, 2)),
        {},
        ValueError,
        "k must be contiguous",
    ),
    ("q misaligned", _replace(0, _misaligned((2, 4, 8, 64))), {}, ValueError, "q must be 16-byte aligned"),
    ("head dim 96", _inputs(D=96), {}, ValueError, "head dim 96 has no CUDA kernel"),
    (
        "mask shape",
        _inputs(),
        {"kpm": torch.ones(2, 7, dtype=torch.bool)},
        ValueError,
        "key_padding_mask must be [B, Nk]",
    ),
    ("mask dtype", _inputs(), {"kpm": torch.ones(2, 8, dtype=torch.int32)}, TypeError, "key_padding_mask must be bool"),
    ("window", _inputs(), {"window": -1}, ValueError, "sliding_window must be >= 0"),
    ("cpu tensors", _inputs(), {}, ValueError, "q must be a CUDA tensor"),
]


@pytest.mark.parametrize("fn", ["fwd", "decode"])
@pytest.mark.parametrize("name,args,kw,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bindings_reject_bad_input_naming_it(fn, name, args, kw, exc, msg):
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
        _call(fn, args, **kw)


def test_decode_rejects_long_queries_and_bad_splits():
    with pytest.raises(ValueError, match="decode takes 1..16 queries"):
        _call("decode", _inputs(Nq=17, Nk=17))
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        _call("decode", _inputs(), num_splits=-2)


def test_bwd_rejects_bad_gradients_and_saved_tensors():
    C = _ext()
    q, k, v, pk, pv = _inputs()
    out, lse = torch.zeros_like(q), torch.zeros(2, 4, 8)
    ok = dict(dout=torch.zeros_like(q), dlse=None, out=out, lse=lse)

    def bwd(**over):
        a = {**ok, **over}
        return C.bwd(a["dout"], a["dlse"], q, k, v, pk, pv, None, a["out"], a["lse"], True, 0.125, 0)

    with pytest.raises(ValueError, match="dout must have q's shape"):
        bwd(dout=torch.zeros(2, 4, 7, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="lse must be"):
        bwd(lse=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="lse must be float32"):
        bwd(lse=lse.half())
    with pytest.raises(ValueError, match="dlse must have lse's shape"):
        bwd(dlse=torch.zeros(2, 4, 9))
    with pytest.raises(TypeError, match="dout must have q's dtype"):
        bwd(dout=torch.zeros_like(q, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        bwd()


def test_cuda_backend_on_cpu_names_every_reason():
    q, k, v, pk, pv = _inputs(D=96, dtype=torch.float32)
    with pytest.raises(backends.BackendUnavailable) as e:
        reasoncache.prefix_attention(q, k, v, pk, pv, backend="cuda")
    msg = str(e.value)
    assert "CUDA device" in msg and "not fp16 or bf16" in msg and "head dim 96" in msg


def test_missing_extension_says_how_to_build(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if fromlist and "_C" in fromlist and globals and globals.get("__name__", "").startswith("reasoncache"):
            raise ImportError("No module named 'reasoncache._C'")
        return real_import(name, globals, locals, fromlist, level)

    backends.cuda_extension.cache_clear()
    monkeypatch.setattr(builtins, "__import__", fake_import)
    try:
        with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
            backends.cuda_extension()
        reasons = backends._cuda_reasons(torch.zeros(1, 1, 1, 64, dtype=torch.float16))
        assert any("REASONCACHE_SKIP_CUDA_BUILD" in r for r in reasons)
    finally:
        monkeypatch.undo()
        backends.cuda_extension.cache_clear()


def test_auto_never_picks_cuda_before_gpu_verification():
    assert backends._BACKENDS["cuda"].auto_devices == ()


def test_importing_reasoncache_does_not_load_the_extension():
    import subprocess
    import sys

    code = "import sys, reasoncache; assert 'reasoncache._C' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_launch_is_refused_where_shared_memory_does_not_fit():
    """The kernels' shared memory comes from the extension itself (the constants the launch
    uses); a card whose per-block opt-in limit is smaller gets a reason naming it."""
    C = _ext()
    # fwd: sQ + double-buffered sK, sV + 16 B (decode merge flag); bwd: 6 swizzled [64, D] tiles + lse/delta
    assert C.smem_bytes("fwd", True, 128) == 2 * 64 * 128 * 5 + 16
    assert C.smem_bytes("bwd", False, 128) == 2 * 64 * 128 * 6 + 4 * 4 * 64
    assert C.smem_bytes("fwd", True, 96) == 0  # no such kernel
    with pytest.raises(ValueError, match="kernel must be 'fwd' or 'bwd'"):
        C.smem_bytes("decode", True, 64)
    why = backends.cuda_smem_reason("a 64 KiB card", 65536, torch.bfloat16, 128)
    assert "a 64 KiB card allows 64 KiB" in why and "fwd 80.02 KiB" in why and "bwd 97.00 KiB" in why
    assert "backend='triton'" in why
    assert backends.cuda_smem_reason("NVIDIA H100", 232448, torch.bfloat16, 128) is None
    assert backends.cuda_smem_reason("NVIDIA L4", 101376, torch.bfloat16, 128) is None  # 97 KiB fits its 99
