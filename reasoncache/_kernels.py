"""Load the Triton kernels as ``reasoncache.kernels``.

A regular install puts them in ``reasoncache/kernels/``. In a source checkout (run in
place, or installed editable) they are the top-level ``kernels/`` folder beside this
package: load that folder under the name ``reasoncache.kernels``, so the kernels always
come from the same tree as the Python code calling them (an editable install elsewhere
must not win). They are never importable as a top-level ``kernels`` module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

_pkg = Path(__file__).resolve().parent
_source_tree = _pkg.parent / "kernels"

if "reasoncache.kernels" in sys.modules:
    kernels = sys.modules["reasoncache.kernels"]
elif not (_pkg / "kernels").is_dir() and (_source_tree / "fwd.py").is_file() and (_pkg.parent / "setup.py").is_file():
    _spec = importlib.util.spec_from_file_location(
        "reasoncache.kernels", _source_tree / "__init__.py", submodule_search_locations=[str(_source_tree)]
    )
    kernels = importlib.util.module_from_spec(_spec)
    sys.modules["reasoncache.kernels"] = kernels
    try:
        _spec.loader.exec_module(kernels)
    except BaseException:
        del sys.modules["reasoncache.kernels"]
        raise
else:
    kernels = importlib.import_module("reasoncache.kernels")
