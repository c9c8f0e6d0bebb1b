"""How jgc names a user's function in messages (its qualified name) and reports (with its module)."""

from __future__ import annotations


def short_name(fn) -> str:
    """``fn.__qualname__`` (or ``__name__``, or its type's name for a callable object)."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name or type(fn).__name__


def function_name(fn) -> str:
    """``module.qualname`` as reports show it; no module for functions defined in ``__main__``."""
    mod = getattr(fn, "__module__", None)
    name = short_name(fn)
    return f"{mod}.{name}" if mod and mod != "__main__" else name
