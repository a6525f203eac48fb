"""The fused op, the bottom layer: public function -> ``torch.library`` custom op -> one
dispatch point (``backends``) -> the reference, the CPU fast path, the Triton kernels
(``reasoncache.kernels``) or the CUDA kernels (``reasoncache._C``). Imports nothing above it."""

from .attention import prefix_attention
from .backends import BackendUnavailable
from .reference import prefix_attention_ref

__all__ = ["prefix_attention", "prefix_attention_ref", "BackendUnavailable"]
