"""Points made from the one given, and points across a rule's domain, where a rule's bugs often hide.

:func:`jgc.check_rule` and :func:`jgc.check_rules` with ``explore=True`` run the checks
again at each of these points:

* **scalings of the given point**: every differentiated argument with its signs
  flipped, scaled by 10⁻² and 10² (towards the origin and into the tails);
* **special values**: every argument set to 0, 1 and −1;
* **domain sweeps**, the same whatever the given point: every argument filled with
  values across several decades, one point of positive values (10⁻³ … 30), one of
  negative values, and one of values either side of the switch points of common
  activations (0, ±1, ±3, 6, ±20): a rule wrong only where the caller never feeds it
  (``elu`` for negative inputs when the loss feeds it positives, ``softplus`` past
  its linear threshold) is found there. Each element of a sweep holds another value,
  so the worst element of a failing check names the value; an argument with fewer
  elements than the sweep has values is swept over two points.

Every value fits the argument's dtype: sweep magnitudes stop at log(max)/2 of the
dtype (44 for float32 and bfloat16, 5.5 for float16), so eˣ of any of them and its
square stay finite; a scaled point whose largest magnitude cubed would overflow is
left out. A point is kept only where every output of the primal is finite there; one
where it is not (a logarithm or a square root at negative values: outside the
function's domain) is skipped with that reason, never checked, so it is never reported
as a mismatch. Each point is reported by its label.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .. import compat
from .subject import _Subject

# Scalings of the given point: a sign flip (an activation's other branch: elu for
# negative inputs when the caller fed positives), two orders of magnitude each way
# (near zero, where a formula may divide by a small number, and the tails, where
# an unstable formula overflows or cancels), then the special points.
SCALINGS = ((-1.0, "−x"), (1e-2, "10⁻²·x"), (1e2, "10²·x"))
SPECIAL = ((0.0, "0"), (1.0, "1"), (-1.0, "−1"))

# Magnitudes of the decade sweeps, in the order an argument with few elements takes
# them (the extremes first): 10⁻³ is near zero yet above the float64 steps jgc takes
# there (steps are relative to the argument's rms, ≈ 10 in a sweep: 7e-5), 30 is where
# exp-based formulas (softplus, sigmoid, elu) run on their asymptotes, 1 where most
# activations bend.
DECADES = (1e-3, 30.0, 1.0, 0.1, 10.0, 1e-2, 3.0, 0.3)
# Switch points of common activations and losses: 0 (relu, elu, leaky relu, abs),
# ±1 (hard tanh, clipping, Huber), ±3 (hard sigmoid, hard swish), 6 (relu6), ±20
# (softplus's linear threshold in common implementations). Each is approached from
# both sides at 5 % of max(1, |k|): beyond the float64 finite-difference step at the
# sweep's scale (7e-5), so no difference crosses the switch, and close enough that a
# rule whose own switch sits elsewhere is caught between the two.
KINKS = (0.0, 1.0, -1.0, 3.0, -3.0, 6.0, 20.0, -20.0)
KINK_OFFSET = 0.05
# A point is checked only where f is finite a little way either side of it too
# (x ± 10⁻³·|x|, and ±10⁻³ where x is 0; every element moved at once): at the edge
# of f's domain (√x or x·log x at 0) the derivative is infinite or one-sided, which no
# finite difference can check. 10⁻³ of the value keeps 10⁻³ itself inside log's domain
# and puts 0 on the edge of √x's.
EDGE = 1e-3
# An argument with fewer elements than a sweep has values is swept over this many
# points at most (a scalar sees 10⁻³ and 30, not every decade): each point runs every
# check again.
MAX_SPLIT = 2


def _near_kinks() -> tuple:
    out = []
    for k in KINKS:
        d = KINK_OFFSET * max(1.0, abs(k))
        out += [k + d, k - d]
    return tuple(out)


SWEEPS = (DECADES, tuple(-v for v in DECADES), _near_kinks())


def _finfo(dtype):
    return jnp.finfo(jnp.dtype(dtype))


def sweep_cap(dtype) -> float:
    """The largest magnitude a sweep puts in an argument of ``dtype``: exp of it, squared, is finite."""
    return math.log(float(_finfo(dtype).max)) / 2.0


def _fmt(v: float) -> str:
    return f"{v:g}".replace("e-0", "e-").replace("e+0", "e")


def _sweep_points(subject: _Subject, values: tuple) -> list:
    """(label, leaves) of one sweep: every leaf filled with ``values`` (those its dtype holds)."""
    x = subject.x
    if not x:
        return []
    cap = min(sweep_cap(v.dtype) for v in x)
    vals = [v for v in values if abs(v) <= cap]
    if not vals:
        return []
    n = max(1, min(int(np.size(v)) for v in x))
    parts = min(MAX_SPLIT, -(-len(vals) // n))
    out = []
    for j in range(parts):
        chunk = vals[j * n:] or vals
        leaves = [jnp.asarray(np.resize(np.asarray(chunk, np.float64), np.shape(v)), dtype=v.dtype) for v in x]
        used = sorted(set(chunk[:n]))
        label = f"x = {_fmt(used[0])}" if len(used) == 1 else f"x ∈ {{{', '.join(_fmt(v) for v in used)}}}"
        out.append((label, leaves))
    return out


def _in_range(x: list) -> str:
    """Why a scaled point does not fit its dtypes, or ''."""
    for v in x:
        a = np.abs(np.asarray(compat.host(v)))
        if not a.size:
            continue
        top = float(np.max(a))
        limit = float(_finfo(v.dtype).max) ** (1.0 / 3.0)
        if not np.isfinite(top) or top > limit:
            return (f"its largest magnitude {top:.3g} is beyond what {np.dtype(v.dtype).name} holds cubed "
                    f"({limit:.3g})")
    return ""


def points(subject: _Subject, rng) -> list:
    """(label, leaves) of every generated point where the primal is finite, duplicates left out."""
    del rng  # the points are deterministic; the checks at them draw from the seed
    return [(label, x) for label, x, _ in generated(subject) if x is not None]


def generated(subject: _Subject) -> list:
    """(label, leaves, why) of every generated point, duplicates left out.

    ``leaves`` is None where the point is skipped; ``why`` then says why (the primal is
    not finite at or around it, it raised, or the point leaves the dtype's range), else
    it is ''.
    """
    cands = [(f"x → {lab}", [(c * v).astype(v.dtype) for v in subject.x], True) for c, lab in SCALINGS]
    cands += [(f"x = {lab}", [jnp.full_like(v, c) for v in subject.x], False) for c, lab in SPECIAL]
    for values in SWEEPS:
        cands += [(label, x, False) for label, x in _sweep_points(subject, values)]
    seen = [_key(subject.x)]
    out = []
    for label, x, scaled in cands:
        k = _key(x)
        if any(k == s for s in seen):
            continue
        seen.append(k)
        label = f"point {label}"
        why = (_in_range(x) if scaled else "") or _outside(subject, x)
        out.append((label, None if why else x, why))
    return out


def _outside(subject: _Subject, x: list) -> str:
    """Why ``x`` is outside f's domain or on its edge, or '' where f is finite at and around it."""
    around = [("here", x)]
    for sign, at in ((1.0, "+"), (-1.0, "−")):
        moved = [(v + sign * EDGE * jnp.where(v == 0, 1.0, jnp.abs(v))).astype(v.dtype) for v in x]
        around.append((f"at x {at} {_fmt(EDGE)}·|x| (±{_fmt(EDGE)} at 0), on the edge of its domain", moved))
    for where, y in around:
        try:
            out = subject.value(y)
        except Exception as e:  # noqa: BLE001 (outside the primal's domain: not a point to check)
            return f"f raised {type(e).__name__} {where}"
        if not all(bool(np.all(np.isfinite(compat.host(o)))) for o in out):
            return f"f is not finite {where}" + (" (outside its domain)" if where == "here" else "")
    return ""


def _key(x: list) -> tuple:
    return tuple(np.asarray(compat.host(v)).tobytes() for v in x)
