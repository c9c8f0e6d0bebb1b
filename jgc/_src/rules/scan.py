"""Every custom rule of a package that a test session runs, captured there and checked after it.

The engine of ``pytest --jgc-rules=PACKAGE`` (the hooks live in ``jgc._src.pytest_plugin``).
While the tests run, :class:`Recorder` wraps the ``__call__`` of ``jax.custom_jvp``,
``jax.custom_vjp``, ``jax.custom_batching.custom_vmap`` and Equinox's
``filter_custom_jvp`` / ``filter_custom_vjp``, and JAX's ``grad``, ``value_and_grad``,
``vjp``, ``jvp``, ``linearize``, ``jacfwd``, ``jacrev`` and ``hessian``. A rule whose
primal is defined under the package is recorded with the test that ran it and a few
of its operands:

- called with concrete arrays: those arrays;
- called with tracers of ``grad``/``jvp``/``vmap`` outside ``jit``: the primal values
  under the tracers (lane 0 under ``vmap``);
- called inside ``jit`` under one of JAX's derivative transformations applied to
  concrete arguments: that outer call is kept, and after the session its function is
  traced and interpreted once at those arguments (the capture of
  :func:`jgc.check_rules`), which yields the rule's operands there.

Rules registered on primitives (``ad.primitive_jvps`` / ``ad.primitive_transposes``)
whose rule functions are defined under the package are recorded the same way: the
``bind`` of each such primitive is wrapped (on the primitive object, once the tests have
imported the package), and each is checked after the session as :func:`jgc.check_rules`
checks it (``primitives="user"``): the JVP rule against differences of the primitive,
the transpose rule by the dot-product identity.

Captures are kept only for new shapes, dtypes or orders of magnitude (a few per rule),
so the tests run at nearly their own speed; the wrappers return what the wrapped call
returns, and every original is restored when the session ends. Each rule is then
checked by :func:`jgc.check_rule` (primal, JVP/VJP, dot product, linearity, batching,
order 2, symbolic zeros) on up to ``points`` distinct captured calls within a wall-time
budget.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad

from .. import compat
from .eager import _closes_over_traced_values
from .primitives import JVP_KIND, PrimitiveWatch, check_primitive_rules, rule_function
from .rule import check_rule
from .sites import _Collector
from .sources import Where, _display_path, _functions_in, _is_wrapper_file, _primal_function, _where_fn
from .surrogates import _library_intended, _user_intended

# Distinct captured calls kept per rule (new shape, dtype or order of magnitude), and per
# shape/dtype signature: a rule's check is a few compiled programs per call checked, so
# only a few distinct calls are worth keeping.
KEPT_PER_RULE = 6
KEPT_PER_SIGNATURE = 3
# Two calls of a primal at the same operands that differ by more than this (relative to the
# output's largest entry) mean it reads state outside its arguments: see _not_reproducible.
REPRODUCIBLE_RTOL = 1e-4
# Outer derivative calls kept for capture after the session, per missed rule and in all.
OUTER_PER_RULE = 3
OUTER_IN_ALL = 64

# Statuses of a rule after the scan, most severe first.
STATUSES = ("mismatch", "error", "not checked", "approximate", "ok", "intended", "not exercised")
DERIVATIVE_TRANSFORMS = ("grad", "value_and_grad", "vjp", "jvp", "linearize", "jacfwd", "jacrev", "hessian")


_JGC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


# -- where the package is ---------------------------------------------------------------------
def package_dirs(package: str) -> list[str]:
    """The directories (or the one file) of an importable package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ValueError(f"--jgc-rules={package}: no importable package or module of that name. Name the "
                         "package whose rules to check, as you would import it (e.g. --jgc-rules=mylib).")
    if spec.submodule_search_locations:
        return [os.path.abspath(d) + os.sep for d in spec.submodule_search_locations]
    return [os.path.abspath(spec.origin)]


# -- the static list of a package's rules -------------------------------------------------------
RULE_DECORATORS = ("custom_jvp", "custom_vjp", "custom_vmap", "filter_custom_jvp", "filter_custom_vjp")


def _rule_kind(node) -> str | None:
    """The rule kind a decorator or call expression makes (``jax.custom_jvp``, ``partial(custom_vjp, ...)``)."""
    if isinstance(node, ast.Call):
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
        if name == "partial" and node.args:
            return _rule_kind(node.args[0])
        return _rule_kind(fn)
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return name if name in RULE_DECORATORS else None


def static_rules(dirs: list[str]) -> list[dict]:
    """Module-level custom rules defined in the package's files: name, kind, file, first and last line.

    A decorated ``def`` counts from its first decorator (as Python's code objects do); an
    assignment ``f = jax.custom_jvp(g)`` names ``g``'s definition. Rules defined inside
    functions are only seen when a test runs them.
    """
    files = []
    for d in dirs:
        if os.path.isfile(d):
            files.append(d)
            continue
        for root, subdirs, names in os.walk(d):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith((".", "__pycache__")))
            files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
    out = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read(), filename=path)
        except (OSError, SyntaxError, ValueError):
            continue
        defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                kinds = [k for k in map(_rule_kind, node.decorator_list) if k]
                if kinds:
                    first = min([d.lineno for d in node.decorator_list] + [node.lineno])
                    out.append({"name": node.name, "kind": kinds[-1], "file": path, "line": first,
                                "last": node.end_lineno or first})
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                kind = _rule_kind(node.value)
                arg = node.value.args[0] if node.value.args and kind else None
                target = defs.get(arg.id) if isinstance(arg, ast.Name) else None
                if target is not None:
                    first = min([d.lineno for d in target.decorator_list] + [target.lineno])
                    out.append({"name": target.name, "kind": kind, "file": path, "line": first,
                                "last": target.end_lineno or first})
    return out


# -- what a call's operands are -----------------------------------------------------------------------
class _NotConcrete(Exception):
    """An operand is a tracer whose values cannot be read (inside jit)."""


def _concrete_leaf(x):
    """The concrete value of a leaf: itself, the primal under a JVP tracer, lane 0 under vmap."""
    for _ in range(32):
        if not isinstance(x, jax.core.Tracer):
            if isinstance(x, np.ndarray):
                return np.array(x)  # a copy: the test may write into its array later
            return x
        if hasattr(x, "primal"):  # JVPTracer, LinearizeTracer: grad, jvp, jacfwd, linearize
            x = x.primal
        elif hasattr(x, "val") and hasattr(x, "batch_dim"):  # BatchTracer: vmap
            val, dim = _concrete_leaf(x.val), x.batch_dim
            x = np.take(np.asarray(val), 0, axis=dim) if isinstance(dim, int) else val
        else:
            raise _NotConcrete(type(x).__name__)
    raise _NotConcrete("nested too deep")


def _signature(leaves) -> tuple:
    return tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__))) for x in leaves
                 if hasattr(x, "shape") or isinstance(x, (float, complex)))


def _decade(leaves) -> tuple:
    """Per floating leaf: the order of magnitude of its largest finite entry (a bucket of magnitudes)."""
    out = []
    for x in leaves:
        if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)) or not np.size(x):
            continue
        a = np.abs(np.asarray(x))
        fin = a[np.isfinite(a)]
        m = float(fin.max()) if fin.size else math.inf
        out.append("zero" if m == 0 else "non-finite" if not math.isfinite(m) else math.floor(math.log10(m)))
    return tuple(out)


def _describe(leaves) -> str:
    parts = []
    for x in leaves:
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            parts.append(f"{getattr(x.dtype, 'name', x.dtype)}{list(np.shape(x))}")  # extended dtypes too
    return ", ".join(parts)


# -- one rule, as recorded -----------------------------------------------------------------------------
@dataclasses.dataclass
class _Point:
    """One captured call: the callable to check, its arguments, how it was captured."""

    f: object
    args: tuple
    how: str
    shapes: str
    nondiff: tuple = ()
    test: str = ""


@dataclasses.dataclass
class _Seen:
    name: str
    kind: str
    where: Where
    rule_at: str = ""
    calls: int = 0
    tests: dict = dataclasses.field(default_factory=dict)  # test id -> None (ordered set)
    points: list = dataclasses.field(default_factory=list)
    buckets: dict = dataclasses.field(default_factory=dict)  # (signature, magnitudes) -> count
    traced: int = 0  # calls whose operands were not concrete
    outer: int = 0  # outer derivative calls kept for it

    @property
    def key(self) -> tuple:
        return (os.path.abspath(self.where.file), self.where.line, self.where.name)


def _rule_of(obj, kind: str) -> tuple[Where, str] | None:
    """(primal, rule location) of a rule object, or None when its primal has no Python source."""
    primal = _where_fn(_primal_function(obj) if kind != "custom_vmap" else obj.fun)
    if primal is None or not primal.file:
        return None
    rule = None
    for attr in ("jvp", "bwd", "vmap_rule", "fn_jvp", "fn_bwd"):
        fn = getattr(obj, attr, None)
        if callable(fn):
            rule = _where_fn(fn)
            if rule is not None and rule.file.replace(os.sep, "/").endswith(_LIFTED_RULES):
                caller = _caller_rule(fn)
                if caller is not None:  # the rule is the caller's: the rule and its primal are named by it
                    return caller, str(caller)
            break
    return primal, str(rule) if rule else ""


# Modules whose custom_vjp rules only pass on a rule their caller gives (Flax's lifted
# ``custom_vjp``: ``flax.core.lift.custom_vjp``, behind ``flax.linen.custom_vjp``). Such a
# rule belongs to the caller (its backward function), not to the library that lifts it.
_LIFTED_RULES = ("flax/core/lift.py",)
_LIFTING = ("flax/core/", "flax/linen/transforms.py", "flax/linen/module.py")


def _caller_rule(bwd) -> Where | None:
    """The first function outside the lifting modules that a lifted backward pass calls through."""
    cells = dict(zip(bwd.__code__.co_freevars, bwd.__closure__ or ()))
    with contextlib.suppress(ValueError, KeyError):
        for f in _functions_in(cells["backward_fn"].cell_contents):
            if not any(d in f.__code__.co_filename.replace(os.sep, "/") for d in _LIFTING):
                return _where_fn(f)
    return None


class Recorder:
    """Records the custom rules of one package that run while it is installed (see the module doc)."""

    def __init__(self, package: str, *, dirs: list[str] | None = None):
        self.package = package
        self.dirs = dirs if dirs is not None else package_dirs(package)
        self.rules: dict[tuple, _Seen] = {}
        self.outer: list[tuple] = []  # (function, args, kwargs, test id)
        self.test = ""
        self._inside = {}  # file -> under the package
        self._saved: list[tuple] = []
        self._local = threading.local()
        self.errors: list[str] = []  # recording failures (never raised into a test)
        self.active = False  # False: every wrapper only calls the original (after restore)
        self.primitives: dict = {}  # primitive -> its _Seen (kind "primitive jvp"), for the package's rules
        self._looked_at: set = set()  # primitives of the registry already looked at
        self._registry_size = -1
        self._prim_saved: list[tuple] = []  # (primitive, had its own bind, that bind)
        self.watch: _PackageWatch | None = None  # the package's primitives met when capturing (after the session)
        self.test_files: set = set()  # the session's test modules (set by the plugin after collection)
        self.test_doubles: list = []  # rules defined in them: set aside, not checked

    # -- installing ------------------------------------------------------------------------------
    def install(self) -> None:
        """Wrap the rule classes' ``__call__`` and JAX's derivative transformations (see the module doc)."""
        from jax._src import custom_batching, custom_derivatives

        classes = [(custom_derivatives.custom_jvp, "custom_jvp"), (custom_derivatives.custom_vjp, "custom_vjp"),
                   (custom_batching.custom_vmap, "custom_vmap")]
        with contextlib.suppress(ImportError):
            from equinox import _ad as eqx_ad

            classes += [(eqx_ad.filter_custom_jvp, "custom_jvp"), (eqx_ad.filter_custom_vjp, "custom_vjp")]
        for cls, kind in classes:
            original = cls.__dict__["__call__"]
            self._saved.append((cls, "__call__", original))
            cls.__call__ = self._call_wrapper(original, kind, eqx=cls.__module__.startswith("equinox"))
        from jax._src import api

        for name in DERIVATIVE_TRANSFORMS:
            original = getattr(jax, name, None)
            if original is None:
                continue
            wrapper = self._transform_wrapper(original, name)
            for owner in (jax, api):
                if getattr(owner, name, None) is original:
                    self._saved.append((owner, name, original))
                    setattr(owner, name, wrapper)
        self.active = True
        self.watch_primitives()

    def watch_primitives(self) -> None:
        """Wrap the ``bind`` of primitives whose registered JVP rule is defined under the package.

        Cheap when the registry has not grown: called again before each test, since the
        package registers its primitives when the tests import it.
        """
        if not self.active or len(ad.primitive_jvps) == self._registry_size:
            return
        self._registry_size = len(ad.primitive_jvps)
        for prim, jvp in list(ad.primitive_jvps.items()):
            if prim in self._looked_at:
                continue
            self._looked_at.add(prim)
            try:
                named = rule_function(jvp)
            except Exception:  # noqa: BLE001, S112 (a registered object jgc cannot read: not the package's)
                continue
            if named is None or not named[1] or not self._under_package(named[0].file):
                continue
            where = named[0]
            self.primitives[prim] = _Seen(prim.name, JVP_KIND, where, str(where))
            own = vars(prim).get("bind")
            self._prim_saved.append((prim, "bind" in vars(prim), own))
            prim.bind = self._bind_wrapper(prim, prim.bind)

    def restore(self) -> None:
        """Put back every original, exactly (the same objects)."""
        self.active = False
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)
        while self._prim_saved:
            prim, had, own = self._prim_saved.pop()
            if had:
                prim.bind = own
            else:
                vars(prim).pop("bind", None)

    def _depth(self, what: str) -> int:
        return getattr(self._local, what, 0)

    @contextlib.contextmanager
    def _entered(self, what: str):
        setattr(self._local, what, self._depth(what) + 1)
        try:
            yield
        finally:
            setattr(self._local, what, self._depth(what) - 1)

    def _call_wrapper(self, original, kind: str, *, eqx: bool):
        recorder = self

        @functools.wraps(original)
        def __call__(obj, *args, **kwargs):
            # Inside an Equinox rule, its own jax.custom_jvp/custom_vjp call is not another rule.
            if recorder.active and recorder._depth("recording") == 0 and recorder._depth("eqx") == 0:
                with recorder._entered("recording"):
                    try:
                        recorder._record(obj, kind, args, kwargs)
                    except Exception as e:  # noqa: BLE001 (a recording failure never reaches the test)
                        recorder.errors.append(f"{type(e).__name__}: {e}")
            if eqx:
                with recorder._entered("eqx"):
                    return original(obj, *args, **kwargs)
            return original(obj, *args, **kwargs)

        return __call__

    def _bind_wrapper(self, prim, original):
        recorder = self

        @functools.wraps(original)
        def bind(*args, **params):
            if recorder.active and recorder._depth("recording") == 0:
                with recorder._entered("recording"):
                    try:
                        recorder._record_primitive(prim, original, args, params)
                    except Exception as e:  # noqa: BLE001 (a recording failure never reaches the test)
                        recorder.errors.append(f"{type(e).__name__}: {e}")
            return original(*args, **params)

        return bind

    def _transform_wrapper(self, original, name: str):
        recorder = self
        takes_fun_first = name in ("vjp", "jvp", "linearize")  # these are called with the primals at once

        @functools.wraps(original)
        def transform(fun, *targs, **tkwargs):
            if takes_fun_first:
                primals = targs[0] if name == "jvp" and targs else targs
                return recorder._outer_call(lambda: original(fun, *targs, **tkwargs), fun, tuple(primals), {})
            g = original(fun, *targs, **tkwargs)

            @functools.wraps(g)
            def transformed(*args, **kwargs):
                return recorder._outer_call(lambda: g(*args, **kwargs), fun, args, kwargs)

            return transformed

        return transform

    def _outer_call(self, run, fun, args, kwargs):
        """Run a derivative transformation; keep (fun, args) when a rule inside ran on tracers of jit."""
        if not self.active or self._depth("outer") > 0:
            return run()
        self._local.missed = set()
        with self._entered("outer"):
            out = run()
        missed, self._local.missed = self._local.missed, set()
        if missed and len(self.outer) < OUTER_IN_ALL:
            with contextlib.suppress(Exception):
                leaves = jax.tree_util.tree_leaves((args, kwargs))
                if not any(isinstance(x, jax.core.Tracer) for x in leaves):
                    todo = [r for r in map(self._seen_by_key, missed) if r is not None and r.outer < OUTER_PER_RULE]
                    if todo:
                        for r in todo:
                            r.outer += 1
                        copy = jax.tree_util.tree_map(lambda x: np.array(x) if isinstance(x, np.ndarray) else x,
                                                      (args, kwargs))
                        self.outer.append((fun, copy[0], copy[1], self.test))
        return out

    # -- recording one call ------------------------------------------------------------------------
    def _under_package(self, file: str) -> bool:
        hit = self._inside.get(file)
        if hit is None:
            path = os.path.abspath(file)
            hit = self._inside[file] = any(path == d or path.startswith(d) for d in self.dirs) \
                and not _is_wrapper_file(path)
        return hit

    def _seen(self, obj, kind: str) -> _Seen | None:
        # Most calls are of other packages' rules (JAX's relu, logsumexp...): known by the primal's file alone.
        primal = _where_fn(_primal_function(obj) if kind != "custom_vmap" else obj.fun)
        if primal is None or not primal.file or not (self._under_package(primal.file) or primal.file.replace(
                os.sep, "/").endswith(_LIFTED_RULES)):
            return None
        found = _rule_of(obj, kind)
        if found is None or not self._under_package(found[0].file):
            return None
        primal, rule_at = found
        key = (os.path.abspath(primal.file), primal.line, primal.name)
        r = self.rules.get(key)
        if r is None:
            r = self.rules[key] = _Seen(primal.name, kind, primal, rule_at)
        return r

    def _record(self, obj, kind: str, args: tuple, kwargs: dict) -> None:
        r = self._seen(obj, kind)
        if r is None:
            return
        r.calls += 1
        if self.test:
            r.tests.setdefault(self.test, None)
        if len(r.points) >= KEPT_PER_RULE:
            return
        if kwargs:
            with contextlib.suppress(TypeError, ValueError):
                bound = inspect.signature(_primal_function(obj) if kind != "custom_vmap" else obj.fun)\
                    .bind(*args, **kwargs)
                if not bound.kwargs:
                    args, kwargs = tuple(bound.args), {}
        if kwargs:
            return  # keyword-only arguments: the rule cannot be called as f(*args)
        try:
            with jax.transfer_guard("allow"):  # reading lane 0 under vmap copies to the host
                concrete = jax.tree_util.tree_map(_concrete_leaf, args)
        except _NotConcrete:
            self._not_concrete(r)
            return
        with jax.transfer_guard("allow"):
            leaves = jax.tree_util.tree_leaves(concrete)
            sig = _signature(leaves)
            if sum(n for (s, _), n in r.buckets.items() if s == sig) >= KEPT_PER_SIGNATURE:
                return
            bucket = (sig, _decade(leaves))
        if bucket in r.buckets:
            r.buckets[bucket] += 1
            return
        r.buckets[bucket] = 1
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args))
        how = ("concrete call" if not traced else "primal values under grad/jvp/vmap") + \
            (f" in {self.test}" if self.test else "")
        r.points.append(_Point(obj, concrete, how, _describe(leaves)))

    def _not_concrete(self, r) -> None:
        """A call of ``r`` whose operands are traced values: counted, and marked for the test's
        outer derivative call to capture (where one is kept)."""
        r.traced += 1
        missed = getattr(self._local, "missed", None)
        if missed is not None:
            missed.add(r.key)

    def _record_primitive(self, prim, bind, args: tuple, params: dict) -> None:
        r = self.primitives[prim]
        r.calls += 1
        if self.test:
            r.tests.setdefault(self.test, None)
        if len(r.points) >= KEPT_PER_RULE:
            return
        try:
            with jax.transfer_guard("allow"):
                concrete = tuple(_concrete_leaf(x) for x in args)
        except _NotConcrete:
            self._not_concrete(r)
            return
        with jax.transfer_guard("allow"):
            bucket = (_signature(concrete), _decade(concrete))
        if bucket in r.buckets or not any(jnp.issubdtype(getattr(x, "dtype", np.int32), jnp.inexact)
                                          for x in concrete):
            return
        r.buckets[bucket] = 1
        traced = any(isinstance(x, jax.core.Tracer) for x in args)
        how = ("concrete call" if not traced else "primal values under grad/jvp/vmap") + \
            (f" in {self.test}" if self.test else "")
        r.points.append(_Point(functools.partial(_bind_with, bind, params), concrete, how, _describe(concrete),
                               test=self.test))

    def set_aside_test_doubles(self) -> None:
        """Move the rules defined in the session's test modules (:attr:`test_files`) to :attr:`test_doubles`.

        A package that ships its tests inside it (optax) has rules defined in its test
        functions: test doubles (optax's ``test_fun_derivative_not_used`` defines a JVP rule
        that raises on purpose, to show it is never called), not rules of the package.
        """
        files = {os.path.abspath(f) for f in self.test_files}
        for k in [k for k, r in self.rules.items() if os.path.abspath(r.where.file) in files]:
            self.test_doubles.append(self.rules.pop(k))

    def _seen_by_key(self, key: tuple) -> _Seen | None:
        r = self.rules.get(key)
        if r is None:
            r = next((p for p in self.primitives.values() if p.key == key), None)
        return r

    # -- after the session: operands of rules run inside jit ----------------------------------------
    def capture_outer(self, deadline: float) -> None:
        """Trace each kept outer call and interpret it at its arguments: the rules' operands inside jit.

        The package's primitives met there, and those called during the tests, become the
        call sites of :attr:`watch` (traced once each, as :func:`jgc.check_rules` captures them).
        """
        self.watch = _PackageWatch(self._under_package, set(self.primitives))
        calls = [(p.f, p.args, {}, p.test) for r in self.primitives.values() for p in r.points]
        for fun, args, kwargs, test in self.outer + calls:
            if time.perf_counter() > deadline:
                break
            try:
                self._capture_one(fun, args, kwargs, test)
            except Exception as e:  # noqa: BLE001 (a function that cannot be traced again: noted, not raised)
                self.errors.append(f"re-tracing {getattr(fun, '__name__', fun)}: {type(e).__name__}: {e}")

    def _capture_one(self, fun, args, kwargs, test: str) -> None:
        if self.watch is not None:
            self.watch.test = test
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        dyn_at = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray))]

        def rebuilt(dyn):
            full = list(leaves)
            for i, x in zip(dyn_at, dyn):
                full[i] = x
            a, k = jax.tree_util.tree_unflatten(treedef, full)
            return fun(*a, **k)

        dyn = [jnp.asarray(leaves[i]) for i in dyn_at]
        closed = jax.make_jaxpr(rebuilt)(dyn)
        col = _Collector(self.watch)
        col.discover(closed.jaxpr)
        col.run(closed.jaxpr, closed.consts, dyn)
        for (kind, primal, rule), rr in col.rules.items():
            r = self.rules.get((os.path.abspath(primal.file), primal.line, primal.name))
            if r is None:
                continue
            for site in rr.sites.values():
                eqn = site.eqn
                if _closes_over_traced_values(eqn):
                    continue
                for cap in site.first + ([site.extreme] if site.extreme is not None else []):
                    if len(r.points) >= KEPT_PER_RULE:
                        break
                    ops = tuple(cap.operands)
                    bucket = (_signature(ops), _decade(ops))
                    if bucket in r.buckets:
                        continue
                    r.buckets[bucket] = 1
                    nc = eqn.params["num_consts"]
                    how = "captured inside jit by re-tracing " + getattr(fun, "__name__", "the function") + \
                        (f" in {test}" if test else "")
                    r.points.append(_Point(_bound(eqn), ops, how, _describe(ops[nc:]), tuple(range(nc))))


def _bind_with(bind, params, *args):
    return bind(*args, **params)


class _PackageWatch(PrimitiveWatch):
    """The primitives the recorder wrapped (rules defined under the package), watched as check_rules does."""

    def __init__(self, inside, prims: set):
        super().__init__("user")
        self.test = ""  # the test whose call is being traced again
        self._prims = prims
        self._inside = inside

    def site(self, eqn, under: tuple, parent=None, jaxpr=None):
        s = super().site(eqn, under, parent, jaxpr)
        if self.test and (not s.at.file or os.path.abspath(s.at.file).startswith(_JGC_DIR)):
            s.at = Where(self.test, self.test, 0)  # bound by the recorder's re-tracing: named by its test
        return s

    def _rule(self, prim):
        if prim not in self._known:
            r = super()._rule(prim) if prim in self._prims else None
            self._known[prim] = r if r is not None and self._inside(r.jvp.file) else None
        return self._known[prim]


def _bound(eqn):
    """The rule equation bound again: a function of its operands whose derivatives run the rule."""

    def rule_call(*ops):
        return compat.bind(eqn, *ops)

    rule_call.__qualname__ = rule_call.__name__ = str(eqn.primitive.name)
    return rule_call


# -- checking ---------------------------------------------------------------------------------------
def _worse(a: str, b: str) -> str:
    return min(a, b, key=lambda s: STATUSES.index(s) if s in STATUSES else len(STATUSES))


def _combined(a: str | None, b: str) -> str:
    """A rule's status over its points: wrong or raising anywhere wins; else a point checked beats one not."""
    if a is None:
        return b
    if "not checked" in (a, b) and {a, b} - {"mismatch", "error", "not checked"}:
        return next(s for s in (a, b) if s != "not checked")
    return _worse(a, b)


def _is_extended(x) -> bool:
    """An extended dtype other than a PRNG key's (keys are held like any integer operand)."""
    ext, key = getattr(jax.dtypes, "extended", None), getattr(jax.dtypes, "prng_key", None)
    dtype = getattr(x, "dtype", None)
    return ext is not None and dtype is not None and jnp.issubdtype(dtype, ext) and \
        not (key is not None and jnp.issubdtype(dtype, key))


def _not_reproducible(p: _Point) -> str:
    """Why the primal cannot be checked at this point, when two calls at the same operands differ; else "".

    A function that reads state outside its arguments (Flax's lifted ``custom_vjp`` during
    ``init`` draws new parameters from the module's random stream at each call) has no
    derivative at its operands to compare with: every check would pair two different draws.
    """
    with contextlib.suppress(Exception):  # a primal that raises is judged by check_rule itself
        a, b = (jax.tree_util.tree_leaves(p.f(*p.args)) for _ in range(2))
        for x, y in zip(a, b):
            x, y = np.asarray(x), np.asarray(y)
            if not jnp.issubdtype(x.dtype, jnp.inexact):
                continue
            scale = max(float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0)), 1e-30)
            diff = np.abs(np.where(np.isfinite(x) & np.isfinite(y), x - y, 0.0))
            # Beyond rounding (a reduction's order may vary between runs, ~1e-7 relative in
            # float32), far below the O(1) change of a new random draw.
            if np.max(diff, initial=0.0) > REPRODUCIBLE_RTOL * scale:
                return ("the primal gives different values when called twice at the same operands (it reads "
                        "state outside its arguments, e.g. a random draw during init): no derivative to compare")
    return ""


def _check_point(r: _Seen, p: _Point, options: dict) -> dict:
    """One captured call through :func:`jgc.check_rule`: status, the checks that ran, the worst element."""
    extended = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(p.args) if _is_extended(x)})
    if extended:  # Flax's fp8_meta32 (gradients accumulated by max): no perturbation or tangent of it to make
        return {"status": "not checked", "checks": {}, "worst": None,
                "reason": f"operands of JAX extended dtypes ({', '.join(extended)}): not checked"}
    why = _not_reproducible(p)
    if why:
        return {"status": "not checked", "reason": why, "checks": {}, "worst": None}
    try:
        rep = check_rule(p.f, *p.args, nondiff_argnums=p.nondiff, **options)
    except Exception as e:  # noqa: BLE001 (the rule raised at its own captured operands: an error)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        # A point where the primal itself is not finite (xlog1py at y = -1) has no derivative
        # to compare: that point is not checked, and the rule's other points still are.
        status = "not checked" if "non-finite" in msg else "error"
        return {"status": status, "reason": f"{type(e).__name__}: {msg}", "checks": {}, "worst": None}
    rr = rep.rules[0]
    checks = {}
    for s in rr.sites:
        if s.check:
            checks[s.check] = _worse(checks.get(s.check, "intended"), s.status) if s.check in checks else s.status
    worst = None
    bad = next((s for s in rr.sites if s.status == "mismatch"), None)
    if bad is not None:
        worst = {"check": bad.check, "at": bad.at,
                 "element": bad.worst.describe() if bad.worst is not None else bad.reason}
    status = rr.status if rr.status in STATUSES else "not checked"
    reason = rr.reason or (bad.reason if bad is not None else "")
    if status == "error" and "non-finite" in reason:  # as above: no derivative to compare at this point
        status = "not checked"
    surrogate = _user_intended(r.where) or _library_intended(r.where)
    against_primal = {"jvp", "vjp", "order 2"} | ({"dot-product"} if r.kind == "custom_vjp" else set())
    failed = {c for c, st in checks.items() if st == "mismatch"}
    if surrogate and status == "mismatch" and failed <= against_primal:
        # A surrogate differs from its primal's derivative on purpose; for a custom_vjp the
        # dot-product check pairs the primal's JVP with the VJP rule, so it differs too.
        # Its identities (primal, linearity, batching, symbolic zeros) still hold it.
        checks = {c: "intended" if c in failed else st for c, st in checks.items()}
        return {"status": "intended", "reason": surrogate, "checks": checks, "worst": None}
    return {"status": status, "reason": reason, "checks": checks, "worst": worst}


def check_recorded(rec: Recorder, *, budget: float, points: int = 3, options: dict | None = None) -> list[dict]:
    """Check every recorded rule on up to ``points`` distinct captures within ``budget`` seconds.

    Every rule gets its first capture checked before any rule gets a second, so a tight
    budget still covers each rule once; a rule found wrong is not checked further.
    """
    options = dict(options or {})
    t0 = time.perf_counter()
    deadline = t0 + budget
    rec.set_aside_test_doubles()
    rec.capture_outer(t0 + budget / 4)
    results = {k: {"status": None, "checks": {}, "worst": None, "reason": "", "points": []} for k in rec.rules}
    for round_ in range(points):
        for k, r in rec.rules.items():
            res = results[k]
            if round_ >= len(r.points) or res["status"] in ("mismatch", "error"):
                continue
            if time.perf_counter() > deadline:
                break
            p = r.points[round_]
            one = _check_point(r, p, options)
            res["points"].append({"operands": p.shapes, "captured": p.how, "status": one["status"]})
            res["status"] = _combined(res["status"], one["status"])
            for c, s in one["checks"].items():
                res["checks"][c] = _worse(res["checks"][c], s) if c in res["checks"] else s
            if one["worst"] is not None and res["worst"] is None:
                res["worst"] = one["worst"]
            if one["reason"] and one["status"] == res["status"]:
                res["reason"] = one["reason"]
    out = []
    for k, r in rec.rules.items():
        res = results[k]
        status, reason = res["status"], res["reason"]
        if status is None:
            status = "not checked"
            if not r.points and r.traced:
                reason = (f"its {r.traced} call(s) ran inside jit on traced values, and no derivative of a "
                          "function of concrete arguments around them was taken (grad, vjp, jvp, jacfwd, ...)")
            elif not r.points:
                reason = "no call with floating-point arrays was seen"
            else:
                reason = f"the time budget ran out before it was checked (--jgc-budget, {budget:g} s)"
        out.append({"name": r.name, "kind": r.kind, "defined_at": str(r.where), "rule_at": r.rule_at,
                    "status": status, "reason": reason, "calls": r.calls, "tests": list(r.tests),
                    "checks": res["checks"], "worst": res["worst"], "points": res["points"],
                    "captured": len(r.points)})
    return out + _check_primitives(rec, deadline, points, options)


def _check_primitives(rec: Recorder, deadline: float, points: int, options: dict) -> list[dict]:
    """The package's primitive rules: each JVP rule (and transpose rule) at up to ``points`` call sites."""
    watch = rec.watch
    wanted = options.get("checks")
    out = []
    for seen in rec.primitives.values():
        base = {"name": seen.name, "calls": seen.calls, "tests": list(seen.tests), "captured": len(seen.points)}
        found = [r for r in (watch.rules.values() if watch is not None else ()) if r.name == seen.name
                 and r.jvp == seen.where]
        rule = found[0] if found else None
        entry = {**base, "kind": JVP_KIND, "defined_at": str(seen.where), "rule_at": str(seen.where),
                 "status": "not checked", "reason": "", "checks": {}, "worst": None, "points": []}
        if not seen.calls:
            out.append({**entry, "status": "not exercised", "reason": "no test ran it"})
            continue
        if rule is None or not rule.sites:
            entry["reason"] = (f"its {seen.traced} call(s) ran inside jit on traced values, and no derivative of "
                               "a function of concrete arguments around them was taken" if seen.traced else
                               "no call with floating-point arrays was seen")
            out.append(entry)
            continue
        if wanted and not {"jvp", "vjp"} & set(wanted):
            out.append({**entry, "reason": "--jgc-checks names neither jvp nor vjp"})
            continue
        if time.perf_counter() > deadline:
            out.append({**entry, "reason": "the time budget ran out before it was checked (--jgc-budget)"})
            continue
        sites = list(rule.sites.values())[:points]
        one = dataclasses.replace(rule, sites={i: s for i, s in enumerate(sites)})
        try:
            reports = check_primitive_rules(types.SimpleNamespace(rules={0: one}), {}, jax.random.PRNGKey(0), None)
        except Exception as e:  # noqa: BLE001 (the rule raised at its own captured operands: an error)
            out.append({**entry, "status": "error", "reason": f"{type(e).__name__}: {e}"})
            continue
        for rep in reports:
            out.append({**base, **_primitive_verdict(rep, sites)})
    return out


def _primitive_verdict(rep, sites: list) -> dict:
    """The plugin's entry for one :class:`RuleReport` of a primitive rule."""
    check = "jvp" if rep.kind == JVP_KIND else "transpose"
    status = rep.status if rep.status in STATUSES else "not checked"
    bad = next((s for s in rep.sites if s.status == "mismatch"), None)
    worst = None
    if bad is not None:
        worst = {"check": check, "at": bad.at,
                 "element": bad.worst.describe() if bad.worst is not None else bad.reason}
    pts = [{"operands": ", ".join(str(v.aval) for v in site.eqn.invars),
            "captured": f"{site.calls} call(s) in {sr.at}", "status": sr.status} for site, sr in zip(sites, rep.sites)]
    return {"kind": rep.kind, "defined_at": rep.rule_at, "rule_at": rep.rule_at, "status": status,
            "reason": rep.reason, "checks": {check: status}, "worst": worst, "points": pts}


# -- the scan's result: merged, with the rules no test ran, the known failures -----------------------
def merge(results: list[list[dict]]) -> list[dict]:
    """The results of several processes (pytest-xdist workers) as one list, one entry per rule."""
    by: dict[tuple, dict] = {}
    for res in results:
        for d in res:
            k = (d["defined_at"], d["name"])
            if k not in by:
                by[k] = json.loads(json.dumps(d))
                continue
            m = by[k]
            m["status"] = _worse(m["status"], d["status"])
            if m["status"] == d["status"] and d["reason"]:
                m["reason"] = d["reason"]
            m["calls"] += d["calls"]
            m["tests"] += [t for t in d["tests"] if t not in m["tests"]]
            for c, s in d["checks"].items():
                m["checks"][c] = _worse(m["checks"][c], s) if c in m["checks"] else s
            m["worst"] = m["worst"] or d["worst"]
            m["points"] += d["points"]
            m["captured"] += d["captured"]
    return list(by.values())


def add_not_exercised(results: list[dict], static: list[dict]) -> list[dict]:
    """The static rules no recorded rule matches, as "not exercised" entries."""
    ran = []
    for d in results:
        file, _, line = d["defined_at"].rpartition(":")
        ran.append((file, int(line) if line.isdigit() else 0))
    out = list(results)
    for s in static:
        shown = _display_path(s["file"])
        if any(f == shown and s["line"] <= ln <= s["last"] for f, ln in ran):
            continue
        out.append({"name": s["name"], "kind": s["kind"], "defined_at": f"{shown}:{s['line']}", "rule_at": "",
                    "status": "not exercised", "reason": "no test ran it", "calls": 0, "tests": [],
                    "checks": {}, "worst": None, "points": [], "captured": 0})
    return out


def _known_key(d: dict) -> tuple:
    # By file and name, not line: a known failure stays known when lines above it move.
    return (d["defined_at"].rpartition(":")[0] or d["defined_at"], d["name"])


def read_known(path: str) -> set:
    """The (file, name) of every rule listed in a known-failures file."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    entries = data.get("known_failures", []) if isinstance(data, dict) else data
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e and "defined_at" in e
                                                for e in entries):
        raise ValueError(f"--jgc-known={path}: expected {{\"known_failures\": [{{\"name\": ..., \"defined_at\": "
                         "\"file:line\"}, ...]}} (as --jgc-write-known writes it).")
    return {_known_key(e) for e in entries}


def write_known(path: str, results: list[dict]) -> int:
    """Write the failing rules as a known-failures file; return how many."""
    bad = [{"name": d["name"], "defined_at": d["defined_at"], "status": d["status"],
            "check": (d["worst"] or {}).get("check", "")} for d in results if d["status"] in FAILING]
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"known_failures": bad}, fh, indent=2)
        fh.write("\n")
    return len(bad)


FAILING = ("mismatch",)


def finish(results: list[dict], known: set) -> list[dict]:
    """Sorted, failing first, each failing rule marked ``known`` when the known-failures file lists it."""
    for d in results:
        d["known"] = d["status"] in FAILING and _known_key(d) in known
    return sorted(results, key=lambda d: (STATUSES.index(d["status"]) if d["status"] in STATUSES else 99,
                                          d["known"], d["defined_at"]))


def unexpected(results: list[dict]) -> list[dict]:
    """The failing rules the known-failures file does not list: these fail the session."""
    return [d for d in results if d["status"] in FAILING and not d.get("known")]


def summary_lines(results: list[dict], *, package: str, seconds: float, notes: list[str]) -> list[str]:
    """The terminal summary: one line per rule, failing first, with the worst element under each."""
    n = {s: sum(d["status"] == s for d in results) for s in STATUSES}
    counts = ", ".join(f"{c} {s}" for s, c in n.items() if c)
    lines = [f"jgc rules of {package}: {len(results)} rule(s): {counts or 'none found'}; checks {seconds:.1f} s"]
    for d in results:
        tests = d["tests"]
        shown = ", ".join(tests[:2]) + (f" (+{len(tests) - 2})" if len(tests) > 2 else "")
        status = d["status"] + (" (known)" if d.get("known") else "")
        lines.append(f"{status:<14} {d['kind']:<11} {d['name']} {d['defined_at']}  tests: {len(tests)}"
                     + (f" [{shown}]" if shown else "") + f"  points: {len(d['points'])}")
        if d["worst"]:
            lines.append(f"    found by {d['worst']['check']}: {d['worst']['element']}")
        elif d["reason"] and d["status"] not in ("ok",):
            lines.append(f"    {d['reason']}")
    if n["not exercised"]:
        lines.append("not exercised: rules found in the package's files that no test ran (rules defined inside "
                     "functions are seen only when a test runs them)")
    lines += [f"note: {x}" for x in notes]
    return lines


def report_json(results: list[dict], *, package: str, seconds: float, notes: list[str]) -> dict:
    for d in results:
        d["tests"] = list(d["tests"])
    return {"package": package, "seconds": seconds, "notes": notes, "rules": results}
