"""Steps that span a staircase: a second look at elements of a cost computed in low precision.

A cost that computes in bfloat16 or float16 inside (a Flax module with
``dtype=jnp.bfloat16``) is quantised: J repeats and then jumps by a few 1e-3 of its
terms, whatever the parameters' dtype. The noise probe sees those steps as noise far
above the dtype's (σ ≫ u·|J|), and a central difference over two points carries
σ/h of it: an element whose derivative moves J by less than that over the step is
``inconclusive``. Two things shrink that bar without changing the derivative: a wider
span (more quanta crossed, so each one weighs less) and more points on it (a least
squares slope averages the rounding of K points: its error falls like 1/√K).

:func:`span` takes the inconclusive elements of such a leaf once more: J at
``POINTS`` offsets spread over ``WIDEN`` times the first pass's step, a polynomial
of degree ``DEGREE`` fitted by least squares, its slope at 0 the estimate. Its error
bar is the slope's standard error from the fit's own residuals (at least the noise
probe's σ), times the round-off safety factor, plus the truncation the fit may carry
(the difference from a fit of lower degree). An element whose bar is then below half
its derivative and that agrees with the analytic value is ``ok``; every other one
stays ``inconclusive``, with a note that names the staircase. It never makes a
mismatch: a wide fit that disagrees is no more trusted than the first pass.
"""

from __future__ import annotations

import math

import numpy as np

from . import compare, compat, noise
from .statuses import INCONCLUSIVE, OK

# Offsets per element on the wide span: 64 average the rounding of the staircase by
# about 8 (1/√64 for independent quanta) against a two-point difference at that span.
# Measured on a Flax attention block computing in bfloat16 (313 elements, 228
# inconclusive after the first pass): 32 points resolved 71 of them, 64 resolved 100.
POINTS = 64
# The span, in units of the first pass's relative step h/s (at most MAX_SPAN): a wider
# span crosses more quanta, so each weighs less, while the fit's degree keeps the
# truncation of a smooth network within the bar (its estimate is part of the bar).
WIDEN = 8.0
# The widest relative step taken: beyond half a coordinate's scale the fit would
# describe another region of the cost, not the derivative at the point.
MAX_SPAN = 0.5
# Degree of the fitted polynomial (odd and even terms: the fit needs no symmetry), and
# of the lower fit whose slope difference estimates the truncation.
DEGREE, LOWER = 4, 2
# Bars of a fitted slope: its standard error comes from POINTS − DEGREE − 1 residuals (at
# least the probe's σ), a measured spread, not the one-number σ·gain of a two-point
# difference that ROUNDOFF_SAFETY (8) covers: 4 standard errors, as the float64 twin's
# claim of a wrong program takes 4 bars (summary.TWIN_SAFETY).
FIT_SAFETY = 4.0
# At most this many elements per leaf get the second look (POINTS evaluations each).
MAX_ELEMENTS = 256


def noisy(steps) -> bool:
    """True when J is noisier than its dtype by far, relative to the terms it moves by
    (``steps.u_eff``: σ over max(|J|, the gradient's scale)): the cost quantises inside
    (a staircase of bfloat16/float16 steps), as the noise probe measured it. A cost
    that is a small difference of large terms is noisy against |J| only, not here."""
    return steps.u_eff > noise.SUSPICIOUS * steps.problem.u


def slope_fit(t: np.ndarray, values: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope at 0 of J along each row (offsets ``t``, values, both (n, K)),
    and its error bar: FIT_SAFETY times the slope's standard error (from the fit's
    residuals, at least the noise ``sigma``) plus |slope − slope of the lower fit|."""
    n, k = values.shape
    slopes, bars = np.empty(n), np.empty(n)
    for i in range(n):
        x, y = t[i], values[i] - values[i].mean()
        span = float(np.max(np.abs(x))) or 1.0
        z = x / span  # a well-conditioned basis on [-1, 1]
        full = np.vander(z, DEGREE + 1, increasing=True)
        coef, res, _, _ = np.linalg.lstsq(full, y, rcond=None)
        low = np.linalg.lstsq(np.vander(z, LOWER + 1, increasing=True), y, rcond=None)[0]
        dof = k - (DEGREE + 1)
        rss = float(res[0]) if res.size else float(np.sum((full @ coef - y) ** 2))
        s = max(math.sqrt(rss / dof) if dof > 0 else math.inf, sigma)
        cov = np.linalg.pinv(full.T @ full)
        se = s * math.sqrt(max(float(cov[1, 1]), 0.0)) / span
        slopes[i] = coef[1] / span
        trunc = abs(coef[1] - low[1]) / span if LOWER >= 1 else 0.0
        bars[i] = FIT_SAFETY * se + trunc
    return slopes, bars


def span(problem, k: int, elems: np.ndarray, a: np.ndarray, judged, lim, *, h_rel: float) -> int:
    """Take the inconclusive elements of real leaf k once more over a wide, many-point
    span (see the module); those it resolves and that agree become ``OK`` in
    ``judged`` (updated in place). Returns how many stay inconclusive."""
    cand = np.flatnonzero((judged.codes == INCONCLUSIVE) & np.isfinite(a))
    if cand.size == 0:
        return 0
    left = cand[MAX_ELEMENTS:].size
    cand = cand[:MAX_ELEMENTS]
    from_host = compat.host(problem.dyn[k]).ravel()
    idx = elems[cand]
    h = min(WIDEN * h_rel, MAX_SPAN) * problem.scales[k][idx]
    offs = np.linspace(-1.0, 1.0, POINTS)
    deltas = (offs[None, :] * h[:, None]).astype(from_host.dtype)
    values = np.real(np.asarray(problem.evaluator(k)(idx, deltas), np.float64))
    # The offsets really taken: (θ + δ) − θ in the leaf's dtype (see engine.actual_steps).
    base = from_host[idx][:, None]
    taken = ((base + deltas) - base).astype(np.float64)
    finite = np.all(np.isfinite(values), axis=1)
    slope, bar = slope_fit(taken, np.where(np.isfinite(values), values, 0.0), float(problem.sigma))
    ab = a[cand]
    analytic = np.ravel(lim.analytic)[cand] if np.ndim(lim.analytic) else lim.analytic
    tol = compare.tolerance(ab, slope, np.ravel(lim.rtol)[cand] if np.ndim(lim.rtol) else lim.rtol,
                            np.ravel(lim.atol)[cand] if np.ndim(lim.atol) else lim.atol)
    resolved = finite & (bar <= 0.5 * np.maximum(np.abs(slope), np.abs(ab)))
    agree = np.abs(slope - ab) <= tol + bar + analytic
    sel = resolved & agree
    now = cand[sel]
    judged.num[now] = slope[sel]
    judged.err[now] = np.broadcast_to(bar + analytic, bar.shape)[sel]
    judged.tol[now] = np.broadcast_to(tol, bar.shape)[sel]
    judged.codes[now] = OK
    return int(cand.size - now.size) + left


# The first words of the note that explains the staircase once per report.
EXPLAINED = "inconclusive elements on a staircase:"


def add_note(notes: list, path: str, still: int, checked: int, sigma_rel: float) -> None:
    """Say, for a leaf whose elements stay inconclusive on a quantised cost, why: the
    staircase is explained once per report, each further leaf gets its counts only."""
    if not any(n.startswith(EXPLAINED) for n in notes):
        notes.append(
            f"{EXPLAINED} the cost computes in low precision inside (bfloat16/float16 compute), so J moves "
            f"in a staircase of rounded steps (σ ≈ {sigma_rel:.1e}·|J|, far above its dtype's rounding). "
            f"Steps spanning it ({POINTS}-point fits over up to {WIDEN:g} times the first step) resolved "
            "what they could; the elements counted here and below stay inconclusive: their derivatives move J "
            "less than the staircase does, and a wrong value there would pass unseen. To check them, compute "
            "the cost in float32 inside (dtype=jnp.float32 on the model) or check at a point where they are "
            f"larger. {path}: {still} of {checked}.")
    else:
        notes.append(f"inconclusive on the staircase (see above): {path}: {still} of {checked}.")
