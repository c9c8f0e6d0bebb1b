"""Validation of the option values every front door shares: tolerances, counts, steps, argnums.

Each validator names the front door (``api``) and the option in its message, so a
bad value is reported where the user wrote it.
"""

from __future__ import annotations

import math

import numpy as np


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
