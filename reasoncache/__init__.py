"""reasoncache: prefix-augmented flash attention for prefix tuning (ReasonCACHE).

The fused op ``prefix_attention`` lets every query attend to a learned key/value prefix
shared by the whole batch, then causally to its own keys.
"""

from .attention import prefix_attention
from .backends import BackendUnavailable
from .cache import ReasonCache
from .hf import patch, unpatch
from .reference import prefix_attention_ref

__version__ = "0.1.0"

__all__ = [
    "prefix_attention",
    "prefix_attention_ref",
    "BackendUnavailable",
    "ReasonCache",
    "patch",
    "unpatch",
    "__version__",
]
