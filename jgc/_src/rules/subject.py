"""One rule under test: a function at given arguments, seen as a map of its differentiable leaves.

:func:`jgc.check_rule` checks one ``custom_jvp`` / ``custom_vjp`` / ``custom_vmap``
function (or any function whose derivative rules are to be tested) at the arguments
given. :class:`_Subject` holds that function as ``go(*leaves) -> outputs``: the inputs
are the floating array leaves of the arguments that are differentiated (the rest,
``nondiff_argnums``, integers and Python objects, are held as given), the outputs are
the floating leaves of the result. Every family of checks works on ``go``, through
JAX's own ``jvp``, ``vjp`` and ``vmap``, so the rule runs exactly as JAX runs it.

It also holds the one judge of the checks that need no finite differences (primal
agreement, dot products, linearity, batching, symbolic zeros): two computations of
the same value agree when they differ by no more than rounding explains
(:func:`_judge`), with the tolerances of :mod:`jgc._src.policy`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import compare, compat, policy
from .report import SiteReport

# Check names, as the report shows them.
PRIMAL = "primal"
JVP = "jvp"
VJP = "vjp"
DOT = "dot-product"
LINEARITY = "linearity"
BATCHING = "batching"
ORDER2 = "order 2"
ZEROS = "symbolic zeros"
CHECKS = (PRIMAL, JVP, VJP, DOT, LINEARITY, BATCHING, ORDER2, ZEROS)


def _is_float_leaf(x) -> bool:
    return (isinstance(x, (jax.Array, np.ndarray, np.generic)) and jnp.issubdtype(x.dtype, jnp.inexact)) \
        or (isinstance(x, (float, complex)) and not isinstance(x, bool))


@dataclasses.dataclass
class _Subject:
    """``f`` at its arguments, as a function ``go`` of the floating leaves it differentiates.

    Attributes:
      f: the function under test.
      leaves, treedef: the flattened arguments as given (Python floats become arrays).
      diff: positions in ``leaves`` of the differentiated leaves.
      names: a readable name per differentiated leaf (``x``, ``args[1]['w']``).
      x: the differentiated leaves, in order (the point).
      out_names: a readable name per floating output leaf.
      out_dtypes: their dtypes.
      fwd, rev: None when ``jax.jvp`` / ``jax.vjp`` of ``go`` work, else why not.
    """

    f: Callable
    leaves: list
    treedef: Any
    diff: list
    names: list
    x: list
    out_names: list = dataclasses.field(default_factory=list)
    out_dtypes: list = dataclasses.field(default_factory=list)
    fwd: str | None = None
    rev: str | None = None
    # Compiled programs by name, shared by the subject at every point (same structure).
    programs: dict = dataclasses.field(default_factory=dict)
    # Positions in ``leaves`` of integer and boolean arrays outside nondiff_argnums, with their
    # names: JAX gives them float0 tangents and cotangents when a caller differentiates them too.
    ints: list = dataclasses.field(default_factory=list)
    int_names: list = dataclasses.field(default_factory=list)
    # Positions in ``leaves`` that were Python numbers (``scale=0.5``), not arrays.
    python: list = dataclasses.field(default_factory=list)
    # The same function where it computes at float64 (a call site's equation traced there),
    # called with widened arguments under x64, where ``f`` itself keeps its narrower dtypes:
    # the rounding reference of checks that compare two computations of one value.
    twin: Any = None

    # -- the function of the differentiated leaves ---------------------------------------------
    def go(self, *x):
        leaves = list(self.leaves)
        for k, v in zip(self.diff + self.ints, x):  # the integer leaves too, when given
            leaves[k] = v
        out = self.f(*jax.tree_util.tree_unflatten(self.treedef, leaves))
        return tuple(o for o in jax.tree_util.tree_leaves(out) if _is_float_leaf(o))

    def at(self, x: list) -> _Subject:
        """The same function at another point (same structure)."""
        return dataclasses.replace(self, x=list(x))

    # -- derivatives as JAX runs them --------------------------------------------------------
    def run(self, name: str, fn: Callable, *args):
        """``fn(*args)`` compiled once per name (one program instead of one per primitive); a
        function that cannot be compiled (Python control flow on values) runs eagerly."""
        jitted = self.programs.get(name)
        if jitted is None:
            jitted = self.programs[name] = jax.jit(fn)
        if self.programs.get("eager"):
            return fn(*args)
        try:
            return jitted(*args)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
                jax.errors.TracerIntegerConversionError, jax.errors.TracerArrayConversionError):
            self.programs["eager"] = True
            return fn(*args)

    def value(self, x):
        return self.run("f", lambda x: self.go(*x), list(x))

    def jvp(self, x, t):
        return self.run("jvp", lambda x, t: jax.jvp(self.go, tuple(x), tuple(t)), list(x), list(t))

    def vjp(self, x, u):
        def vjp(x, u):
            out, back = jax.vjp(self.go, *x)
            return out, back(tuple(u))
        return self.run("vjp", vjp, list(x), list(u))

    # -- random directions, seeded ----------------------------------------------------------------
    def tangent(self, rng: np.random.Generator, x=None) -> list:
        """Normal tangents scaled like each element (policy.coordinate_scale), at x's dtypes."""
        x = self.x if x is None else x
        return [_normal(rng, v.shape, v.dtype, _scale(v)) for v in x]

    def cotangent(self, rng: np.random.Generator, out) -> list:
        """Normal cotangents of unit scale at the outputs' dtypes (their size does not matter to a
        linear rule; the linearity check varies it)."""
        return [_normal(rng, o.shape, o.dtype, 1.0) for o in out]


def _scale(v) -> np.ndarray:
    a = np.abs(compat.host(v)).astype(np.float64)
    # max(|x_i|, rms(x)), or 1 where the leaf is all zeros: the scale steps are sized to.
    return policy.coordinate_scale(a, fallback=1.0) if a.size else a


def _normal(rng: np.random.Generator, shape, dtype, scale) -> jax.Array:
    z = rng.standard_normal(shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        z = z + 1j * rng.standard_normal(shape)
    return jnp.asarray(z * scale, dtype=dtype)


def make_subject(f: Callable, args: tuple, nondiff: set, api: str) -> _Subject:
    """The subject of a check: which leaves of ``args`` are differentiated, and their names."""
    leaves_p, treedef = jax.tree_util.tree_flatten_with_path(list(args))
    leaves, diff, names, ints, int_names, python = [], [], [], [], [], []
    for k, (path, v) in enumerate(leaves_p):
        arg = path[0].idx if path and hasattr(path[0], "idx") else -1
        if isinstance(v, (float, complex)) and not isinstance(v, bool):
            v = jnp.asarray(v)
            python.append(k)
        leaves.append(v)
        if arg not in nondiff and _is_float_leaf(v):
            diff.append(k)
            names.append(_arg_name(f, arg, path[1:]))
        elif arg not in nondiff and isinstance(v, (jax.Array, np.ndarray)) and \
                (jnp.issubdtype(v.dtype, jnp.integer) or v.dtype == bool):
            ints.append(k)
            int_names.append(_arg_name(f, arg, path[1:]))
    if not diff:
        raise TypeError(f"{api}: no argument has floating-point array leaves to differentiate "
                        f"(nondiff_argnums={sorted(nondiff)}).")
    x = [leaves[k] for k in diff]
    return _Subject(f, leaves, treedef, diff, names, x, ints=ints, int_names=int_names, python=python)


# What JAX raises when a traced value meets Python control flow (``if scale == 1.0``).
_UNTRACEABLE = (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError,
                jax.errors.TracerIntegerConversionError)


def hold_untraceable(s: _Subject) -> tuple[_Subject, list]:
    """``s`` with its Python-number arguments held as given where ``f`` cannot trace them.

    A wrapper such as ``optax.scale_gradient(x, scale)`` branches on ``scale`` in Python
    before it calls its rule, so ``scale`` cannot be differentiated, by JAX or here: held
    as given, the rule is checked in the other arguments. Returns the subject and the
    names of the leaves held (none when ``f`` traces as it is, or when holding the Python
    numbers does not make it trace: then the error is reported by the checks as it is).
    """
    try:
        jax.eval_shape(s.go, *s.x)
        return s, []
    except _UNTRACEABLE:
        pass
    keep = [i for i, k in enumerate(s.diff) if k not in s.python]
    if not keep or len(keep) == len(s.diff):
        return s, []
    # Held as the Python numbers they were given as: an array, even a concrete one, becomes
    # a tracer again once jnp touches it inside a trace.
    leaves = [v.item() if k in s.python and k not in [s.diff[i] for i in keep] else v
              for k, v in enumerate(s.leaves)]
    held = dataclasses.replace(s, leaves=leaves, diff=[s.diff[i] for i in keep], names=[s.names[i] for i in keep],
                               x=[s.x[i] for i in keep])
    try:
        jax.eval_shape(held.go, *held.x)
    except _UNTRACEABLE:
        return s, []
    return held, [s.names[i] for i in range(len(s.diff)) if i not in keep]


def _arg_name(f, arg: int, rest) -> str:
    names = _param_names(f)
    head = names[arg] if 0 <= arg < len(names) else f"args[{arg}]"
    return head + jax.tree_util.keystr(tuple(rest))


def _param_names(f) -> list:
    target = f
    for attr in ("fun", "fn"):
        inner = getattr(target, attr, None)
        if callable(inner):
            target = inner
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


# -- the judge of exact identities ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Disagreement:
    """Where two computations of one value differ most beyond their allowance."""

    where: str
    a: complex | float
    b: complex | float
    allowed: float
    excess: float

    def text(self, a_name: str, b_name: str) -> str:
        return (f"{self.where}: {a_name} {_g(self.a)} vs {b_name} {_g(self.b)} "
                f"(allowed difference {self.allowed:.2g})")


def _g(x) -> str:
    x = complex(x)
    return f"{x:.6g}" if x.imag else f"{x.real:.6g}"


def _judge(a, b, scale: float, dtype, *, rtol=None, atol=None, extra: float = 0.0):
    """Elements of ``a`` and ``b`` (two computations of the same values) that differ beyond rounding.

    The allowance is jgc's tolerance for a derivative computed at ``dtype``
    (``policy.default_tolerances``: rtol per dtype, atol = 32·u·``scale``, the absolute
    rounding of values summed from terms of size ``scale``), plus ``extra`` (a rounding
    measured or bounded by the caller). Non-finite values agree only with themselves.

    Returns (mask of disagreeing elements, |a − b|, allowance).
    """
    a = np.asarray(compat.host(a)).astype(np.complex128 if np.iscomplexobj(a) else np.float64)
    b = np.asarray(compat.host(b)).astype(np.complex128 if np.iscomplexobj(b) else np.float64)
    rt, at = policy.default_tolerances(dtype, scale, rtol, atol)
    with np.errstate(invalid="ignore", over="ignore"):
        tol = compare.tolerance(a, b, rt, at) + extra
        d = np.abs(a - b)
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        bad = ~same & ~(d <= tol)
    return bad, d, tol


def _leaf_max(v) -> float:
    a = np.abs(np.asarray(compat.host(v)))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def compare_leaves(a: list, b: list, names: list, dtypes: list, *, scales=None, rtol=None, atol=None,
                   extras=None, prefix: str = "") -> tuple[int, Disagreement | None]:
    """Compare two lists of leaves element by element: (elements compared, the worst disagreement or None).

    ``scales`` per leaf default to the larger of the two leaves' largest finite magnitude.
    """
    worst, n = None, 0
    for k, (x, y, nm, dt) in enumerate(zip(a, b, names, dtypes)):
        s = max(_leaf_max(x), _leaf_max(y)) if scales is None else scales[k]
        bad, d, tol = _judge(x, y, s, dt, rtol=rtol, atol=atol, extra=0.0 if extras is None else extras[k])
        n += int(np.size(d))
        if bad.any():
            with np.errstate(invalid="ignore", divide="ignore"):
                excess = np.where(bad, np.nan_to_num(d / np.maximum(tol, 1e-300), nan=np.inf, posinf=np.inf), -1.0)
            i = np.unravel_index(int(np.argmax(excess)), np.shape(d))
            xa, ya = np.asarray(compat.host(x)), np.asarray(compat.host(y))
            dis = Disagreement(prefix + nm + (f"[{', '.join(map(str, i))}]" if i else ""), xa[i].item(),
                               ya[i].item(), float(np.broadcast_to(tol, np.shape(d))[i]), float(excess[i]))
            if worst is None or dis.excess > worst.excess:
                worst = dis
    return n, worst


def site(check: str, at: str, function: str, status: str, checked: int = 0, *, reason: str = "",
         report=None, worst=None, method: str = "") -> SiteReport:
    """The verdict of one check at one point, as a row of the rule's report."""
    return SiteReport(at=at, function=function, under="", calls=1, checked=checked, status=status,
                      reason=reason, report=report, worst=worst, method=method or check, check=check)


def raised(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]
