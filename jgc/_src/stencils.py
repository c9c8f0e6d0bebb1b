"""Finite-difference stencils with an error estimate for every derivative.

Each function takes the J values the engine returned and the representable steps, and
returns a :class:`Estimate`: the derivative, a round-off bound (noise σ of J divided by
the step, times the stencil's noise gain) and, where the stencil gives one, a
truncation estimate from comparing two step sizes (Richardson).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import policy


@dataclasses.dataclass
class Estimate:
    value: np.ndarray  # derivative estimate per coordinate
    err_round: np.ndarray  # round-off part, per unit noise σ (multiply by σ)
    err_trunc: np.ndarray  # truncation estimate (0 where the stencil gives none)
    finite: np.ndarray  # all J values used were finite
    # one-sided differences at h, 2h and 4h (richardson only; used for kinks)
    onesided: np.ndarray | None = None
    # central differences at h, 2h, 4h (richardson only; used for kinks)
    table: np.ndarray | None = None


def offsets(stencil: str) -> np.ndarray:
    """Multiples of h at which a stencil evaluates J (0 = J(θ), known already)."""
    return {
        "central": np.array([1.0, -1.0]),
        "forward": np.array([1.0]),
        "central4": np.array([1.0, -1.0, 2.0, -2.0]),
        "richardson": np.array([1.0, -1.0, 2.0, -2.0, 4.0, -4.0]),
        "complex": np.array([1.0]),
    }[stencil]


def _central(jp, jm, hp, hm):
    return (jp - jm) / (hp + hm), 2.0 / (hp + hm)


def _extrapolate(d_small, d_big, h_small, h_big, order):
    """Richardson: cancel the h^order term of two estimates at steps h_small < h_big."""
    r = (h_big / h_small) ** order
    return (r * d_small - d_big) / (r - 1.0)


def estimate(stencil: str, j0: float, jv: np.ndarray, hv: np.ndarray) -> Estimate:
    """Combine J values at the stencil's offsets into derivatives with error estimates.

    Args:
      stencil: one of ``offsets``' keys (except "complex", see ``complex_step``).
      j0: J(θ).
      jv: (n, p) J values at the offsets ``offsets(stencil)``.
      hv: (n, p) representable signed offsets actually taken.

    Rows with a non-finite value are flagged in ``finite`` (their arithmetic warns not).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        return _estimate(stencil, j0, jv, hv)


def _estimate(stencil: str, j0: float, jv: np.ndarray, hv: np.ndarray) -> Estimate:
    jv = np.asarray(jv, np.float64)
    hv = np.abs(np.asarray(hv, np.float64))
    finite = np.all(np.isfinite(jv), axis=1) & np.isfinite(j0)
    zeros = np.zeros(jv.shape[0])
    if stencil == "forward":
        # O(h) truncation; noise gain 2/h (two independent values).
        value = (jv[:, 0] - j0) / hv[:, 0]
        return Estimate(value, 2.0 / hv[:, 0], zeros, finite)
    d1, g1 = _central(jv[:, 0], jv[:, 1], hv[:, 0], hv[:, 1])
    if stencil == "central":
        return Estimate(d1, g1, zeros, finite)
    d2, _ = _central(jv[:, 2], jv[:, 3], hv[:, 2], hv[:, 3])
    h1 = (hv[:, 0] + hv[:, 1]) / 2
    h2 = (hv[:, 2] + hv[:, 3]) / 2
    r1 = _extrapolate(d1, d2, h1, h2, 2)  # the five-point O(h⁴) formula
    if stencil == "central4":
        # |D_h − D_2h|/3 estimates D_h's h² error, a safe upper bound on r1's error.
        # Noise gain of (4·D_h − D_2h)/3 with D's gains 1/h and 1/2h: 1.5/h.
        return Estimate(r1, 1.5 * g1, np.abs(r1 - d1), finite)
    d4, _ = _central(jv[:, 4], jv[:, 5], hv[:, 4], hv[:, 5])
    h4 = (hv[:, 4] + hv[:, 5]) / 2
    r1b = _extrapolate(d2, d4, h2, h4, 2)
    r2 = _extrapolate(r1, r1b, h1, h2, 4)  # O(h⁶)
    # The difference of the last two table entries bounds the error of the better
    # one; the noise gain of the O(h⁶) combination is policy.RICHARDSON_NOISE_GAIN/h.
    est = Estimate(r2, policy.RICHARDSON_NOISE_GAIN * g1, np.abs(r2 - r1), finite)
    fwd1 = (jv[:, 0] - j0) / hv[:, 0]
    bwd1 = (j0 - jv[:, 1]) / hv[:, 1]
    fwd2 = (jv[:, 2] - j0) / hv[:, 2]
    bwd2 = (j0 - jv[:, 3]) / hv[:, 3]
    fwd4 = (jv[:, 4] - j0) / hv[:, 4]
    bwd4 = (j0 - jv[:, 5]) / hv[:, 5]
    est.onesided = np.stack([fwd1, bwd1, fwd2, bwd2, fwd4, bwd4], axis=1)
    est.table = np.stack([d1, d2, d4], axis=1)
    return est


def complex_step(jv: np.ndarray, h: np.ndarray, u: float) -> Estimate:
    """Complex-step derivative Im J(θ + ih)/h: no subtraction, so no cancellation.

    Its truncation error is h²·|J'''|/6 with h ≈ 1e-20·s, far below round-off, and
    its round-off is a few u·|J'| rather than σ/h: we return a zero noise gain and put
    16·u·|J'| (rounding through a chain of complex operations) in the second term.
    """
    jv = np.asarray(jv).reshape(-1)
    finite = np.isfinite(jv.real) & np.isfinite(jv.imag)
    value = jv.imag / np.asarray(h, np.float64).reshape(-1)
    zeros = np.zeros_like(value)
    return Estimate(value, zeros, 16.0 * u * np.abs(value), finite)


def kink(onesided: np.ndarray, table: np.ndarray, noise: np.ndarray, analytic: np.ndarray,
         tol: np.ndarray):
    """Flag non-smooth points from one-sided and central differences at h, 2h, 4h.

    Three signatures of a kink, each far above the noise of the quantity tested:

    * at the point itself: forward − backward ≈ h·J'' at a smooth point, so doubling h
      doubles the gap; at a kink the gap is the jump in slope, the same for both steps.
      We require the gap at h to be 40× its noise and to grow by less than 1.5× (smooth:
      2×), or the gap at 4h to be 40× its own noise (a quarter of that at h) and less
      than 2× the gap at h (smooth: 4×).
    * within the stencil: at a smooth point the central differences follow
      D(h) − D(2h) ≈ −3ch² and D(2h) − D(4h) ≈ −12ch², a ratio of 4. A kink crossed by
      the stencil breaks that law; we require the larger difference to be 40× its noise
      and the ratio to fall outside [2, 8].

    * on one side: the extrapolated forward and backward slopes split apart (below).

    In every case the point counts as non-smooth only when the analytic value lies within
    the span of the one-sided slopes (plus tolerance): a valid one-sided derivative, as
    JAX returns for relu/abs/max at or near the switch point. A wrong derivative next to
    a kink still lies outside that span and stays a mismatch.
    """
    gap1 = onesided[:, 0] - onesided[:, 1]
    gap2 = onesided[:, 2] - onesided[:, 3]
    at_point = (np.abs(gap1) > 40.0 * noise) & (np.abs(gap2) < 1.5 * np.abs(gap1))
    # The same signature read at 4h, whose one-sided slopes carry a quarter of the noise:
    # in float32 (precision="native": noise ~1e-4 of a ReLU unit's slopes) the gap at h
    # may sit under 40× its noise while the gap at 4h stands 40× above its own. A smooth
    # J makes the gap at 4h 4× the one at h; a kink keeps it. We require the gap at h
    # above 20× its noise, of the same sign, and the one at 4h less than 2× it: a smooth
    # point passes that only if the noise moved the gap at h by half of itself, 10× its
    # noise.
    gap4 = onesided[:, 4] - onesided[:, 5]
    at_point |= ((np.abs(gap4) > 10.0 * noise) & (np.abs(gap1) > 20.0 * noise)
                 & (np.sign(gap4) == np.sign(gap1)) & (np.abs(gap4) < 2.0 * np.abs(gap1)))
    e12 = table[:, 0] - table[:, 1]
    e24 = table[:, 1] - table[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(e24) / np.abs(e12)
    resolved = np.maximum(np.abs(e12), np.abs(e24)) > 40.0 * noise
    in_stencil = resolved & ~((ratio >= 2.0) & (ratio <= 8.0))
    # One-sided slopes carry an O(h·J'') bias from the smooth part of J; extrapolate
    # them (2·S(h) − S(2h), and the O(h²) version from h, 2h, 4h) so that a one-sided
    # derivative next to a kink is not missed by that bias. The spread of the two
    # extrapolations is their own uncertainty; 40·noise covers the noise of
    # 2·S(h) − S(2h) (gain 5σ/h) with the usual safety factor 8.
    fwd, bwd = onesided[:, 0::2], onesided[:, 1::2]
    ext = []
    for side in (fwd, bwd):
        first = 2.0 * side[:, 0] - side[:, 1]
        second = (8.0 * side[:, 0] - 6.0 * side[:, 1] + side[:, 2]) / 3.0
        ext += [first, second]
    ext = np.stack(ext, axis=1)
    spread = np.maximum(np.abs(ext[:, 0] - ext[:, 1]), np.abs(ext[:, 2] - ext[:, 3]))
    slopes = np.concatenate([onesided, ext], axis=1)
    margin = tol + 40.0 * noise + spread
    inside = (analytic >= slopes.min(axis=1) - margin) & (analytic <= slopes.max(axis=1) + margin)
    # Third signature: for a smooth J the extrapolated forward and backward slopes
    # agree to O(h³) (both equal J' − h²·J⁽³⁾/3), while |D(h) − D(2h)| = h²·|J⁽³⁾|/2. A
    # split between them far beyond that and the noise means a kink on one side.
    split = np.abs(ext[:, 0] - ext[:, 2]) > 40.0 * noise + np.abs(e12) + np.abs(e24) / 4.0
    return (at_point | in_stencil | split) & inside


def to_elements(values: np.ndarray, m: int, is_complex: bool) -> np.ndarray:
    """Fold per-coordinate derivatives into per-element ones (complex: JAX convention).

    For a real-valued J of complex z = x + iy, ``jax.grad`` returns ∂J/∂x − i·∂J/∂y
    (the conjugate of the usual Wirtinger-based gradient), so we fold the same way.
    """
    if not is_complex:
        return values
    return values[:m] - 1j * values[m:]
