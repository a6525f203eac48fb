"""Argument checks shared by every layer (a leaf module: it imports nothing of reasoncache)."""


def is_int_at_least(v, low: int) -> bool:
    """Whether ``v`` is a Python int (not a bool, which is an int subclass) and ``v >= low``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= low
