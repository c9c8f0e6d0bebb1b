"""One custom rule checked every way, at the arguments given: :func:`check_rule`.

A unit test for one ``jax.custom_jvp`` / ``jax.custom_vjp`` function (Equinox's
``filter_custom_jvp`` / ``filter_custom_vjp``), a ``jax.custom_batching.custom_vmap``
function, or any function whose derivatives JAX computes through rules. Where
:func:`jgc.check_rules` checks each rule inside a loss at the operands that loss
feeds it, this checks one rule in every way JAX can call it: the families of checks
live in ``identities`` (no finite differences) and ``derivatives`` (against finite
differences); ``points`` makes the points they run at.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax

from .. import validate
from .derivatives import derivatives
from .report import RulesReport
from .sitechecks import check_one
from .subject import CHECKS

__all__ = ["check_rule"]


def check_rule(f: Callable, *args, nondiff_argnums=(), seed: int = 0, checks=None, explore: bool = False,
               precision: str = "auto", rtol: float | None = None, atol: float | None = None,
               step: float | None = None) -> RulesReport:
    """Check one custom derivative rule every way JAX can run it, at the arguments given.

    ``f`` is a ``jax.custom_jvp`` or ``jax.custom_vjp`` function (Equinox's
    ``filter_custom_jvp`` / ``filter_custom_vjp`` too), a
    ``jax.custom_batching.custom_vmap`` function, or any function of arrays whose
    derivatives are to be tested. Every floating array leaf of ``args`` outside
    ``nondiff_argnums`` (and the rule's own ``nondiff_argnums``) is differentiated;
    the rest is held as given. The checks, each named in the report:

    - ``primal``: the rule's primal output (a JVP rule's primal, a ``custom_vjp``'s
      ``fwd``) against the primal function: a mismatch is a wrong forward value.
    - ``jvp`` (``vjp`` for a ``custom_vjp``): the rule against float64 central
      differences of the primal, every Jacobian entry for small arguments, random
      tangents of every argument for large ones.
    - ``dot-product``: ⟨u, J t⟩ from the JVP against ⟨Jᵀu, t⟩ from the VJP, random
      tangents and cotangents (for a ``custom_vjp``, J t from JAX's JVP of its primal).
    - ``linearity``: the rule's output for α·t₁ + β·t₂ against α·out(t₁) + β·out(t₂),
      and for −t, 10⁻³·t and 10³·t (in the tangent, and in the cotangent): catches a
      rule that clips, normalises or drops signs, which unit tangents cannot.
    - ``batching``: ``vmap`` of f, its JVP and its VJP (and a ``custom_vmap`` rule)
      over lanes of nearby points against one call per lane, lane by lane.
    - ``order 2``: the derivative of the rule's gradient by AD through the rule
      against central differences of that gradient.
    - ``symbolic zeros``: only some arguments differentiated (symbolic-zero tangents,
      ``perturbed=False``) and only some outputs' cotangents, against the dense result.

    The identities are judged by rounding alone (jgc's per-dtype tolerances, the
    rounding of the linear map measured at nudged tangents); the finite differences by
    jgc's steps, noise model and tolerances, as in :func:`jgc.check_jacobian`.

    Args:
      f: the rule, called as ``f(*args)``; any pytree of arrays out.
      *args: the point (pytrees of arrays; Python floats become arrays).
      nondiff_argnums: positions of ``args`` that are not differentiated.
      seed: seeds every random tangent, cotangent, lane and generated point.
      checks: the names of the checks to run (default: all).
      explore: also check at points made from the given one (signs flipped, magnitudes
        scaled by 10⁻² and 10²), at the special points 0 and ±1, and at points that sweep
        the rule's domain: positive and negative values from 10⁻³ to 30 and values either
        side of common switch points (0, ±1, ±3, 6, ±20), within the dtype's range. A
        point where the primal is not finite, at or just around it, is skipped with its
        reason, never checked.
      precision, rtol, atol, step: as in :func:`jgc.check_jacobian`.

    Returns:
      A :class:`jgc.RulesReport` with one rule; each of its rows is one check at one
      point (``check``, ``at``, ``status``, ``reason``). ``.ok`` is False when any check
      finds a mismatch; ``failed_checks()`` names them. A rule declared with
      :func:`jgc.intended` is reported ``intended`` where it differs from finite
      differences, and still held to every identity.

    Raises:
      TypeError: ``f`` is not callable, an argument is traced, or no argument has a
        floating leaf to differentiate.
      ValueError: an unknown check name.

    Example:
      >>> import jax, jax.numpy as jnp, jgc
      >>> @jax.custom_jvp
      ... def softplus(x):
      ...     return jnp.logaddexp(x, 0.0)
      >>> @softplus.defjvp
      ... def softplus_jvp(primals, tangents):
      ...     (x,), (t,) = primals, tangents
      ...     return softplus(x), jax.nn.sigmoid(jax.lax.stop_gradient(x)) * t
      >>> rep = jgc.check_rule(softplus, jnp.array([-1.0, 0.5, 2.0]))
      >>> rep.ok, rep.failed_checks()
      (False, ('order 2',))
    """
    api = "jgc.check_rule"
    t0 = time.perf_counter()
    validate.function(api, "f", f, "callable as f(*args)")
    validate.concrete(api, args, "Checking a rule needs concrete numbers: call it outside transformations.")
    chosen = tuple(CHECKS) if checks is None else tuple([checks] if isinstance(checks, str) else checks)
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown:
        raise ValueError(f"{api}: unknown check(s) {unknown}; the checks are {list(CHECKS)}.")
    validate.precision(api, precision)
    # jgc's own host/device traffic (seeds, random tangents, values read back to judge) is
    # implicit here: allowed inside the check, and the caller's guard is restored after it.
    with jax.transfer_guard("allow"):
        return check_one(f, args, nondiff_argnums=nondiff_argnums, seed=seed, chosen=chosen, explore=explore,
                         precision=precision, options={"rtol": rtol, "atol": atol, "step": step}, t0=t0,
                         derivatives=derivatives)
