"""Find every custom derivative rule inside a loss, capture its real inputs, check each alone.

``check_rules(fn, params, *args)`` works in three steps.

1. **Find.** ``jax.make_jaxpr`` traces the loss once. Each ``jax.custom_jvp`` /
   ``jax.custom_vjp`` call (Equinox's ``filter_custom_jvp``/``filter_custom_vjp`` are
   built on them) is an equation ``custom_jvp_call`` / ``custom_vjp_call`` whose params
   hold the primal as a jaxpr (``call_jaxpr``) and the rule (``jvp_jaxpr_fun``, or
   ``fwd_jaxpr_thunk`` and ``bwd``), each with a ``debug_info`` naming the Python
   function and its ``file:line``. Equations inside ``jit``, ``scan``, ``while``,
   ``cond``, ``checkpoint`` and inside other rules' primals are found by walking the
   sub-jaxprs; under ``vmap`` the traced program holds the batched rule.
2. **Capture.** One eager interpretation of that jaxpr at the caller's numbers records
   the operands every call site receives: loops are stepped one iteration at a time,
   so a rule inside a scan is seen at every step. Per call site the first few calls
   and the one with the largest operand are kept. Values closed over by a rule are
   operands of the equation (its ``num_consts`` leading ones) and are captured too;
   they are held fixed, as JAX does not differentiate a rule with respect to them.
3. **Check.** Each call site becomes a small function of its captured operands (the
   equation bound again, vmapped over the captured calls) and goes through
   :func:`jgc.check_jacobian` (every element, for small operands) or
   :func:`jgc.check_jvp` / :func:`jgc.check_vjp` (random directions, for large ones):
   ``jax.jvp``/``jax.vjp`` of that function runs the hand-written rule, finite
   differences run the primal. Same steps, tolerances, noise model, statuses and kink
   test as every other jgc check.

The loss is traced with ``params`` in float64 where the backend has it (as
:func:`jgc.check` does), so the operands of every rule fed by the parameters are
float64 and the rule is checked against a float64 reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import linecache
import math
import os
import re
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from . import trees
from .jacobian import check_jacobian, check_jvp, check_vjp
from .problem import precision_scope
from .rules_report import RuleReport, RulesReport, SiteReport, Worst
from .vector import fname

# -- the JAX internals this module reads (pinned by tests/test_rules.py) ----------------------
JVP_CALL, VJP_CALL = "custom_jvp_call", "custom_vjp_call"
KINDS = {JVP_CALL: "custom_jvp", VJP_CALL: "custom_vjp"}
RULE_PARAMS = {
    JVP_CALL: ("call_jaxpr", "jvp_jaxpr_fun", "num_consts", "symbolic_zeros"),
    VJP_CALL: ("call_jaxpr", "fwd_jaxpr_thunk", "bwd", "num_consts", "symbolic_zeros"),
}
# The parameter holding the rule function: its debug_info names the user's function.
RULE_FUNCTION = {JVP_CALL: "jvp_jaxpr_fun", VJP_CALL: "bwd"}
CALL_PRIMS = ("jit", "pjit", "closed_call", "core_call")
REMAT_PRIMS = ("checkpoint", "remat", "remat2")
# Kernels run as one opaque call: rules inside a kernel body are not user-level calls.
OPAQUE_PRIMS = ("pallas_call",)

# Calls kept per call site: the first few show the rule where the loss starts; the one
# with the largest operand reaches the far end of its domain (a rule wrong only for
# large inputs). Four calls stacked keep a site's check one small compiled batch.
FIRST_CALLS = 3
# Up to this many perturbed coordinates (over the captured calls of a site) every
# Jacobian entry is checked (2 evaluations per coordinate in one vmapped batch); above
# it, random directions per operand (jgc.check_jvp / check_vjp) keep the cost flat.
FULL_JACOBIAN_COORDINATES = 256


class JaxInternalsChanged(RuntimeError):
    """The traced program no longer has the structure jgc.check_rules reads."""


def _internals_changed(what: str) -> JaxInternalsChanged:
    return JaxInternalsChanged(
        f"jgc.check_rules reads JAX's traced programs (jaxprs), and {what} in JAX "
        f"{jax.__version__}. It was written against JAX 0.10.2. Please report this with "
        "your JAX version; jgc.check and jgc.check_vjp/check_jvp on a rule still work."
    )


def pin_equation(eqn) -> None:
    """Raise :class:`JaxInternalsChanged` unless ``eqn`` has the params this module reads."""
    name = eqn.primitive.name
    missing = [p for p in RULE_PARAMS[name] if p not in eqn.params]
    if missing:
        raise _internals_changed(f"a {name} equation has no {', '.join(missing)} param "
                                 f"(it has {', '.join(sorted(eqn.params))})")
    cj = eqn.params["call_jaxpr"]
    if not isinstance(cj, jcore.ClosedJaxpr) or getattr(cj.jaxpr, "debug_info", None) is None:
        raise _internals_changed(f"the call_jaxpr of {name} is not a ClosedJaxpr with debug_info")
    if not hasattr(eqn.primitive, "get_bind_params"):
        raise _internals_changed(f"{name} has no get_bind_params")


# -- where things are defined -------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Where:
    """A Python function and where it is: name, file, line (0 when unknown)."""

    name: str
    file: str
    line: int

    def __str__(self) -> str:
        file = _display_path(self.file)
        return f"{file}:{self.line}" if self.line else file or "?"


def _display_path(path: str) -> str:
    """Installed packages from their package directory on, files under the working directory relative to it."""
    if not path:
        return path
    marker = f"site-packages{os.sep}"
    if marker in path:
        return path.split(marker, 1)[1]
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            return rel
    return path


def _pkg_dir(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except ImportError:
        return None
    return os.path.dirname(os.path.abspath(m.__file__)) + os.sep


_JAX, _EQX = _pkg_dir("jax"), _pkg_dir("equinox")
# Modules whose functions wrap the user's rule: JAX's custom-derivative and tracing
# machinery (defjvps, flattening, memoised thunks) and Equinox's filtered rules.
_WRAPPER_FILES = tuple(os.path.join(d, *f.split("/")) for d, f in (
    (_JAX, "_src/custom_derivatives.py"), (_JAX, "_src/linear_util.py"), (_JAX, "_src/api_util.py"),
    (_JAX, "_src/interpreters/partial_eval.py"), (_JAX, "_src/interpreters/ad.py"),
    (_JAX, "_src/interpreters/batching.py"), (_EQX, "_ad.py")) if d)


def _is_wrapper_file(path: str) -> bool:
    """Files whose functions wrap the user's (JAX's custom-derivative machinery, Equinox's filtered rules)."""
    return os.path.abspath(path) in _WRAPPER_FILES


def _parse_src_info(info: str | None) -> Where:
    """Parse debug_info.func_src_info: "name at file:line"."""
    if not info:
        return Where("?", "", 0)
    name, _, loc = info.rpartition(" at ")
    if not name:
        return Where(info, "", 0)
    file, _, line = loc.rpartition(":")
    return Where(name, file, int(line)) if line.isdigit() else Where(name, loc, 0)


def _where_fn(fn) -> Where | None:
    fn = inspect_unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return Where(getattr(fn, "__qualname__", fname(fn)), code.co_filename, code.co_firstlineno)


def inspect_unwrap(fn):
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif hasattr(fn, "__wrapped__") and not isinstance(fn, type):
            fn = fn.__wrapped__
        else:
            return fn


def _functions_in(obj, depth=0, seen=None):
    """Python functions reachable from a WrappedFun through .f, partials and closures."""
    seen = set() if seen is None else seen
    if obj is None or id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, types.FunctionType):
        yield obj
        names = obj.__code__.co_freevars
        for nm, cell in zip(names, obj.__closure__ or ()):
            try:
                v = cell.cell_contents
            except ValueError:
                continue
            yield from _functions_in(v, depth + 1, seen)
    elif isinstance(obj, functools.partial):
        yield from _functions_in(obj.func, depth + 1, seen)
    elif isinstance(obj, types.MethodType):
        yield from _functions_in(obj.__func__, depth + 1, seen)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _functions_in(x, depth + 1, seen)
    elif type(obj).__name__ == "WrappedFun":
        yield from _functions_in(getattr(obj, "f", None), depth + 1, seen)


def _closure(fn) -> dict:
    out = {}
    for nm, cell in zip(getattr(getattr(fn, "__code__", None), "co_freevars", ()), fn.__closure__ or ()):
        with contextlib.suppress(ValueError):
            out[nm] = cell.cell_contents
    return out


def _see_through(wrapped, prefer: str) -> Where | None:
    """The user's function behind a wrapper (Equinox keeps it in a closure or on ``self``)."""
    for fn in _functions_in(wrapped):
        if not _is_wrapper_file(fn.__code__.co_filename):
            return _where_fn(fn)
        cl = _closure(fn)
        target = cl.get(prefer)
        if target is None and prefer in ("fn_bwd", "fn_fwd", "fn") and cl.get("self") is not None:
            target = getattr(cl["self"], prefer, None)
        if callable(target):
            return _where_fn(target)
    return None


def _def_line(file: str, name: str, line: int) -> int:
    """The line of ``def name`` at or above ``line`` (a body line from a traceback)."""
    short = name.rsplit(".", 1)[-1]
    pat = re.compile(rf"^\s*(async\s+)?def\s+{re.escape(short)}\b")
    for ln in range(line, max(0, line - 400), -1):
        if pat.match(linecache.getline(file, ln)):
            return ln
    return line


def _user_frame_in(jaxpr) -> Where | None:
    """The first frame outside JAX and Equinox among the equations of a primal's jaxpr."""
    from jax._src import source_info_util  # private: pinned by tests/test_rules.py

    for eqn in _all_eqns(jaxpr):
        tb = eqn.source_info.traceback
        if tb is None:
            continue
        for fr in source_info_util.user_frames(tb):
            if not _is_wrapper_file(fr.file_name):
                return Where(fr.function_name, fr.file_name,
                             _def_line(fr.file_name, fr.function_name, fr.start_line))
    return None


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _subjaxprs(eqn):
            yield from _all_eqns(sub)


def call_site(eqn) -> Where:
    """Where the rule is called: the user's frame of the equation."""
    from jax._src import source_info_util  # private: pinned by tests/test_rules.py

    fr = source_info_util.user_frame(eqn.source_info.traceback)
    if fr is None:
        return Where("?", "", 0)
    return Where(fr.function_name, fr.file_name, fr.start_line)


def rule_names(eqn) -> tuple[Where, Where, Where | None]:
    """(primal, rule, fwd) of a custom rule equation, seen through Equinox's wrappers."""
    name = eqn.primitive.name
    cj = eqn.params["call_jaxpr"]
    primal = _parse_src_info(cj.jaxpr.debug_info.func_src_info)
    rule_fun = eqn.params[RULE_FUNCTION[name]]
    rule = _parse_src_info(getattr(getattr(rule_fun, "debug_info", None), "func_src_info", None))
    fwd = None
    if name == VJP_CALL:
        fwd = _parse_src_info(getattr(getattr(eqn.params["fwd_jaxpr_thunk"], "debug_info", None),
                                      "func_src_info", None))
    if rule.file and _is_wrapper_file(rule.file):
        rule = _see_through(rule_fun, "fn_jvp" if name == JVP_CALL else "fn_bwd") or rule
    if fwd is not None and fwd.file and _is_wrapper_file(fwd.file):
        fwd = _see_through(eqn.params["fwd_jaxpr_thunk"], "fn_fwd") or fwd
    if primal.file and _is_wrapper_file(primal.file) and not _library_intended(primal):
        seen = _see_through(rule_fun, "fn") if name == VJP_CALL else None
        primal = seen or _user_frame_in(cj.jaxpr) or primal
    return primal, rule, fwd


# -- intended surrogate gradients -------------------------------------------------------------
_INTENDED: dict[tuple[str, str], list[tuple[int, int, str]]] = {}


def _code_span(fn) -> tuple[str, int, int] | None:
    code = getattr(inspect_unwrap(fn), "__code__", None)
    if code is None:
        return None
    lines = [ln for _, _, ln in code.co_lines() if ln is not None]
    return code.co_filename, code.co_firstlineno, max(lines, default=code.co_firstlineno)


def _primal_function(obj):
    """The user's primal function behind a custom_jvp/custom_vjp object (or Equinox's)."""
    fun = getattr(obj, "fun", None)  # jax.custom_jvp / jax.custom_vjp
    if fun is not None:
        return fun
    inner = getattr(obj, "fn", None)  # equinox.filter_custom_jvp (a custom_jvp) / _vjp (the fn)
    if inner is not None:
        fun = getattr(inner, "fun", None)
        if fun is not None:
            return _closure(fun).get("fn", fun)
        return inner
    return obj


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
    name = fname(inspect_unwrap(_primal_function(fn))).rsplit(".", 1)[-1]
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
    return None


# -- walking and interpreting the traced program ------------------------------------------------
def _subjaxprs(eqn):
    """Sub-programs of an equation, as open jaxprs (none for opaque kernels)."""
    if eqn.primitive.name in OPAQUE_PRIMS:
        return
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


@dataclasses.dataclass
class _Capture:
    operands: list
    where: str  # e.g. "scan step 3"
    magnitude: float


@dataclasses.dataclass
class _Site:
    eqn: Any
    at: Where
    under: tuple  # enclosing constructs, outermost first
    calls: int = 0
    first: list = dataclasses.field(default_factory=list)
    extreme: _Capture | None = None


@dataclasses.dataclass
class _Rule:
    kind: str
    primal: Where
    rule: Where
    fwd: Where | None
    sites: dict = dataclasses.field(default_factory=dict)


def _magnitude(ops) -> float:
    m = 0.0
    for x in ops:
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and np.size(x):
            a = float(jnp.max(jnp.abs(x)))
            m = max(m, a if math.isfinite(a) else math.inf)
    return m


class _Collector:
    """Finds the rules of a traced program and captures their operands in one eager pass."""

    def __init__(self):
        self.rules: dict[tuple, _Rule] = {}
        self.unreached: dict[str, str] = {}  # rule site key -> why it was not stepped into
        self._has_rule: dict[int, bool] = {}
        self._sites: dict[tuple, _Site] = {}  # (id of equation, constructs around it) -> site

    # static
    def site(self, eqn, under: tuple, parent: Where | None = None) -> _Site:
        cached = self._sites.get((id(eqn), under))
        if cached is not None:  # the same equation again (a loop step): names are known
            return cached
        site = self._new_site(eqn, under, parent)
        self._sites[(id(eqn), under)] = site
        return site

    def _new_site(self, eqn, under: tuple, parent: Where | None) -> _Site:
        pin_equation(eqn)
        primal, rule, fwd = rule_names(eqn)
        kind = KINDS[eqn.primitive.name]
        key = (kind, primal, rule)
        r = self.rules.get(key)
        if r is None:
            r = self.rules[key] = _Rule(kind, primal, rule, fwd)
        at = call_site(eqn)
        if not at.file and parent is not None:  # called from library code with no user frame
            at = parent
        skey = (at, under, tuple(str(v.aval) for v in eqn.invars))
        s = r.sites.get(skey)
        if s is None:
            s = r.sites[skey] = _Site(eqn, at, under)
        return s

    def discover(self, jaxpr, under=(), parent=None):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in KINDS:
                site = self.site(eqn, under, parent)
                self.discover(eqn.params["call_jaxpr"].jaxpr, under + (f"{KINDS[name]} {_short(eqn)}",), site.at)
            else:
                for sub in _subjaxprs(eqn):
                    self.discover(sub, under + (_construct(name),), parent)

    def has_rule(self, jaxpr) -> bool:
        k = id(jaxpr)
        if k not in self._has_rule:
            self._has_rule[k] = any(e.primitive.name in KINDS or any(self.has_rule(s) for s in _subjaxprs(e))
                                    for e in jaxpr.eqns)
        return self._has_rule[k]

    # eager
    def run(self, jaxpr, consts, args, under=(), steps=(), parent=None):
        env = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for v, x in zip(jaxpr.constvars, consts):
            env[v] = x
        for v, x in zip(jaxpr.invars, args):
            env[v] = x
        for eqn in jaxpr.eqns:
            vals = [read(v) for v in eqn.invars]
            outs = self._eqn(eqn, vals, under, steps, parent)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            for v, x in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def _bind(self, eqn, vals):
        return eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))

    def _eqn(self, eqn, vals, under, steps, parent):
        name = eqn.primitive.name
        p = eqn.params
        if name in KINDS:
            site = self.site(eqn, under, parent)
            self._record(site, eqn, vals, steps)
            cj = p["call_jaxpr"]
            if self.has_rule(cj.jaxpr):
                return self.run(cj.jaxpr, cj.consts, vals, under + (f"{KINDS[name]} {_short(eqn)}",), steps,
                                site.at)
            return self._bind(eqn, vals)
        if not any(self.has_rule(s) for s in _subjaxprs(eqn)):
            return self._bind(eqn, vals)
        inner = under + (_construct(name),)
        if name in CALL_PRIMS:
            cj = p["jaxpr"] if "jaxpr" in p else p["call_jaxpr"]
            return self.run(cj.jaxpr, cj.consts, vals, inner, steps, parent)
        if name in REMAT_PRIMS:
            jx = p["jaxpr"]
            jx, consts = (jx.jaxpr, jx.consts) if isinstance(jx, jcore.ClosedJaxpr) else (jx, ())
            return self.run(jx, consts, vals, inner, steps, parent)
        if name == "scan":
            return self._scan(eqn, vals, inner, steps, parent)
        if name == "while":
            return self._while(eqn, vals, inner, steps, parent)
        if name == "cond":
            branches = p["branches"]
            i = int(np.clip(int(vals[0]), 0, len(branches) - 1))
            b = branches[i]
            return self.run(b.jaxpr, b.consts, vals[1:], inner, steps + (f"cond branch {i}",), parent)
        # A construct jgc cannot step through: its rules are found but not captured.
        for sub in _subjaxprs(eqn):
            for e in _all_eqns(sub):
                if e.primitive.name in KINDS:
                    self.unreached[_short(e)] = name
        return self._bind(eqn, vals)

    def _scan(self, eqn, vals, under, steps, parent):
        p = eqn.params
        body, nc, ncarry, length = p["jaxpr"], p["num_consts"], p["num_carry"], p["length"]
        consts, carry, xs = vals[:nc], list(vals[nc:nc + ncarry]), vals[nc + ncarry:]
        ys = []
        order = range(length - 1, -1, -1) if p.get("reverse", False) else range(length)
        for i in order:
            out = self.run(body.jaxpr, body.consts, [*consts, *carry, *(x[i] for x in xs)], under,
                           steps + (f"scan step {i}",), parent)
            carry, y = out[:ncarry], out[ncarry:]
            ys.append(y)
        if p.get("reverse", False):
            ys.reverse()
        y_avals = [v.aval for v in eqn.outvars[ncarry:]]
        stacked = [jnp.stack([y[j] for y in ys]) if ys else jnp.zeros(a.shape, a.dtype)
                   for j, a in enumerate(y_avals)]
        return [*carry, *stacked]

    def _while(self, eqn, vals, under, steps, parent):
        p = eqn.params
        cj, bj = p["cond_jaxpr"], p["body_jaxpr"]
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cc, bc, carry = vals[:cn], vals[cn:cn + bn], list(vals[cn + bn:])
        i = 0
        while bool(self.run(cj.jaxpr, cj.consts, [*cc, *carry], under, steps, parent)[0]):
            carry = self.run(bj.jaxpr, bj.consts, [*bc, *carry], under, steps + (f"while step {i}",), parent)
            i += 1
        return carry

    def _record(self, site: _Site, eqn, vals, steps):
        site.calls += 1
        nc = eqn.params["num_consts"]
        cap = _Capture(list(vals), " > ".join(steps) or "", _magnitude(vals[nc:]))
        if len(site.first) < FIRST_CALLS:
            site.first.append(cap)
        elif cap.magnitude > max([c.magnitude for c in site.first]
                                 + ([site.extreme.magnitude] if site.extreme else [])):
            site.extreme = cap  # the largest input beyond the first calls


def _short(eqn) -> str:
    return _parse_src_info(eqn.params["call_jaxpr"].jaxpr.debug_info.func_src_info).name


def _construct(name: str) -> str:
    return {"pjit": "jit", "remat2": "checkpoint", "remat": "checkpoint"}.get(name, name)


# -- checking call sites ----------------------------------------------------------------------
@dataclasses.dataclass
class _Prepared:
    """One call site ready to check: its function of the stacked explicit operands."""

    key: tuple
    site: _Site
    kind: str
    caps: list
    explicit: list
    f: Callable
    coordinates: int


def _site_function(eqn, consts_stacked):
    """The rule at one call site as a function of its explicit operands, vmapped over calls."""
    prim = eqn.primitive

    def one(consts, explicit):
        out = prim.bind(*consts, *explicit, **prim.get_bind_params(eqn.params))
        return tuple(out) if prim.multiple_results else (out,)

    def rule_at_site(*explicit):
        return jax.vmap(one)(consts_stacked, list(explicit))

    rule_at_site.__qualname__ = _short(eqn)
    return rule_at_site


def _operand_names(eqn) -> list[str]:
    nc = eqn.params["num_consts"]
    n = len(eqn.invars) - nc
    names = eqn.params["call_jaxpr"].jaxpr.debug_info.arg_names
    if names and len(names) == len(eqn.invars):
        names = list(names[nc:])
    elif eqn.primitive.name == VJP_CALL:  # the forward pass is traced with the explicit arguments only
        names = getattr(getattr(eqn.params["fwd_jaxpr_thunk"], "debug_info", None), "arg_names", None)
        names = list(names) if names and len(names) == n else []
    else:
        names = []
    return [nm if nm else f"#{i}" for i, nm in enumerate(names)] if names else [f"#{i}" for i in range(n)]


def _site_base(site: _Site) -> dict:
    return {"at": str(site.at), "function": site.at.name, "under": " > ".join(site.under), "calls": site.calls}


def _prepare(key, site: _Site, kind: str) -> _Prepared | SiteReport:
    base = _site_base(site)
    if not site.calls:
        return SiteReport(**base, checked=0, status="not executed",
                          reason="the loss never reached this call at these params and args")
    eqn = site.eqn
    caps = site.first + ([site.extreme] if site.extreme is not None else [])
    nc = eqn.params["num_consts"]
    ops = [jnp.stack([c.operands[j] for c in caps]) for j in range(len(eqn.invars))]
    consts, explicit = ops[:nc], ops[nc:]
    coords = sum(int(x.size) for x in explicit if trees.is_inexact_array(x))
    if not coords:
        return SiteReport(**base, checked=len(caps), status="not checked",
                          reason="the rule has no floating-point operands to differentiate")
    return _Prepared(key, site, kind, caps, explicit, _site_function(eqn, consts), coords)


def _verdict(prep: _Prepared, rep, leaves, offset: int = 0) -> SiteReport:
    """The SiteReport from the blocks of ``rep`` that belong to this site."""
    failing = [lf for lf in rep.failing() if lf in leaves]
    worst = _worst(failing[0], prep, offset) if failing else None
    return SiteReport(**_site_base(prep.site), checked=len(prep.caps), status="mismatch" if failing else "ok",
                      report=rep, worst=worst, method=rep.mode)


def _check_one(prep: _Prepared, options: dict, key) -> SiteReport:
    """Check one call site alone: every Jacobian entry when small, random directions when large."""
    if prep.coordinates <= FULL_JACOBIAN_COORDINATES:
        rep = check_jacobian(prep.f, *prep.explicit, precision="native", **options)
    elif prep.kind == "custom_jvp":
        rep = check_jvp(prep.f, *prep.explicit, precision="native", key=key, **options)
    else:
        rep = check_vjp(prep.f, *prep.explicit, precision="native", against="numerical", key=key, **options)
    return _verdict(prep, rep, rep.leaves)


def _closes_over_traced_values(eqn) -> bool:
    """Whether the rule's Python functions hold tracers of the loss's trace in their closures.

    Such a rule (defined inside the loss, closing over a value computed there) cannot be
    differentiated again once that trace has ended; its site is checked on the Python
    object called in an eager run instead.
    """
    funs = [eqn.params[RULE_FUNCTION[eqn.primitive.name]]]
    if eqn.primitive.name == VJP_CALL:
        funs.append(eqn.params["fwd_jaxpr_thunk"])
    for fun in funs:
        for fn in _functions_in(fun):
            for v in _closure(fn).values():
                if isinstance(v, (types.FunctionType, functools.partial)):
                    continue
                with contextlib.suppress(Exception):
                    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(v)):
                        return True
    return False


def _check_together(preps: list, options: dict) -> dict:
    """Every entry of the small sites' Jacobians in one compiled check (one noise probe, one batch).

    The sites are independent functions of disjoint operands, so the Jacobian of all
    of them together is block diagonal: the off-diagonal blocks are zero on both sides
    and each site is judged on its own diagonal blocks.
    """
    spans, outs, lo, o = [], [], 0, 0
    for prep in preps:
        n_out = len(prep.site.eqn.outvars)
        spans.append((lo, lo + len(prep.explicit)))
        outs.append((o, o + n_out))
        lo, o = lo + len(prep.explicit), o + n_out

    def all_sites(*flat):
        res = []
        for prep, (a, b) in zip(preps, spans):
            res.extend(prep.f(*flat[a:b]))
        return tuple(res)

    all_sites.__qualname__ = "custom rules"
    rep = check_jacobian(all_sites, *[x for p in preps for x in p.explicit], precision="native", **options)
    found = {}
    for prep, (a, b), (oa, ob) in zip(preps, spans, outs):
        mine = [lf for lf in rep.leaves
                if a <= _index(lf.path) < b and oa <= _index(lf.output_path) < ob]
        found[prep.key] = _verdict(prep, rep, mine, offset=a)
    return found


def _index(path: str) -> int:
    m = re.match(r"^\w*\[(\d+)\]", path)
    return int(m.group(1)) if m else -1


def _worst(lf, prep: _Prepared, offset: int = 0) -> Worst:
    k = _index(lf.path) - offset
    names = _operand_names(prep.site.eqn)
    x = np.asarray(prep.explicit[k])
    idx = tuple(lf.input_index)
    if len(idx) != x.ndim:  # random directions: an elementwise rule's output sits where its input does
        out_idx = tuple(lf.output_index)
        idx = out_idx if len(out_idx) == x.ndim and all(i < n for i, n in zip(out_idx, x.shape)) else ()
    value = float(np.real(x[idx])) if idx else None
    call = int(idx[0]) if idx else None
    step = prep.caps[call].where if call is not None and call < len(prep.caps) else ""
    numeric = np.abs(np.asarray(lf.numeric))
    bound = np.asarray(lf.bound)
    constant = bool(numeric.size and np.all(numeric <= bound)
                    and np.any(np.abs(np.asarray(lf.analytic)) > bound))
    return Worst(operand=names[k] if 0 <= k < len(names) else f"#{k}", index=tuple(idx[1:]) if idx else (),
                 call=call, step=step, input=value, rule=lf.worst_analytic, numeric=lf.worst_numeric,
                 allowed=lf.worst_bound, block=lf.name, locally_constant=constant)


def _error(prep_or_site, e: Exception) -> SiteReport:
    site = prep_or_site.site if isinstance(prep_or_site, _Prepared) else prep_or_site
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return SiteReport(**_site_base(site), checked=0, status="error", reason=f"{type(e).__name__}: {msg}")


# -- rules that close over values traced inside the loss -----------------------------------------
@contextlib.contextmanager
def _intercepted(calls: list):
    """Record every call of a custom_jvp/custom_vjp object (with its arguments) while active."""
    from jax._src import custom_derivatives as cd  # private: pinned by tests/test_rules.py

    saved = {cls: cls.__call__ for cls in (cd.custom_jvp, cd.custom_vjp)}

    def recorder(original):
        def __call__(self, *a, **k):
            calls.append((self, a, k))
            return original(self, *a, **k)
        return __call__

    for cls, original in saved.items():
        cls.__call__ = recorder(original)
    try:
        yield
    finally:
        for cls, original in saved.items():
            cls.__call__ = original


def _eager_calls(fn, p, args) -> list:
    """Run the loss op by op (no jit), recording the custom rules it calls with concrete arguments."""
    calls: list = []
    with _intercepted(calls), jax.disable_jit():
        fn(p, *args)
    concrete = []
    for obj, a, k in calls:
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((a, k))):
            concrete.append((obj, a, k))
    return concrete


def _matches(obj, primal: Where) -> bool:
    span = _code_span(_primal_function(obj))
    return bool(span) and os.path.abspath(span[0]) == os.path.abspath(primal.file) and \
        span[1] <= primal.line <= span[2]


def _check_eager(site: _Site, primal: Where, eager: list, options: dict) -> SiteReport:
    """Check a rule that closes over traced values on the Python object called in an eager run."""
    base = _site_base(site)
    mine = [(o, a, k) for o, a, k in eager if _matches(o, primal)]
    if not mine:
        return SiteReport(**base, checked=0, status="not checked",
                          reason="the rule closes over values computed inside the loss, and no call "
                                 "with concrete operands was seen in an eager run (it runs under vmap or "
                                 "checkpoint)")
    picks = mine[:FIRST_CALLS]
    rest = mine[FIRST_CALLS:]
    if rest:
        picks.append(max(rest, key=lambda c: _magnitude(jax.tree_util.tree_leaves(c[1]))))
    reports = []
    for obj, a, k in picks:
        nondiff = set(getattr(obj, "nondiff_argnums", ()) or ())
        nums = tuple(i for i in range(len(a)) if i not in nondiff)
        rep = check_jacobian(lambda *x, obj=obj, k=k: obj(*x, **k), *a, argnums=nums, precision="native",
                             **options)
        reports.append(rep)
        if not rep.ok:
            lf = rep.failing()[0]
            worst = Worst(operand=lf.path, index=tuple(lf.input_index), call=len(reports) - 1, step="eager call",
                          input=None, rule=lf.worst_analytic, numeric=lf.worst_numeric, allowed=lf.worst_bound,
                          block=lf.name)
            return SiteReport(**base, checked=len(reports), status="mismatch", report=rep, worst=worst,
                              method=rep.mode + " on an eager call (the rule closes over traced values)")
    return SiteReport(**base, checked=len(reports), status="ok", report=reports[-1],
                      method=reports[-1].mode + " on eager calls (the rule closes over traced values)")


# -- the front door ---------------------------------------------------------------------------------
def check_rules(fn: Callable, params: Any, *args, precision: str = "auto", rtol: float | None = None,
                atol: float | None = None, step: float | None = None, key=None) -> RulesReport:
    """Find every custom derivative rule that runs inside ``fn`` and check each one alone.

    The loss is traced once; every ``jax.custom_jvp`` / ``jax.custom_vjp`` call in it
    (also Equinox's ``filter_custom_jvp`` / ``filter_custom_vjp``, rules nested in other
    rules, and calls under ``jit``, ``vmap``, ``lax.scan``, ``fori_loop``,
    ``while_loop``, ``cond`` and ``jax.checkpoint``) is found, and one eager pass at
    these ``params`` and ``args`` records the operands each call site receives (per
    loop step; the first three calls and the one with the largest operand are kept).
    Each call site is then checked in isolation on those operands: the rule's JVP or
    VJP against central differences of the rule's own primal, with jgc's steps,
    tolerances, noise model and kink test (every Jacobian entry for small operands,
    random directions for large ones). A rule that is wrong only on part of its domain
    is caught when the loss feeds it that part.

    Values a rule closes over and ``nondiff_argnums`` operands are held fixed (JAX does
    not differentiate a rule with respect to them); integer operands are not perturbed.
    Rules declared with :func:`jgc.intended`, ``optax.scale_gradient`` and Equinox's
    non-differentiable markers are reported as ``intended``, never as failures.

    Args:
      fn: the loss ``fn(params, *args)``.
      params: the point (any pytree); its floating leaves are traced in float64 where
        the backend has it (``precision="auto"``), as in :func:`jgc.check`.
      *args: data, passed as they are.
      precision: "auto", "float64" or "native", as in :func:`jgc.check`.
      rtol, atol, step: as in :func:`jgc.check` (None: jgc's per-dtype defaults).
      key: seed of the random directions used for large operands.

    Returns:
      A :class:`jgc.RulesReport`: ``.ok`` is False when any rule disagrees with its
      primal; ``str()`` lists the rules, wrong ones first, with ``file:line``.

    Raises:
      TypeError: ``fn`` is not callable, or the inputs are traced values.

    Example:
      >>> import jax, jax.numpy as jnp, jgc
      >>> @jax.custom_jvp
      ... def cube(x):
      ...     return x ** 3
      >>> _ = cube.defjvp(lambda p, t: (cube(p[0]), 2 * p[0] ** 2 * t[0]))  # should be 3x²
      >>> rep = jgc.check_rules(lambda p: jnp.sum(cube(p)), jnp.array([1.0, 2.0]))
      >>> rep.ok, rep.rules[0].name, rep.rules[0].status
      (False, 'cube', 'mismatch')
    """
    api = "jgc.check_rules"
    if not callable(fn):
        raise TypeError(f"{api}: fn must be callable as fn(params, *args), got {type(fn).__name__}.")
    if precision not in ("auto", "float64", "native"):
        raise ValueError(f"{api}: precision must be 'auto', 'float64' or 'native', got {precision!r}.")
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((params, args))):
        raise TypeError(f"{api} got traced values (it was called inside jit, vmap or grad). Checking "
                        "rules needs concrete numbers: call it outside transformations.")
    t0 = time.perf_counter()
    notes: list[str] = []
    split, dyn = trees.split_params(params, what=f"{api}: params")
    widen, scope = precision_scope(precision, [np.dtype(x.dtype) for x in dyn], notes)
    with scope:
        if widen:
            dyn = [x.astype(trees.wide_dtype(x.dtype)) for x in dyn]
        dyn = [jnp.asarray(x) for x in dyn]
        p = split.combine(dyn)
        # Floating data is widened with the params, as in jgc.check (one precision inside fn).
        rebuild_args, argarr = trees.split_args(args, widen=widen)
        args = rebuild_args(argarr)
        # Only array leaves are traced; the rest (an Equinox module's strings and
        # functions, Python numbers) stays static, as in every evaluation of jgc.check.
        closed = jax.make_jaxpr(lambda d, a: fn(split.combine(d), *rebuild_args(a)))(dyn, argarr)
        col = _Collector()
        col.discover(closed.jaxpr)
        col.run(closed.jaxpr, closed.consts, list(dyn) + list(argarr))
        options = {k: v for k, v in {"rtol": rtol, "atol": atol, "step": step}.items() if v is not None}
        rules = _judge(col, options, key, lambda: _eager_calls(fn, p, args))
    return RulesReport.build(rules, function=_fn_name(fn), seconds=time.perf_counter() - t0, notes=notes)


def _fn_name(fn) -> str:
    mod = getattr(fn, "__module__", None)
    name = fname(fn)
    return f"{mod}.{name}" if mod and mod != "__main__" else name


def _judge(col: _Collector, options: dict, key, eager: Callable[[], list]) -> list:
    """Check every call site: small ones together, large ones alone, each rule's verdict from its sites."""
    verdicts, small, retrace = {}, [], []
    intended_by = {}
    for rkey, r in col.rules.items():
        reason = _user_intended(r.primal) or _library_intended(r.primal)
        if reason:
            intended_by[rkey] = reason
            continue
        for skey, s in r.sites.items():
            k = (rkey, skey)
            if not s.calls and r.primal.name in col.unreached:
                verdicts[k] = SiteReport(**_site_base(s), checked=0, status="not checked",
                                         reason=f"it runs inside {col.unreached[r.primal.name]}, which "
                                                "jgc.check_rules does not step through")
                continue
            prep = _prepare(k, s, r.kind)
            if isinstance(prep, SiteReport):
                verdicts[k] = prep
            elif prep.coordinates <= FULL_JACOBIAN_COORDINATES \
                    and not _closes_over_traced_values(prep.site.eqn):
                small.append(prep)
            else:  # large, or a rule that raises when differentiated: alone
                try:
                    verdicts[k] = _check_one(prep, options, key)
                except Exception as e:  # noqa: BLE001 (the rule itself raised: an error for this rule only)
                    verdicts[k] = _error(prep, e)
                    retrace.append(prep)
    if small:
        try:
            verdicts.update(_check_together(small, options))
        except Exception:  # noqa: BLE001 (one site's rule raised: check each alone, so only it is an error)
            for prep in small:
                try:
                    verdicts[prep.key] = _check_one(prep, options, key)
                except Exception as e:  # noqa: BLE001 (as above)
                    verdicts[prep.key] = _error(prep, e)
                    retrace.append(prep)
    leaked = [p for p in retrace if "UnexpectedTracerError" in verdicts[p.key].reason]
    if leaked:
        calls = eager()
        for prep in leaked:
            r = col.rules[prep.key[0]]
            try:
                verdicts[prep.key] = _check_eager(prep.site, r.primal, calls, options)
            except Exception as e:  # noqa: BLE001 (as above)
                verdicts[prep.key] = _error(prep, e)
    out = []
    for rkey, r in col.rules.items():
        base = {"kind": r.kind, "name": r.primal.name, "primal_at": str(r.primal), "rule_name": r.rule.name,
                "rule_at": str(r.rule), "fwd_name": r.fwd.name if r.fwd else "",
                "fwd_at": str(r.fwd) if r.fwd else ""}
        calls = sum(s.calls for s in r.sites.values())
        if rkey in intended_by:
            reason = intended_by[rkey]
            sites = tuple(SiteReport(**_site_base(s), checked=0, status="intended", reason=reason)
                          for s in r.sites.values())
            out.append(RuleReport(**base, status="intended", reason=reason, sites=sites, calls=calls))
        else:
            sites = tuple(verdicts[(rkey, skey)] for skey in r.sites)
            out.append(RuleReport.from_sites(base, sites, calls))
    return out


def attach_rules(rep, fn, params, args, *, precision: str = "auto"):
    """A failing :class:`jgc.Report` with the verdict of every custom rule inside ``fn``.

    Used by ``jgc.check(..., rules=True)``: the report gains ``rules`` (the
    :class:`jgc.RulesReport`) and one note per wrong rule, so its text says which rule
    to fix; when every rule agrees with its primal, a note says the mismatch lies
    elsewhere.
    """
    rr = check_rules(fn, params, *args, precision=precision)
    notes = [f"custom rule {r.kind} {r.name} ({r.primal_at}) disagrees with its primal: rule "
             f"{r.rule_name} ({r.rule_at})" + (f"; worst {r.worst.describe()}" if r.worst else "")
             for r in rr.failing()]
    if not notes:
        checked = [r for r in rr.rules if r.status == "ok"]
        elsewhere = (f"jgc.check_rules found {len(checked)} custom rule(s) that agree with their primal: the "
                     "mismatch comes from elsewhere (a hand-written grad, stop_gradient, or a rule not "
                     "checked: see report.rules).")
        notes = [elsewhere] if rr.rules else []
    return dataclasses.replace(rep, rules=rr, notes=tuple(rep.notes) + tuple(notes))
