"""Load the Triton kernels as ``reasoncache.kernels``.

An install (regular or editable) maps the top-level ``kernels/`` folder to
``reasoncache.kernels``. Run straight from a source checkout (``PYTHONPATH=.``) there is
no such mapping, so load the folder under that name by hand. It is never importable as
a top-level ``kernels`` module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

try:
    kernels = importlib.import_module("reasoncache.kernels")
except ModuleNotFoundError as e:
    if e.name != "reasoncache.kernels":
        raise
    _init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not _init.is_file():
        raise
    _spec = importlib.util.spec_from_file_location(
        "reasoncache.kernels", _init, submodule_search_locations=[str(_init.parent)]
    )
    kernels = importlib.util.module_from_spec(_spec)
    sys.modules["reasoncache.kernels"] = kernels
    _spec.loader.exec_module(kernels)
