"""Triton kernels of reasoncache. Import them as ``reasoncache.kernels``.

This folder sits at the top of the repository (the design card's layout) but is
installed as the ``reasoncache.kernels`` subpackage. When the repository root is on
``sys.path`` (running from a checkout), ``import kernels`` would find it, and
transformers would mistake it for the Hugging Face hub-kernels package. Imported under
any name but ``reasoncache.kernels``, it therefore loads as an inert stub: it exports
nothing and has no ``__file__``, which is how transformers recognises a namespace-package
shadow and reports hub kernels as unavailable.
"""

if __name__ == "reasoncache.kernels":
    from .bwd import prefix_attention_bwd
    from .fwd import prefix_attention_fwd

    __all__ = ["prefix_attention_fwd", "prefix_attention_bwd"]
else:
    __all__ = []
    globals()["__file__"] = None
