"""Checks of a rule against finite differences: its first derivative, and the derivative of its gradient.

- **jvp** / **vjp**: the rule's JVP (or, for a ``custom_vjp``, its VJP) against central
  differences of the primal, with :func:`jgc.check_jacobian` (every entry, for small
  arguments) or :func:`jgc.check_jvp` / :func:`jgc.check_vjp` (random tangents of every
  argument, for large ones): the rule at the dtypes given, the differences in float64
  where the backend has it, with jgc's steps, noise model, tolerances and kink test.
- **order 2**: the derivative of the rule's gradient, x ↦ Jᵀ(x)·u for a fixed random
  cotangent u, taken by AD through the rule, against central differences of that same
  gradient (the way Stan's ``expect_ad`` tests second order). A rule whose first
  derivative is right but is itself built from something AD cannot see through (a
  ``stop_gradient``, a nested rule with a wrong derivative) fails here only.
"""

from __future__ import annotations

import jax
import numpy as np

from ..jacobian import check_jacobian
from ..products import check_jvp, check_vjp
from .report import Worst
from .subject import JVP, ORDER2, VJP, _Subject, raised, site


# Up to this many differentiated coordinates every Jacobian entry is checked (2 evaluations per
# coordinate in one vmapped batch, as jgc.check_rules does at a call site); above it, random
# tangents per argument keep the cost flat.
FULL_JACOBIAN_COORDINATES = 256


def _coordinates(subject: _Subject) -> int:
    return sum(int(np.size(v)) for v in subject.x)


def _fd_check(fn, x: list, *, mode: str, small: bool, options: dict, key):
    """jgc.check_jacobian for small arguments, else random directions (check_jvp / check_vjp)."""
    if small:
        return check_jacobian(fn, *x, mode=mode, **options)
    if mode == "rev":
        return check_vjp(fn, *x, against="numerical", key=key, **options)
    return check_jvp(fn, *x, key=key, **options)


def _index(path: str) -> int:
    head = path.split("]", 1)[0]
    digits = head.rsplit("[", 1)[-1]
    return int(digits) if digits.isdigit() else -1


def _worst(rep, subject: _Subject, leaves) -> Worst | None:
    failing = [lf for lf in rep.failing() if lf in leaves]
    if not failing:
        return None
    lf = failing[0]
    k = _index(lf.path)
    idx = tuple(lf.input_index)
    x = np.asarray(subject.x[k]) if 0 <= k < len(subject.x) else None
    value = None
    if x is not None and len(idx) == x.ndim:
        value = float(np.real(x[idx])) if idx else float(np.real(x))
    else:
        idx = ()
    numeric = np.abs(np.asarray(lf.numeric))
    bound = np.asarray(lf.bound)
    constant = bool(numeric.size and np.all(numeric <= bound) and np.any(np.abs(np.asarray(lf.analytic)) > bound))
    return Worst(operand=subject.names[k] if 0 <= k < len(subject.names) else lf.path, index=idx, call=None,
                 step="", input=value, rule=lf.worst_analytic, numeric=lf.worst_numeric, allowed=lf.worst_bound,
                 block=lf.name, locally_constant=constant)


def _gradient(subject: _Subject, rng):
    """x ↦ the rule's gradient at x: Jᵀ(x)·u for a fixed random u (J(x)·t where f has no VJP)."""
    if subject.rev is None:
        u = subject.cotangent(rng, subject.value(subject.x))

        def gradient(*x):
            out, back = jax.vjp(subject.go, *x)
            # u at the outputs' dtypes here: the reference runs this at float64.
            return back(tuple(v.astype(o.dtype) for v, o in zip(u, out)))
        return gradient, "the gradient ⟨u, ∂f⟩"
    t = subject.tangent(rng)

    def jvp(*x):
        return jax.jvp(subject.go, x, tuple(v.astype(w.dtype) for v, w in zip(t, x)))[1]
    return jvp, "the JVP ∂f·t"


def derivatives(subject: _Subject, name: str, at: str, rng, options: dict, *, key, intended: str | None,
                first: bool = True, second: bool = True) -> list:
    """The first derivative against finite differences of the primal, the second against finite
    differences of the rule's gradient, in one check: the Jacobian of x ↦ (f(x), gradient(x)), whose
    first outputs judge the rule and the rest AD through it (one noise probe, one compiled batch)."""
    check = JVP if subject.fwd is None else VJP
    if subject.fwd is not None and subject.rev is not None:
        return [site(check, at, name, "error", reason=f"neither jax.jvp nor jax.vjp runs: {subject.fwd}")]
    gradient, what = _gradient(subject, rng)
    n_out = len(subject.out_names)

    def both(*x):
        return (tuple(subject.go(*x)) if first else ()) + (tuple(gradient(*x)) if second else ())
    both.__qualname__ = name
    small = _coordinates(subject) <= FULL_JACOBIAN_COORDINATES
    mode = "fwd" if subject.fwd is None and not second else "rev" if subject.fwd is not None and not second \
        else "auto"
    try:
        rep = _fd_check(both, subject.x, mode=mode if small else ("rev" if subject.fwd is not None else "fwd"),
                        small=small, options=options, key=key)
    except Exception as e:  # noqa: BLE001 (the rule raised: reported for these checks)
        return ([site(check, at, name, "error", reason=raised(e))] if first else []) + \
            ([site(ORDER2, at, name, "error", reason=f"differentiating {what} raised {raised(e)}")] if second else [])
    rows = []
    split = n_out if first else 0
    if first:
        rows.append(_first_row(rep, [lf for lf in rep.leaves if _index(lf.output_path) < split], subject, name, at,
                               check=check, intended=intended))
    if second:
        rows.append(_second_row(rep, [lf for lf in rep.leaves if _index(lf.output_path) >= split], subject, name,
                                at, what))
    return rows


def _first_row(rep, leaves, subject, name, at, *, check, intended):
    worst = _worst(rep, subject, leaves)
    n = sum(lf.checked for lf in leaves)
    if worst is None:
        return site(check, at, name, "ok", n, report=rep, method=rep.mode)
    if intended:
        return site(check, at, name, "intended", reason=intended, report=rep, method=rep.mode)
    what = "the JVP rule" if check == JVP else "the VJP rule"
    return site(check, at, name, "mismatch", n, report=rep, worst=worst, method=rep.mode,
                reason=f"{what} disagrees with finite differences of the primal")


def _second_row(rep, leaves, subject, name, at, what):
    worst = _worst(rep, subject, leaves)
    n = sum(lf.checked for lf in leaves)
    if worst is None:
        return site(ORDER2, at, name, "ok", n, report=rep, method=f"{rep.mode} of {what}")
    return site(ORDER2, at, name, "mismatch", n, report=rep, worst=worst, method=f"{rep.mode} of {what}",
                reason=f"the derivative of {what} by AD through the rule (shown as rule) disagrees with "
                f"finite differences of {what}")
