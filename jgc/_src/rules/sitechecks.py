"""The checks of one rule at one point, shared by :func:`jgc.check_rule` and :func:`jgc.check_rules`.

:func:`checks_at` runs the chosen families of checks (``identities``: primal, dot
product, linearity, batching, symbolic zeros; ``derivatives``: first order and order 2
against finite differences) on one :class:`_Subject` at one point, in the order that
lets one explain another (batching first: jgc's finite differences run the rule under
``vmap``). :func:`jgc.check_rule` calls it at the given arguments and at generated
points; :func:`jgc.check_rules` calls it at each call site, on the operands the loss
fed that call (:func:`call_subject`), with the checks that need no finite differences
and, where the loss differentiates twice or the caller asks, order 2.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from .. import compat
from ..names import function_name
from .hidden import UNDER_AD
from .identities import batching, dot_product, linearity, primal, symbolic_zeros, together
from .points import generated
from .report import RuleReport, RulesReport, SiteReport
from .sites import CALL_PRIMS, KINDS, _magnitude, rule_names
from .sources import Where, _code_span, _primal_function, _where_fn
from .subject import (
    BATCHING,
    CHECKS,
    DOT,
    JVP,
    LINEARITY,
    ORDER2,
    PRIMAL,
    VJP,
    ZEROS,
    _Subject,
    hold_untraceable,
    make_subject,
    raised,
    site,
)
from .surrogates import _library_intended, _user_intended

_JAX_DIR = os.path.dirname(os.path.abspath(jax.__file__))

# The checks jgc.check_rules runs at every call site by default: none of them takes
# finite differences (each is a few compiled calls of the rule at the captured operands),
# and each catches what the first-derivative check with unit cotangents cannot see: a
# rule non-linear in its tangent or cotangent, one wrong only under vmap, a wrong
# forward value, a wrong symbolic-zero fast path.
CHEAP = (PRIMAL, LINEARITY, BATCHING, ZEROS)


def capabilities(subject: _Subject, rng, *, trace_only: bool = False) -> None:
    """Whether jax.jvp and jax.vjp of the rule run at the point (a custom_vjp has no JVP).

    ``trace_only``: whether they trace, and the JVP lowers (JAX refuses forward mode on a
    ``custom_vjp`` only when lowering), with nothing compiled; a rule that then raises
    when run is found by the checks, which run it.
    """
    t = subject.tangent(rng)
    value, jvp, vjp = subject.value, subject.jvp, subject.vjp
    if trace_only:
        def value(x):
            return jax.eval_shape(lambda x: subject.go(*x), list(x))

        def jvp(x, t):
            fn = jax.jit(lambda x, t: jax.jvp(subject.go, tuple(x), tuple(t)))
            fn.lower(list(x), list(t))
            return jax.eval_shape(fn, list(x), list(t))

        def vjp(x, u):
            return jax.eval_shape(lambda x, u: jax.vjp(subject.go, *x)[1](tuple(u)), list(x), list(u))
    subject.fwd = subject.rev = None
    try:
        out = jvp(subject.x, t)[0]
    except Exception as e:  # noqa: BLE001 (recorded: the checks that need a JVP say why they did not run)
        subject.fwd = raised(e)
        out = None
    try:
        if out is None:
            out = value(subject.x)
        vjp(subject.x, subject.cotangent(rng, out))
    except Exception as e:  # noqa: BLE001 (as above)
        subject.rev = raised(e)
    if out is not None:
        subject.out_names = [f"out[{j}]" if len(out) > 1 else "out" for j in range(len(out))]
        subject.out_dtypes = [np.dtype(o.dtype) for o in out]


def under_vmap(rows: list, vmap_wrong: bool) -> list:
    """A finite-difference check that failed where vmap of the rule is wrong says nothing more."""
    if not vmap_wrong:
        return rows
    return [dataclasses.replace(r, status="not checked", worst=None,
                                reason="jgc's finite differences and Jacobians run f and its rule under vmap, "
                                "which the batching check finds wrong here")
            if r.status in ("mismatch", "error") else r for r in rows]


def checks_at(subject: _Subject, name: str, at: str, rng, *, chosen, options: dict, fd_options: dict, key,
              intended: str | None = None, primal_jvp=None, each: bool = True, derivatives=None) -> list:
    """The rows of every chosen check of ``subject`` at its point, labelled ``at`` (``each``: the
    batching check also batches each argument alone; ``derivatives``: the finite-difference
    checks, :func:`derivatives.derivatives`, given by the caller, as the module importing it
    sits right under the wing's front)."""
    # Batching first: jgc's finite differences and Jacobians run f and its rule under vmap.
    batched = batching(subject, name, at, rng, options, each) if BATCHING in chosen else []
    vmap_wrong = any(r.status == "mismatch" for r in batched)
    rows = []
    if PRIMAL in chosen:
        rows += primal(subject, name, at, rng, options)
    first, second = JVP in chosen or VJP in chosen, ORDER2 in chosen
    fd = under_vmap(derivatives(subject, name, at, rng, fd_options, key=key, intended=intended, first=first,
                                second=second), vmap_wrong) if first or second else []
    rows += [r for r in fd if r.check != ORDER2]
    if DOT in chosen:
        rows += dot_product(subject, name, at, rng, options, primal_jvp)
    if LINEARITY in chosen:
        rows += linearity(subject, name, at, rng, options)
    rows += batched
    rows += [r for r in fd if r.check == ORDER2]
    if ZEROS in chosen:
        rows += symbolic_zeros(subject, name, at, rng, options)
    return rows


def explored(subject: _Subject, rng) -> list:
    """(label, subject, why) at every generated point (:mod:`points`); subject None where skipped, and why."""
    return [(label, None if x is None else subject.at(x), why) for label, x, why in generated(subject)]


def skipped(label: str, name: str, why: str) -> SiteReport:
    """The row of a generated point no check runs at (outside the primal's domain): not a verdict."""
    return site(PRIMAL, label, name, "not executed", reason=f"{why}: no check runs at this point")


# -- one captured call of a rule equation, as a subject ---------------------------------------------
def call_subject(eqn, operands: list, varying: list, masks: dict, outs: list, *, names: list, rng,
                 twin_eqn=None) -> _Subject:
    """One captured call of a rule's equation as a function of its varying operands.

    ``operands`` are every operand of the call as captured; those at positions
    ``varying`` are the subject's arguments, except the entries where ``masks[pos]`` is
    False, which keep their captured value (as in the call-site check). Only the outputs
    at positions ``outs`` are returned. The equation is bound again, so ``jax.jvp``,
    ``jax.vjp`` and ``jax.vmap`` of the subject run the rule as the loss runs it.
    """
    masks = {pos: jnp.asarray(m) for pos, m in masks.items()}

    def calling(eqn, operands):
        def rule_call(*var):
            full = list(operands)
            for j, pos in enumerate(varying):
                full[pos] = jnp.where(masks[pos], var[j], operands[pos]) if pos in masks else var[j]
            out = compat.bind(eqn, *full)
            out = tuple(out) if eqn.primitive.multiple_results else (out,)
            return tuple(out[i] for i in outs)
        return rule_call

    subject = make_subject(calling(eqn, operands), tuple(operands[pos] for pos in varying), set(),
                           "jgc.check_rules")
    subject.names = list(names)
    capabilities(subject, rng, trace_only=True)
    if twin_eqn is not None:  # the operands as the twin's equation takes them (called under x64 only)
        wide = [np.asarray(o).astype(v.aval.dtype) if np.issubdtype(np.asarray(o).dtype, np.inexact) else o
                for o, v in zip(operands, twin_eqn.invars)]
        subject.twin = dataclasses.replace(subject, f=calling(twin_eqn, wide), programs={})
    return subject


def site_rows(subject: _Subject, name: str, at: str, *, chosen, explore: bool, options: dict, key,
              base: dict, derivatives=None) -> list:
    """The rows of the chosen checks at a call site (and its generated points), as its SiteReports.

    ``base`` holds the call site's fields (``at``, ``function``, ``under``); each row says
    its check, and where it ran when not at the captured operands.
    """
    rng = np.random.default_rng(0)
    todo = [("", subject, "")] + (explored(subject, rng) if explore else [])
    rows = []
    cheap = tuple(c for c in chosen if c in CHEAP)
    for label, subj, why in todo:
        try:
            if subj is None:
                got = [skipped(label, name, why)]
            else:
                # Primal, linearity and batching from one compiled program (identities.together);
                # where it raises, each check alone, once jax.jvp and jax.vjp have run (to know
                # which of them runs).
                got = together(subj, name, label or at, rng, options, cheap)
                if got is None:
                    capabilities(subj, np.random.default_rng(0))
                    got = checks_at(subj, name, label or at, rng, chosen=cheap, options=options, fd_options={},
                                    key=key, each=False)
                elif ZEROS in cheap:
                    got += symbolic_zeros(subj, name, label or at, rng, options)
                # The first derivative at the captured operands is the call site's own check;
                # at a generated point nothing else checks it.
                fd = ((JVP,) if label else ()) + ((ORDER2,) if ORDER2 in chosen else ())
                if fd:
                    got += checks_at(subj, name, label or at, rng, chosen=fd, options=options,
                                     fd_options=dict(options, precision="native"), key=key,
                                     derivatives=derivatives)
        except Exception as e:  # noqa: BLE001 (a check raised at this point: an error of this rule only)
            got = [SiteReport(at=label or at, function=name, under="", calls=1, checked=0, status="error",
                              reason=raised(e), check="checks")]
        for r in got:
            where = base["at"] + (f" ({label})" if label else "")
            rows.append(dataclasses.replace(r, at=where, function=base["function"], under=base["under"], calls=0))
    return rows



@dataclasses.dataclass(frozen=True)
class SiteChecks:
    """Which of :func:`jgc.check_rule`'s checks :func:`jgc.check_rules` runs at each call site.

    Attributes:
      chosen: the check names (:data:`CHEAP`, with ``order 2`` where asked).
      explore: also at the points made from the captured operands (:mod:`points`).
      options: rtol / atol / step as given to the check.
      order: as asked of :func:`jgc.check_rules`.
    """

    chosen: tuple = CHEAP
    explore: bool = False
    options: dict = dataclasses.field(default_factory=dict)
    order: int | None = None  # 2: order 2 everywhere; None: where the loss differentiates through the rule


# Call sites per rule where the identities run: a rule's identities hold or fail whatever
# the call site, except for the operands it is fed, so two sites (different operand
# shapes first, then the largest operands) find what more would, at a bounded cost.
SITES_PER_RULE = 2


def _picked(prepared: dict) -> dict:
    by_rule: dict = {}
    for k, prep in prepared.items():
        by_rule.setdefault(k[0], []).append((k, prep))
    out = {}
    for items in by_rule.values():
        shapes, first, rest = set(), [], []
        for k, prep in items:
            sh = tuple(np.shape(prep.caps[0].operands[pos]) for pos in prep.varying)
            (rest if sh in shapes else first).append((k, prep))
            shapes.add(sh)
        rest.sort(key=lambda kp: -max((c.magnitude for c in kp[1].caps), default=0.0))
        out.update((first + rest)[:SITES_PER_RULE])
    return out


def _installed(where) -> bool:
    parts = os.path.abspath(where.file).split(os.sep) if where.file else []
    return "site-packages" in parts or "dist-packages" in parts


def _in_jax(where) -> bool:
    return bool(where.file) and os.path.abspath(where.file).startswith(_JAX_DIR)


def check_sites(prepared: dict, verdicts: dict, settings: SiteChecks | None, key, *, skip, primal_of,
                derivatives=None) -> dict:
    """Per rule key, the rows of the chosen checks at each of its prepared call sites.

    ``prepared`` maps a site key (rule key, site key) to the site ready to check (its
    equation, captured calls, varying operand positions, masks and outputs); the checks
    run on its first captured call. Where the batching check finds vmap of the rule wrong,
    the site's finite-difference verdict (which runs the rule under vmap) is replaced by
    "not checked" in ``verdicts``. ``skip(prep)`` says a site the checks cannot rebind
    (a rule closing over values traced inside the loss). ``primal_of(rule key)`` is where the
    rule's primal is defined: the rules of JAX itself (``jax.nn``, ``jax.numpy``), tested by
    JAX's own suite for batching and linearity, are left to their first-derivative check, so
    the identities' cost goes to the user's and libraries' rules.
    """
    out: dict = {}
    if settings is None or not settings.chosen:
        return out
    mine = {k: p for k, p in prepared.items() if not _in_jax(primal_of(k[0]))}
    for k, prep in _picked(mine).items():
        if skip(prep) or verdicts.get(k) is None or verdicts[k].status in ("error", "not checked"):
            continue
        base = {"at": str(prep.site.at), "function": prep.site.at.name, "under": " > ".join(prep.site.under)}
        operands = list(prep.caps[0].operands)
        masks = {pos: np.asarray(m)[0] for pos, m in prep.partial.items()}
        name = verdicts[k].function
        try:
            subject = call_subject(prep.site.eqn, operands, list(prep.varying), masks, list(prep.outs),
                                   names=list(prep.names), rng=np.random.default_rng(0), twin_eqn=prep.twin_eqn)
            # Only a rule declared with symbolic_zeros=True sees symbolic zeros; JAX gives any
            # other rule dense zeros, the same computation the check compares against. An
            # installed library's rule may read a symbolic zero as "not perturbed" on purpose
            # (Equinox's _stop_gradient_on_unperturbed stops the gradient there), so the
            # partial-differentiation patterns the loss never runs are compared for the user's
            # rules only.
            zeros = prep.site.eqn.params.get("symbolic_zeros") and not _installed(primal_of(k[0]))
            chosen = tuple(c for c in settings.chosen if c != ZEROS or zeros)
            rows = site_rows(subject, name, base["at"], chosen=chosen, explore=settings.explore,
                             options=settings.options, key=key, base=base, derivatives=derivatives)
        except Exception as e:  # noqa: BLE001 (the rule raised at its captured operands: reported on this site)
            rows = [SiteReport(**base, calls=0, checked=0, status="error", reason=raised(e), check="checks")]
        if any(r.check == BATCHING and r.status == "mismatch" for r in rows):
            verdicts[k] = under_vmap([verdicts[k]], True)[0]
        out.setdefault(k[0], []).extend(rows)
    return {rk: tuple(v) for rk, v in out.items()}


# -- one rule every way (jgc.check_rule) ----------------------------------------------------------------
def _custom_eqns(jaxpr, depth: int = 0):
    """The custom rule equations of a program, outside any other rule (through jit and calls)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in KINDS:
            yield eqn
        elif eqn.primitive.name in CALL_PRIMS and depth < 8:
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            if inner is not None:
                yield from _custom_eqns(getattr(inner, "jaxpr", inner), depth + 1)


def _naming(f, subject: _Subject) -> tuple[dict, Where, list]:
    """The RuleReport fields that name the rule (kind, primal, rule, fwd with file:line), the primal, notes."""
    notes = []
    if isinstance(f, jax.custom_batching.custom_vmap):
        p, r = _where_fn(f.fun), _where_fn(f.vmap_rule) if f.vmap_rule is not None else None
        p = p or Where(function_name(f), "", 0)
        return _base("custom_vmap", p, r or Where("?", "", 0), None), p, notes
    try:
        eqns = list(_custom_eqns(jax.make_jaxpr(subject.go)(*subject.x).jaxpr))
    except Exception:  # noqa: BLE001 (naming only: the checks report the error)
        eqns = []
    # Library markers around the user's rule (Equinox's nondifferentiable) do not name it.
    eqns = [e for e in eqns if not _library_intended(rule_names(e)[0])] or eqns
    if len(eqns) == 1:
        p, r, fw = rule_names(eqns[0])
        return _base(KINDS[eqns[0].primitive.name], p, r, fw), p, notes
    me = _where_fn(f) or Where(function_name(f), "", 0)
    if eqns:
        found = sorted({str(rule_names(e)[0].name) + " (" + str(rule_names(e)[0]) + ")" for e in eqns})
        notes.append(f"{len(eqns)} custom rule calls inside: " + ", ".join(found))
    return _base("function", me, me, None), me, notes


def _base(kind: str, p: Where, r: Where, fw: Where | None) -> dict:
    return {"kind": kind, "name": p.name, "primal_at": str(p), "rule_name": r.name, "rule_at": str(r),
            "fwd_name": fw.name if fw else "", "fwd_at": str(fw) if fw else ""}


def _primal_jvp(f, subject: _Subject):
    """For a custom_vjp: JAX's JVP of the undecorated primal function (what its VJP must transpose)."""
    fun = _primal_function(f)
    if fun is f or not callable(fun) or subject.fwd is None:
        return None
    bare = _Subject(fun, subject.leaves, subject.treedef, subject.diff, subject.names, subject.x)
    try:
        bare.jvp(subject.x, subject.tangent(np.random.default_rng(0)))
    except Exception:  # noqa: BLE001 (a primal JAX cannot differentiate: the dot product is not run)
        return None
    return bare.jvp


def check_one(f, args, *, nondiff_argnums, seed, chosen, explore, precision, options, t0, derivatives,
              label: str = "the given args") -> RulesReport:
    """:func:`jgc.check_rule` after its arguments are checked (``derivatives``: the finite-difference checks)."""
    api = "jgc.check_rule"
    nondiff = {int(k) for k in ((nondiff_argnums,) if isinstance(nondiff_argnums, int) else nondiff_argnums)}
    nondiff |= set(getattr(f, "nondiff_argnums", ()) or ())
    if type(f).__name__ == "filter_custom_vjp" and type(f).__module__.startswith("equinox"):
        nondiff |= set(range(1, len(args)))  # Equinox differentiates its first argument only
    subject, held = hold_untraceable(make_subject(f, args, nondiff, api))
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    capabilities(subject, rng)
    base, where, notes = _naming(f, subject)
    if held:
        notes.append(f"held as given: {', '.join(held)} (a Python number that f uses in Python control flow, so "
                     "neither JAX nor this check can differentiate it; pass it in nondiff_argnums to say so)")
    name = base["name"]
    intended = _user_intended(where) or _library_intended(where)
    options = {k: v for k, v in options.items() if v is not None}
    fd_options = dict(options, precision=precision)
    if subject.fwd is not None and subject.rev is not None:
        row = site(PRIMAL, label, name, "error", reason=f"neither jax.jvp nor jax.vjp of f runs: "
                   f"{subject.fwd}; {subject.rev}")
        rr = RuleReport.from_sites(base, (row,), 1)
        return RulesReport(ok=False, rules=(rr,), function=name, seconds=time.perf_counter() - t0,
                           notes=tuple(notes), api=api)
    if subject.fwd is not None and "custom_vjp" not in subject.fwd:
        notes.append(f"jax.jvp of f does not run ({subject.fwd}): checked in reverse mode")
    if subject.rev is not None:
        notes.append(f"jax.vjp of f does not run ({subject.rev}): checked in forward mode")
    primal_jvp = _primal_jvp(f, subject)
    rows = []
    todo = [(label, subject, "")] + (explored(subject, rng) if explore else [])
    for at, subj, why in todo:
        if subj is None:
            rows.append(skipped(at, name, why))
            continue
        rows += checks_at(subj, name, at, rng, chosen=chosen, options=options, fd_options=fd_options, key=key,
                          intended=intended, primal_jvp=primal_jvp, derivatives=derivatives)
    rr = RuleReport.from_sites(base, tuple(rows), len(todo))
    if intended and rr.status == "ok" and any(r.status == "intended" for r in rows):
        rr = RuleReport(**base, status="intended", reason=intended, sites=tuple(rows), calls=len(todo))
    return RulesReport.build([rr], function=name, seconds=time.perf_counter() - t0, notes=notes,
                             api=api)



# -- rules the traced loss hides (rules.hidden), checked at their captured calls ----------------------
def _key(obj):
    span = _code_span(_primal_function(obj))
    return span or id(obj)


def _in_jax(obj) -> bool:
    span = _key(obj)
    return isinstance(span, tuple) and os.path.abspath(span[0]).startswith(_JAX_DIR)


def check_hidden(calls: list, *, order: int | None, explore: bool, options: dict, derivatives, seed: int = 0) -> list:
    """A :class:`RuleReport` per rule among ``calls``, checked at its first and its largest call
    (``derivatives``: the finite-difference checks, as :func:`sitechecks.checks_at` takes them)."""
    groups: dict = {}
    for c in calls:
        groups.setdefault(_key(c.obj), []).append(c)
    out = []
    for group in groups.values():
        picks = [group[0]]
        largest = max(group, key=lambda c: _magnitude(jax.tree_util.tree_leaves(c.args)))
        if largest is not group[0]:
            picks.append(largest)
        under_ad = any(c.why == UNDER_AD for c in group)
        chosen = tuple(c for c in CHECKS if c != ORDER2 or order == 2 or (order is None and under_ad))
        if _in_jax(group[0].obj):
            # JAX's own rules (jax.nn, jax.numpy), tested by JAX's suite for batching and
            # linearity: their derivatives only, as at the call sites of the traced program.
            chosen = tuple(c for c in chosen if c in (JVP, VJP, ORDER2))
        rows, base = [], None
        for c in picks:
            f = functools.partial(c.obj, **c.kwargs) if c.kwargs else c.obj
            rep = check_one(f, c.args, nondiff_argnums=(), seed=seed, chosen=chosen, explore=explore,
                            precision="native", options=options, t0=time.perf_counter(), derivatives=derivatives,
                            label=f"{c.at} ({c.why})")
            rr = rep.rules[0]
            base = base or {k: getattr(rr, k) for k in ("kind", "name", "primal_at", "rule_name", "rule_at",
                                                         "fwd_name", "fwd_at")}
            rows += [dataclasses.replace(s, function=rr.name, under=c.why) for s in rr.sites]
        out.append(RuleReport.from_sites(base, tuple(rows), len(group)))
    return out
