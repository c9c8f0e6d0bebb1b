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

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from .. import compat, compiling, trees, validate
from .surrogates import (_library_approximate, _library_intended, _user_approximate, _user_intended,
                         with_solver_tolerance)
from ..jacobian import check_jacobian
from ..names import function_name
from ..preparation import retried
from ..products import check_jvp, check_vjp
from .callbacks import sequential_callbacks
from .eager import _check_eager, _closes_over_traced_values, _eager_calls
from .paths import Paths, differentiated_paths
from .primitives import PRIMITIVES, PrimitiveWatch, check_primitive_rules
from .sites import KINDS, VJP_CALL, _Collector, _short, _Site, _site_base, _subjaxprs
from .report import RuleReport, RulesReport, SiteReport, Worst, as_approximate, relative_error
from .derivatives import derivatives
from .hidden import replay, through_calls, watching
from .sitechecks import CHEAP, SiteChecks, check_hidden, check_sites
from .subject import ORDER2

__all__ = ["attach_rules", "check_rules"]

# Up to this many perturbed coordinates (over the captured calls of a site) every
# Jacobian entry is checked (2 evaluations per coordinate in one vmapped batch); above
# it, random directions per operand (jgc.check_jvp / check_vjp) keep the cost flat.
FULL_JACOBIAN_COORDINATES = 256


# -- checking call sites ----------------------------------------------------------------------
@dataclasses.dataclass
class _Prepared:
    """One call site ready to check: its function of the stacked operands that vary."""

    key: tuple
    site: _Site
    kind: str
    caps: list
    explicit: list  # the operands that vary (stacked over the captured calls)
    names: list  # their names
    f: Callable
    coordinates: int
    n_out: int  # outputs compared (those on the differentiated path)
    held: str  # what is held fixed, and why
    # Output entries left out (non-finite at the point): a custom_jvp is then checked in
    # forward mode, where a left-out entry's tangent is dropped; in reverse mode its zero
    # cotangent times the rule's infinite derivative there would be NaN.
    masked_outputs: bool = False
    # The check's precision: the one asked where the site was also traced at the
    # reference's precision (the rule at the dtypes given, the differences there), else
    # "native" (both at the captured dtypes).
    precision: str = "native"
    # Where the operands of one captured call go (the call-site checks rebind the rule on
    # them): the positions that vary, their masks (stacked over calls), the outputs kept.
    varying: tuple = ()
    partial: dict = dataclasses.field(default_factory=dict)
    outs: tuple = ()
    # The site's equation traced at the reference's precision (float64), where it was: the
    # call-site checks' rounding reference for operands captured at narrower dtypes.
    twin_eqn: Any = None


def _site_function(eqn, ops: list, varying: list, partial: dict, outs: list, wide=None):
    """The rule at one call site as a function of its varying operands, vmapped over calls.

    ``ops`` are every operand (stacked over calls); those at positions ``varying`` are
    replaced by the arguments, except, for positions in ``partial``, the entries where
    its mask is False, which keep their captured value (an infinite bound, a buffer
    entry the parameters never reach: constants of the check). Only the outputs at
    positions ``outs`` are returned.

    ``wide``: the same call site's equation traced at the reference's precision. Called
    with operands at other dtypes than ``eqn`` was traced at (the reference widens
    them), the rule is bound from ``wide`` instead, its held operands cast to its
    dtypes (exactly: they were captured at the narrower dtypes given); at the dtypes
    given it runs as the program runs.
    """
    prim = eqn.primitive
    given = [v.aval.dtype for v in eqn.invars]
    # An operand held fixed that is the same in every captured call is not batched: a
    # rule that branches on it (Equinox's runtime checks on a flag) keeps its branch.
    same = [pos not in varying and all(np.array_equal(np.asarray(x[0]), np.asarray(x[i])) for i in range(1, len(x)))
            for pos, x in enumerate(ops)]
    ops = [x[0] if s else x for x, s in zip(ops, same)]
    axes = [None if s else 0 for s in same]

    masks = {pos: jnp.asarray(m) for pos, m in partial.items()}

    def one(base, mask, var):
        bound = eqn
        if wide is not None and any(var[j].dtype != given[pos] for j, pos in enumerate(varying)):
            bound = wide
            base = [b.astype(v.aval.dtype) if hasattr(v.aval, "dtype") and b.dtype != v.aval.dtype else b
                    for b, v in zip(base, wide.invars)]
        full = list(base)
        for j, pos in enumerate(varying):
            full[pos] = jnp.where(mask[pos], var[j], base[pos]) if pos in mask else var[j]
        out = compat.bind(bound, *full)
        out = tuple(out) if prim.multiple_results else (out,)
        return tuple(out[i] for i in outs)

    def rule_at_site(*var):
        return jax.vmap(one, in_axes=(axes, 0, 0))(ops, masks, list(var))

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


def _on_path(site: _Site, paths: Paths | None) -> tuple[list, list]:
    """(explicit operands, outputs) of a site on the differentiated path (all, without ``paths``)."""
    eqn = site.eqn
    nc = eqn.params["num_consts"]
    ops, outs = [True] * (len(eqn.invars) - nc), [True] * len(eqn.outvars)
    if paths is None:
        return ops, outs
    seen_ops = [paths.operands[id(e)] for e in site.eqns if id(e) in paths.operands]
    seen_outs = [paths.outputs[id(e)] for e in site.eqns if id(e) in paths.outputs]
    if seen_ops:
        ops = [any(o[nc + j] for o in seen_ops) for j in range(len(ops))]
    if seen_outs:
        outs = [any(o[i] for o in seen_outs) for i in range(len(outs))]
    return ops, outs


def _value(x) -> str:
    v = np.unique(np.asarray(x)[~np.isfinite(np.asarray(x))])
    return ", ".join(str(float(np.real(u))) for u in v[:3])


def _prepare(key, site: _Site, kind: str, paths: Paths | None, moved: dict | None = None,
             wide: tuple | None = None) -> _Prepared | SiteReport:
    """One site ready to check, or its report when there is nothing to compare.

    ``moved`` maps an operand position to the entries (stacked over the captured calls)
    that changed when the parameters moved; the others are held fixed. ``wide``: (the
    site's equation traced at the reference's precision, the precision asked), or None
    (see :func:`_wide_twins`).
    """
    base = _site_base(site)
    if not site.calls:
        return SiteReport(**base, checked=0, status="not executed",
                          reason="the loss never reached this call at these params and args")
    eqn = site.eqn
    caps = site.first + ([site.extreme] if site.extreme is not None else [])
    nc = eqn.params["num_consts"]
    ops = [jnp.stack([c.operands[j] for c in caps]) for j in range(len(eqn.invars))]
    names = _operand_names(eqn)
    on_ops, on_outs = _on_path(site, paths)
    inexact = [j for j in range(len(names)) if trees.is_inexact_array(ops[nc + j])]
    if not inexact:
        return SiteReport(**base, checked=len(caps), status="not checked",
                          reason="the rule has no floating-point operands to differentiate")
    off = [names[j] for j in inexact if not on_ops[j]]
    outs = [i for i, b in enumerate(on_outs) if b]
    if len(off) == len(inexact) or not outs:
        why = ("none of its operands depends on the differentiated parameters" if len(off) == len(inexact)
               else "none of its outputs reaches the cost's gradient")
        return SiteReport(**base, checked=0, status="not on the differentiated path", reason=why)
    moved = moved or {}
    varying, partial, held = [], {}, []
    if off:
        held.append(f"{', '.join(off)} (not on the differentiated path)")
    for j in inexact:
        if not on_ops[j]:
            continue
        finite = np.isfinite(np.asarray(ops[nc + j]))
        if not finite.any():
            held.append(f"{names[j]} = {_value(ops[nc + j])} (non-finite)")
            continue
        keep = finite
        if not finite.all():
            held.append(f"the non-finite entries of {names[j]} ({_value(ops[nc + j])})")
        mv = moved.get(nc + j)
        if mv is not None and mv.shape == finite.shape and not mv.all():
            if not (mv & finite).any():
                held.append(f"{names[j]} (it does not move with the parameters)")
                continue
            held.append(f"{int((finite & ~mv).sum())} entries of {names[j]} that do not move with the parameters")
            keep = finite & mv
        if not keep.all():
            partial[nc + j] = keep
        varying.append(nc + j)
    n_out_off = len(on_outs) - len(outs)
    if n_out_off:
        held.append(f"{n_out_off} output{'s' * (n_out_off != 1)} not compared (no cotangent reaches the cost)")
    held_text = "; ".join(held)
    if not varying:
        return SiteReport(**base, checked=0, status="error", held=held_text,
                          reason="tried to perturb its finite operands: every operand on the differentiated "
                                 "path is non-finite at the captured calls")
    explicit = [jnp.where(partial[pos], ops[pos], 0) if pos in partial else ops[pos] for pos in varying]
    coords = sum(int(x.size) for x in explicit)
    f = _site_function(eqn, ops, varying, partial, outs, wide=wide[0] if wide else None)
    # Outputs non-finite at the captured calls (a masked branch, an infinite fill value)
    # have no derivative there: those entries are held out of the comparison, per entry.
    at = [np.asarray(y) for y in _evaluated(f, explicit)]
    finite_out = [np.isfinite(y) if jnp.issubdtype(y.dtype, jnp.inexact) else np.ones(y.shape, bool) for y in at]
    keep = [i for i, m in enumerate(finite_out) if m.any()]
    partial_out = [i for i in keep if not finite_out[i].all()]
    if partial_out or len(keep) < len(outs):
        n_bad = sum(int((~m).sum()) for m in finite_out)
        held.append(f"{n_bad} non-finite output entr{'ies' if n_bad != 1 else 'y'} at the captured calls "
                    "(no derivative there)")
        held_text = "; ".join(held)
        if not keep:
            return SiteReport(**base, checked=0, status="error", held=held_text,
                              reason="tried to compare its finite outputs: every output on the differentiated "
                                     "path is non-finite at the captured calls")
        f = _finite_outputs(f, keep, {i: finite_out[i] for i in partial_out})
    return _Prepared(key, site, kind, caps, explicit, [names[pos - nc] for pos in varying], f, coords,
                     len(keep), held_text, masked_outputs=bool(partial_out),
                     precision=wide[1] if wide else "native", varying=tuple(varying), partial=partial,
                     twin_eqn=wide[0] if wide else None,
                     outs=tuple(outs[i] for i in keep))


def _evaluated(f, explicit: list):
    """``f(*explicit)`` from one compiled program (op by op, each operation is compiled on its
    own); op by op where the program raises, so that an error is the rule's own."""
    try:
        return compiling.compiled_fast(f, *explicit)(*explicit)
    except Exception:  # noqa: BLE001 (raised again below, by the rule itself, or not at all)
        return f(*explicit)


def _finite_outputs(f, keep: list, masks: dict):
    """``f`` with only the outputs ``keep``, and the entries of ``masks`` (False there) held at 0."""

    def finite_part(*var):
        out = f(*var)
        return tuple(jnp.where(masks[i], out[i], 0) if i in masks else out[i] for i in keep)

    finite_part.__qualname__ = f.__qualname__
    return finite_part


def _verdict(prep: _Prepared, rep, leaves, locate=None) -> SiteReport:
    """The SiteReport from the blocks of ``rep`` that belong to this site (``locate``: see :func:`_worst`)."""
    failing = [lf for lf in rep.failing() if lf in leaves]
    worst = _worst(failing[0], prep, locate) if failing else None
    return SiteReport(**_site_base(prep.site), checked=len(prep.caps), status="mismatch" if failing else "ok",
                      report=rep, worst=worst, method=rep.mode, held=prep.held, error=relative_error(leaves))


def _check_one(prep: _Prepared, options: dict, key) -> SiteReport:
    """Check one call site alone: every Jacobian entry when small, random directions when large."""
    if prep.coordinates <= FULL_JACOBIAN_COORDINATES:
        mode = "fwd" if prep.masked_outputs and prep.kind == "custom_jvp" else "auto"
        rep = check_jacobian(prep.f, *prep.explicit, precision=prep.precision, mode=mode, **options)
    elif prep.kind == "custom_jvp":
        rep = check_jvp(prep.f, *prep.explicit, precision=prep.precision, key=key, **options)
    else:
        rep = check_vjp(prep.f, *prep.explicit, precision=prep.precision, against="numerical", key=key,
                        **options)
    return _verdict(prep, rep, rep.leaves)



def _check_together(preps: list, options: dict) -> dict:
    """Every entry of the small sites' Jacobians in one compiled check (one noise probe, one batch).

    The sites are independent functions of disjoint operands, so the Jacobian of all
    of them together is block diagonal: the off-diagonal blocks are zero on both sides
    and each site is judged on its own diagonal blocks. They share one precision.

    The j-th operands of the sites (of one dtype) are passed raveled into one vector:
    the finite differences build an evaluator program per vector, each of which holds
    every site, so a few programs instead of one per operand. Each block of the report
    (a vector against a site's output) then holds that site's j-th operand and zeros
    (the other sites' operands), so its largest derivative, rounding floors and
    tolerances are those of the site's own operand block; steps are sized per element,
    by its value and the RMS of all of them, either way.
    """
    xs, keys = [], []
    for p in preps:
        xs += list(p.explicit)
        keys += [(j, np.dtype(x.dtype)) for j, x in enumerate(p.explicit)]
    groups = list(dict.fromkeys(keys))
    where = []  # per operand: (its vector, start in it, shape)
    fill = [0] * len(groups)
    for x, key in zip(xs, keys):
        g = groups.index(key)
        where.append((g, fill[g], tuple(x.shape)))
        fill[g] += int(x.size)
    # Joined on the host: eagerly on the device each shape would compile a program.
    flats = [jax.device_put(np.concatenate([compat.host(x).ravel() for x, key in zip(xs, keys) if key == gk]))
             for gk in groups]
    spans, outs, lo, o = [], [], 0, 0
    for prep in preps:
        spans.append((lo, lo + len(prep.explicit)))
        outs.append((o, o + prep.n_out))
        lo, o = lo + len(prep.explicit), o + prep.n_out

    def all_sites(*flat):
        ops = [flat[g][a:a + math.prod(shape)].reshape(shape) for g, a, shape in where]
        res = []
        for prep, (a, b) in zip(preps, spans):
            res.extend(prep.f(*ops[a:b]))
        return tuple(res)

    all_sites.__qualname__ = "custom rules"
    # Compiled as one program where jgc evaluates it outside its own (f at the dtypes given).
    rep = check_jacobian(jax.jit(all_sites), *flats, precision=preps[0].precision, **options)
    found = {}
    for prep, (a, b), (oa, ob) in zip(preps, spans, outs):
        mine_groups = {where[i][0] for i in range(a, b)}
        mine = [lf for lf in rep.leaves
                if _index(lf.path) in mine_groups and oa <= _index(lf.output_path) < ob]
        found[prep.key] = _verdict(prep, rep, mine, locate=lambda lf, a=a, b=b: _in_flat(lf, where, a, b))
    return found


def _in_flat(lf, where: list, a: int, b: int) -> tuple[int, tuple] | None:
    """(operand of the site, index in it) of a block's worst entry in the raveled operands of
    :func:`_check_together` (the site's operands are ``where[a:b]``), or None."""
    g, idx = _index(lf.path), tuple(lf.input_index)
    if len(idx) != 1:
        return None
    for k in range(b - a):
        gk, start, shape = where[a + k]
        size = math.prod(shape)
        if gk == g and start <= idx[0] < start + size:
            return k, tuple(int(i) for i in np.unravel_index(idx[0] - start, shape))
    return None


def _index(path: str) -> int:
    m = re.match(r"^\w*\[(\d+)\]", path)
    return int(m.group(1)) if m else -1


def _worst(lf, prep: _Prepared, locate=None) -> Worst:
    """The worst entry of block ``lf``; ``locate(lf)``: (operand of the site, index in it) where
    the check ran on other arguments than the site's operands (None: not found), else the
    block's input leaf is the operand."""
    found = locate(lf) if locate is not None else None
    k, idx = found if found is not None else (_index(lf.path), tuple(lf.input_index))
    names = prep.names
    x = np.asarray(prep.explicit[k]) if 0 <= k < len(prep.explicit) else np.zeros(())
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


# -- the front door ---------------------------------------------------------------------------------
def check_rules(fn: Callable, params: Any, *args, precision: str = "auto", rtol: float | None = None,
                atol: float | None = None, step: float | None = None, key=None,
                all_operands: bool = False, primitives: str = "user", order: int | None = None,
                explore: bool = False) -> RulesReport:
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
    Only what reaches the gradient is compared: an operand that does not depend on the
    parameters (a constant, a library's buffer, the data) is held fixed, an output whose
    cotangent never reaches the cost (a solver residual, a value under
    ``stop_gradient``) is not compared, and a rule with neither is listed as "not on
    the differentiated path" (``all_operands=True`` compares everything). Non-finite
    operand entries (an infinite bound, a ``-inf`` fill) are held at their values and
    the finite ones perturbed; non-finite output entries are left out. Each site's
    ``held`` says what was held and why.
    Rules declared with :func:`jgc.intended`, ``optax.scale_gradient`` and Equinox's
    non-differentiable markers are reported as ``intended``, never as failures.

    JVP and transpose rules registered on primitives (``ad.primitive_jvps``,
    ``ad.primitive_transposes``; Equinox's ``filter_primitive_jvp`` /
    ``filter_primitive_transpose``, as lineax's ``linear_solve``) are found and checked
    likewise, named by the primitive and the ``file:line`` of the rule function: the
    JVP rule against differences of the primitive, the transpose rule against the JVP.

    Args:
      fn: the loss ``fn(params, *args)``.
      params: the point (any pytree); its floating leaves are traced in float64 where
        the backend has it (``precision="auto"``), as in :func:`jgc.check`.
      *args: data, passed as they are.
      precision: "auto", "float64" or "native", as in :func:`jgc.check`.
      rtol, atol, step: as in :func:`jgc.check` (None: jgc's per-dtype defaults).
      key: seed of the random directions used for large operands.
      all_operands: compare every operand and output of every rule, also those off the
        differentiated path (a library author checking a rule in full wants this).
      primitives: which primitives' registered rules to check: "user" (default: those
        whose rule functions are defined outside JAX, by the user or a library),
        "all" (also JAX's built-in primitives, tested by JAX itself) or "none".

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
    validate.function(api, "fn", fn, "callable as fn(params, *args)")
    validate.precision(api, precision)
    if primitives not in PRIMITIVES:
        raise ValueError(f"{api}: primitives must be one of {PRIMITIVES}, got {primitives!r}.")
    validate.concrete(api, (params, args), "Checking rules needs concrete numbers: call it outside transformations.")
    t0 = time.perf_counter()
    notes: list[str] = []
    split, dyn = trees.split_params(params, what=f"{api}: params")
    orig_dtypes = [np.dtype(x.dtype) for x in dyn]
    options = {k: v for k, v in {"rtol": rtol, "atol": atol, "step": step}.items() if v is not None}
    if order not in (None, 1, 2):
        raise ValueError(f"{api}: order must be None, 1 or 2, got {order!r}.")
    settings = SiteChecks(CHEAP + ((ORDER2,) if order == 2 else ()), bool(explore), dict(options), order)
    # Code that fixes its own dtypes refuses wider inputs: checked as given, by the retry of jgc.check.
    rules = retried(lambda widen, scope, _: _rules_of(
        fn, split, dyn, args, widen=widen, scope=scope, options=options, key=key, all_operands=all_operands,
        primitives=primitives, precision=precision, settings=settings),
        precision=precision, orig_dtypes=orig_dtypes, notes=notes)
    return RulesReport.build(rules, function=function_name(fn), seconds=time.perf_counter() - t0, notes=notes)


def _rules_of(fn, split, dyn: list, args: tuple, *, widen: bool, scope, options: dict, key,
              all_operands: bool, primitives: str = "user", precision: str = "auto",
              settings: SiteChecks | None = None) -> list:
    """Find, capture and judge every rule of ``fn`` at (params leaves ``dyn``, ``args``) in ``scope``.

    Where the check widens narrower params or data (float32, bfloat16), the operands
    are captured as the program runs: at the dtypes given, under the caller's own x64
    setting, so each rule's JVP or VJP is judged at the dtypes it really receives (a
    backward that saves its residual in bfloat16 only for float32 work is caught). The
    loss is traced once more at the reference's precision, inside ``scope``: each call
    site found there lends its equation to the finite differences (:func:`_wide_twins`),
    and tells which operand entries move with the parameters (a bfloat16 parameter
    moved by 1e-4 of itself would not move at all).
    """
    given = [np.dtype(x.dtype) for x in list(dyn) + list(trees.split_args(args)[1]) if trees.is_inexact_array(x)]
    if not (widen and any(d != trees.wide_dtype(d) for d in given)):
        with scope:
            cap = _capture(fn, split, dyn, args, widen=widen, all_operands=all_operands, primitives=primitives)
            with sequential_callbacks():
                return _judge(cap.col, options, key, cap.eager, cap.paths, cap.moved, settings=settings) \
                    + _primitive_rules(cap.col, options, key, cap.paths) + _hidden_rules(cap, settings)
    cap = _capture(fn, split, dyn, args, widen=False, all_operands=True, primitives=primitives)
    if not _found(cap.col, cap.hidden):
        return []
    with scope:
        wide = _capture(fn, split, dyn, args, widen=True, all_operands=all_operands)
    twins = _wide_twins(cap.col, wide.col, precision)
    moved = {k: wide.moved[w[2]] for k, w in twins.items() if w[2] in wide.moved}
    paths = None
    if not all_operands:
        n_args = len(cap.closed.jaxpr.invars) - len(cap.dyn)
        paths = differentiated_paths(cap.closed.jaxpr, [True] * len(cap.dyn) + [False] * n_args)
    with sequential_callbacks():
        return _judge(cap.col, options, key, cap.eager, paths, moved,
                      wide={k: w[:2] for k, w in twins.items()}, precision=precision, settings=settings) \
            + _primitive_rules(cap.col, options, key, paths) + _hidden_rules(cap, settings)


def _primitive_rules(col: _Collector, options: dict, key, paths: Paths | None) -> list:
    """The verdicts on the rules registered on the primitives the collector watched (none without a watch)."""
    return check_primitive_rules(col.watch, options, key, paths) if col.watch is not None else []


@dataclasses.dataclass
class _Captured:
    """One trace of the loss and the operands its rules received (see :func:`_capture`)."""

    closed: Any
    col: _Collector
    dyn: list
    paths: Paths | None
    moved: dict
    eager: Callable[[], list]
    # Rules the traced program does not show as calls (custom_vmap; rules under the loss's
    # own jax.jvp / grad), seen while tracing, and the op-by-op run that captures them.
    hidden: list = dataclasses.field(default_factory=list)
    replay: Callable[[], list] | None = None


def _hidden_rules(cap: _Captured, settings: SiteChecks | None) -> list:
    """The verdicts on the rules the trace hides (:mod:`hidden`), checked on an op-by-op run."""
    if not cap.hidden or settings is None or cap.replay is None:
        return []
    return check_hidden(cap.replay(), order=settings.order, explore=settings.explore, options=settings.options,
                        derivatives=derivatives)


def _capture(fn, split, dyn: list, args: tuple, *, widen: bool, all_operands: bool,
             primitives: str = "none") -> _Captured:
    """Trace the loss at params leaves ``dyn`` (widened with ``widen``) and record every rule's operands."""
    if widen:
        dyn = [x.astype(trees.wide_dtype(x.dtype)) for x in dyn]
    dyn = [jnp.asarray(x) for x in dyn]
    p = split.combine(dyn)
    # Floating data is widened with the params, as in jgc.check (one precision inside fn).
    rebuild_args, argarr = trees.split_args(args, widen=widen)
    args = rebuild_args(argarr)
    # Only array leaves are traced; the rest (an Equinox module's strings and
    # functions, Python numbers) stays static, as in every evaluation of jgc.check.
    hidden: list = []
    def trace():
        return jax.make_jaxpr(lambda d, a: fn(split.combine(d), *rebuild_args(a)))(dyn, argarr)

    with watching(hidden):
        closed = trace()
    # A rule inside a jit the loss differentiates shows under its AD only with jit disabled.
    hidden = hidden or through_calls(trace, closed.jaxpr)
    programs: dict = {}
    col = _Collecting(PrimitiveWatch(primitives) if primitives != "none" else None, programs)
    col.discover(closed.jaxpr)
    paths, moved = None, {}
    if not _found(col, hidden):  # nothing to capture: the op-by-op runs would only compile each primitive
        return _Captured(closed, col, dyn, paths, moved, lambda: [], hidden)
    col.run(closed.jaxpr, closed.consts, list(dyn) + list(argarr))
    if not all_operands:  # the loss's inputs: the params are differentiated, the data are not
        n_args = len(closed.jaxpr.invars) - len(dyn)
        paths = differentiated_paths(closed.jaxpr, [True] * len(dyn) + [False] * n_args)
        moved = _moved_entries(col, closed, dyn, list(argarr), programs)
    return _Captured(closed, col, dyn, paths, moved, lambda: _eager_calls(fn, p, args), hidden,
                     lambda: replay(fn, p, args))


def _found(col: _Collector, hidden: list) -> bool:
    """Whether the trace shows any rule: a custom rule's call, a watched primitive, or a hidden rule.

    :meth:`_Collector.discover` walks every sub-program the op-by-op run would step
    through, so a trace without any shows none at run time either.
    """
    return bool(col.rules) or bool(hidden) or (col.watch is not None and bool(col.watch.rules))


def _wide_twins(col: _Collector, wide: _Collector, precision: str) -> dict:
    """Per call site of ``col`` (captured at the dtypes given): (its equation in ``wide``,
    the trace at the reference's precision; ``precision``; the site's key there).

    Sites are matched by rule, call site, enclosing constructs and operand shapes. Only
    a site whose every floating operand is widened there (to float64) gets a twin: its
    rule then runs at the captured dtypes and the finite differences of its primal at
    the reference's. A site without one (a rule that branches on the dtype into other
    rules, code that fixes its own dtypes) is checked at the captured dtypes on both
    sides, as before.
    """
    def shapes(eqn):
        return tuple(tuple(getattr(v.aval, "shape", ())) for v in eqn.invars)

    index = {(rkey, s.at, s.under, shapes(s.eqn)): (s, skey) for rkey, r in wide.rules.items()
             for skey, s in r.sites.items()}
    out = {}
    for rkey, r in col.rules.items():
        for skey, s in r.sites.items():
            found = index.get((rkey, s.at, s.under, shapes(s.eqn)))
            if found is None:
                continue
            w = found[0].eqn
            pairs = [(np.dtype(a.aval.dtype), np.dtype(b.aval.dtype)) for a, b in zip(s.eqn.invars, w.invars)
                     if hasattr(a.aval, "dtype") and jnp.issubdtype(a.aval.dtype, jnp.inexact)]
            if any(d != a for a, d in pairs) and all(d == trees.wide_dtype(a) for a, d in pairs):
                out[(rkey, skey)] = (w, precision, (rkey, found[1]))
    return out


class _Collecting(_Collector):
    """The collector of :mod:`sites`, with the equations between rules run as compiled programs.

    Op by op, each operation of the loss, and of each rule's primal bound as one call, is
    compiled alone the first time it meets its shapes. Here each run of two or more
    consecutive equations that holds no rule, no watched primitive and no effect is one
    compiled program, and so is each rule's call with no rule inside, each compiled
    once for every loop step and for the run at the moved parameters (``programs``, the
    cache the collectors of one trace share). The rules' operands are recorded as before.
    """

    def __init__(self, watch=None, programs: dict | None = None):
        super().__init__(watch)
        self._programs = {} if programs is None else programs

    def _bind(self, eqn, vals):
        primal = eqn.params["call_jaxpr"] if eqn.primitive.name in KINDS else None
        if primal is None or len(primal.jaxpr.eqns) < 2:  # one operation: as cheap op by op
            return super()._bind(eqn, vals)
        # Keyed by the primal's program, which JAX shares between the calls of one rule
        # it traced once.
        key = ("rule", id(primal))
        fn = self._programs.get(key)
        if fn is None:
            fn = self._programs[key] = (primal, compiling.Reused(functools.partial(compat.bind, eqn)))
        fn = fn[1]
        try:
            return fn(*vals)
        except Exception:  # noqa: BLE001 (op by op, where the error, if any, is the rule's own)
            return super()._bind(eqn, vals)

    def run(self, jaxpr, consts, args, *, under=(), steps=(), parent=None):
        env = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        def write(outvars, values):
            for var, val in zip(outvars, values):
                if not isinstance(var, compat.DropVar):
                    env[var] = val

        def one(eqn):
            outs = self._eqn(eqn, [read(v) for v in eqn.invars], under, steps, parent)
            write(eqn.outvars, outs if eqn.primitive.multiple_results else [outs])

        write(jaxpr.constvars, consts)
        write(jaxpr.invars, args)
        for item in self._plan(jaxpr):
            if not isinstance(item, _Segment):
                one(item)
                continue
            try:
                write(item.outs, item.fn(*[env[v] for v in item.ins]))
            except Exception:  # noqa: BLE001 (op by op, where an error is that of its operation)
                for eqn in item.eqns:
                    one(eqn)
        return [read(v) for v in jaxpr.outvars]

    def _plan(self, jaxpr) -> list:
        """The equations of ``jaxpr``, runs of plain ones grouped into :class:`_Segment` s."""
        key = ("plan", id(jaxpr))
        if key not in self._programs:
            items, run = [], []
            for eqn in list(jaxpr.eqns) + [None]:
                plain = eqn is not None and eqn.primitive.name not in KINDS and not self._watched(eqn) \
                    and not eqn.effects and not any(self.has_rule(s) for s in _subjaxprs(eqn))
                if plain:
                    run.append(eqn)
                    continue
                items += [_Segment.of(run, jaxpr)] if len(run) > 1 else run
                run = []
                if eqn is not None:
                    items.append(eqn)
            self._programs[key] = (jaxpr, items)  # the jaxpr held, so that its id stays its own
        return self._programs[key][1]


@dataclasses.dataclass
class _Segment:
    """Consecutive equations run as one compiled program: the variables it reads and those read after it."""

    eqns: list
    ins: list
    outs: list
    fn: Callable

    @staticmethod
    def of(eqns: list, jaxpr) -> _Segment:
        mine = {id(e) for e in eqns}
        defined = {v for e in eqns for v in e.outvars if not isinstance(v, compat.DropVar)}
        ins = list(dict.fromkeys(v for e in eqns for v in e.invars
                                 if not isinstance(v, jcore.Literal) and v not in defined))
        later = {v for e in jaxpr.eqns if id(e) not in mine for v in e.invars if not isinstance(v, jcore.Literal)}
        later |= {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
        outs = [v for e in eqns for v in e.outvars if v in defined and v in later]

        def segment(*vals):
            env = dict(zip(ins, vals))
            for e in eqns:
                got = compat.bind(e, *[v.val if isinstance(v, jcore.Literal) else env[v] for v in e.invars])
                for var, val in zip(e.outvars, got if e.primitive.multiple_results else [got]):
                    env[var] = val
            return [env[v] for v in outs]

        return _Segment(eqns, ins, outs, compiling.Reused(segment))


# Relative size of the move of the parameters that tells which operand entries depend
# on them: large enough that any entry with a derivative above 1e-9 of its size moves
# by far more than a float64 rounding, small enough that loops take the same number of
# steps (when they do not, the sites that differ are compared whole).
MOVE = 1e-4


def _moved_entries(col: _Collector, closed, dyn: list, argarr: list, programs: dict | None = None) -> dict:
    """Per site, per operand position: the entries that change when the parameters move.

    The loss is interpreted once more at params moved along a fixed pseudo-random
    direction. An entry that stays bitwise the same (a library's write-once buffer
    before it is written, a fill value) does not depend on the parameters, and its
    derivative never reaches the gradient. Sites whose captured calls differ in number
    or shape between the two runs get no entry (compared whole).
    """
    rng = np.random.default_rng(0)
    moved_dyn = [jnp.asarray(_moved_by(compat.host(x), rng)) if jnp.issubdtype(x.dtype, jnp.inexact) else x
                 for x in dyn]
    other = _Collecting(programs=programs)
    other.discover(closed.jaxpr)
    try:
        other.run(closed.jaxpr, closed.consts, list(moved_dyn) + argarr)
    except Exception:  # noqa: BLE001 (the loss fails at the moved point: every site is compared whole)
        return {}
    out = {}
    for rkey, r in col.rules.items():
        r2 = other.rules.get(rkey)
        for skey, s in r.sites.items():
            s2 = r2.sites.get(skey) if r2 is not None else None
            if not s.first or s2 is None or len(s2.first) != len(s.first) \
                    or (s.extreme is None) != (s2.extreme is None):
                continue
            caps = s.first + ([s.extreme] if s.extreme is not None else [])
            caps2 = s2.first + ([s2.extreme] if s2.extreme is not None else [])
            masks = {}
            for j in range(len(s.eqn.invars)):
                if not all(trees.is_inexact_array(c.operands[j]) for c in caps + caps2):
                    continue  # integers, flags and PRNG keys are never perturbed
                a = [np.asarray(c.operands[j]) for c in caps]
                b = [np.asarray(c.operands[j]) for c in caps2]
                if any(x.shape != y.shape for x, y in zip(a, b)):
                    masks = None
                    break
                masks[j] = np.stack([~((x == y) | (np.isnan(x) & np.isnan(y))) for x, y in zip(a, b)])
            if masks is not None:
                out[(rkey, skey)] = masks
    return out


def _moved_by(x: np.ndarray, rng) -> np.ndarray:
    """x moved by MOVE·(|x| + 1) times a factor in [0.5, 1.5] per entry, at x's dtype (on the host)."""
    return (x + MOVE * (np.abs(x) + 1) * rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)).astype(x.dtype)


def _judge(col: _Collector, options: dict, key, eager: Callable[[], list], paths: Paths | None,
           moved: dict, *, wide: dict | None = None, precision: str = "native",
           settings: SiteChecks | None = None) -> list:
    """Check every call site: small ones together, large ones alone, each rule's verdict from its sites.

    ``wide``: per site, (its equation at the reference's precision, the precision asked)
    where its operands were captured at narrower dtypes given (see :func:`_rules_of`).
    """
    wide = wide or {}
    verdicts, small, retrace, prepared = {}, [], [], {}
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
            try:
                prep = _prepare(k, s, r.kind, paths, moved.get(k), wide.get(k))
            except Exception as e:  # noqa: BLE001 (the rule raised at its own captured operands)
                prep = _error(s, e)
            if isinstance(prep, _Prepared):
                prepared[k] = prep
            if isinstance(prep, SiteReport):
                verdicts[k] = prep
            elif prep.coordinates <= FULL_JACOBIAN_COORDINATES and not prep.masked_outputs \
                    and not _closes_over_traced_values(prep.site.eqn):
                small.append(prep)
            else:  # large, or a rule that raises when differentiated: alone
                try:
                    verdicts[k] = _check_one(prep, options, key)
                except Exception as e:  # noqa: BLE001 (the rule itself raised: an error for this rule only)
                    verdicts[k] = _error(prep, e)
                    retrace.append(prep)
    for group in ([p for p in small if p.precision == c] for c in dict.fromkeys(p.precision for p in small)):
        try:
            verdicts.update(_check_together(group, options))
        except Exception:  # noqa: BLE001 (one site's rule raised: check each alone, so only it is an error)
            for prep in group:
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
                verdicts[prep.key] = _check_eager(prep.site, r.primal, calls, options,
                                                  precision if wide else "native")
            except Exception as e:  # noqa: BLE001 (as above)
                verdicts[prep.key] = _error(prep, e)
    # jgc.check_rule's checks at each call site (linearity, batching, primal, symbolic zeros).
    extra = check_sites(prepared, verdicts, settings, key,
                        skip=lambda prep: prep in leaked or _closes_over_traced_values(prep.site.eqn),
                        primal_of=lambda rkey: col.rules[rkey].primal, derivatives=derivatives)
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
            approx = _user_approximate(r.primal) or with_solver_tolerance(
                _library_approximate(r.primal, r.rule), [s.eqn.params for s in r.sites.values()])
            if approx:
                sites = tuple(as_approximate(s, *approx) for s in sites)
            out.append(RuleReport.from_sites(base, sites, calls, checks=extra.get(rkey, ())))
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
    approximate = [f"custom rule {r.kind} {r.name} ({r.primal_at}) is approximate by construction, so the "
                   f"gradient is approximate by design: {r.reason}" for r in rr.rules if r.status == "approximate"]
    notes += approximate
    if not rr.failing():
        checked = [r for r in rr.rules if r.status == "ok"]
        elsewhere = (f"jgc.check_rules found {len(checked)} custom rule(s) that agree with their primal: the "
                     "mismatch comes from elsewhere (a hand-written grad, stop_gradient, or a rule not "
                     "checked: see report.rules).")
        notes += [elsewhere] if rr.rules and not approximate else []
    return dataclasses.replace(rep, rules=rr, notes=tuple(rep.notes) + tuple(notes))
