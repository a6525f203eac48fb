"""Which implementation runs prefix attention: the one place that decides.

``backend`` is ``"torch"`` (reference), ``"triton"`` (kernels/), ``"cuda"`` (csrc/) or
``"auto"``. ``"auto"`` honours ``REASONCACHE_BACKEND`` and otherwise takes the fastest
backend that supports the input and has been verified on that kind of device. Every
backend lists the reasons it cannot take an input; when none can, the error lists them all.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from . import cpu_flash
from .reference import prefix_attention_ref, prefix_attention_ref_bwd

ENV_VAR = "REASONCACHE_BACKEND"
NAMES = ("torch", "triton", "cuda")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_KERNEL_HEAD_DIM = 256


class BackendUnavailable(RuntimeError):
    """Raised when a requested backend cannot take the given input."""


# ---------------------------------------------------------------- torch (reference)
def _torch_reasons(q: Tensor) -> list[str]:
    return []


def _torch_fwd(q, k, v, pk, pv, kpm, causal, scale, window):
    if cpu_flash.supported(q, pk):
        return cpu_flash.fwd(q, k, v, pk, pv, kpm, causal, scale, window)
    out, lse = prefix_attention_ref(
        q, k, v, pk, pv, causal=causal, softmax_scale=scale, key_padding_mask=kpm, sliding_window=window or None
    )
    return out.to(q.dtype).contiguous(), lse.float().contiguous()


def _torch_bwd(dout, dlse, q, k, v, pk, pv, kpm, out, lse, causal, scale, window):
    if cpu_flash.supported(q, pk) and (dlse is None or not bool(dlse.any())):
        grads = cpu_flash.bwd(dout, q, k, v, pk, pv, kpm, out, lse, causal, scale, window)
    else:
        grads = prefix_attention_ref_bwd(
            dout, dlse, q, k, v, pk, pv, causal=causal, softmax_scale=scale, key_padding_mask=kpm,
            sliding_window=window or None, out=out, lse=lse,
        )  # fmt: skip
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v, pk, pv)))


# ---------------------------------------------------------------- triton
@functools.cache
def _triton_import_error() -> str | None:
    try:
        from ..kernels import bwd, fwd  # noqa: F401
    except Exception as e:  # ImportError, or a Triton too old for our kernels
        return f"Triton kernels failed to import ({type(e).__name__}: {e})"
    return None


def _major_minor(version: str) -> tuple[int, int]:
    """(3, 6) from "3.6.0", "3.6.0+git1234" or "2.4.0rc1"."""
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in version.split(".")[:2]]
    return parts[0], parts[1] if len(parts) > 1 else 0


def _interpreter_reason() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here, or None: before Triton 3.7 it
    turns a loop's runtime bound into a one-element numpy array, which numpy 2.4 refuses to
    convert to an int (every kernel loop fails with "only 0-dimensional arrays can be
    converted to Python scalars")."""
    import numpy
    import triton

    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        return (
            f"Triton {triton.__version__}'s CPU interpreter cannot run kernel loops with numpy {numpy.__version__} "
            "(fixed in Triton 3.7): pip install 'numpy<2.4'"
        )
    return None


def _triton_reasons(q: Tensor) -> list[str]:
    reasons = []
    err = _triton_import_error()
    if err:
        reasons.append(err)
    if q.device.type != "cuda" and not (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        reasons.append(f"tensors are on {q.device}; Triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
    elif q.device.type == "cpu" and not err and (why := _interpreter_reason()):
        reasons.append(why)
    if q.dtype not in _KERNEL_DTYPES:
        reasons.append(f"dtype {q.dtype} is not one of fp16, bf16, fp32")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        reasons.append("Triton's CPU interpreter computes bf16 tl.dot wrongly (triton-lang/triton#11584)")
    if q.dtype == torch.float32 and q.device.type == "cuda":
        reasons.append(
            "fp32 has no tensor-core path in the Triton kernels (true fp32 dots spill heavily and take minutes to "
            "compile per config); the torch backend runs it"
        )
    if q.shape[-1] > _MAX_KERNEL_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {_MAX_KERNEL_HEAD_DIM}")
    return reasons


def _triton_fwd(*args):
    from ..kernels.fwd import prefix_attention_fwd

    return prefix_attention_fwd(*args)


def _triton_bwd(*args):
    from ..kernels.bwd import prefix_attention_bwd

    return prefix_attention_bwd(*args)


# ---------------------------------------------------------------- cuda
CUDA_BUILD_HINT = (
    "build it with nvcc and a CUDA build of torch on the PATH: pip install --no-build-isolation -e . "
    "(without REASONCACHE_SKIP_CUDA_BUILD=1; MAX_JOBS=2 keeps memory low)"
)
_CUDA_HEAD_DIMS = (64, 128)
DECODE_MAX_NQ = 16  # up to this many queries per sequence, the CUDA backend runs its decode kernels


@functools.cache
def cuda_extension():
    """The compiled ``reasoncache._C`` module, imported on first use. Raises ImportError
    saying how to build it when it is missing."""
    try:
        from .. import _C
    except ImportError as e:
        raise ImportError(f"reasoncache._C (the CUDA C++ kernels) is not built: {e}; {CUDA_BUILD_HINT}") from e
    return _C


def cuda_smem_reason(device_name: str, smem_optin: int, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the CUDA kernels cannot launch on a GPU that allows ``smem_optin`` bytes of shared
    memory per block (``sharedMemPerBlockOptin``), or None when the forward and backward fit."""
    C = cuda_extension()
    need = {k: C.smem_bytes(k, dtype == torch.bfloat16, head_dim) for k in ("fwd", "bwd")}
    over = {k: n for k, n in need.items() if n > smem_optin}
    if not over:
        return None
    wants = ", ".join(f"{k} {n / 1024:.2f} KiB" for k, n in over.items())
    return (
        f"{device_name} allows {smem_optin / 1024:.0f} KiB of shared memory per block, and the CUDA kernels for "
        f"{dtype} head dim {head_dim} need more ({wants}); use backend='triton' or 'torch'"
    )


def _cuda_reasons(q: Tensor) -> list[str]:
    reasons = []
    try:
        cuda_extension()
        built = True
    except ImportError as e:
        reasons.append(str(e))
        built = False
    supported = q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in _CUDA_HEAD_DIMS
    if q.device.type != "cuda":
        reasons.append(f"tensors are on {q.device}; the CUDA kernels need a CUDA device")
    elif torch.cuda.get_device_capability(q.device) < (8, 0):
        reasons.append(f"{torch.cuda.get_device_name(q.device)} is below compute capability 8.0")
    elif built and supported:
        props = torch.cuda.get_device_properties(q.device)
        why = cuda_smem_reason(props.name, props.shared_memory_per_block_optin, q.dtype, q.shape[-1])
        if why:
            reasons.append(why)
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {q.dtype} is not fp16 or bf16 (the CUDA kernels run on tensor cores)")
    if q.shape[-1] not in _CUDA_HEAD_DIMS:
        reasons.append(f"head dim {q.shape[-1]} has no CUDA kernel (only {_CUDA_HEAD_DIMS})")
    return reasons


def _contig(*ts):
    return [t.contiguous() if t is not None else None for t in ts]


def _cuda_fwd(q, k, v, pk, pv, kpm, causal, scale, window):
    C = cuda_extension()
    q, k, v, pk, pv, kpm = _contig(q, k, v, pk, pv, kpm)
    fn = C.decode if q.shape[2] <= DECODE_MAX_NQ else C.fwd
    return tuple(fn(q, k, v, pk, pv, kpm, causal, scale, window))


def _cuda_bwd(dout, dlse, q, k, v, pk, pv, kpm, out, lse, causal, scale, window):
    C = cuda_extension()
    args = _contig(dout, dlse, q, k, v, pk, pv, kpm, out, lse)
    return tuple(C.bwd(*args, causal, scale, window))


class _Backend:
    def __init__(self, name: str, reasons: Callable, fwd: Callable, bwd: Callable, auto_devices: tuple[str, ...]):
        self.name, self.not_supported_reasons, self.fwd, self.bwd = name, reasons, fwd, bwd
        # Device types on which "auto" may pick this backend: only where it passed its
        # tests. The Triton kernels are verified under the interpreter; the GPU runs are
        # still pending (README), so "auto" picks them on CUDA with a compile fallback.
        self.auto_devices = auto_devices


_BACKENDS = {
    # "auto" never picks CUDA yet: its kernels have not run on a GPU (README, GPU status).
    "cuda": _Backend("cuda", _cuda_reasons, _cuda_fwd, _cuda_bwd, ()),
    "triton": _Backend("triton", _triton_reasons, _triton_fwd, _triton_bwd, ("cuda",)),
    "torch": _Backend("torch", _torch_reasons, _torch_fwd, _torch_bwd, ("cpu", "cuda", "mps", "xpu", "meta")),
}
_AUTO_ORDER = ("cuda", "triton", "torch")
_failed_auto: set = set()  # (backend, device type, dtype, head dim): kernels that failed to compile


def check_name(backend: str | None) -> str:
    """Normalise a backend argument to one of NAMES or "auto", naming the bad value."""
    name = "auto" if backend is None else backend
    if name not in NAMES + ("auto",):
        raise ValueError(f"backend={backend!r} is not one of {NAMES + ('auto',)} or None")
    return name


def _requested(backend: str) -> str:
    if backend != "auto":
        return backend
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return "auto"
    if env not in NAMES:
        raise ValueError(f"{ENV_VAR}={env!r} is not one of {NAMES + ('auto',)}")
    return env


def resolve(backend: str, q: Tensor) -> tuple[_Backend, bool]:
    """Pick the backend for ``q``. Returns (backend, chosen_automatically)."""
    name = _requested(backend)
    if name != "auto":
        reasons = _BACKENDS[name].not_supported_reasons(q)
        if reasons:
            raise BackendUnavailable(f"backend {name!r} cannot run this input: " + "; ".join(reasons))
        return _BACKENDS[name], False
    for b in _auto_candidates(q):  # the cheap disqualifiers first: this runs on every call
        if not b.not_supported_reasons(q):
            return b, True
    all_reasons = []
    for cand in _AUTO_ORDER:
        b = _BACKENDS[cand]
        reasons = b.not_supported_reasons(q)
        if q.device.type not in b.auto_devices:
            reasons = reasons + [f"not verified on {q.device.type} for automatic choice"]
        if _auto_key(cand, q) in _failed_auto:
            reasons = reasons + ["failed to compile earlier in this process"]
        all_reasons.append(f"{cand}: " + "; ".join(reasons))
    raise BackendUnavailable("no backend can run this input:\n  " + "\n  ".join(all_reasons))


def _auto_key(name: str, q: Tensor) -> tuple:
    """What ``_failed_auto`` remembers a failed kernel by: backend, device type, dtype, head dim."""
    return name, q.device.type, q.dtype, q.shape[-1]


def _auto_candidates(q: Tensor):
    """The backends "auto" may pick for ``q``'s device, dtype and head dim, in preference order."""
    for cand in _AUTO_ORDER:
        b = _BACKENDS[cand]
        if q.device.type in b.auto_devices and _auto_key(cand, q) not in _failed_auto:
            yield b


def forward(backend: str, q: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    """Run the forward on the backend chosen for ``q``; ``args`` follow q as in the custom op.

    Returns ``out, lse, ran``: ``ran`` is a CPU int64 tensor ``[2]`` holding the index in
    ``NAMES`` of the backend that actually ran and 1 if it was chosen automatically. The
    backward reads it (``backward``) and runs that same backend instead of choosing again.
    """
    b, auto = resolve(backend, q)
    (out, lse), b = _call(b, auto, "fwd", q, args)
    return out, lse, torch.tensor([NAMES.index(b.name), int(auto)])


def backward(ran: Tensor, q: Tensor, *args) -> tuple[Tensor, ...]:
    """Run the backward on the backend the forward recorded in ``ran`` (see ``forward``)."""
    index, auto = (int(x) for x in ran.tolist())
    return _call(_BACKENDS[NAMES[index]], bool(auto), "bwd", q, args)[0]


def _call(b: _Backend, auto: bool, which: str, q: Tensor, args: tuple):
    """``b``'s ``which`` ("fwd" or "bwd") pass, and the backend that ran it.

    An automatically chosen kernel that fails (a compile error on an unusual GPU) is
    remembered and replaced by the reference, with a warning; an explicitly requested
    backend raises instead.
    """
    fn = getattr(b, which)
    if not auto or b.name == "torch":
        return fn(*args), b
    try:
        return fn(*args), b
    except Exception as e:  # noqa: BLE001 - any kernel failure falls back, loudly
        _failed_auto.add(_auto_key(b.name, q))
        warnings.warn(
            f"reasoncache: the {b.name} kernel failed ({type(e).__name__}: {e}); "
            "falling back to the PyTorch reference for this input. Pass backend='torch' to silence, "
            f"or backend='{b.name}' to see the error.",
            RuntimeWarning,
            stacklevel=4,
        )
        torch_backend = _BACKENDS["torch"]
        return getattr(torch_backend, which)(*args), torch_backend
