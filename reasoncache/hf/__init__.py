"""Hugging Face transformers integration: patch a decoder to use the fused prefix op."""

from .patch import patch, prefix_suspended, unpatch, use_caches

__all__ = ["patch", "unpatch", "prefix_suspended", "use_caches"]
