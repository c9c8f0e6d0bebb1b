"""The custom rules of a traced program: their call sites, found and captured in one eager pass.

Each ``jax.custom_jvp`` / ``jax.custom_vjp`` call is an equation ``custom_jvp_call`` /
``custom_vjp_call`` of the jaxpr; :class:`_Collector` finds them (inside ``jit``,
``scan``, ``while``, ``cond``, ``checkpoint`` and other rules' primals), names each
rule, its primal and its call site, and interprets the jaxpr once at the caller's
numbers, stepping loops one iteration at a time, to record the operands every call
site receives.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from .. import compat
from .surrogates import _library_intended
from ..jaxprs import interpret
from .sources import Where, _def_line, _is_recorder_file, _is_wrapper_file, _parse_src_info, _primal_of_rule, _see_through

# -- the JAX internals this module reads (pinned by tests/test_rules.py) ----------------------
JVP_CALL, VJP_CALL = "custom_jvp_call", "custom_vjp_call"
KINDS = {JVP_CALL: "custom_jvp", VJP_CALL: "custom_vjp"}
RULE_PARAMS = {
    JVP_CALL: ("call_jaxpr", "jvp_jaxpr_fun", "num_consts", "symbolic_zeros"),
    VJP_CALL: ("call_jaxpr", "fwd_jaxpr_thunk", "bwd", "num_consts", "symbolic_zeros"),
}
# The parameter holding the rule function: its debug_info names the user's function.
RULE_FUNCTION = {JVP_CALL: "jvp_jaxpr_fun", VJP_CALL: "bwd"}
# Older names of these equations: a program that has one is read by no rule here, so
# it is refused rather than reported as free of rules (custom_vjp before JAX 0.6.2).
OLD_NAMES = {"custom_vjp_call_jaxpr": VJP_CALL}
# The oldest JAX whose programs this module reads (checked release by release down to it).
OLDEST_JAX = "0.6.2"
CALL_PRIMS = ("jit", "pjit", "closed_call", "core_call")
REMAT_PRIMS = ("checkpoint", "remat", "remat2")
# Kernels run as one opaque call: rules inside a kernel body are not user-level calls.
OPAQUE_PRIMS = ("pallas_call",)

# Calls kept per call site: the first few show the rule where the loss starts; the one
# with the largest operand reaches the far end of its domain (a rule wrong only for
# large inputs). Four calls stacked keep a site's check one small compiled batch.
FIRST_CALLS = 3


class JaxInternalsChanged(RuntimeError):
    """The traced program no longer has the structure jgc.check_rules reads."""


def _internals_changed(what: str) -> JaxInternalsChanged:
    return JaxInternalsChanged(
        f"jgc.check_rules reads JAX's traced programs (jaxprs), and {what} in JAX "
        f"{jax.__version__}. It reads those of JAX {OLDEST_JAX} and later; with an older JAX, "
        "upgrade to use it, else please report this with your JAX version. jgc.check and "
        "jgc.check_vjp/check_jvp on a rule still work."
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



def _user_frame_in(jaxpr) -> Where | None:
    """The first frame outside JAX and Equinox among the equations of a primal's jaxpr."""
    for eqn in _all_eqns(jaxpr):
        for fr in compat.user_frames(eqn.source_info):
            if not (_is_wrapper_file(fr.file_name) or _is_recorder_file(fr.file_name)):
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
    fr = next((f for f in compat.user_frames(eqn.source_info) if not _is_recorder_file(f.file_name)), None)
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
        primal = seen or _user_frame_in(cj.jaxpr) or (_primal_of_rule(rule_fun) if name == JVP_CALL else None) \
            or primal
    return primal, rule, fwd



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
    eqns: list = dataclasses.field(default_factory=list)  # every equation of this call site


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
            a = _abs_max(x)
            m = max(m, a if math.isfinite(a) else math.inf)
    return m


def _abs_max(x) -> float:
    """max |x|: on the host where x lives on a CPU (eagerly on the device, abs and max would
    each compile a program per shape and dtype captured), else on its device."""
    devices = getattr(x, "devices", None)
    if devices is None or all(d.platform == "cpu" for d in devices()):
        return float(np.max(np.abs(compat.host(x))))
    return float(jnp.max(jnp.abs(x)))


class _Collector:
    """Finds the rules of a traced program and captures their operands in one eager pass."""

    def __init__(self, watch=None):
        self.rules: dict[tuple, _Rule] = {}
        # Primitives with registered rules to capture too (primitives.PrimitiveWatch), or None.
        self.watch = watch
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
        s.eqns.append(eqn)
        return s

    def discover(self, jaxpr, under=(), parent=None):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in OLD_NAMES:
                raise _internals_changed(f"a {OLD_NAMES[name]} equation is named {name}")
            if name in KINDS:
                site = self.site(eqn, under, parent)
                self.discover(eqn.params["call_jaxpr"].jaxpr, under + (f"{KINDS[name]} {_short(eqn)}",), site.at)
            elif self._watched(eqn):
                self.watch.site(eqn, under, parent, jaxpr)
            else:
                for sub in _subjaxprs(eqn):
                    self.discover(sub, under + (_construct(name),), parent)

    def has_rule(self, jaxpr) -> bool:
        k = id(jaxpr)
        if k not in self._has_rule:
            self._has_rule[k] = any(e.primitive.name in KINDS or self._watched(e)
                                    or any(self.has_rule(s) for s in _subjaxprs(e)) for e in jaxpr.eqns)
        return self._has_rule[k]

    def _watched(self, eqn) -> bool:
        return self.watch is not None and self.watch.wants(eqn)

    # eager
    def run(self, jaxpr, consts, args, *, under=(), steps=(), parent=None):
        def apply(eqn, vals):
            outs = self._eqn(eqn, vals, under, steps, parent)
            return outs if eqn.primitive.multiple_results else [outs]

        return interpret(jaxpr, consts, args, apply)

    def _bind(self, eqn, vals):
        return compat.bind(eqn, *vals)

    def _eqn(self, eqn, vals, under, steps, parent):
        name = eqn.primitive.name
        p = eqn.params
        if name in KINDS:
            site = self.site(eqn, under, parent)
            self._record(site, eqn, vals, steps)
            cj = p["call_jaxpr"]
            if self.has_rule(cj.jaxpr):
                return self.run(cj.jaxpr, cj.consts, vals, under=under + (f"{KINDS[name]} {_short(eqn)}",),
                                steps=steps, parent=site.at)
            return self._bind(eqn, vals)
        if self._watched(eqn):
            self._record(self.watch.site(eqn, under, parent), eqn, vals, steps)
            return self._bind(eqn, vals)
        if not any(self.has_rule(s) for s in _subjaxprs(eqn)):
            return self._bind(eqn, vals)
        inner = under + (_construct(name),)
        if name in CALL_PRIMS:
            cj = p["jaxpr"] if "jaxpr" in p else p["call_jaxpr"]
            return self.run(cj.jaxpr, cj.consts, vals, under=inner, steps=steps, parent=parent)
        if name in REMAT_PRIMS:
            jx = p["jaxpr"]
            jx, consts = (jx.jaxpr, jx.consts) if isinstance(jx, jcore.ClosedJaxpr) else (jx, ())
            return self.run(jx, consts, vals, under=inner, steps=steps, parent=parent)
        if name == "scan":
            return self._scan(eqn, vals, inner, steps, parent)
        if name == "while":
            return self._while(eqn, vals, inner, steps, parent)
        if name == "cond":
            branches = p["branches"]
            i = int(np.clip(int(vals[0]), 0, len(branches) - 1))
            b = branches[i]
            return self.run(b.jaxpr, b.consts, vals[1:], under=inner, steps=steps + (f"cond branch {i}",),
                            parent=parent)
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
            out = self.run(body.jaxpr, body.consts, [*consts, *carry, *(x[i] for x in xs)], under=under,
                           steps=steps + (f"scan step {i}",), parent=parent)
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
        while bool(self.run(cj.jaxpr, cj.consts, [*cc, *carry], under=under, steps=steps, parent=parent)[0]):
            carry = self.run(bj.jaxpr, bj.consts, [*bc, *carry], under=under, steps=steps + (f"while step {i}",),
                             parent=parent)
            i += 1
        return carry

    def _record(self, site: _Site, eqn, vals, steps):
        site.calls += 1
        nc = eqn.params.get("num_consts", 0)
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




def _site_base(site: _Site) -> dict:
    return {"at": str(site.at), "function": site.at.name, "under": " > ".join(site.under), "calls": site.calls}
