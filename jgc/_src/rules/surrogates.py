"""Custom rules whose derivative differs from their primal's on purpose, or is approximate by design.

``jgc.intended`` declares a surrogate; ``jgc.approximate`` a rule right only to a
tolerance. Known library cases of both are recognised without a declaration.

Rules declared with :func:`intended`, and surrogate gradients that libraries define
on purpose (``optax.scale_gradient``, Equinox's non-differentiable markers), are
reported by :func:`jgc.check_rules` as ``intended``, never as failures. A rule is
recognised by where its primal is defined.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable

import jax

from ..names import short_name
from .sources import Where, _code_span, _primal_function, inspect_unwrap

_INTENDED: dict[tuple[str, str], list[tuple[int, int, str]]] = {}


def intended(fn: Callable | None = None, *, reason: str):
    """Declare that a custom rule's derivative differs from its primal's on purpose.

    Straight-through estimators, gradient scaling or clipping and other surrogate
    gradients are not bugs: :func:`jgc.check_rules` reports a rule declared here as
    ``intended`` (with ``reason``) and never as a failure. Works as a call or a
    decorator on a ``jax.custom_jvp`` / ``jax.custom_vjp`` function, Equinox's
    ``filter_custom_jvp`` / ``filter_custom_vjp``, or the plain primal function, and
    returns its argument unchanged. The rule is recognised by where its primal is
    defined, so every call of it in any loss is covered.

    Args:
      fn: the custom rule (or its primal function). Omit it to get a decorator.
      reason: a short sentence saying why the derivative is a surrogate.

    Returns:
      ``fn`` itself (or, without ``fn``, a decorator).

    Raises:
      TypeError: ``reason`` is not a non-empty string, or ``fn`` has no Python source.

    Example:
      >>> import jax, jax.numpy as jnp, jgc
      >>> @jax.custom_jvp
      ... def ste_round(x):
      ...     return jnp.round(x)
      >>> _ = ste_round.defjvp(lambda p, t: (ste_round(p[0]), t[0]))
      >>> ste_round = jgc.intended(ste_round, reason="straight-through estimator")
      >>> jgc.check_rules(lambda p: jnp.sum(ste_round(p)), jnp.array([0.3, 1.7])).ok
      True
    """
    if not isinstance(reason, str) or not reason.strip():
        raise TypeError("jgc.intended: reason must be a non-empty string saying why the derivative is a "
                        f"surrogate, e.g. reason='straight-through estimator'; got {reason!r}.")
    if fn is None:
        return lambda f: intended(f, reason=reason)
    span = _code_span(_primal_function(fn))
    if span is None:
        raise TypeError(f"jgc.intended: fn must be a custom_jvp/custom_vjp function or a Python function, "
                        f"got {type(fn).__name__}, which has no Python source to recognise it by.")
    file, first, last = span
    name = short_name(inspect_unwrap(_primal_function(fn))).rsplit(".", 1)[-1]
    _INTENDED.setdefault((os.path.abspath(file), name), []).append((first, last, reason))
    return fn


def _user_intended(primal: Where) -> str | None:
    name = primal.name.rsplit(".", 1)[-1]
    for first, last, reason in _INTENDED.get((os.path.abspath(primal.file), name), ()):
        if first <= primal.line <= last:
            return reason
    return None


def _library_intended(primal: Where) -> str | None:
    """Surrogate gradients that libraries define on purpose."""
    path = primal.file.replace(os.sep, "/")
    if "/optax/" in path and primal.name.startswith("_scale_gradient"):
        return "optax.scale_gradient scales the gradient on purpose"
    if "/equinox/" in path and "nondifferentiable" in primal.name:
        return "Equinox marks this value as not to be differentiated"
    if "/jaxopt/" in path and path.endswith("/perturbations.py") and primal.name.startswith("forward_pert"):
        return ("jaxopt's perturbed optimizers use the gradient of the smoothed (perturbed) argmax, a Monte "
                "Carlo surrogate of the piecewise-constant one (jaxopt docs, Perturbed optimizers)")
    if "/tensorflow_probability/" in path and path.endswith("/distributions/gamma.py") \
            and primal.name == "_random_gamma_gradient":
        return ("TFP differentiates Gamma samples by implicit reparameterisation (the derivative of the "
                "sample at a fixed CDF value), not through its rejection sampler (TFP docs, "
                "tfp.distributions.Gamma; Figurnov et al. 2018)")
    if "/jax_md/" in path and path.endswith("/space.py") and primal.name == "transform":
        return ("jax_md.space.transform passes the tangent of R through without the box on purpose, so that "
                "jax.grad of an energy of fractional coordinates gives real-space forces (jax_md source, "
                "space.transform_jvp docstring)")
    if "/jax_md/" in path and path.endswith("/rigid_body.py") and primal.name == "_quaternion_rotate":
        return ("jax_md's quaternion rotation projects its gradient onto the unit quaternions' tangent space "
                "(the component along q removed), a gradient on the sphere of orientations (jax_md source, "
                "rigid_body._quaternion_rotate_bwd)")
    return None


# The library versions the recognised rules above were checked against (tests/test_rules.py
# runs each recognition where the library is installed).
CHECKED_WITH = {"optax": "0.2.8", "equinox": "0.13.8", "jaxopt": "0.8.5", "diffrax": "0.7.2",
                "optimistix": "0.1.0", "tensorflow_probability": "0.26.0-dev20261027", "jax_md": "0.2.29"}


# -- approximate by construction ---------------------------------------------------------------------
_APPROXIMATE: dict[tuple[str, str], list[tuple[int, int, float, str]]] = {}

# Relative error allowed to a library rule that is approximate by construction (a
# continuous adjoint, an implicit rule at a solver tolerance) when no tolerance is
# declared: the adjoints of benchmarks/bench_real_rules.py (diffrax BacksolveAdjoint at
# dt = 0.1, optimistix and jaxopt at their tolerances) stay below 1e-4, and a 1 %
# error in a term of the rule is ten times above it, so it is still called a mismatch.
LIBRARY_APPROXIMATE_TOL = 1e-3


def approximate(fn: Callable | None = None, *, tol: float, reason: str):
    """Declare that a custom rule's derivative is approximate by construction, to ``tol``.

    A continuous adjoint, an implicit-function rule at a solver tolerance or a
    truncated series gives a derivative that is right only to some relative error.
    :func:`jgc.check_rules` reports such a rule as ``approximate`` (with the measured
    relative error next to ``tol`` and ``reason``) when it disagrees with its primal by
    at most ``tol``, and as ``mismatch`` when it disagrees by more. Works as a call or a
    decorator, like :func:`jgc.intended`, and returns its argument unchanged.

    Args:
      fn: the custom rule (or its primal function). Omit it to get a decorator.
      tol: the relative error the rule is designed to (max |rule − differences| over the
        largest |derivative| of the call site).
      reason: a short sentence saying why the derivative is approximate.

    Returns:
      ``fn`` itself (or, without ``fn``, a decorator).

    Raises:
      TypeError: ``reason`` is not a non-empty string, ``tol`` is not a positive number,
        or ``fn`` has no Python source.

    Example:
      >>> import jax, jax.numpy as jnp, jgc
      >>> @jax.custom_jvp
      ... def softer(x):
      ...     return jnp.tanh(x)
      >>> _ = softer.defjvp(lambda p, t: (softer(p[0]), (1 - jnp.tanh(p[0]) ** 2) * (1 + 1e-3) * t[0]))
      >>> softer = jgc.approximate(softer, tol=1e-2, reason="a truncated series")
      >>> jgc.check_rules(lambda p: jnp.sum(softer(p)), jnp.array([0.3, 1.7])).rules[0].status
      'approximate'
    """
    if not isinstance(reason, str) or not reason.strip():
        raise TypeError("jgc.approximate: reason must be a non-empty string saying why the derivative is "
                        f"approximate, e.g. reason='continuous adjoint'; got {reason!r}.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise TypeError(f"jgc.approximate: tol must be a positive relative error, got {tol!r}.")
    if fn is None:
        return lambda f: approximate(f, tol=tol, reason=reason)
    span = _code_span(_primal_function(fn))
    if span is None:
        raise TypeError(f"jgc.approximate: fn must be a custom_jvp/custom_vjp function or a Python function, "
                        f"got {type(fn).__name__}, which has no Python source to recognise it by.")
    file, first, last = span
    name = short_name(inspect_unwrap(_primal_function(fn))).rsplit(".", 1)[-1]
    _APPROXIMATE.setdefault((os.path.abspath(file), name), []).append((first, last, float(tol), reason))
    return fn


def _user_approximate(primal: Where) -> tuple[float, str] | None:
    name = primal.name.rsplit(".", 1)[-1]
    for first, last, tol, reason in _APPROXIMATE.get((os.path.abspath(primal.file), name), ()):
        if first <= primal.line <= last:
            return tol, reason
    return None


def _library_approximate(primal: Where, rule: Where) -> tuple[float, str] | None:
    """Rules that libraries make approximate by construction: (relative tolerance, reason)."""
    pfile, rfile = primal.file.replace(os.sep, "/"), rule.file.replace(os.sep, "/")
    if "/diffrax/" in pfile and primal.name == "_loop_backsolve":
        return LIBRARY_APPROXIMATE_TOL, ("diffrax BacksolveAdjoint solves the adjoint ODE backwards in time: its "
                                         "gradient is right to the solver's tolerance (diffrax docs, Adjoints)")
    if "/optimistix/" in rfile and rule.name == "_implicit_impl_jvp":
        return LIBRARY_APPROXIMATE_TOL, ("optimistix differentiates the solution by the implicit function "
                                         "theorem: right to the root/minimum's tolerance (optimistix.ImplicitAdjoint)")
    if "/jaxopt/" in pfile and primal.name == "solver_fun_flat":
        return LIBRARY_APPROXIMATE_TOL, ("jaxopt's implicit differentiation (custom_root / custom_fixed_point) "
                                         "is right to the solver's tolerance (jaxopt docs, Implicit differentiation)")
    return None


def primitive_approximate(rule: Where, params: list) -> tuple[float, str] | None:
    """A library primitive's JVP rule approximate by construction: (relative tolerance, reason).

    lineax differentiates ``linear_solve`` by solving again with the same solver. A direct
    solver (LU, QR, Cholesky) makes that derivative exact to rounding; an iterative one
    (CG, GMRES, BiCGStab: the solvers with an ``rtol``) makes it right to that solver's
    tolerance, as the primal solve is. Only a solve whose tolerance is found is approximate.
    """
    if "/lineax/" not in rule.file.replace(os.sep, "/") or rule.name != "_linear_solve_jvp":
        return None
    params = [_filtered_operands(p) for p in params]
    if not any(solver_tolerance(p) is not None for p in params):
        return None
    return with_solver_tolerance((LIBRARY_APPROXIMATE_TOL, (
        "lineax differentiates linear_solve by a second solve with the same iterative solver: its derivative "
        "is right to the solver's tolerance, which bounds the residual: the error of the solution and of its "
        "derivative is up to the operator's condition number times larger (lineax docs, linear_solve)")), params)


def _filtered_operands(params):
    """An Equinox filtered primitive's parameters as its operands' tree, or ``params`` as given.

    ``filter_primitive_bind`` passes the static leaves (a solver's ``rtol``) in ``static``,
    with placeholders where the arrays go, and the tree's structure in ``treedef``; rebuilt,
    the tree holds the solver object whose tolerance is read.
    """
    if isinstance(params, dict) and "treedef" in params and "static" in params:
        try:
            return jax.tree_util.tree_unflatten(params["treedef"], params["static"])
        except Exception:  # noqa: BLE001 (an unexpected layout: read the parameters as they are)
            return params
    return params


# -- the tolerance of the solver behind an approximate rule ------------------------------------------
# The objects searched for a solver's tolerance: at most this deep below a rule's
# parameters, and this many in all. Equinox keeps a rule's static arguments in the
# nodes of a flattened tree, one level per node: optimistix's solver sits about 40
# levels down; the bound on objects keeps a pathological rule cheap (searched only for
# the few rules known to be approximate).
_SEARCH_DEPTH, _SEARCH_OBJECTS = 64, 20000
# Programs, values and arrays hold no solver: not searched.
_NOT_SOLVERS = ("jax._src.core", "jax._src.array", "jaxlib", "numpy")


def solver_tolerance(root) -> tuple[float, float | None, str] | None:
    """(rtol, atol, the solver's type name) of the first solver found below ``root``, or None.

    A solver is an object with numeric ``rtol`` and ``atol`` (diffrax's step-size
    controllers, optimistix's and lineax's iterative solvers) or ``tol`` (jaxopt's
    solvers). ``root`` is a rule's parameters: functions (closures, partials, JAX's
    wrapped functions and their static arguments), containers and objects are searched.
    """
    seen: set[int] = set()
    stack = [(root, 0)]
    while stack and len(seen) < _SEARCH_OBJECTS:
        obj, depth = stack.pop(0)
        if obj is None or isinstance(obj, (str, bytes, int, float, bool, type)) or id(obj) in seen \
                or depth > _SEARCH_DEPTH or type(obj).__module__.startswith(_NOT_SOLVERS):
            continue
        seen.add(id(obj))
        try:  # properties of arbitrary objects may raise (an empty JAX store): skip those objects
            found = _tolerance_of(obj)
            if found is not None:
                return found
            stack.extend((x, depth + 1) for x in _children(obj))
        except Exception:  # noqa: BLE001, S112
            continue
    return None


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 else None


def _tolerance_of(obj) -> tuple[float, float | None, str] | None:
    name = type(obj).__name__
    rtol, atol = _number(getattr(obj, "rtol", None)), _number(getattr(obj, "atol", None))
    if rtol is not None and atol is not None:
        return rtol, atol, name
    tol = _number(getattr(obj, "tol", None))
    if tol is not None and hasattr(obj, "maxiter"):  # jaxopt's solvers
        return tol, None, name
    return None


def _children(obj):
    if isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                yield cell.cell_contents
            except ValueError:
                continue
    elif isinstance(obj, functools.partial):
        yield obj.func
        yield from obj.args
        yield from obj.keywords.values()
    elif isinstance(obj, (tuple, list, set, frozenset)):
        yield from obj
    elif isinstance(obj, dict):
        yield from obj.values()
    elif type(obj).__name__ == "WrappedFun":  # JAX's: static arguments live in its transforms
        yield obj.f
        yield getattr(obj, "transforms", ())
        yield getattr(obj, "params", ())
    elif type(obj).__name__ == "PyTreeDef":  # static parts of a flattened tree live in its nodes' data
        yield obj.node_data()
        yield from obj.children()
    elif type(obj).__name__ == "Unhashable":
        yield obj.val
    elif hasattr(obj, "__dict__") and not isinstance(obj, types.ModuleType):
        yield from vars(obj).values()


# A solve's derivative carries about the solve's own relative error: an adaptive solve's
# global error is a few times its local tolerance, so 10 × rtol is allowed. Never less
# than LIBRARY_APPROXIMATE_TOL (a tight solver, rtol = 1e-10, is right to what the finite
# differences resolve, and its rule was measured within that allowance).
SOLVER_TOL_FACTOR = 10


def with_solver_tolerance(approx: tuple[float, str] | None, params: list) -> tuple[float, str] | None:
    """A library's (tolerance, reason) with the tolerance of the solver found in its rule's ``params``."""
    if approx is None:
        return None
    tol, reason = approx
    for p in params:
        found = solver_tolerance(p)
        if found is not None:
            rtol, atol, name = found
            told = f"{name} rtol={rtol:g}" + (f", atol={atol:g}" if atol is not None else "")
            return max(tol, SOLVER_TOL_FACTOR * rtol), f"{reason}; solver tolerance {told}"
    return tol, f"{reason}; no solver tolerance found (a constant step size, or none readable)"
