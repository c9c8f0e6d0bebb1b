"""Comparison policy: when does an analytic derivative disagree with a numerical one?

Element i passes when

    |a_i − n_i| ≤ atol + rtol·max(|a_i|, |n_i|) + 8·σ·gain_i + 2·trunc_i

where σ is the noise of J (measured, never below u·|J|), gain_i the stencil's noise
gain at that element's step (≈ 1/h for central differences) and trunc_i the
truncation estimate from two step sizes (zero on the cheap first pass). The first two
terms are the user's tolerance for the analytic side; the last two are what the
numerical method itself can explain.
"""

from __future__ import annotations

import numpy as np

from . import policy
from .statuses import IMPRECISE, INCONCLUSIVE, MISMATCH, NON_FINITE, NON_SMOOTH, OK

# A reference resolves a derivative when its error bar is at most this fraction of its
# value: then a relative disagreement beyond rtol is the analytic side's, not the
# reference's. A tenth keeps a 2× error bar estimate (noise, truncation) well clear.
RESOLVED = 0.1


def method_error(gain: np.ndarray, trunc: np.ndarray, sigma: float) -> np.ndarray:
    """The part of a difference that the finite-difference method can explain."""
    return policy.ROUNDOFF_SAFETY * sigma * gain + policy.TRUNCATION_SAFETY * trunc


def tolerance(a: np.ndarray, n: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    # fmax: a NaN on one side (a derivative rule that returned NaN) leaves the other
    # side's tolerance to report, not NaN; such an element fails on finiteness anyway.
    return atol + rtol * np.fmax(np.abs(a), np.abs(n))


def imprecise(a, n, err, rel, passed, tiny=0.0) -> np.ndarray:
    """Elements that pass only thanks to the absolute tolerance although the reference resolves them.

    ``rel`` is the relative part of the tolerance (rtol·max(|a|, |n|)). Such an element
    is off by more than rtol relative to a value the reference pins down to within
    ``RESOLVED`` of itself: the analytic side lost relative precision there (an
    output-written rule such as σ(1 − σ) rounding to 0 in the tail). An element whose
    true value is tiny but whose analytic value keeps rtol relative precision is not
    flagged, nor is one the reference cannot resolve (its error bar covers the value),
    nor one below ``tiny`` (the analytic dtype's smallest normal number: it could not
    hold that value to full relative precision).
    """
    a, n = np.asarray(a), np.asarray(n)
    d = np.abs(a - n)
    resolved = (err <= RESOLVED * np.abs(n)) & (np.abs(n) >= tiny) & (n != 0)
    return passed & resolved & (d > rel + err) & np.isfinite(a)


def classify(a, n, err, tol, finite, *, kink=None, floor=0.0, rel=None, tiny=0.0) -> np.ndarray:
    """Return a status code per element.

    Args:
      a, n: analytic and numerical derivatives.
      err: method error (``method_error``); tol: user tolerance (``tolerance``).
      finite: whether every J value behind n was finite.
      kink: optional boolean mask of elements flagged non-smooth.
      floor: derivatives below this size are judged against it when deciding whether
        an error bar is too wide to say anything (inconclusive).
      rel: optional relative part of ``tol`` (rtol·max(|a|, |n|)); when given, elements
        that pass only by the absolute part although the reference resolves them are
        ``IMPRECISE`` (see :func:`imprecise`; ``tiny`` is passed on).
    """
    d = np.abs(a - n)
    codes = np.full(d.shape, OK, dtype=np.int8)
    a_finite = np.isfinite(a)
    passed = d <= tol + err
    # Passing only because the error bar is wider than half the derivative itself:
    # the check could not have told a gross error from a right answer there.
    wide = (err > 0.5 * np.maximum(np.maximum(np.abs(a), np.abs(n)), floor)) & (d > tol)
    codes[passed & wide] = INCONCLUSIVE
    if rel is not None:
        codes[imprecise(a, n, err, rel, passed & ~wide, tiny)] = IMPRECISE
    codes[~passed] = MISMATCH
    if kink is not None:
        codes[~passed & kink] = NON_SMOOTH
    codes[~finite] = NON_FINITE
    # A non-finite analytic value where J is finite around θ is a bug, not noise.
    codes[~a_finite & finite] = MISMATCH
    return codes
