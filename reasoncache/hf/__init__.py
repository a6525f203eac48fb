"""Hugging Face transformers integration: patch a decoder to use the fused prefix op."""

from .patch import patch, prefix_suspended, unpatch

__all__ = ["patch", "unpatch", "prefix_suspended"]
