"""Triton kernels of reasoncache. Import them as ``reasoncache.kernels``.

This folder sits at the top of the repository (the design card's layout) but is
installed as the ``reasoncache.kernels`` subpackage. It refuses to load as a top-level
``kernels`` module, which transformers would mistake for the Hugging Face hub-kernels
package.
"""

if __name__ != "reasoncache.kernels":
    raise ImportError(
        f"the reasoncache Triton kernels were imported as {__name__!r}; import them as "
        "'reasoncache.kernels' (a top-level 'kernels' module shadows the Hugging Face "
        "'kernels' package)"
    )

from .bwd import prefix_attention_bwd  # noqa: E402
from .fwd import prefix_attention_fwd  # noqa: E402

__all__ = ["prefix_attention_fwd", "prefix_attention_bwd"]
