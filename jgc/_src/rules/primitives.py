"""Derivative rules registered on primitives: found in the traced loss, checked at their captured operands.

A library (lineax's ``linear_solve``, built with Equinox's ``filter_primitive_def`` /
``filter_primitive_jvp`` / ``filter_primitive_transpose``) or a user can define a
primitive and register its JVP rule in ``jax.interpreters.ad.primitive_jvps`` and its
transpose rule in ``ad.primitive_transposes``. Each equation of such a primitive in the
loss's jaxpr is a call site: its operands are captured in the same eager pass as the
custom rules' (:class:`PrimitiveWatch` is the hook the collector of ``sites`` calls),
and the rule is checked alone on them.

* **JVP rule.** ``jax.jvp`` of the primitive bound again (forward mode runs the
  registered JVP rule) against central differences of the primitive's own evaluation.
* **Transpose rule.** ``jax.vjp`` of the same function (reverse mode linearises with
  the JVP rule and transposes the linear primitives the JVP emits with their transpose
  rules) against the JVP, by the identity ⟨u, J t⟩ = ⟨Jᵀ u, t⟩: exact, no differences.
  Checked where the JVP emits the primitive itself on the tangents (else the transpose
  rule takes no part in the gradient).

An operand computed from other operands of the same equation through
``stop_gradient`` (a factorisation that lineax hands the solve as its "state") is not
perturbed on its own: it is recomputed from the perturbed operands, so the differences
move it as the program would, while its tangent stays zero, as the rule expects.

Rules whose functions all live in JAX (``jax._src``, ``jaxlib``) are JAX's own, tested
by JAX, and those of Equinox's own primitives are its plumbing (``unvmap_any``,
``select_if_vmap``...); they are checked only with ``primitives="all"``. A primitive
with no floating output has nothing to differentiate and is not watched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.interpreters import ad, batching

from .. import compat, trees
from ..jacobian import check_jacobian
from ..products import check_jvp, check_vjp
from .paths import Paths
from .report import RuleReport, SiteReport, Worst, as_approximate, relative_error
from .sites import CALL_PRIMS, KINDS, REMAT_PRIMS, _site_base, _Site, _subjaxprs, call_site
from .sources import Where, _functions_in, _pkg_dir
from .surrogates import primitive_approximate

# The registry of batching rules, a dict (JAX wraps what is set in ``primitive_batchers`` into it).
_BATCHERS = getattr(batching, "fancy_primitive_batchers", batching.primitive_batchers)
# Values of ``check_rules(primitives=...)``.
PRIMITIVES = ("user", "all", "none")
JVP_KIND, TRANSPOSE_KIND = "primitive jvp", "primitive transpose"

# Packages whose own primitives are machinery, not a user's or a library's rules: JAX's
# built-ins (tested by JAX) and Equinox's (its loop and vmap plumbing: unvmap_any,
# select_if_vmap, maybe_set, nondifferentiable...). Equinox's wrappers around the
# functions another library registers (filter_primitive_jvp, as lineax does) are seen
# through to that library's function.
_OWN_DIRS = tuple(d for d in (_pkg_dir("jax"), _pkg_dir("jaxlib"), _pkg_dir("equinox")) if d)
# Constructs, not primitives with rules of their own: the collector steps through them.
_CONSTRUCTS = frozenset(KINDS) | frozenset(CALL_PRIMS) | frozenset(REMAT_PRIMS) | {"scan", "while", "cond"}
# Bound on the equations recomputed for an operand derived through stop_gradient
# (a factorisation is a handful): beyond it the operand is held fixed instead.
MAX_DERIVED_EQNS = 64
# As check.FULL_JACOBIAN_COORDINATES: every Jacobian entry up to this many perturbed
# coordinates (2 evaluations each), random directions above.
FULL_JACOBIAN_COORDINATES = 256


# -- naming the rule functions ---------------------------------------------------------------------
def _is_own_file(path: str) -> bool:
    path = os.path.abspath(path)
    return any(path.startswith(d) for d in _OWN_DIRS)


def _where(fn) -> Where:
    code = fn.__code__
    return Where(getattr(fn, "__qualname__", fn.__name__), code.co_filename, code.co_firstlineno)


def rule_function(registered) -> tuple[Where, bool] | None:
    """(the function behind a registered rule, whether it lives outside JAX and Equinox), or None.

    Equinox's and JAX's wrappers (``filter_primitive_jvp``, ``ad.defjvp``'s partials)
    are seen through to the function they hold.
    """
    fns = list(_functions_in(registered))
    for f in fns:
        if not _is_own_file(f.__code__.co_filename):
            return _where(f), True
    wrappers = ("interpreters/ad.py", "equinox/internal/_primitive.py")
    own = [f for f in fns if not f.__code__.co_filename.replace(os.sep, "/").endswith(wrappers)]
    return (_where((own or fns)[0]), False) if (own or fns) else None


def _inexact(v) -> bool:
    return jnp.issubdtype(getattr(getattr(v, "aval", None), "dtype", np.int32), jnp.inexact)


@dataclasses.dataclass
class _PrimRule:
    name: str
    impl: Where
    jvp: Where
    transpose: Where | None
    sites: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Derived:
    """Operands recomputed from the others: their positions, and the equations that compute them."""

    positions: tuple
    eqns: tuple

    def recompute(self, eqn, full: list) -> list:
        env = {v: x for v, x in zip(eqn.invars, full) if not isinstance(v, jcore.Literal)}
        for e in self.eqns:
            ins = [v.val if isinstance(v, jcore.Literal) else env[v] for v in e.invars]
            out = compat.bind(e, *ins)
            for v, x in zip(e.outvars, out if e.primitive.multiple_results else (out,)):
                env[v] = x
        full = list(full)
        for pos in self.positions:
            full[pos] = env[eqn.invars[pos]]
        return full


def _derived(eqn, jaxpr) -> _Derived | None:
    """Operands of ``eqn`` computed, within ``jaxpr``, from its other operands through stop_gradient."""
    if jaxpr is None:
        return None
    order = {id(e): i for i, e in enumerate(jaxpr.eqns)}
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    operands = [v for v in eqn.invars if not isinstance(v, jcore.Literal)]
    positions, needed = [], {}
    for pos, v in enumerate(eqn.invars):
        if isinstance(v, jcore.Literal) or v not in producer:
            continue
        others = {u for u in operands if u is not v}
        stack, seen, found, blocked, leaves = [v], set(), {}, False, False
        while stack and found is not None:
            u = stack.pop()
            if isinstance(u, jcore.Literal) or u in seen:
                continue
            seen.add(u)
            if u in others:
                leaves = True
                continue
            e = producer.get(u)
            if e is None or len(found) >= MAX_DERIVED_EQNS:
                found = None  # reaches a value that is not an operand: cannot be recomputed here
                break
            found[id(e)] = e
            blocked |= e.primitive.name == "stop_gradient"
            stack.extend(e.invars)
        if found and blocked and leaves:
            positions.append(pos)
            needed.update(found)
    if not positions:
        return None
    return _Derived(tuple(positions), tuple(sorted(needed.values(), key=lambda e: order[id(e)])))


def _library_frame(eqn) -> Where | None:
    """The innermost frame of the equation's traceback outside JAX and Equinox (the library that binds it)."""
    try:
        frames = list(eqn.source_info.traceback.frames)
    except AttributeError:  # no traceback kept
        return None
    fr = next((f for f in frames if not _is_own_file(f.file_name)), None)
    return Where(fr.function_name, fr.file_name, fr.line_num) if fr is not None else None


@dataclasses.dataclass
class _PrimSite(_Site):
    derived: _Derived | None = None


class PrimitiveWatch:
    """The primitives with registered rules that the collector records ("user": defined outside JAX)."""

    def __init__(self, which: str):
        self.which = which
        self.rules: dict[Any, _PrimRule] = {}
        self._known: dict[Any, _PrimRule | None] = {}
        self._sites: dict[tuple, _PrimSite] = {}

    def _rule(self, prim) -> _PrimRule | None:
        if prim in self._known:
            return self._known[prim]
        r = None
        jvp = ad.primitive_jvps.get(prim)
        if jvp is not None and prim.name not in _CONSTRUCTS:
            named = rule_function(jvp)
            if named is not None and (named[1] or self.which == "all"):
                tr = ad.primitive_transposes.get(prim)
                tr_named = rule_function(tr) if tr is not None else None
                impl = rule_function(getattr(prim, "impl", None))
                r = _PrimRule(prim.name, impl[0] if impl else Where(prim.name, "", 0), named[0],
                              tr_named[0] if tr_named else None)
        self._known[prim] = r
        return r

    def wants(self, eqn) -> bool:
        """A primitive with a watched rule, some floating output (else nothing to differentiate), no sub-programs."""
        prim = eqn.primitive
        if prim not in self._known:
            self._rule(prim)
        return self._known[prim] is not None and any(_inexact(v) for v in eqn.outvars) \
            and not any(True for _ in _subjaxprs(eqn))

    def site(self, eqn, under: tuple, parent: Where | None = None, jaxpr=None) -> _PrimSite:
        cached = self._sites.get((id(eqn), under))
        if cached is not None:
            return cached
        r = self._rule(eqn.primitive)
        key = (r.name, r.jvp)
        self.rules.setdefault(key, r)
        at = call_site(eqn)
        if not at.file:  # no frame of the user's (traced inside a library's jit): the caller, else the library
            at = parent or _library_frame(eqn) or at
        skey = (at, under, tuple(str(v.aval) for v in eqn.invars))
        s = r.sites.get(skey)
        if s is None:
            s = r.sites[skey] = _PrimSite(eqn, at, under, derived=_derived(eqn, jaxpr))
        s.eqns.append(eqn)
        self._sites[(id(eqn), under)] = s
        return s


# -- checking ----------------------------------------------------------------------------------------
def _on_path(site: _PrimSite, paths: Paths | None) -> tuple[list, list]:
    eqn = site.eqn
    ops, outs = [True] * len(eqn.invars), [True] * len(eqn.outvars)
    if paths is None:
        return ops, outs
    seen_ops = [paths.operands[id(e)] for e in site.eqns if id(e) in paths.operands]
    seen_outs = [paths.outputs[id(e)] for e in site.eqns if id(e) in paths.outputs]
    if seen_ops:
        ops = [any(o[j] for o in seen_ops) for j in range(len(ops))]
    if seen_outs:
        outs = [any(o[i] for o in seen_outs) for i in range(len(outs))]
    return ops, outs


@dataclasses.dataclass
class _Ready:
    site: _PrimSite
    caps: list
    explicit: list
    varying: list
    f: Any
    held: str


def _site_function(site: _PrimSite, ops: list, varying: list, outs: list):
    """The primitive at one call site as a function of its varying operands (stacked over the calls).

    The calls are unrolled rather than vmapped: a primitive need not have a batching rule.
    """
    eqn, n = site.eqn, len(ops[0])
    prim = eqn.primitive

    def one(i, var):
        full = [x[i] for x in ops]
        for j, pos in enumerate(varying):
            full[pos] = var[j][i]
        if site.derived is not None:
            full = site.derived.recompute(eqn, full)
        out = compat.bind(eqn, *full)
        out = tuple(out) if prim.multiple_results else (out,)
        return tuple(out[k] for k in outs)

    def primitive_at_site(*var):
        res = [one(i, var) for i in range(n)]
        return tuple(jnp.stack([r[k] for r in res]) for k in range(len(outs)))

    primitive_at_site.__qualname__ = prim.name
    return primitive_at_site


def _ready(site: _PrimSite, paths: Paths | None) -> _Ready | SiteReport:
    base = _site_base(site)
    if not site.calls:
        return SiteReport(**base, checked=0, status="not executed",
                          reason="the loss never reached this call at these params and args")
    eqn = site.eqn
    caps = site.first + ([site.extreme] if site.extreme is not None else [])
    ops = [jnp.stack([jnp.asarray(c.operands[j]) for c in caps]) for j in range(len(eqn.invars))]
    on_ops, on_outs = _on_path(site, paths)
    derived = set(site.derived.positions) if site.derived else set()
    inexact = [j for j in range(len(ops)) if trees.is_inexact_array(ops[j]) and j not in derived]
    outs = [i for i, v in enumerate(eqn.outvars)
            if on_outs[i] and jnp.issubdtype(getattr(v.aval, "dtype", np.int32), jnp.inexact)]
    held = []
    if derived:
        held.append(f"operand{'s' * (len(derived) != 1)} {', '.join(f'#{j}' for j in sorted(derived))} "
                    "(computed from the others through stop_gradient: recomputed, not perturbed)")
    varying = []
    for j in inexact:
        if not on_ops[j]:
            held.append(f"#{j} (not on the differentiated path)")
        elif not np.isfinite(np.asarray(ops[j])).all():
            held.append(f"#{j} (non-finite entries)")
        else:
            varying.append(j)
    if not varying or not outs:
        why = ("none of its operands depends on the differentiated parameters" if not varying
               else "none of its outputs reaches the cost's gradient")
        return SiteReport(**base, checked=0, status="not on the differentiated path", reason=why)
    f = _site_function(site, ops, varying, outs)
    return _Ready(site, caps, [ops[j] for j in varying], varying, f, "; ".join(held))


def _leaf_index(path: str) -> int:
    head = path.split("]", 1)[0]
    digits = "".join(ch for ch in head if ch.isdigit())
    return int(digits) if digits else -1


def _verdict(ready: _Ready, rep, leaves: list) -> SiteReport:
    """The SiteReport from the blocks ``leaves`` of ``rep``."""
    failing = [lf for lf in rep.failing() if lf in leaves]
    worst = None
    if failing:
        lf = failing[0]
        k = _leaf_index(lf.path)
        pos = ready.varying[k] if 0 <= k < len(ready.varying) else k
        idx = tuple(lf.input_index)
        x = np.asarray(ready.explicit[k]) if 0 <= k < len(ready.explicit) else None
        inside = x is not None and len(idx) == x.ndim and all(i < s for i, s in zip(idx, x.shape))
        call = int(idx[0]) if inside else None
        worst = Worst(operand=f"#{pos}", index=tuple(idx[1:]) if inside else (), call=call,
                      step=ready.caps[call].where if call is not None else "",
                      input=float(np.real(x[idx])) if inside else None, rule=lf.worst_analytic,
                      numeric=lf.worst_numeric, allowed=lf.worst_bound, block=lf.name)
    return SiteReport(**_site_base(ready.site), checked=len(ready.caps), status="mismatch" if failing else "ok",
                      report=rep, worst=worst, method=rep.mode, held=ready.held, error=relative_error(leaves))


def _error(site, e: Exception) -> SiteReport:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return SiteReport(**_site_base(site), checked=0, status="error", reason=f"{type(e).__name__}: {msg}")


def _check_jvp_rule(ready: _Ready, options: dict, key) -> SiteReport:
    """The JVP rule alone (forward mode): every Jacobian entry when small, random directions when large."""
    coords = sum(int(x.size) for x in ready.explicit)
    if coords <= FULL_JACOBIAN_COORDINATES:
        rep = check_jacobian(ready.f, *ready.explicit, precision="native", mode="fwd", **options)
    else:
        rep = check_jvp(ready.f, *ready.explicit, precision="native", key=key, **options)
    return _verdict(ready, rep, list(rep.leaves))


def _emits_itself(ready: _Ready) -> bool:
    """Whether the JVP rule applies the primitive to the tangents (its transpose rule is then used)."""
    _, lin = jax.linearize(ready.f, *ready.explicit)
    jx = jax.make_jaxpr(lin)(*ready.explicit).jaxpr
    name = ready.site.eqn.primitive.name

    def has(j):
        return any(e.primitive.name == name or any(has(s) for s in _subjaxprs(e)) for e in j.eqns)

    return has(jx)


def _check_both_rules(ready: _Ready, options: dict, key) -> tuple[SiteReport, SiteReport]:
    """The JVP and transpose rules in one reverse-mode check.

    ``jax.vjp`` of the site linearises with the JVP rule and transposes what it emits:
    its pairings ⟨Jᵀu, t⟩ are judged against differences of the primitive (the JVP
    rule, through a transpose) and, where the JVP emits the primitive itself, against
    ⟨u, J t⟩ from the JVP (the transpose rule alone, exact). A wrong transpose fails the
    second; a wrong JVP with a right transpose fails only the first. Where both fail,
    the JVP rule is checked again alone, in forward mode.
    """
    emits = _emits_itself(ready)
    rep = check_vjp(ready.f, *ready.explicit, precision="native", against="auto" if emits else "numerical",
                    key=key, **options)
    identity = [lf for lf in rep.leaves if lf.name.endswith(" transpose")]
    numerical = [lf for lf in rep.leaves if not lf.name.endswith(" transpose")]
    tr = _verdict(ready, rep, identity)
    if not emits:
        tr = SiteReport(**_site_base(ready.site), checked=0, status="not checked", held=ready.held,
                        reason="the JVP rule does not apply the primitive to the tangents here, so the "
                               "transpose rule takes no part in the gradient")
    jvp = _verdict(ready, rep, numerical)
    if tr.status == "mismatch" and jvp.status == "mismatch":  # judged through a wrong transpose: alone
        jvp = _check_jvp_rule(ready, options, key)
    return jvp, tr


def _one_at_a_time(prim):
    """A batching rule that applies ``prim`` to each batch element in turn (exact; a ``lax.map`` loop)."""

    def rule(args, dims, **params):
        mapped = [i for i, d in enumerate(dims) if d is not None]

        def one(xs):
            full = list(args)
            for i, x in zip(mapped, xs):
                full[i] = x
            return prim.bind(*full, **params)

        out = jax.lax.map(one, [jnp.moveaxis(args[i], dims[i], 0) for i in mapped])
        return (out, [0] * len(out)) if prim.multiple_results else (out, 0)

    return rule


@contextlib.contextmanager
def _batchable(prims):
    """Primitives without a batching rule get one for the check (jgc evaluates in batches), removed after."""
    added = [p for p in prims if p not in _BATCHERS]
    for p in added:
        batching.primitive_batchers[p] = _one_at_a_time(p)
    try:
        yield
    finally:
        for p in added:
            _BATCHERS.pop(p, None)


def check_primitive_rules(watch: PrimitiveWatch, options: dict, key, paths: Paths | None) -> list:
    """One :class:`RuleReport` per registered JVP rule (and transpose rule) of the watched primitives."""
    prims = {s.eqn.primitive for r in watch.rules.values() for s in r.sites.values()}
    with _batchable(prims):
        return _check_all(watch, options, key, paths)


def _check_all(watch: PrimitiveWatch, options: dict, key, paths: Paths | None) -> list:
    out = []
    for r in watch.rules.values():
        jvp_sites, tr_sites = [], []
        for s in r.sites.values():
            try:
                ready = _ready(s, paths)
            except Exception as e:  # noqa: BLE001 (the primitive raised at its own captured operands)
                ready = _error(s, e)
            if isinstance(ready, SiteReport):
                jvp_sites.append(ready)
                tr_sites.append(ready)
                continue
            try:
                if r.transpose is None:
                    jvp_sites.append(_check_jvp_rule(ready, options, key))
                else:
                    jvp, tr = _check_both_rules(ready, options, key)
                    jvp_sites.append(jvp)
                    tr_sites.append(tr)
            except Exception as e:  # noqa: BLE001 (a rule raised: an error for this primitive only)
                jvp_sites.append(_error(s, e))
                tr_sites.append(_error(s, e))
        calls = sum(s.calls for s in r.sites.values())
        approx = primitive_approximate(r.jvp, [s.eqn.params for s in r.sites.values()])
        if approx:
            jvp_sites = [as_approximate(s, *approx) for s in jvp_sites]
        base = {"name": r.name, "primal_at": str(r.impl), "fwd_name": "", "fwd_at": ""}
        out.append(RuleReport.from_sites({**base, "kind": JVP_KIND, "rule_name": r.jvp.name,
                                          "rule_at": str(r.jvp)}, tuple(jvp_sites), calls))
        if r.transpose is not None:
            out.append(RuleReport.from_sites({**base, "kind": TRANSPOSE_KIND, "rule_name": r.transpose.name,
                                              "rule_at": str(r.transpose)}, tuple(tr_sites), calls))
    return out
