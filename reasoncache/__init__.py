"""reasoncache: prefix-augmented flash attention for prefix tuning (ReasonCACHE).

The fused op ``prefix_attention`` lets every query attend to a learned key/value prefix
shared by the whole batch, then causally to its own keys.

Layers, each importing only those below it:
  ``ops/``      the op: public function, custom op, backends, reference, CPU fast path
  ``kernels/``  the Triton kernels (``reasoncache.kernels``); ``_C`` the CUDA kernels
  ``hf/``       the Hugging Face integration: model introspection, attention entries, patch
  ``cache.py``  ``ReasonCache``, the learned per-layer prefix, and its builders
  ``app/``      trainer, data, evaluation, tasks, model loading, baselines, demo, CLI
"""

from ._version import __version__
from .cache import ReasonCache, ReasonCacheBank, build_cache
from .hf import patch, unpatch
from .ops import BackendUnavailable, prefix_attention, prefix_attention_ref

__all__ = [
    "prefix_attention",
    "prefix_attention_ref",
    "BackendUnavailable",
    "ReasonCache",
    "ReasonCacheBank",
    "build_cache",
    "patch",
    "unpatch",
    "__version__",
]
