"""Step sizes of every check: per stencil from f's measured precision, and per leaf from pilots.

A :class:`Steps` is a pure function of what it is built from: the problem's measured
noise (its ``relative_noise``, the one number each output layout, a scalar cost's or a
vector function's, gives in its own terms), its scales, wave cap and kinks (every
problem has them: ``vector.Prepared``), and the gradient scale passed in (how much J
moves per relative unit change of a coordinate, known once the analytic gradient is).
Nothing is written back into the problem, so every step of a check comes from one
stated set of inputs. Scalar checks take every step from it (with the pilots of
:meth:`Steps.leaf`); the vector checks (Jacobian, JVP, VJP, HVP) take theirs from
:meth:`Steps.relative`, through ``Prepared.relative_step``: the same defaults, wave cap
and kink cap.
"""

from __future__ import annotations

import numpy as np

from . import policy, validate


def gradient_scale(a_leaves: list, scales: list) -> float:
    """Largest |g_i|·s_i over finite analytic values: J's change per relative unit change of θ_i."""
    scale = 0.0
    for a, s in zip(a_leaves, scales):
        v = np.abs(np.asarray(a)).ravel() * s
        v = v[np.isfinite(v)]
        scale = max(scale, float(v.max(initial=0.0)))
    return scale


class Steps:
    """The relative steps h/s of a problem (scalar or vector), given the gradient scale."""

    def __init__(self, problem, grad_scale: float = 0.0):
        self.problem = problem
        self.grad_scale = grad_scale

    @property
    def u_eff(self) -> float:
        """Effective unit round-off of f: the dtype's, or the measured noise if larger
        (the problem's ``relative_noise``: for a scalar cost σ relative to max(|J|,
        grad_scale), for a vector function the 90th percentile of σ_j/|y_j|). Capped at
        policy.MAX_U_EFF (central steps of at most ≈ 0.14·s).
        """
        return min(self.problem.relative_noise(self.grad_scale), policy.MAX_U_EFF)

    @property
    def cap(self) -> float:
        """The largest relative step J allows: below the spacing that resolved a short
        wave (the problem's wave_cap), and, when the noise probe found kinks near θ, the
        central step that balances J's noise measured without them, (3·u_eff)^(1/3).

        Near kinks a longer step buys nothing: its error is not the smooth truncation
        a pilot measures but the slope change of every kink it straddles, and the chance
        of straddling one grows with the step. The step that balances the noise is the
        shortest one whose round-off stays at the level every check accepts; a stencil
        that still straddles a kink is caught by the judge's kink test (one-sided
        differences at h, 2h, 4h), whose thresholds are multiples of the same noise.
        """
        p = self.problem
        if p.kinks:
            return min(p.wave_cap, policy.relative_step("central", self.u_eff))
        return p.wave_cap

    def relative(self, stencil: str, step: float | None) -> float:
        """h/s for a stencil: given, or chosen from the effective precision of J."""
        step = validate.step(self.problem.api, step)
        if step is not None:
            return step
        return min(policy.relative_step(stencil, self.u_eff), self.cap)

    def leaf(self, k: int, stencil: str, step: float | None, a_flat=None) -> float:
        """h/s for leaf k: the user's, or a central step calibrated on a few pilots.

        The default central step (3u)^(1/3) assumes |J⁽³⁾| ≈ |J|/s³. For most models J
        bends far less along one coordinate, so that step is dominated by round-off.
        We measure instead: at up to 4 pilot coordinates (the 2 largest analytic
        derivatives and 2 random ones) we take central differences at H and 2H (H the
        five-point step, ≈ 1.4e-3·s in float64); |D_H − D_2H| / 3H² estimates
        c = |J⁽³⁾|/6, and the step minimising σ/h + c·h² is h* = (σ / 2c)^(1/3). We keep
        the smallest h* over the pilots (conservative for truncation), clamped between
        the step balancing the dtype's round-off and H. Cost: 16 evaluations per leaf. Elements whose
        truncation error is larger than the pilots' are still caught by the Richardson
        refinement of the comparison.
        """
        p = self.problem
        base = self.relative(stencil, step)
        x = p.dyn[k]
        if step is not None or stencil != "central" or np.iscomplexobj(x) or x.size == 0:
            return base
        big = min(policy.relative_step("central4", self.u_eff), self.cap)
        m = x.size
        rng = np.random.default_rng(k)
        picks = list(rng.choice(m, size=min(2, m), replace=False))
        if a_flat is not None and np.all(np.isfinite(a_flat)):
            picks += list(_two_largest(np.abs(a_flat)))
        pilots = np.unique(np.asarray(picks, dtype=np.int64))
        est = p.estimate(k, pilots, "central4", big)
        # est.err_trunc = |r1 − d1| = |D_H − D_2H|/3 for the five-point stencil.
        h_abs = big * p.scales[k][pilots]
        c = est.err_trunc / h_abs**2
        noise_floor = 4.0 * p.sigma / h_abs**3  # a smaller c is not resolved
        c = np.where(est.finite, np.maximum(c, noise_floor), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):  # c = 0 or σ = 0: handled below
            h_star = (p.sigma / (2.0 * c)) ** (1.0 / 3.0) / p.scales[k][pilots]
        h = float(np.min(h_star)) if h_star.size else base
        if not np.isfinite(h):
            return base
        # Lower guard: the step that balances the dtype's own round-off (not the
        # measured noise relative to |J|, which is large when J is a small difference
        # of large terms, e.g. a confident cross-entropy).
        lower = min(policy.relative_step(stencil, p.u), big)
        return float(np.clip(h, lower, big))


# Leaves from this size on find their two largest |g| by selection instead of a sort.
SELECT_LEAF = 2**16


def _two_largest(mag: np.ndarray) -> np.ndarray:
    """Indices of the two largest entries, as ``np.argsort(-mag)[:2]`` gives them.

    Large leaves use a selection (O(m)); it can order ties differently from a sort, so
    it serves only leaves too large for a sort to be cheap.
    """
    if mag.size < SELECT_LEAF:
        return np.argsort(-mag)[:2]
    top = np.argpartition(-mag, 1)[:2]
    return top[np.argsort(-mag[top], kind="stable")]
