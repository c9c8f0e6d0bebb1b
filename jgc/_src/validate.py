"""Validation of the option values every front door shares: the function, traced values,
precision, tolerances, counts, steps, argnums.

Each validator names the front door (``api``) and the option in its message, so a
bad value is reported where the user wrote it. Each rule is written here once; the
front doors call it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from . import compat, policy

# Where the reference side evaluates: "auto" (float64 where the backend has it),
# "float64" (always), "native" (at the dtypes given).
PRECISIONS = ("auto", "float64", "native")


def function(api: str, name: str, v, expected: str, *, optional: bool = False) -> None:
    """Refuse a ``v`` that is not callable (None too, unless ``optional``).

    ``expected`` completes "``name`` must be …" (``"callable as f(*args)"``).
    """
    if (v is not None or not optional) and not callable(v):
        raise TypeError(f"{api}: {name} must be {expected}, got {type(v).__name__}.")


def traced(tree) -> bool:
    """Whether any leaf of ``tree`` is a JAX tracer (a value inside jit, vmap or grad)."""
    return any(compat.is_tracer(x) for x in jax.tree_util.tree_leaves(tree))


def concrete(api: str, tree, hint: str, *, message: str | None = None) -> None:
    """Refuse traced values in ``tree``: a check needs concrete numbers.

    The message says ``api`` got traced values, then ``hint`` (what to do instead);
    ``message`` replaces the whole sentence where a front door words it its own way.
    """
    if traced(tree):
        raise TypeError(message or f"{api} got traced values (it was called inside jit, vmap or grad). {hint}")


def precision(api: str, v) -> None:
    """The precision option: one of :data:`PRECISIONS`."""
    if v not in PRECISIONS:
        raise ValueError(f"{api}: precision must be one of {PRECISIONS}, got {v!r}.")


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def tolerances(api: str, rtol, atol) -> None:
    """rtol and atol: non-negative finite numbers, or None (the per-dtype defaults)."""
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and not (_is_number(v) and v >= 0 and math.isfinite(v)):
            raise ValueError(f"{api}: {name} must be a non-negative number or None, got {v!r}.")


# Where the analytic side runs: "native", the user's program at the dtypes given (its
# float32/bfloat16 rounding and casts inside, as training runs it); "reference", the
# same program at the reference's precision (float64), which hides bugs that live only
# at the user's dtype.
ANALYTIC = ("native", "reference")


def analytic(api: str, v) -> None:
    """The analytic option: one of :data:`ANALYTIC`."""
    if v not in ANALYTIC:
        raise ValueError(f"{api}: analytic must be one of {ANALYTIC}, got {v!r}.")


def count(api: str, name: str, v, minimum: int = 1) -> int | None:
    """An int option of at least ``minimum`` (None passes through as "not given")."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        what = "a positive int" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ValueError(f"{api}: {name} must be {what}, got {v!r}.")
    return int(v)


def step(api: str, v) -> float | None:
    """The user's relative step h/s: a positive finite number (None: chosen by jgc)."""
    if v is None:
        return None
    if not (_is_number(v) and v > 0 and math.isfinite(v)):
        raise ValueError(f"{api}: step must be a positive relative step h/s, got {v!r}.")
    return float(v)


def argnums(argnums, n: int, api: str) -> tuple[int, ...]:
    """Return argnums as a sorted tuple of non-negative ints (None: every primal)."""
    if argnums is None:
        return tuple(range(n))
    single = isinstance(argnums, (int, np.integer)) and not isinstance(argnums, bool)
    nums = (argnums,) if single else argnums
    if not isinstance(nums, (tuple, list)) or not all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in nums
    ):
        raise TypeError(
            f"{api}: argnums must be None (every primal), an int or a tuple of ints, got "
            f"{argnums!r}. Example: argnums=(0, 2) checks the first and third arguments."
        )
    out = []
    for i in nums:
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise ValueError(
                f"{api}: argnums={argnums!r} refers to argument {int(i)}, but f was given "
                f"{n} primal(s). Pass an index below {n}."
            )
        out.append(j)
    if len(set(out)) != len(out):
        raise ValueError(f"{api}: argnums={argnums!r} repeats an argument; list each once.")
    return tuple(sorted(out))


def stencil(api: str, v) -> None:
    """The stencil option: one of ``policy.STENCILS``."""
    if v not in policy.STENCILS:
        raise ValueError(f"{api}: stencil must be one of {policy.STENCILS}, got {v!r}.")


@dataclasses.dataclass(frozen=True)
class Options:
    """The options every check shares, validated once at its front door.

    One object travels from the front door to the judge and the report instead of the
    keywords one by one; ``None`` keeps its meaning (chosen by jgc per dtype).
    """

    api: str  # the front door, named in every message
    precision: str = "auto"
    rtol: float | None = None
    atol: float | None = None
    step: float | None = None  # relative step h/s
    strict: bool = False
    chunk_size: int | None = None
    analytic: str = "native"
    stencil: str = "central"



def options(api: str, **given) -> Options:
    """Validate the shared options of front door ``api`` once and freeze them.

    ``given``: any fields of :class:`Options`. Tolerances, the analytic side, the
    stencil and the step are validated here; the precision and the chunk size where
    the problem is prepared, after the function and its inputs (the order the messages
    have always come in).
    """
    opts = Options(api, **given)
    if "stencil" in given:
        stencil(api, opts.stencil)
    tolerances(api, opts.rtol, opts.atol)
    analytic(api, opts.analytic)
    return dataclasses.replace(opts, step=step(api, opts.step))
