"""Build and install reasoncache.

Layout: the Triton kernels live in the top-level ``kernels/`` folder and the benchmarks in
``bench/``; they install as the subpackages ``reasoncache.kernels`` (through the symlink
``reasoncache/kernels -> ../kernels``, so a source checkout, an editable install and a wheel
all import them under that one name) and ``reasoncache.bench`` (``package_dir`` below).
``kernels/`` has no ``__init__.py``: seen from the repository root it is an empty namespace,
which transformers does not take for the Hugging Face hub-kernels package.

The CUDA C++ kernels in ``csrc/`` are built as ``reasoncache._C`` (torch cpp_extension,
ninja, pybind11) whenever nvcc and a CUDA build of torch are present. Environment:
  REASONCACHE_SKIP_CUDA_BUILD=1  skip it (the Triton and PyTorch backends still work)
  TORCH_CUDA_ARCH_LIST           GPU architectures (default "8.0;9.0+PTX": A100, H100, and PTX that
                                 newer GPUs compile at load time)
  MAX_JOBS                       parallel compile jobs (ninja)
  CUDA_HOME                      the CUDA toolkit (default: found from nvcc on the PATH)
  REASONCACHE_PTXAS_VERBOSE=1    print each kernel's registers, spills and shared memory
"""

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    """The version, written once in reasoncache/_version.py (read as text: no torch needed)."""
    with open(os.path.join(ROOT, "reasoncache", "_version.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _cuda_home() -> str | None:
    """CUDA_HOME, else the toolkit behind ``nvcc`` on the PATH (following a symlink, or a
    wrapper script that execs ``<toolkit>/bin/nvcc``)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            m = re.search(rb"exec\s+\"?(/\S+?/bin/nvcc)\b", head)
            if m:
                nvcc = os.path.realpath(m.group(1).decode())
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(nvcc))


def _cuda_extension():
    """([ext_modules], {cmdclass}) for reasoncache._C, or ([], {}) with the reason printed."""
    if os.environ.get("REASONCACHE_SKIP_CUDA_BUILD", "0") == "1":
        print("reasoncache: REASONCACHE_SKIP_CUDA_BUILD=1, not building reasoncache._C", file=sys.stderr)
        return [], {}
    home = _cuda_home()
    try:
        import torch
    except ImportError:
        print("reasoncache: torch is not installed at build time; not building reasoncache._C", file=sys.stderr)
        return [], {}
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")) or torch.version.cuda is None:
        why = "nvcc was not found" if torch.version.cuda else f"torch {torch.__version__} is not a CUDA build"
        print(f"reasoncache: {why}; not building reasoncache._C (Triton and PyTorch backends only)", file=sys.stderr)
        return [], {}
    os.environ["CUDA_HOME"] = home  # read by cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # no GPU to detect on a build machine
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # CUDA 13 wheels of torch ship some toolkit headers (cusparse.h, ...) under nvidia/cu13.
    include = []
    for base in sys.path:
        include += sorted(glob.glob(os.path.join(base, "nvidia", "cu1[0-9]", "include")))
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    if os.environ.get("REASONCACHE_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    ext = CUDAExtension(
        name="reasoncache._C",
        sources=["csrc/bindings.cpp", "csrc/fwd.cu", "csrc/bwd.cu"],
        include_dirs=[os.path.join(ROOT, "csrc")] + include[:1],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": nvcc,
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(
    name="reasoncache",
    version=_version(),
    description="Prefix-augmented flash attention (Triton, CUDA, PyTorch) for prefix tuning frozen LLMs",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "reasoncache",
        "reasoncache.ops",
        "reasoncache.kernels",
        "reasoncache.hf",
        "reasoncache.app",
        "reasoncache.bench",
    ],
    package_dir={"reasoncache.bench": "bench"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.56",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        # the embedded default model (SmolLM2-135M-Instruct GGUF) and the demo's baselines and plot
        "demo": ["gguf", "peft", "matplotlib", "accelerate"],
        "test": ["pytest>=8", "ruff>=0.6", "gguf", "peft", "matplotlib", "accelerate"],
    },
    entry_points={"console_scripts": ["reasoncache = reasoncache.app.cli:main"]},
)
