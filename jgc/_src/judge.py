"""The judge: from analytic values and finite-difference estimates to a status per element.

One driver, :func:`judge`, runs the same sequence for every check, scalar costs and
vector functions alike:

1. a cheap pass classifies every element against atol + rtol·max(|a|, |n|) plus the
   error the method can explain (``compare.classify``);
2. elements that fail it are re-estimated with a Richardson table (steps h, 2h, 4h),
   whose one-sided differences feed the kink test, and re-classified; the refined
   figures are spliced back in place of the cheap ones (:func:`refine`);
3. confirmed mismatches take a step ladder (is the numerical value stable in h?);
4. derivatives too small for central differences to resolve take a complex-step probe;
   at float64, those nothing resolves are inconclusive with their reason, and rounding
   residues of a true 0 stay ok (:func:`settle_tail`).

Each side supplies its evidence through :class:`Evidence` (the cheap pass, Richardson,
central differences at a step, the complex step; each look but the first optional),
so the sides are adapters: a scalar cost's leaf (:func:`judge_leaf`: every look), a
Jacobian's columns (``jacobian``) and JVP rows and VJP pairings (``products``), the
complex step of both from ``vector_complex`` (the transpose identity takes the cheap
pass only), and the directional screen
(``screening``: its one estimate). The vector checks judge entries in blocks, one
output leaf against one input leaf, each with its own :func:`limits`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import numpy as np

from . import compare, compat, policy, staircase, stencils, vector_native
from .report import LeafReport, Report
from .statuses import IMPRECISE, INCONCLUSIVE, MISMATCH, OK
from .summary import assemble, summarize
from .validate import Options


@dataclasses.dataclass
class Judged:
    """Per-element figures of a judgement, arrays of one shape (updated in place by refine)."""

    num: np.ndarray  # the numerical derivative
    err: np.ndarray  # the error the method can explain
    tol: np.ndarray  # the tolerance of the analytic side
    finite: np.ndarray  # every J value behind num was finite
    codes: np.ndarray  # status codes (see statuses.py)
    # Why some elements have their status, where the status alone does not say it
    # (flat index -> reason): the float64 tail elements nothing resolves.
    why: dict = dataclasses.field(default_factory=dict)

    @property
    def bound(self) -> np.ndarray:
        """The allowed difference |a − n|: tolerance plus method error."""
        return self.tol + self.err


@dataclasses.dataclass(frozen=True)
class Limits:
    """The analytic side's tolerance for a group of elements (scalars or arrays like them)."""

    rtol: float | np.ndarray
    atol: float | np.ndarray
    floor: float | np.ndarray  # derivatives below it are judged against it (inconclusive)
    tiny: float = 0.0  # below it a value cannot hold full relative precision
    # The analytic side's own measured rounding (policy.ANALYTIC_SAFETY included), added
    # to the method's error bar: 0 where the analytic side runs at the reference precision.
    analytic: float | np.ndarray = 0.0
    # The analytic side runs at the reference's own precision (float64): a nonzero
    # derivative the reference cannot tell from 0 is ``inconclusive`` there (see
    # :func:`settle_tail`), since no check at a higher precision could settle it. Off
    # for narrower dtypes, whose absolute tolerance stands far above what the float64
    # reference resolves. A mask like the elements where only some blocks are float64.
    tail: bool | np.ndarray = False
    # Analytic values at most this size are float64 rounding residues of a true 0, not
    # tails (see :func:`residue_floor`): they stay ok. 0: no such floor.
    residue: float | np.ndarray = 0.0

    def at(self, idx: np.ndarray) -> Limits:
        """The limits of the elements at flat indices ``idx``."""
        pick = (lambda v: np.ravel(v)[idx] if np.ndim(v) else v)
        return Limits(pick(self.rtol), pick(self.atol), pick(self.floor), self.tiny, pick(self.analytic),
                      pick(self.tail), pick(self.residue))


# Multiples of the unit round-off, times the size of the terms an element is summed
# from, that rounding leaves at a true 0: a sum of n terms of size T rounds by up to
# about n·u·T, and the few terms of a normalisation or a softmax row leave ≈ 0.3-2·u·T
# (LayerNorm at n = 50: 7e-17 from terms of ≈ 1). 16, as the complex step's allowance
# for a chain of operations (stencils.complex_step).
RESIDUE_ULPS = 16.0


def residue_floor(block: np.ndarray, u: float) -> np.ndarray:
    """Per entry of a 2-D block of analytic derivatives (a Jacobian block, J·t rows
    against outputs, pairings), the size under which a value is a rounding residue of 0.

    What tells a residue from a tail is the size of the terms that produce this very
    entry, not of the block: σ'(40) = 4e-18 is a tail whose terms are all ≈ 4e-18 (an
    elementwise op: its row and column hold nothing larger), while the 1e-17 entries
    of a LayerNorm Jacobian are what is left of terms ≈ 1 that cancel, and those terms
    show in the entries beside it, in its row (the same output) and in its column (the
    same input). So the floor is ``RESIDUE_ULPS``·u times the smaller of the entry's row
    and column scales: an entry is a residue only if both its output and its input
    carry derivatives 1/(16u) times larger. An isolated tail (its row or its column
    tiny) keeps its own size as scale and is never taken for a residue; a scalar
    cost's gradient has no such structure (its 'column' is the element itself), so a
    scalar check relies on the complex step's own rounding bar (:func:`_complex_probe`)
    instead. Used where the complex step cannot run: it is the weaker evidence.
    """
    m = np.where(np.isfinite(block), np.abs(block), 0.0)
    if m.size == 0:
        return np.zeros(np.shape(block))
    rows = np.max(m, axis=1, keepdims=True)
    cols = np.max(m, axis=0, keepdims=True)
    return RESIDUE_ULPS * u * np.minimum(rows, cols)


def limits(vp, k: int, ol, rtol, atol, g_ref, *, block=None) -> Limits:
    """The limits of a vector check's block (output leaf ol, input leaf k), its largest |g| g_ref.

    The tolerance is in the coarser of the two dtypes (a function that computes in
    float32 inside a float64 check rounds there), at the dtypes given with
    ``analytic="native"``, and scaled by the block's largest derivative. ``block``: the
    block's analytic values, compared with finite differences: where they are float64,
    its tails nothing resolves are inconclusive (``Limits.tail``), and values under
    :func:`residue_floor` are rounding residues. None for a comparison exact on both
    sides (the transpose identity), which has no tail.
    """
    d = vector_native.analytic_dtype(vp, k, ol)
    rt, at = policy.default_tolerances(d, g_ref, rtol, atol)
    tail = block is not None and np.dtype(d) == np.float64
    residue = residue_floor(np.asarray(block), policy.unit_roundoff(d)) if tail else 0.0
    return Limits(rt, at, policy.inconclusive_floor(g_ref), tail=tail, residue=residue)


@dataclasses.dataclass
class Refined:
    """A Richardson re-estimate of some elements, flat, in the order of their indices."""

    value: np.ndarray
    err: np.ndarray
    finite: np.ndarray
    # For the kink test (None: not tested, e.g. complex coordinates): one-sided
    # differences and the central table at h, 2h, 4h, and the noise of each element.
    onesided: np.ndarray | None = None
    table: np.ndarray | None = None
    noise: np.ndarray | None = None


def classify(a, num, err, finite, lim: Limits, *, kink=None, imprecise: bool = True) -> Judged:
    """Classify every element; ``imprecise`` also flags precision lost under atol."""
    err = err + lim.analytic
    tol = compare.tolerance(a, num, lim.rtol, lim.atol)
    rel = lim.rtol * np.maximum(np.abs(a), np.abs(num)) if imprecise else None
    codes = compare.classify(a, num, err, tol, finite, kink=kink, floor=lim.floor, rel=rel, tiny=lim.tiny)
    return Judged(num, err, tol, finite, codes)


def suspects(judged: Judged, a) -> np.ndarray:
    """Flat indices of the elements worth refining: mismatches with a finite analytic value."""
    return np.flatnonzero((np.ravel(judged.codes) == MISMATCH) & np.isfinite(np.ravel(a)))


def suspect_lines(judged: Judged, a, axis: int) -> np.ndarray:
    """Columns (``axis=0``) or rows (``axis=1``) of a 2-D block that hold a suspect."""
    return np.flatnonzero(np.any((judged.codes == MISMATCH) & np.isfinite(a), axis=axis))


def line_indices(shape: tuple, lines: np.ndarray, axis: int) -> np.ndarray:
    """Flat indices (row-major) of every element of the columns (``axis=0``) or rows (``axis=1``)."""
    rows, cols = (np.arange(shape[0]), lines) if axis == 0 else (lines, np.arange(shape[1]))
    return np.ravel_multi_index(np.ix_(rows, cols), shape).ravel()


def refine(judged: Judged, a, idx: np.ndarray, est: Refined, lim: Limits, *, imprecise: bool = True) -> None:
    """Re-classify elements ``idx`` (flat) from a refined estimate; splice in the mismatches.

    Only elements still a mismatch after the cheap pass take the refined figures (a
    caller may re-estimate whole rows or columns around its suspects).
    """
    a2 = np.ravel(a)[idx]
    lim2 = lim.at(idx)
    kink = None
    if est.onesided is not None:
        t2 = compare.tolerance(a2, est.value, lim2.rtol, lim2.atol)
        kink = stencils.kink(est.onesided, est.table, est.noise, a2, t2)
    new = classify(a2, est.value, est.err, est.finite, lim2, kink=kink, imprecise=imprecise)
    sel = np.ravel(judged.codes)[idx] == MISMATCH
    at = idx[sel]
    for name in ("num", "err", "tol", "finite", "codes"):
        getattr(judged, name).flat[at] = getattr(new, name)[sel]


# -- the driver --------------------------------------------------------------------------
def _no_note(hidden, err) -> None:
    """The default of ``ComplexStep.unresolved``: nothing to say."""


@dataclasses.dataclass(frozen=True)
class ComplexStep:
    """The complex-step evidence of a side that has it: a scalar cost's real leaf, a
    Jacobian's columns of a real input leaf (:func:`line_complex`), J·t rows along real
    tangents and the pairings built from them (real outputs)."""

    at: Callable  # (flat element indices, relative step h) -> stencils.Estimate of Im J(θ + ih)/h
    h: float  # the complex step's relative step
    u: float  # the reference's unit round-off
    # (mask of the unresolved elements with analytic 0, error bars) -> None: says so when
    # the cost is not complex-safe
    unresolved: Callable = _no_note
    # The elements it can evaluate (None: all): a complex output or input has no
    # complex step of its own (Im of its (Re, Im) view is not a derivative).
    where: np.ndarray | None = None
    # Exact zeros probed (sampled): a scalar leaf confirms its dead units; a Jacobian,
    # full of structural zeros, probes only nonzero values (every zero costs a column).
    zeros: int = 0


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What one side of a check can supply to :func:`judge`; every look but the first optional.

    A side is an adapter of this interface: a scalar cost's leaf, a Jacobian's columns,
    JVP rows, VJP pairings. Arrays are shaped like the analytic values ``a``; flat
    indices are row-major into them.
    """

    # The cheap pass: () -> (num, err, finite), the numerical values, the error the
    # method can explain, and whether every J value behind them was finite.
    cheap: Callable
    # Richardson re-estimates (steps h, 2h, 4h, one-sided values for the kink test where
    # the side has them): suspects -> Refined, in the order of their flat indices. The
    # suspects are flat indices, or with ``lines`` the columns (0) or rows (1) that hold
    # one, re-estimated whole.
    richardson: Callable | None = None
    lines: int | None = None
    # Central differences for the step ladder: (flat indices, relative step h) ->
    # (value, round-off scale σ·gain, finite) of those elements.
    central: Callable | None = None
    complex_step: ComplexStep | None = None
    imprecise: bool = True  # also flag precision lost under atol (see classify)
    h_rel: float = 0.0  # the cheap pass's relative step: the ladder starts below it
    u: float = 0.0  # the reference's unit round-off: the ladder stops at its balancing step


@dataclasses.dataclass
class Verdict:
    """What :func:`judge` found: the figures, and which elements Richardson re-estimated."""

    judged: Judged
    refined_at: np.ndarray  # flat indices re-estimated (empty when none was)
    refined: Refined | None  # their re-estimate
    limits: Limits  # the limits judged against (from the cheap pass where they depend on it)


def judge(a, lim: Limits | Callable, ev: Evidence) -> Verdict:
    """Judge analytic values ``a`` on evidence ``ev``: classify → refine → ladder → complex probe.

    1. the cheap pass classifies every element (:func:`classify`); ``lim`` may be a
       callable (num, finite) -> Limits where the tolerance depends on that pass;
    2. elements that fail it (or the lines holding them) are re-estimated with
       Richardson and the kink test, and the refined figures spliced in (:func:`refine`);
    3. confirmed mismatches take the step ladder (:func:`step_ladder`);
    4. tiny derivatives central differences cannot resolve take the complex step;
       at float64 (``Limits.tail``), a nonzero one that nothing resolves is
       inconclusive, with its reason (:func:`settle_tail`).

    Each look runs only where the side supplies its evidence.
    """
    num, err, finite = ev.cheap()
    lim = lim(num, finite) if callable(lim) else lim
    judged = classify(a, num, err, finite, lim, imprecise=ev.imprecise)
    idx, est = np.zeros(0, np.int64), None
    if ev.richardson is not None:
        if ev.lines is None:
            cand = idx = suspects(judged, a)
        else:
            cand = suspect_lines(judged, a, axis=ev.lines)
            idx = line_indices(np.shape(a), cand, axis=ev.lines) if cand.size else idx
        if cand.size:
            est = ev.richardson(cand)
            refine(judged, a, idx, est, lim, imprecise=ev.imprecise)
            if ev.central is not None:
                bad = idx[np.ravel(judged.codes)[idx] == MISMATCH]
                step_ladder(judged, a, bad, functools.partial(ev.central, bad), h_rel=ev.h_rel, u=ev.u,
                            floor=lim.at(bad).floor)
    resolved, reason, bar = None, NO_COMPLEX_STEP, None
    cs = ev.complex_step
    if cs is not None:
        resolved, reason, bar = _complex_probe(cs, a, judged, lim)
        if cs.where is not None:
            said = reason
            reason = (lambda j: said if cs.where.flat[j] else NO_COMPLEX_STEP)
    if np.any(lim.tail):
        settle_tail(judged, a, lim, resolved, reason, bar=bar)
    return Verdict(judged, idx, est, lim)


def line_complex(estimate: Callable, shape: tuple, out_axis: int) -> Callable:
    """The complex step's look at elements of a block judged by lines (see ``ComplexStep.at``):
    ``estimate(lines, h)`` gives Im f(x + i·h·v)/h of whole lines (a Jacobian column, a
    tangent's J·t), (lines · outputs) flat, the outputs along ``out_axis``. Each line is
    evaluated once, however many of its elements are asked."""
    def at(idx, h):
        where = np.unravel_index(np.asarray(idx, np.int64), shape)
        out, line = where[out_axis], where[1 - out_axis]
        lines, inv = np.unique(line, return_inverse=True)
        est = estimate(lines, h)
        pick = inv * shape[out_axis] + out
        return stencils.Estimate(est.value[pick], est.err_round[pick], est.err_trunc[pick], est.finite[pick])

    return at


def line_central(estimate: Callable, shape: tuple, out_axis: int, sigma: np.ndarray) -> Callable:
    """The ladder's central differences for a block judged by lines (see ``Evidence.lines``).

    The block has the outputs along ``out_axis``; ``estimate(lines, h)`` gives the central
    differences of whole lines at relative step h, (lines · outputs) flat; ``sigma``: the
    noise of each output.
    """
    def central(bad, h):
        idx = np.unravel_index(bad, shape)
        out, line = idx[out_axis], idx[1 - out_axis]
        lines, where = np.unique(line, return_inverse=True)
        pick = where * shape[out_axis] + out  # (line, output) of each element in the estimate
        est = estimate(lines, h)
        return est.value[pick], sigma[out] * est.err_round[pick], est.finite[pick]

    return central


# -- a scalar cost's leaf -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """How the elements of one leaf of a scalar cost are judged."""

    stencil: str  # of the cheap pass
    h_rel: float  # its relative step
    step: float | None  # the user's step (None: chosen from the measured noise)
    rtol: float | None  # the user's tolerances (None: per dtype)
    atol: float | None
    g_ref: float  # the leaf's largest |g| (the check's when the leaf's is 0)


def _fold(est: stencils.Estimate, sigma: float, m: int, is_c: bool):
    """(value, err, finite) per element from an estimate over an element's coordinates."""
    err_c = compare.method_error(est.err_round, est.err_trunc, sigma)
    err = err_c[:m] + (err_c[m:] if is_c else 0.0)
    finite = est.finite[:m] & (est.finite[m:] if is_c else True)
    return stencils.to_elements(est.value, m, is_c), err, finite


def judge_leaf(problem, steps, k: int, coords: np.ndarray, a: np.ndarray, plan: Plan):
    """Judge the elements behind real coordinates ``coords`` of leaf k: the scalar adapter.

    ``a``: their analytic values (complex leaves: both halves of each element are in
    ``coords``). The evidence: the cheap pass with ``plan.stencil``, Richardson with
    one-sided values (real leaves) where the cheap pass is not Richardson already, the
    ladder's central differences (real leaves) and the complex step (real leaves,
    unless the cheap pass took it). Returns (elements, Judged, one-sided slopes of
    refined elements or None).
    """
    x = problem.dyn[k]
    m, is_c = x.size, np.iscomplexobj(x)
    elems = np.unique(coords % m)

    def cheap():
        return _fold(problem.estimate(k, coords, plan.stencil, plan.h_rel), problem.sigma, elems.size, is_c)

    def richardson(cand):
        sel = elems[cand]
        rich = problem.estimate(k, np.concatenate([sel, sel + m]) if is_c else sel, "richardson",
                                steps.relative("richardson", plan.step))
        value, e2, f2 = _fold(rich, problem.sigma, sel.size, is_c)
        if is_c:
            return Refined(value, e2, f2)
        return Refined(value, e2, f2, rich.onesided, rich.table,
                       problem.sigma * rich.err_round / policy.RICHARDSON_NOISE_GAIN)

    def central(bad, h):
        est = problem.estimate(k, elems[bad], "central", h)
        return est.value, problem.sigma * est.err_round, est.finite

    ev = Evidence(
        cheap, richardson=None if plan.stencil == "richardson" else richardson,
        central=None if is_c else central, h_rel=plan.h_rel, u=problem.u,
        complex_step=None if is_c or plan.stencil == "complex" else ComplexStep(
            lambda idx, h: problem.estimate(k, elems[idx] % m, "complex", h), steps.relative("complex", None),
            problem.u, functools.partial(_unresolved_note, problem, k, elems=elems, a=a), zeros=COMPLEX_PROBES))
    verdict = judge(a, lambda num, finite: _leaf_limits(problem, k, elems, a, plan, num=num, finite=finite), ev)
    if not is_c and plan.step is None and staircase.noisy(steps):
        # A cost quantised inside (bfloat16 compute): inconclusive elements get steps that span the staircase.
        still = staircase.span(problem, k, elems, a, verdict.judged, verdict.limits, h_rel=plan.h_rel)
        if still:
            staircase.add_note(problem.notes, problem.paths[k], still, elems.size,
                               float(problem.sigma) / abs(float(np.real(problem.j0))))
    refined = verdict.refined
    onesided = None if refined is None or refined.onesided is None else (verdict.refined_at, refined.onesided)
    return elems, verdict.judged, onesided


def _leaf_limits(problem, k: int, elems: np.ndarray, a: np.ndarray, plan: Plan, *, num, finite) -> Limits:
    """The limits of elements ``elems`` of leaf k, whose cheap pass gave ``num`` (``finite``)."""
    is_c = np.iscomplexobj(problem.dyn[k])
    adtype = problem.orig_dtypes[k] if a.dtype == problem.orig_dtypes[k] else a.dtype
    rt, at = policy.default_tolerances(adtype, plan.g_ref, plan.rtol, plan.atol)
    spread = getattr(problem, "analytic_spread", None)
    if spread is not None and plan.atol is None:
        # At the user's dtype, an element's rounding is absolute at the scale of the terms
        # it sums (1 − tanh² sums terms of size 1 for a derivative of 1e-8), which a
        # gradient does not show. Its stand-in: the largest change of J per relative unit
        # change of any coordinate (max_j |g_j|·s_j), per unit of this coordinate's scale
        # s_i. Scale-free (leaves of 1e4 and 1e-6 get their own); below it, lost digits
        # are 'imprecise', not a mismatch.
        at = np.maximum(at, policy.default_atol_factor(adtype) * problem.analytic_scale
                        / problem.scales[k].ravel()[elems])
        # A cost that rounds terms far larger than itself (analytic.cost_cancellation)
        # rounds its gradient from them too: each element may lose that factor times
        # 32·u of its own reference value.
        at = np.maximum(at, policy.default_atol_factor(adtype) * problem.cost_cancellation
                        * np.where(finite, np.abs(num), 0.0))
    return Limits(rt, at, policy.inconclusive_floor(plan.g_ref), float(compat.finfo(adtype).tiny),
                  0.0 if spread is None or is_c else policy.ANALYTIC_SAFETY * spread[k].ravel()[elems],
                  tail=np.dtype(adtype) == np.float64)


def judge_elements(problem, steps, a_leaves: list, k: int, elems: np.ndarray, opts: Options, *, g_all: float,
                   h_rel: float | None = None) -> tuple[LeafReport, float]:
    """Judge elements ``elems`` of leaf k individually and summarise them: (LeafReport, h/s).

    ``opts``: the check's options (stencil, step, tolerances); ``g_all`` stands in for
    the leaf's largest |g| when that is 0; ``h_rel`` is the first pass's relative step
    (default: calibrated on the leaf's pilots).
    """
    stencil, step = opts.stencil, opts.step
    a_full = a_leaves[k].ravel()
    g_leaf = float(np.max(np.abs(a_full[np.isfinite(a_full)]), initial=0.0))
    g_ref = g_leaf if g_leaf > 0 else g_all
    x = problem.dyn[k]
    where = {"path": problem.paths[k], "shape": tuple(x.shape), "dtype": problem.orig_dtypes[k].name,
                 "size": int(x.size), "g_ref": g_ref}
    if elems.size == 0:
        e = np.zeros(0)
        return summarize(e, e, e, e.astype(np.int8), indices=np.zeros(0, np.int64), step=math.nan,
                         **where), steps.relative(stencil, step)
    h_rel = steps.leaf(k, stencil, step, a_full) if h_rel is None else h_rel
    m = x.size
    elems = np.unique(elems % m)
    is_c = np.iscomplexobj(x)
    coords = np.concatenate([elems, elems + m]) if is_c else elems  # both parts of a complex element
    a = a_full[elems]
    if is_c and not np.iscomplexobj(a):
        a = a.astype(np.complex128)
    plan = Plan(stencil, h_rel, step, opts.rtol, opts.atol, g_ref)
    elems, judged, onesided = judge_leaf(problem, steps, k, coords, a, plan)
    return summarize(a, judged.num, judged.bound, judged.codes, indices=elems, onesided=onesided, error=judged.err,
                     reasons=judged.why, step=float(np.median(h_rel * problem.scales[k][elems])), **where), h_rel


def judge_all(problem, steps, a_leaves: list, elems: list, opts: Options, *, mode: str, notes=()) -> Report:
    """Judge elements ``elems[k]`` of every leaf k with options ``opts`` and assemble the report."""
    g_all = max((float(np.max(np.abs(a), initial=0.0)) for a in a_leaves), default=0.0)
    g_all = g_all if np.isfinite(g_all) else 0.0
    leaves, h = [], []
    for k, e in enumerate(elems):
        leaf, h_rel = judge_elements(problem, steps, a_leaves, k, e, opts, g_all=g_all)
        leaves.append(leaf)
        h.append(h_rel)
    return assemble(problem, leaves, stencil=opts.stencil, step=float(np.median(h)), strict=opts.strict,
                    mode=mode, notes=notes, cost=problem.j0)


# Elements per leaf with an analytic value of exactly 0 probed with the complex step (1
# evaluation each, plus 2 at the validation elements): enough for the saturated tails of
# a layer, bounded for leaves full of exact zeros (dead ReLU units), which the probe
# confirms as zeros. Nonzero candidates are all probed (at most the two evaluations per
# element that the central differences already took): at float64 an unprobed one would
# stay inconclusive.
COMPLEX_PROBES = 256

# Why a float64 tail element stays inconclusive (see settle_tail), by what the complex
# step could do there.
NO_COMPLEX_STEP = "this check has no complex step to resolve it"
NOT_COMPLEX_SAFE = "the cost is not complex-safe (or fails with complex inputs), so the complex step could not resolve it"
UNVALIDATED = ("no element of the leaf is resolved to validate the complex step against, so the complex "
               "step could not resolve it")
NOT_PROBED = "it was not among the elements probed with the complex step"
TOO_WIDE = "the complex step's own error bar ({:.1e}, from its steps h and 3h) is too wide to resolve it either"


def unresolved(a, judged: Judged, at) -> np.ndarray:
    """Elements hidden under the absolute tolerance (|a| ≤ atol) whose reference does not
    resolve them (error bar above ``compare.RESOLVED`` of their value), still ok or inconclusive."""
    mag = np.maximum(np.abs(a), np.abs(judged.num))
    return ((judged.err > compare.RESOLVED * mag) & np.isfinite(a) & (np.abs(a) <= at)
            & ((judged.codes == OK) | (judged.codes == INCONCLUSIVE)))


def _complex_probe(cs: ComplexStep, a, judged: Judged, lim: Limits) -> tuple[np.ndarray | None, str, np.ndarray | None]:
    """Resolve tiny derivatives that central differences cannot, with the complex step.

    An element hidden under the absolute tolerance (|a| ≤ atol) whose central
    difference does not resolve it (:func:`unresolved`) may still be a derivative that
    the analytic side rounded away: σ' = σ(1 − σ) is 0 at x = 40 in float64, where the
    truth is 4e-18, far below the ≈1e-13 that central differences resolve. Im J(θ + ih)/h
    has no subtraction, so it resolves such values when the cost is complex-safe.
    Whether it is, we test on the same leaf: the complex step at the two largest-|a|
    elements must agree with their resolved analytic values (an abs, conj or real-only
    op breaks that). A cost that is not complex-safe, or that fails with complex
    inputs, is left as it was. The probe only ever adds ``IMPRECISE``: it never turns a
    pass into a mismatch. ``cs.where`` limits it to the elements it can evaluate, and
    ``cs.zeros`` to that many exact zeros (sampled).

    Returns (the elements the complex step resolved, a boolean mask or None where it
    resolved none; why the others were not resolved; the complex step's error bar per
    element, NaN where it did not run, or None), for :func:`settle_tail`.
    """
    rt, at = lim.rtol, lim.atol
    shape = np.shape(a)
    can = np.ones(shape, bool) if cs.where is None else np.asarray(cs.where, bool).reshape(shape)
    hidden = (unresolved(a, judged, at) & can).ravel()
    # Float64 elements already inconclusive (the error bar wider than the derivative) in
    # a block of nothing but rounding residues (J·t of sum(LayerNorm(x)), identically 0:
    # its largest value, which sets the floor, is a residue too) are probed for the
    # residue test alone (see _residues_ok); their verdict is otherwise unchanged.
    wide = ((judged.codes == INCONCLUSIVE) & np.broadcast_to(np.asarray(lim.tail, bool), shape) & can
            & (np.asarray(a) != 0) & np.isfinite(a)).ravel() & ~hidden
    if not (hidden.any() or wide.any()) or np.all(np.asarray(at) <= 0):
        return None, NOT_PROBED, None
    # Flat copies to read; results are written back through ``.flat`` (a block judged by
    # columns may hold transposed, non-contiguous arrays).
    a = np.ravel(a)
    num, err, tol = (np.ravel(v) for v in (judged.num, judged.err, judged.tol))
    zero = np.flatnonzero(hidden & (a == 0))
    if zero.size > cs.zeros:
        zero = zero[np.linspace(0, zero.size - 1, cs.zeros).astype(np.int64)] if cs.zeros else zero[:0]
    cand = np.union1d(np.flatnonzero((hidden | wide) & (a != 0)), zero)
    if cand.size == 0:
        return None, NOT_PROBED, None
    good = np.flatnonzero((err <= compare.RESOLVED * np.abs(num)) & (np.abs(a - num) <= tol) & can.ravel())
    check_at = good[np.argsort(-np.abs(a[good]))[:2]]
    h = cs.h
    if check_at.size == 0:
        # Nothing resolved to validate the complex step against: its values cannot be
        # trusted, but its rounding can (see _rounding_residues).
        return _rounding_residues(cs, judged, a, cand), UNVALIDATED, None
    try:
        with np.errstate(all="ignore"):
            e1 = cs.at(np.concatenate([check_at, cand]), h)
            e3 = cs.at(cand, 3.0 * h)
    except Exception:  # noqa: BLE001 - not complex-safe: central differences stand
        cs.unresolved(hidden & (a == 0), err)
        return None, NOT_COMPLEX_SAFE, None
    v = np.concatenate([e1.value, e3.value])
    fin = np.concatenate([e1.finite, e3.finite])
    vc, v1, v3 = v[: check_at.size], v[check_at.size: check_at.size + cand.size], v[check_at.size + cand.size:]
    # Complex-safe only if the probe reproduces the resolved elements.
    if not np.all(fin[: check_at.size]) or np.any(
            np.abs(vc - a[check_at]) > tol[check_at] + err[check_at]):
        cs.unresolved(hidden & (a == 0), err)
        return None, NOT_COMPLEX_SAFE, None
    # Rounding of the imaginary part is relative to the terms summed for that element,
    # not to its value: two steps (h, 3h) round differently, so their spread (×8, as the
    # round-off safety) measures it; 16u|v| covers a chain of complex operations.
    e_c = policy.ROUNDOFF_SAFETY * np.abs(v1 - v3) + 16.0 * cs.u * np.abs(v1)
    ok_fin = fin[check_at.size: check_at.size + cand.size] & fin[check_at.size + cand.size:]
    at_c = np.ravel(at)[cand] if np.ndim(at) else at
    rt_c = np.ravel(rt)[cand] if np.ndim(rt) else rt
    rel = rt_c * np.maximum(np.abs(a[cand]), np.abs(v1))
    passed = np.abs(a[cand] - v1) <= compare.tolerance(a[cand], v1, rt_c, at_c) + e_c
    flag = compare.imprecise(a[cand], v1, e_c, rel, passed & ok_fin, lim.tiny) & hidden[cand]
    idx = cand[flag]
    judged.num.flat[idx], judged.err.flat[idx] = v1[flag], e_c[flag]
    judged.codes.flat[idx] = IMPRECISE
    resolved = np.zeros(a.size, bool)
    # Resolved: the complex step's own bar is within compare.RESOLVED of its value (or
    # of the analytic value), or it confirms an exact 0 to within the tolerance. Or
    # explained: both the analytic value and the complex step's lie within that bar,
    # which measures the rounding of the very terms this element is summed from (their
    # spread between steps h and 3h; a smooth derivative does not depend on h at
    # h ≈ 1e-20·s): the element is a rounding residue of a true 0 (a LayerNorm input's
    # 1e-16 where the exact gradient is 0, from terms ≈ 1), which float64 itself cannot
    # hold, not a tail (σ'(40) = 4e-18 comes from terms of 4e-18, with a bar of ≈ 1e-31).
    mag = np.maximum(np.abs(v1), np.abs(a[cand]))
    settled = ((e_c <= compare.RESOLVED * mag) | ((a[cand] == 0) & passed)) & hidden[cand]
    bar_r = np.maximum(e_c, _third_step(cs, cand, v1, v3, ok_fin & passed & ~settled))
    residue = ok_fin & passed & _within_rounding(a[cand], v1, bar_r)
    resolved[cand] = ok_fin & (settled | residue)
    _residues_ok(judged, cand[residue])
    # The report shows the complex step's figures where it resolved an element that passed.
    keep = resolved[cand] & passed & ~flag
    judged.num.flat[cand[keep]], judged.err.flat[cand[keep]] = v1[keep], e_c[keep]
    bar = np.full(a.size, np.nan)
    bar[cand] = np.where(ok_fin, e_c, np.inf)
    return resolved.reshape(shape), NOT_PROBED, bar.reshape(shape)


def _residues_ok(judged: Judged, idx: np.ndarray) -> None:
    """Rounding residues of a true 0 (flat ``idx``) are ok, whatever the cheap pass said:
    an error bar wider than such a value (inconclusive there) says nothing about a value
    float64 itself cannot hold. Never a mismatch: only elements that passed come here."""
    idx = idx[judged.codes.flat[idx] == INCONCLUSIVE]
    judged.codes.flat[idx] = OK


def _within_rounding(a: np.ndarray, v: np.ndarray, bar: np.ndarray) -> np.ndarray:
    """A rounding residue of a true 0: the complex step's value ``v`` within its own
    rounding bar, and the analytic value ``a`` within ``policy.ANALYTIC_SAFETY`` times it
    (the analytic side rounds its own chain of the same terms, not bit for bit the
    complex one: the factor the judge allows its measured rounding everywhere)."""
    return (np.abs(v) <= bar) & (np.abs(a) <= policy.ANALYTIC_SAFETY * bar)


def _third_step(cs: ComplexStep, cand: np.ndarray, v1: np.ndarray, v3: np.ndarray, ask: np.ndarray) -> np.ndarray:
    """The complex step's rounding spread, ``ROUNDOFF_SAFETY`` times the largest difference
    of its values at steps h, 3h and (for the elements ``ask``, whose h/3h spread does
    not cover them) 5h: two steps may round alike by chance (a spread of 0 at a residue
    of 1e-16), a third rarely. One evaluation per line asked, none where none is."""
    d = np.abs(v1 - v3)
    need = np.flatnonzero(ask & (policy.ROUNDOFF_SAFETY * d < np.abs(v1)))
    if need.size:
        try:
            with np.errstate(all="ignore"):
                e5 = cs.at(cand[need], 5.0 * cs.h)
        except Exception:  # noqa: BLE001 - it ran at h and 3h; a failure here leaves their spread
            e5 = None
        if e5 is not None:
            more = np.maximum(np.abs(e5.value - v1[need]), np.abs(e5.value - v3[need]))
            d = d.copy()
            d[need] = np.where(e5.finite, np.maximum(d[need], more), d[need])
    return policy.ROUNDOFF_SAFETY * d


def _rounding_residues(cs: ComplexStep, judged: Judged, a: np.ndarray, cand: np.ndarray) -> np.ndarray | None:
    """Elements ``cand`` (flat) that are float64 rounding residues by an unvalidated complex step.

    With nothing resolved to compare it with (every element of a J·t row of
    sum(LayerNorm(x)), identically 0, is 1e-16 of rounding), the complex step's values
    prove nothing, but the spread between its steps h and 3h still measures rounding:
    Im f(x + i·h·v)/h of a smooth f does not depend on h at h ≈ 1e-20·s, and an op that
    is not complex-safe (abs, a real part) gives values smooth in h (or 0), not a spread.
    Where that spread covers both the analytic value and the step's own, the element is
    a residue, as when the step is validated (those that passed the cheap pass: ok).
    Returns the mask of residues, or None where the complex step cannot run.
    """
    try:
        with np.errstate(all="ignore"):
            e1, e3 = cs.at(cand, cs.h), cs.at(cand, 3.0 * cs.h)
    except Exception:  # noqa: BLE001 - not complex-safe: nothing to say
        return None
    fin = e1.finite & e3.finite
    passed = np.abs(a[cand] - judged.num.flat[cand]) <= judged.bound.flat[cand]
    spread = _third_step(cs, cand, e1.value, e3.value, fin & passed)
    residue = fin & (spread > 0) & _within_rounding(a[cand], e1.value, spread) & passed
    _residues_ok(judged, cand[residue])
    resolved = np.zeros(a.size, bool)
    resolved[cand] = residue
    return resolved.reshape(np.shape(judged.codes))


def settle_tail(judged: Judged, a, lim: Limits, resolved: np.ndarray | None, reason: str | Callable, *,
                bar: np.ndarray | None = None) -> None:
    """Mark inconclusive, with ``reason``, the float64 tail elements that nothing resolved.

    At float64 (``Limits.tail``) an element whose analytic value is nonzero, hidden
    under the absolute tolerance, and whose reference error bar exceeds half of it
    (the reference cannot tell it from 0: σ' at 40 is 4e-18 against a bar of ≈1e-11)
    passed by the absolute tolerance alone, as a wrong value there would have. Unless
    the complex step resolved it (``resolved``), it is ``inconclusive``; the reason
    goes into ``judged.why`` (``bar``: the complex step's own error bar where it ran
    without resolving the element, NaN elsewhere). A rounding residue of a true 0 (2e-16
    left of terms ≈ 1 that cancel) is no tail and stays ok: the complex step's own
    rounding covers it (``resolved`` holds it, see :func:`_within_rounding`), or, where
    the complex step cannot run, it lies under ``Limits.residue`` (:func:`residue_floor`:
    a vector block's entry far below both its row and its column; a scalar cost's
    gradient has no such structure, so there it stays inconclusive). Exact zeros are
    left ok: a dead unit (ReLU off, the cost
    flat there) has analytic 0 and finite differences that see no change, which is
    evidence of 0, not a lack of it; a tail rounded to 0 looks the same, and the note of
    :func:`_unresolved_note` names such elements where the complex step could not run.
    """
    a = np.asarray(a)
    num, err = judged.num, judged.err
    wide = err > 0.5 * np.maximum(np.abs(a), np.abs(num))  # as compare.classify's inconclusive test
    tail = unresolved(a, judged, lim.atol) & (judged.codes == OK) & (a != 0) & wide
    # Where the analytic side is float64 (a mask where only some blocks are), and above
    # what float64 rounding leaves at a true 0 (see residue_floor): a residue stays ok.
    tail &= np.broadcast_to(np.asarray(lim.tail, bool), tail.shape) & (np.abs(a) > lim.residue)
    if resolved is not None:
        tail &= ~resolved
    for j in np.flatnonzero(tail):
        b = None if bar is None else float(bar.flat[j])
        said = (TOO_WIDE.format(b) if b is not None and not math.isnan(b)
                else reason(int(j)) if callable(reason) else reason)
        judged.why[int(j)] = (f"smaller than float64 central differences resolve (error bar {float(err.flat[j]):.1e} "
                              f"against a value of {abs(complex(a.flat[j])):.1e}; σ' at 40 is 4e-18), and "
                              f"{said}; it passed by the absolute tolerance alone")
    judged.codes[tail] = INCONCLUSIVE


def _unresolved_note(problem, k: int, hidden: np.ndarray, err: np.ndarray, *, elems: np.ndarray,
                     a: np.ndarray) -> None:
    """Say plainly, for a float64 leaf whose cost is not complex-safe, that some of its
    elements have an analytic value of exactly 0 that central differences cannot check:
    they pass by the absolute tolerance only, and a tail rounded to 0 (σ' at 40 is
    4e-18, σ(1 − σ) gives 0) looks the same as a dead unit there. The first few are
    named with their error bar (``hidden``: a mask over ``elems``, whose analytic values
    are ``a`` and error bars ``err``). Nonzero ones are inconclusive (settle_tail)."""
    at = np.flatnonzero(hidden)
    count = at.size
    if problem.orig_dtypes[k] != np.float64 or count == 0:
        return
    shape, m = tuple(problem.dyn[k].shape), max(problem.dyn[k].size, 1)
    named = [f"{problem.paths[k]}{[int(i) for i in np.unravel_index(int(elems[j]) % m, shape)]} "
             f"(analytic {float(np.real(a[j])):.2g}, error bar {float(err[j]):.1e})"
             for j in at[:UNRESOLVED_NAMED]]
    problem.notes.append(
        f"{count} element(s) of {problem.paths[k]} have an analytic derivative of 0 that float64 central "
        f"differences cannot check (error bar ≈ {float(np.median(err[at])):.1e}; σ' at 40 is 4e-18) and the "
        "cost is not complex-safe, so the complex step could not resolve them: they pass by the leaf's "
        "absolute tolerance only, and a derivative rounded to 0 there would pass too (a dead unit looks the "
        "same): " + "; ".join(named) + ("; ..." if count > len(named) else "") + ".")


# Elements named in the note on float64 elements that nothing resolves (the rest counted).
UNRESOLVED_NAMED = 5


# Rungs of the step ladder: h/4, h/16, ... down to the step that balances the dtype's
# own round-off, at most this many (2 evaluations per rung and suspect element).
LADDER_RUNGS = 6


def step_ladder(judged: Judged, a, bad: np.ndarray, central_at: Callable, *, h_rel: float, u: float,
                floor) -> None:
    """Last look at confirmed mismatches ``bad`` (flat indices): is the numerical derivative stable in h?

    A function that varies on a scale shorter than the step (cos(w⁹) at |w| = 2, a
    high-frequency feature, singular vectors next to a small gap) can make both the
    central difference and its Richardson table wrong while looking self-consistent,
    and it inflates the measured noise (the probe sees its fast variation). So before
    we call a mismatch, we shrink the step by 4 per rung down to the step that balances
    the dtype's round-off u. ``central_at(h)`` returns (value, round-off scale σ·gain,
    finite) of the central difference at relative step h for the elements ``bad``.
    Rung j's truncation error is estimated from the next rung, |D_j − D_(j+1)|·16/15,
    plus the round-off safety factor times σ·gain. If a rung agrees with the analytic
    value within that bar, the bar is conclusive (below half the derivative) *and* the
    rung contradicts the refined estimate beyond both their bars, the refined estimate
    was unreliable and the element is ok at that rung; otherwise the mismatch stands.
    A wide bar never excuses a disagreement.
    """
    if bad.size == 0:
        return
    lo = policy.relative_step("central", u)
    ladder = [h_rel / 4.0**j for j in range(1, LADDER_RUNGS + 1) if h_rel / 4.0**j >= lo] or [lo]
    if len(ladder) < 2:
        ladder = [ladder[0], ladder[0] / 4.0]
    rungs = [central_at(h) for h in ladder]
    values, rounding, finite = (np.stack([np.asarray(r[i]) for r in rungs]) for i in range(3))
    trunc = np.empty_like(values)
    trunc[:-1] = np.abs(values[:-1] - values[1:]) * 16.0 / 15.0
    trunc[-1] = np.abs(values[-1] - values[-2])
    bars = policy.ROUNDOFF_SAFETY * rounding + trunc
    ab = np.ravel(a)[bad]
    t = np.ravel(judged.tol)[bad]
    # A rung may overrule the refined estimate R only if the two are inconsistent
    # with each other (R was unreliable); a noisier rung whose bar merely covers both
    # R and the analytic value proves nothing.
    r, e_r = np.ravel(judged.num)[bad], np.ravel(judged.err)[bad]
    agree = finite & (np.abs(values - ab) <= t + bars) & (
        bars <= 0.5 * np.maximum(np.maximum(np.abs(ab), np.abs(values)), floor)) & (
        np.abs(values - r) > e_r + bars)
    rescued = agree.any(axis=0)
    if rescued.any():
        best = np.argmax(agree, axis=0)  # the largest agreeing step (least round-off)
        cols = np.arange(bad.size)
        idx = bad[rescued]
        judged.num.flat[idx] = values[best, cols][rescued]
        judged.err.flat[idx] = bars[best, cols][rescued]
        judged.codes.flat[idx] = OK
