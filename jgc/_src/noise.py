"""Measure the rounding noise of J, robustly to kinks.

With equally spaced offsets t_j, the k-th differences of a smooth function shrink
like (Δt)^k, while those of independent rounding noise keep the variance
C(2k, k)·σ² (Hamming's observation, used by Moré and Wild's ECnoise). So the k-th
differences of J along a short line measure σ directly.

A kink (relu, abs, max) crossed by the line also leaves large k-th differences, and a
piecewise-linear network has many kinks. We therefore probe several short lines in
independent random directions and take the median of their estimates: a kink spoils
the lines that cross it, not the median.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

# 6th differences: their smooth part is spacing⁶·|J⁽⁶⁾|, negligible for the spacing below.
ORDER = 6
# 10 points per line give 4 sixth differences per line.
POINTS = 10
# 7 lines: the median survives up to 3 lines spoiled by kinks; 70 evaluations in one
# vmapped batch, negligible next to the 2n of a full check.
LINES = 7


def spacing(u: float) -> float:
    """Relative spacing of the probe: u^(1/3), but at least 1e-5.

    u^(1/3) keeps the smooth part of a 6th difference at ~u²·|J|, far below u·|J|,
    and the line short (≈ 9·u^(1/3)·s) so that it rarely crosses a kink. The floor 1e-5
    keeps offsets resolvable when a float64 cost rounds to float32 inside (float32
    resolves relative steps down to ~1e-7).
    """
    return max(u ** (1.0 / 3.0), 1e-5)


def estimate(values: np.ndarray) -> float:
    """σ from J on ``LINES`` lines of ``POINTS`` equally spaced points, shape (L, P).

    Returns NaN when a line holds a non-finite value.
    """
    f = np.asarray(values, np.float64)
    if not np.all(np.isfinite(f)):
        return math.nan
    d = np.diff(f, n=ORDER, axis=1)
    gamma = math.factorial(ORDER) ** 2 / math.factorial(2 * ORDER)
    per_line = np.sqrt(gamma * np.mean(d * d, axis=1))
    return float(np.median(per_line))


def measure(cost_lines: Callable, u: float) -> tuple[float, np.ndarray]:
    """Evaluate ``cost_lines(t)`` (J at θ + t_j·v_l, shape (L, P)); return σ and the values.

    The values at t = 0 are J(θ) as compiled code computes it.
    """
    t = np.arange(POINTS, dtype=np.float64) * spacing(u)
    values = np.asarray(cost_lines(t), np.float64)
    return estimate(values), values
