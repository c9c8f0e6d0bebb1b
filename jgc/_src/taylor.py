"""Taylor-remainder test: a second opinion that needs no tolerance at all.

For a correct gradient g, the remainder r(h) = |J(θ + h·v) − J(θ) − h·<g, v>| of the
first-order Taylor expansion shrinks like h² as h → 0; with a wrong gradient it
shrinks only like h (the error <g_true − g, v>·h dominates). Fitting the slope of
log r against log h tells which: the observed order.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import compat, engine
from .analytic import analytic_gradient
from .problem import Problem
from .steps import Steps


@dataclasses.dataclass(frozen=True)
class TaylorReport:
    """The result of :func:`check_taylor`.

    Attributes:
      ok: the observed order is above 1.5 (2 expected for a correct gradient, 1 for a
        wrong one).
      order: slope of log r(h) against log h over the resolved steps.
      steps: the steps h (relative: v is scaled by each parameter's scale s).
      residuals: r(h) at each step.
      resolved: which residuals are far enough above the noise of J to be used.
      noise: the measured noise σ of J.
    """

    ok: bool
    order: float
    steps: np.ndarray = dataclasses.field(repr=False)
    residuals: np.ndarray = dataclasses.field(repr=False)
    resolved: np.ndarray = dataclasses.field(repr=False)
    noise: float = 0.0
    evaluations: int = 0

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        rows = "\n".join(
            f"  h={h:9.3e}  r(h)={r:9.3e}{'' if ok else '  (below noise, unused)'}"
            for h, r, ok in zip(self.steps, self.residuals, self.resolved)
        )
        return (f"jgc.check_taylor {verdict}: observed order {self.order:.2f} "
                f"(2 for a correct gradient, 1 for a wrong one)\n{rows}")

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "order": float(self.order), "noise": self.noise,
            "evaluations": self.evaluations, "steps": [float(h) for h in self.steps],
            "residuals": [float(r) for r in self.residuals],
            "resolved": [bool(b) for b in self.resolved],
        }


def check_taylor(fn, params, *args, grad=None, has_aux: bool = False, key=0,
                 num_steps: int | None = None, largest_step: float = 0.1,
                 precision: str = "auto") -> TaylorReport:
    """Check a gradient by the convergence order of the first-order Taylor remainder.

    Evaluates J(θ + h·v) for a random direction v (scaled per element by the parameter
    scale used for finite-difference steps) at h = largest_step·2^-k, k < num_steps, in
    one vmapped batch, and fits the slope of log |J(θ+hv) − J(θ) − h<g,v>| against
    log h over the residuals that stand at least 100σ above the noise of J.

    Args:
      fn, params, *args, grad, has_aux, precision: as for :func:`jgc.check`.
      key: int seed or PRNG key for the direction.
      num_steps: number of halvings of the step. Default: down to h ≈ (1000·u)^(1/2),
        where a remainder h²·|J''| still stands ~1000× above round-off u·|J| (about
        19 halvings in float64, 6 in float32) — small steps are where an error in the
        gradient shows, since it dominates the remainder once h < |error|/|J''|.
      largest_step: the largest relative step.

    Returns:
      A :class:`TaylorReport`; ``ok`` when the observed order is above 1.5.

    Example:
      >>> import jax.numpy as jnp, jgc
      >>> rep = jgc.check_taylor(lambda p: jnp.sum(jnp.sin(p)), jnp.array([0.3, 1.0]))
      >>> rep.ok, round(rep.order)
      (True, 2)
    """
    if num_steps is not None and num_steps < 3:
        raise ValueError(f"jgc.check_taylor: num_steps must be at least 3 to fit an order, got {num_steps}.")
    with Problem(fn, params, args, precision=precision, api="jgc.check_taylor",
                 has_aux=has_aux) as problem:
        g = analytic_gradient(problem, grad)
        # An int seed is moved to the device explicitly (transfer guards); as an int32
        # it makes the same key as jax.random.key(key) for 0 <= key < 2^31.
        k = key if not isinstance(key, int) else jax.random.key(jax.device_put(np.int32(key)))
        keys = jax.random.split(k, len(problem.dyn))
        direction = []
        for kk, x, s in zip(keys, problem.dyn, problem.scales):
            v = np.asarray(compat.host(jax.random.normal(kk, x.shape, jnp.float32)), np.float64).ravel() * s
            if jnp.iscomplexobj(x):
                v = v + 1j * compat.host(jax.random.normal(kk, x.shape, jnp.float32)).ravel() * s
            direction.append(v.reshape(x.shape))
        # <g, v> with JAX's complex convention: g = ∂J/∂x − i∂J/∂y, so Re(conj(g)·v)
        # would be wrong; the directional derivative is Re(g)·Re(v) − Im(g)·Im(v).
        slope = sum(float(np.sum(np.real(gi) * np.real(v) - np.imag(gi) * np.imag(v)))
                    for gi, v in zip(g, direction))
        if num_steps is None:
            h_min = math.sqrt(1e3 * Steps(problem).u_eff)
            num_steps = max(6, math.ceil(math.log2(largest_step / h_min)) + 1)
        steps = largest_step * 0.5 ** np.arange(num_steps)
        wide = jnp.float64 if compat.x64_enabled() else jnp.float32
        # The direction in the leaf's dtype, held in the dtype of h·v (strict promotion has
        # no implicit path between dtypes): the product rounds as h·v does, then to x's dtype.
        bank = [jax.device_put(np.asarray(v, x.dtype).astype(compat.result_type(wide, x.dtype))[None])
                for v, x in zip(direction, problem.dyn)]
        ts = np.concatenate([[0.0], steps])
        line = engine.LineEvaluator(problem.full_cost, problem.dyn, problem.argarr, bank, rows=ts.size,
                                    t_dtype=wide, counter=problem.counter)
        # J(θ) comes from the same program as J(θ+hv) (h = 0 is the first row): another
        # compilation may round float32 parts of the cost (random draws, a float32
        # layer) differently in the last bit, a constant offset that hides the order.
        vals = np.asarray(line(0, ts), np.float64)
        j0, vals = vals[0], vals[1:]
        r = np.abs(vals - j0 - steps * slope)
        resolved = np.isfinite(r) & (r > 100.0 * problem.sigma)
        if resolved.sum() >= 2:
            lh, lr = np.log(steps[resolved]), np.log(r[resolved])
            # The smallest resolved steps are where the asymptotic order shows.
            lh, lr = lh[-4:], lr[-4:]
            order = float(np.polyfit(lh, lr, 1)[0])
        else:
            # Every residual is at the noise floor: the expansion is exact to round-off
            # (J linear or quadratic with an exact gradient); nothing contradicts order 2.
            order = math.inf if np.all(np.isfinite(r)) else math.nan
        return TaylorReport(ok=bool(order > 1.5), order=order, steps=steps, residuals=r,
                            resolved=resolved, noise=problem.sigma,
                            evaluations=problem.counter.evaluations)
