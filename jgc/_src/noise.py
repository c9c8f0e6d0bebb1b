"""Measure the rounding noise of J, robustly to kinks and to short wavelengths.

With equally spaced offsets t_j, the k-th differences of a smooth function shrink
like (Δt)^k, while those of independent rounding noise keep the variance
C(2k, k)·σ² (Hamming's observation, used by Moré and Wild's ECnoise). So the k-th
differences of J along a short line measure σ directly.

A kink (relu, abs, max) crossed by the line also leaves large k-th differences, and a
piecewise-linear network has many kinks. We therefore probe several short lines in
independent random directions and take the median of their estimates: a kink spoils
the lines that cross it, not the median. A ReLU network with many units and samples
has kinks so close to θ that most lines cross one (the MLP of tests/test_kinks.py:
5 of 7 lines switch a unit within 1.2e-6·s of θ, the line is 9e-5·s long), and their
slope changes, not rounding, then set the median.
Kink roughness is localised where rounding noise is not: between kinks J is smooth, so
only the few differences whose span holds a kink are large, while rounding noise
leaves every difference of the same size. So the probe also takes a robust estimate,
the median of |k-th difference| over all lines and positions; when the RMS estimate is
far above it (CONCENTRATED), the roughness sits in a few places and the robust one is
the noise. Steps sized for that noise stay short, so they rarely straddle a kink, and
an element whose stencil does straddle one is left to the kink test of the judge,
whose thresholds are multiples of the same σ. A staircase (a cost rounded to a
coarser quantum inside, whose values repeat and then jump) is localised as well but
is rounding, seen at offsets below its quantum: it keeps the RMS estimate.

A function that oscillates on a scale shorter than the probe (cos(w⁹) at |w| ≈ 1.7
has a period of about 0.01 in w) also leaves large differences: sampled too coarsely, a
smooth wave looks exactly like noise. The spacing tells them apart. Shrinking it by 8
shrinks the smooth part of a 6th difference by up to 8⁶ ≈ 2.6e5 and leaves rounding
noise as it is. So when the first probe reports J far noisier than its dtype, we probe
again with finer spacings and keep a finer result only when it is clearly smaller.

Every check measures its noise through :func:`probe` (equally spaced points at
:func:`spacing`, then :func:`finest`), in one of two designs: :data:`SCALAR` (7 lines
of 10 points, a scalar cost) and :data:`VECTOR` (1 line of 16 points, σ per output
element of a vector function); why they differ is written next to them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

# 6th differences: their smooth part is spacing⁶·|J⁽⁶⁾|, negligible for the spacing below.
ORDER = 6


@dataclasses.dataclass(frozen=True)
class Design:
    """A noise probe's design: ``lines`` lines of ``points`` equally spaced points each,
    at the spacing :func:`spacing` gives (and finer ones, :func:`finest`)."""

    lines: int
    points: int

    @property
    def evaluations(self) -> int:
        return self.lines * self.points


# A scalar cost: 7 lines of 10 points. 10 points give 4 sixth differences a line; 7
# lines let the median survive up to 3 lines spoiled by kinks (a ReLU network's lines
# cross one often, see above); 70 evaluations in one vmapped batch, negligible next to
# the 2n of a full check.
SCALAR = Design(lines=7, points=10)
# A vector function: 1 line of 16 points, σ_j per output element from its 10 sixth
# differences (good to ~25%, which the comparison's 8σ factor covers). One line, because
# every output element needs its own σ_j along the same evaluations: the lines of the
# scalar design would give each element 7 medians of 4 differences for 70 evaluations
# of the whole f, while an element crossed by a kink is told apart per element by
# :func:`localised` over its 10 differences. The two cannot be one design without
# changing the σ_j, hence every step and error bar, of one side's checks.
VECTOR = Design(lines=1, points=16)
# The scalar design's lines and points, as :func:`estimate` and :func:`measure` take them.
LINES, POINTS = SCALAR.lines, SCALAR.points


def spacing(u: float) -> float:
    """Relative spacing of the probe: u^(1/3), but at least 1e-5.

    u^(1/3) keeps the smooth part of a 6th difference at ~u²·|J|, far below u·|J|,
    and the line short (≈ 9·u^(1/3)·s) so that it rarely crosses a kink. The floor 1e-5
    keeps offsets resolvable when a float64 cost rounds to float32 inside (float32
    resolves relative steps down to ~1e-7).
    """
    return max(u ** (1.0 / 3.0), 1e-5)


# 1/√C(2·ORDER, ORDER): the ORDER-th difference of independent noise of variance σ²
# has variance C(2·ORDER, ORDER)·σ².
GAMMA = math.sqrt(math.factorial(ORDER) ** 2 / math.factorial(2 * ORDER))
# Median of |z| for a standard normal z: median |d| / MEDIAN_ABS estimates the standard
# deviation of d when d is (near-)Gaussian, as summed rounding errors are.
MEDIAN_ABS = 0.6745
# The RMS estimate must exceed the median-based one by this factor before the roughness
# counts as localised (kinks). For independent Gaussian noise the ratio of the two
# stays near 1: simulated, it exceeds 4 with probability 6e-4 and 8 with 2e-5 for the
# 10 differences of one output of a vector probe, never (in 2e5 draws) above 3 for the
# 28 differences of the scalar probe; 16 leaves a margin for heavier-tailed rounding
# across the ≈1e5 outputs of a big Jacobian. A kink dominates by far more: the slope
# change of one hidden unit of the ReLU MLP in tests/test_kinks.py gives a ratio of
# ≈1e4.
CONCENTRATED = 16.0


def _rms_difference(f: np.ndarray, axis: int) -> np.ndarray:
    """σ along ``axis`` of equally spaced values: the RMS of their ORDER-th differences,
    divided by √C(2·ORDER, ORDER) (the variance factor of differenced independent noise)."""
    d = np.diff(f, n=ORDER, axis=axis)
    return GAMMA * np.sqrt(np.mean(d * d, axis=axis))


def _median_difference(d: np.ndarray, axis) -> np.ndarray:
    """σ from ORDER-th differences ``d`` by their median magnitude over ``axis`` (robust:
    differences spoiled by a kink, fewer than half, do not move it)."""
    return GAMMA * np.median(np.abs(d), axis=axis) / MEDIAN_ABS


def localised(rms, robust, stairs) -> np.ndarray:
    """Where the roughness of J is localised (kinks), not spread (rounding noise).

    ``rms`` and ``robust``: the RMS and median-based estimates of the same values;
    ``stairs``: whether those values are a staircase (see :func:`staircase`).
    Localised: the RMS estimate is more than CONCENTRATED times the robust one, and the
    values are no staircase.
    """
    return (np.asarray(rms) > CONCENTRATED * np.asarray(robust)) & ~np.asarray(stairs, bool)


def estimate(values: np.ndarray) -> float:
    """σ from J on ``LINES`` lines of ``POINTS`` equally spaced points, shape (L, P).

    The median over lines of each line's RMS estimate, or, where J's roughness is
    localised (:func:`localised`), the median of every line's differences at once.
    Returns NaN when a line holds a non-finite value.
    """
    f = np.asarray(values, np.float64)
    if not np.all(np.isfinite(f)):
        return math.nan
    sigma, robust = _both(f)
    return robust if bool(localised(sigma, robust, staircase(f))) else sigma


def _both(f: np.ndarray) -> tuple[float, float]:
    """(median over lines of the RMS estimates, median-based estimate over every line)."""
    sigma = float(np.median(_rms_difference(f, axis=1)))
    return sigma, float(_median_difference(np.diff(f, n=ORDER, axis=1), axis=None))


def kinked(values: np.ndarray) -> bool:
    """Whether J's roughness along the probe, shape (L, P), is localised: J has kinks
    near θ (see :func:`localised`), and steps longer than its noise asks for would
    straddle them."""
    f = np.asarray(values, np.float64)
    if not np.all(np.isfinite(f)):
        return False
    sigma, robust = _both(f)
    return bool(localised(sigma, robust, staircase(f)))


def per_output(values: np.ndarray, y0: np.ndarray, u: float) -> tuple[np.ndarray, float]:
    """(σ_j of every output element, the effective u) of a vector-valued f.

    ``values``: f at equally spaced points along one line, shape (P, n_out); each column
    is one output element (see jgc/_src/vector.py). σ_j is floored at u·|y_j|, the
    rounding of y_j = f(x)_j itself; non-finite outputs add no noise, and a line with a
    non-finite value leaves every σ_j at its floor. The step serves every output at
    once, so the effective u is sized for the noisier outputs: the 90th percentile of
    σ_j/|y_j| (|y_j| at least 1e-3 of the largest), never below u.
    """
    absy = np.where(np.isfinite(y0), np.abs(y0), 0.0)
    floor = u * absy
    values = np.asarray(values, np.float64)
    if np.all(np.isfinite(values)):
        # Per output, as estimate() does over lines: the RMS estimate, or the robust one
        # where that output's roughness is localised (a kink crossed by the line).
        rms = _rms_difference(values, axis=0)
        robust = _median_difference(np.diff(values, n=ORDER, axis=0), axis=0)
        stairs = np.mean(np.diff(values, axis=0) == 0, axis=0) >= STAIRCASE
        sigma = np.where(localised(rms, robust, stairs), robust, rms)
        sigma = np.maximum(sigma, floor)
    else:
        sigma = floor
    ref = np.maximum(absy, 1e-3 * float(np.max(absy, initial=0.0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ref > 0, sigma / ref, 0.0)
    return sigma, max(u, float(np.quantile(rel, 0.9)) if rel.size else 0.0)


# Finer probes: each level divides the spacing by REFINE; at most LEVELS levels in all.
REFINE = 8.0
LEVELS = 3
# A first estimate above SUSPICIOUS·u·|J| triggers the finer probes (the dtype's own
# rounding gives about u·|J|; the finer probes cost 70 evaluations each).
SUSPICIOUS = 64.0
# A finer level replaces the coarser one only when σ drops by more than DROP. For pure
# noise the ratio of two estimates stays within about 0.5–2 (28 sixth differences each).
DROP = 8.0
# ...and only when the finer line is not a staircase: when many neighbouring values are
# identical the offsets are below a quantum of the cost (an input rounded to a lower
# precision inside), and a small σ there says nothing about the steps we will take.
STAIRCASE = 0.25


def staircase(values: np.ndarray) -> bool:
    """True when at least STAIRCASE of the neighbouring values along the lines that move
    are equal (along every line when none moves).

    A line that does not move anywhere along a finer probe is flat there (an output
    clamped near the point: ``optax.safe_norm`` of a zero row), not a staircase, as
    long as other lines move; it is left out of the count. When none moves, a quantum
    larger than the whole probe cannot be told from flatness: every line counts, and
    all their neighbours are equal.
    """
    d = np.diff(values, axis=1)
    moving = np.any(d != 0, axis=1)
    return bool(np.mean((d[moving] if moving.any() else d) == 0) >= STAIRCASE)


def finest(probe: Callable[[float], tuple[np.ndarray, float]], h: float):
    """Coarse-to-fine probing: the values and spacing of the finest level worth keeping.

    ``probe(spacing)`` evaluates J along its lines at that spacing and returns the
    values, shape (lines, points), and their excess: the measured noise in units of
    the dtype's rounding (σ / (u·|J|)). When the first excess is above SUSPICIOUS, finer
    spacings are probed; a finer level is kept only when its excess drops by more than
    DROP and its lines are not a staircase. A staircase whose steps are far above the
    dtype's rounding (excess above SUSPICIOUS: a cost that rounds to bfloat16 inside)
    sends the probe back to the first level. Returns (first values, kept values, kept
    spacing).
    """
    first, excess = probe(h)
    values, kept = first, h
    if math.isfinite(excess) and excess > SUSPICIOUS:
        for level in range(1, LEVELS):
            finer = h / REFINE**level
            fine_values, fine = probe(finer)
            if staircase(fine_values) and math.isfinite(fine) and fine > SUSPICIOUS:
                # J is quantised on the finer scales, in steps far above its dtype's
                # rounding (values rounded to bfloat16/float16 inside): what looked like a
                # short wave between here and the first probe was those steps. The first
                # probe's spread is J's noise as steps that span the quantum see it.
                return first, first, h
            if not (math.isfinite(fine) and fine < excess / DROP) or staircase(fine_values):
                break
            values, excess, kept = fine_values, fine, finer
            if excess <= SUSPICIOUS:
                break
    return first, values, kept


def probe(evaluate: Callable, u: float, design: Design):
    """The one noise probe of every check: the points t_j = j·h, j < ``design.points``, at
    h = ``spacing(u)`` and, when the first level looks far noisier than the dtype, at
    finer spacings (:func:`finest`). ``evaluate(t)`` returns (values, excess) along the
    design's lines at offsets ``t`` (see :func:`finest`). Returns (first values, kept
    values, kept spacing, first spacing)."""
    offsets = np.arange(design.points, dtype=np.float64)
    h = spacing(u)
    first, values, kept = finest(lambda s: evaluate(offsets * s), h)
    return first, values, kept, h


def measure(cost_lines: Callable, u: float) -> tuple[float, np.ndarray, float]:
    """Evaluate ``cost_lines(t)`` (J at θ + t_j·v_l, shape (L, P), the :data:`SCALAR`
    design); return σ, values, spacing.

    The values returned are those of the first probe; at t = 0 they are J(θ) as compiled
    code computes it. The spacing is that of the probe whose σ was kept (relative to the
    per-leaf scale); it is smaller than ``spacing(u)`` only when finer probes showed
    that the first one was resolving a short wave, not noise.
    """
    def evaluate(t):
        values = np.asarray(cost_lines(t), np.float64)
        floor = u * abs(values[0, 0])
        return values, (estimate(values) / floor if floor > 0 else 0.0)

    first, values, kept, _ = probe(evaluate, u, SCALAR)
    return estimate(values), first, kept


def signs(rng: np.random.Generator, m: int) -> np.ndarray:
    """m random signs ±1.0, as ``rng.choice([-1.0, 1.0], size=m)`` draws them, drawn in pieces
    (the same values: the generator's stream does not depend on how the draw is split)."""
    piece = 2**22
    return np.concatenate([rng.choice([-1.0, 1.0], size=min(piece, m - a)) for a in range(0, m, piece)]
                          or [np.zeros(0)])
