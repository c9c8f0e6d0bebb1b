"""Numerical policy: unit round-off, default steps and default tolerances.

Every number here has its reason beside it. They are pure functions of dtypes so
that the engine, the comparison and the report agree on one source of truth.

Notation: ``u`` is the unit round-off of a dtype (half the machine epsilon), ``h`` a
finite-difference step, ``s`` the scale of a parameter (see :func:`coordinate_scale`).
"""

from __future__ import annotations

import numpy as np

from . import compat

# Stencils the engine knows. "central" is the lecture's two-sided difference.
STENCILS = ("central", "forward", "central4", "richardson", "complex")


def unit_roundoff(dtype) -> float:
    """Return u = eps/2 for a floating or complex dtype (the real part's precision)."""
    # compat.finfo knows bfloat16 and the float8 types as well as NumPy's floats, and
    # takes a complex dtype's real part (complex64 -> float32, complex128 -> float64).
    return float(compat.finfo(dtype).eps) / 2.0


# The largest effective unit round-off steps are sized for. Noise above it (a cost
# that jumps or bends on a scale far below the parameter's, or a kink the noise probe
# crossed) would ask for central steps beyond (3e-3)^(1/3) ≈ 0.14·s, where a difference
# no longer describes the derivative at the point: steps stop growing there, and the
# measured noise widens the error bars instead (inconclusive rather than a mismatch).
# float16 (u ≈ 4.9e-4) stays below it.
MAX_U_EFF = 1e-3


def relative_step(stencil: str, u: float) -> float:
    """Return the step h/s that balances truncation against round-off for a stencil.

    With a cost J whose k-th derivative is of the order |J| / s^k (s the scale of the
    parameter), the error of each stencil is

    * forward  (J(θ+h) − J(θ))/h:        h|J''|/2 + 2u|J|/h      → h = 2·u^(1/2)·s
    * central  (J(θ+h) − J(θ−h))/2h:     h²|J'''|/6 + u|J|/h     → h = (3u)^(1/3)·s
    * central4 (five-point, O(h⁴)):      h⁴|J⁽⁵⁾|/30 + 1.5u|J|/h → h = (11.25u)^(1/5)·s
    * richardson: extrapolates central steps h and 2h to O(h⁴); it uses the central4
      step, because its error has the same form.
    * complex  Im J(θ+ih)/h: no subtractive cancellation, so h can be tiny; 1e-20·s
      keeps h² far below u while staying a normal number (for float64 and float32).

    For float64 the central step is ≈ 6.9e-6·s, not the lecture's fixed 1e-4: a fixed
    1e-4 gives truncation errors near 1e-9 relative and is far too small in float32.
    """
    if stencil == "forward":
        return 2.0 * u**0.5
    if stencil == "central":
        return (3.0 * u) ** (1.0 / 3.0)
    if stencil in ("central4", "richardson"):
        return (11.25 * u) ** 0.2
    if stencil == "complex":
        return 1e-20
    raise ValueError(f"Unknown stencil {stencil!r}; expected one of {STENCILS}.")


# Elements squared and summed at once for a leaf's rms (2^20: 8 MiB of float64): the
# scales of a 10⁸-parameter model need no squared copy of it. A leaf of one piece sums
# exactly as np.mean does.
SCALE_PIECE = 2**20


def sum_of_squares(a: np.ndarray) -> float:
    """Σ a_i² in float64, in pieces of SCALE_PIECE elements."""
    a = np.ravel(a)
    return float(sum(np.add.reduce(np.square(a[i:i + SCALE_PIECE], dtype=np.float64))
                     for i in range(0, a.size, SCALE_PIECE)))


def coordinate_scale(leaf_abs: np.ndarray, fallback: float, *, overwrite: bool = False) -> np.ndarray:
    """Return the scale s_i used to size the step of every element of one leaf.

    s_i = max(|θ_i|, rms(leaf)), so a step is relative to the parameter and to the
    typical size of its neighbours. A leaf that is all zeros (the zero-initialised
    biases of Flax, Haiku and NNX) takes ``fallback``: the RMS of all parameters, or 1
    when every parameter is zero. This floor keeps the step non-zero at θ_i = 0.
    ``overwrite``: a float64 ``leaf_abs`` the caller no longer needs holds the result
    (no second copy of a big leaf).
    """
    rms = float(np.sqrt(sum_of_squares(leaf_abs) / leaf_abs.size)) if leaf_abs.size else 0.0
    if not np.isfinite(rms) or rms == 0.0:
        rms = fallback
    if overwrite and leaf_abs.dtype == np.float64:
        return np.maximum(leaf_abs, rms, out=leaf_abs)
    return np.maximum(leaf_abs.astype(np.float64), rms)


def default_rtol(dtype) -> float:
    """Return the default relative tolerance for an analytic gradient of this dtype.

    The tolerance covers the rounding error of the *analytic* side (backprop sums many
    products, each with relative error ~u, and conditioning amplifies it); the error of
    the numerical side is handled separately by the per-element error estimate.

    * float64: 1e-7 ≈ 1e9·u. Covers backprop through moderately ill-conditioned chains
      while a single element wrong by a relative 1e-6 is still 10× over it.
    * float32: 1e-4 ≈ 1700·u. Covers float32 backprop through softmax / layer norm; a 1%
      error in one element is 100× over it.
    * bfloat16 / float16: 3e-2 ≈ 8·u of bfloat16; such gradients carry 2–3 digits.
    """
    u = unit_roundoff(dtype)
    if u < 1e-12:
        return 1e-7
    if u < 1e-6:
        return 1e-4
    return 3e-2


def default_atol_factor(dtype) -> float:
    """Return k such that atol = k·max|g| over the leaf for an analytic dtype.

    Backprop rounds each element with an absolute error of about u times the magnitudes
    of the terms it sums, which are of the order of the leaf's largest gradient; 32·u
    of that is the absolute noise of an element that should be exactly zero.
    """
    return 32.0 * unit_roundoff(dtype)


def default_tolerances(dtype, g_ref: float, rtol=None, atol=None) -> tuple:
    """(rtol, atol) for an analytic derivative of this dtype: the user's, else the defaults.

    ``g_ref`` is the size of the largest derivative it is judged with (the leaf's
    largest |g|, or the largest over the check when the leaf's is 0): atol is
    ``default_atol_factor(dtype)·g_ref``.
    """
    rt = default_rtol(dtype) if rtol is None else rtol
    at = default_atol_factor(dtype) * g_ref if atol is None else atol
    return rt, at


# Safety factor on the round-off part of the error estimate. The noise σ of J is
# measured (or taken as u|J|); the central difference then carries at most ≈ σ/h,
# but σ is a standard deviation, not a bound: 8σ covers the tail of many thousands of
# elements without a false alarm (P(|z| > 8) ≈ 1e-15 for Gaussian rounding noise).
ROUNDOFF_SAFETY = 8.0

# The analytic side at the user's dtypes carries its own rounding: a float32 backprop
# element that sums terms which cancel (a bias before a normalisation, whose true
# gradient is 0) holds u·|terms|, far above u·|g|. It is measured, not modelled: the
# same compiled gradient at ANALYTIC_PROBES points moved by ANALYTIC_PROBE_ULPS units
# of round-off of each coordinate (of the leaf's dtype, or of J's measured relative
# noise where the cost computes coarser inside) gives a fresh sample of that rounding
# per element; its largest deviation, times ANALYTIC_SAFETY, joins the method's error
# bar. A dtype-only bug (a tail rounded to 0, a bfloat16 residual) does not move with
# such a nudge, so it stays outside the bar. The true change of the gradient over the
# nudge (H·δ, a few u relative) only widens the bar, never narrows it.
ANALYTIC_PROBES = 4
ANALYTIC_PROBE_ULPS = 4.0
ANALYTIC_SAFETY = 4.0
# A nudge that moves an element by more than ANALYTIC_JUMP·u times the check's largest
# |g| crossed a kink (ReLU at 0, a max at a tie), not a rounding: rounding of a backprop
# sum stays within a few u of the terms it sums, and 1e3 leaves room for terms 100×
# larger than any gradient. Such an element gets no analytic error bar; the kink test of
# the reference side judges it.
ANALYTIC_JUMP = 1e3

# Noise gain of the Richardson table (stencils.estimate): its O(h⁶) value is
# (64·D_h − 20·D_2h + D_4h)/45, and D_kh carries 1/k of D_h's round-off, so it carries
# (64 + 10 + 0.25)/45 = 1.65 times the round-off of one central difference at h.
# Dividing a Richardson round-off bound by it gives back the noise of a single
# difference at h, the scale the kink test compares one-sided differences with; it is
# also the largest gain of a directional screen.
RICHARDSON_NOISE_GAIN = 1.65

# Derivatives smaller than this fraction of the largest one judged with them (a leaf's,
# or a block's) are judged against that floor when deciding whether an error bar is too
# wide to say anything (inconclusive): below a thousandth of the scale the check sees,
# an error bar half the derivative's size is what the finite differences of the larger
# ones carry anyway, not a sign that this element's own difference is unresolved.
SMALL_DERIVATIVE = 1e-3


def inconclusive_floor(g_ref):
    """The floor (``SMALL_DERIVATIVE`` of the largest derivative ``g_ref``) under which
    an element's error bar is compared with the floor instead of its own value."""
    return SMALL_DERIVATIVE * g_ref


# Safety factor on the truncation estimate |D_h − D_2h|/3 (Richardson), which is a
# direct estimate of the leading error term rather than a noise level.
TRUNCATION_SAFETY = 2.0

# Seconds a check may take by default (no ``mode=``): full mode runs when its estimated
# time (the evaluations it needs × the measured time of one evaluation) fits, otherwise
# directional screening plus a sample of elements, within about the same time. A minute
# is what a check run once, before training or in a test, can cost without being turned
# off: every test-sized model and the lecture's network check in full in seconds, while a
# 10⁷-parameter model (2·10⁷ evaluations of ~10 ms: days) gets a screen of every leaf.
DEFAULT_TIME_BUDGET = 60.0
