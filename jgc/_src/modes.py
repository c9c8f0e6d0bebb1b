"""Check modes beyond "full": sampled coordinates, random directions with localisation, auto.

* ``mode="sampled"`` checks a stratified sample of coordinates in every leaf (small
  biases too), always including each leaf's largest-|gradient| elements, reproducibly
  from ``key``. Each sampled element is judged exactly as in full mode.
* ``mode="directional"`` screens every leaf with k random directions v (v_i = ±s_i,
  s the parameter scale) in a few vmapped batches: 6k evaluations per leaf whatever its
  size. The derivative of J along v, from a Richardson table at steps sized along v
  itself (see ``_Directions``), is compared with ⟨g, v⟩. A single wrong element e_i
  shows as |e_i|·s_i in *every* direction (random signs cannot hide one term). When a
  screen fails, group testing localises the culprit: the failing range is split into
  4 parts, each tested with its own random direction (16 evaluations per level, one
  batch), and the failing parts are split again: ⌈log_4 m⌉ levels, O(log m)
  evaluations. The element found is then judged individually as in full mode, so its
  path, index and status read as a full check's would. Each leaf's ``detect`` states
  the smallest relative error in its typical element that screen and judgement
  together catch.
* ``mode="auto"`` runs full mode when its ≈2n evaluations fit ``budget``, otherwise
  directional on every leaf plus a sampled check with what is left of the budget.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import compare, compat, engine, policy, progress, stencils
from .check import _judge, _leaf_report, judge_coordinates, make_report, set_gradient_scale
from .report import MISMATCH, OK, STATUS_NAMES, failing_statuses, typical_and_largest

# Elements per leaf in sampled mode: 64 coordinates (128 evaluations) per leaf catch
# a wrong formula (which touches many elements) with certainty and a single wrong
# element with probability 64/m, at a cost independent of the model's size.
DEFAULT_SAMPLES = 64
# A quarter of each leaf's samples go to its largest |g| elements, where a wrong factor
# is largest in absolute terms; the rest are stratified over the flat index so that
# every region of the leaf (rows, columns, channels) is represented.
TOP_FRACTION = 0.25
# Small leaves (biases, scales) get at least this many samples when a budget is split.
MIN_PER_LEAF = 4
# Random directions per leaf: a single wrong element fails every direction; for two
# equal errors, random signs cancel them in one direction with probability 1/2, so
# in all 8 with 1/256. 6 x 8 = 48 evaluations per leaf (SCREEN_EVALS), one compiled
# function for every leaf and localisation level.
DEFAULT_DIRECTIONS = 8
# Evaluations per screening direction: J(θ ± T·v), J(θ ± 2T·v), J(θ ± 4T·v) (a
# Richardson table), plus 2 at ±t* where the curvature along v calls for a shorter step.
SCREEN_EVALS = 6
# Parts per localisation level. A level costs 4 evaluations per part (the five-point
# estimate) and there are ⌈log_p m⌉ levels: p/ln p is smallest near p = 3, and p = 4
# needs 25% fewer evaluations than 8-way splits for one wrong element in 10⁶.
LOCALISE_SPLIT = 4
# Wrong elements localised per failing leaf before stopping (each costs
# ≈ 2k·⌈log_k m⌉ evaluations); the report says when more may remain.
DEFAULT_LOCATE = 4
# Evaluation budget of mode="auto": full mode for models up to ~10^4 parameters (2n
# evaluations, seconds on a CPU for small models), directional + sampled beyond.
DEFAULT_BUDGET = 20_000
# Standard deviations of the analytic side's allowed error along a direction. With
# random signs, Σ e_i v_i for per-element errors |e_i| ≤ rtol·|g_i| is a sum of
# independent symmetric terms: Hoeffding gives P(|Σ| > 6‖rtol·g∘v‖₂) ≤ 2e^(-18) ≈ 3e-8.
DIRECTION_Z = 6.0
# Rounding per element, in units of the analytic dtype's unit round-off (relative to
# |g_i|, and absolute relative to the leaf's max |g|), that a directional screen allows
# the analytic side (capped by rtol and atol). The user's rtol (float64: 1e-7 ≈ 1e9·u)
# is a per-element worst case; summed over 10⁶ random signs it would allow 6·rtol·‖g∘v‖
# and hide a single element wrong by a relative 10⁻³. Backprop's real rounding is a
# few u per operation on the path times the conditioning; 2^10·u covers both (float64:
# 1.1e-13; in float32 it is 6e-5, close to rtol = 1e-4, so float32 gradients keep the
# power their own rounding allows). A screen beyond it only starts the search: what it
# finds is judged with rtol, and a range fails by itself only beyond rtol summed over
# it, so no false alarm comes from here.
SCREEN_ROUNDING = 2.0**10
# Evaluations full mode spends per leaf on top of its passes (step pilots).
PILOT_EVALS = 16


def _seed(key) -> int:
    """An int seed from ``key``: an int, or a JAX PRNG key (new- or old-style)."""
    if key is None:
        return 0
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key) & 0xFFFFFFFF
    try:
        arr = key if isinstance(key, jax.Array) else np.asarray(key)  # no implicit transfer
        if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
            arr = jax.random.key_data(arr)
        data = compat.host(arr).astype(np.uint64).ravel()
    except (TypeError, ValueError) as e:
        raise TypeError(f"jgc.check: key must be an int or a JAX PRNG key, got {type(key).__name__}.") from e
    return int(np.random.SeedSequence(data.tolist()).generate_state(1)[0])


def _positive_int(name, v, minimum=1):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"jgc.check: {name} must be an integer ≥ {minimum}, got {v!r}.")
    return int(v)


def samples_per_leaf(sizes, samples=None, total=None) -> list[int]:
    """How many elements to check in each leaf.

    ``samples`` an int: that many per leaf (all of a smaller leaf); a float in (0, 1]:
    that fraction of each leaf (at least one element). ``total``: split a total over
    leaves in proportion to their size, with at least ``MIN_PER_LEAF`` each.
    """
    if samples is not None:
        if isinstance(samples, float):
            if not 0 < samples <= 1:
                raise ValueError(f"jgc.check: samples as a fraction must be in (0, 1], got {samples!r}.")
            return [min(m, max(1, math.ceil(samples * m))) for m in sizes]
        samples = _positive_int("samples", samples)
        return [min(m, samples) for m in sizes]
    if total is None:
        return [min(m, DEFAULT_SAMPLES) for m in sizes]
    n = max(1, sum(sizes))
    base = [min(m, MIN_PER_LEAF) for m in sizes]
    left = max(0, total - sum(base))
    return [min(m, b + int(left * m / n)) for m, b in zip(sizes, base)]


def sample_elements(a_flat: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``count`` sorted element indices: the largest |a| first, the rest stratified."""
    m = a_flat.size
    if count >= m:
        return np.arange(m)
    if count <= 0:
        return np.zeros(0, np.int64)
    mag = np.abs(np.asarray(a_flat))
    mag = np.where(np.isfinite(mag), mag, np.inf)  # a NaN/Inf analytic value is checked first
    top = max(1, int(count * TOP_FRACTION))
    chosen = np.argpartition(-mag, top - 1)[:top]
    rest = count - top
    if rest:
        edges = np.linspace(0, m, rest + 1).astype(np.int64)
        width = np.maximum(edges[1:] - edges[:-1], 1)
        strat = np.minimum(edges[:-1] + (rng.random(rest) * width).astype(np.int64), m - 1)
        chosen = np.union1d(chosen, strat)
        if chosen.size < count:  # collisions with the top elements: fill at random
            pool = np.setdiff1d(np.arange(m), chosen)
            chosen = np.union1d(chosen, rng.choice(pool, count - chosen.size, replace=False))
    return np.sort(chosen).astype(np.int64)


# -- directional screening and localisation ---------------------------------------
@dataclasses.dataclass
class _Tests:
    codes: np.ndarray  # against the screening allowance (guides localisation)
    fails: np.ndarray  # beyond the user's tolerance summed over the range (a mismatch by itself)
    ratio: np.ndarray  # |a − D| / allowed
    analytic: np.ndarray  # ⟨g, v⟩
    numeric: np.ndarray  # the directional derivative of J
    bound: np.ndarray  # allowed difference (screening allowance + method error)
    diff: np.ndarray  # |a − D|
    trunc: np.ndarray  # |R − D₄| of the Richardson table: the five-point estimate's error


class _Directions:
    """Directional tests over all real leaves: rows of (leaf, seed, lo, hi), batched.

    One compiled function (``engine.DirectionEvaluator``) serves every leaf, every
    screen and every localisation level.

    Each test chooses its own step along its own direction v (v_i = ±s_i on the range):
    J(θ ± T·v), J(θ ± 2T·v), J(θ ± 4T·v) give a Richardson estimate of φ'(0), φ(t) =
    J(θ + t·v), with a truncation estimate, and the curvature c = |D_T − D_2T| / 3T²
    measured along v; where that curvature makes t* = (σ / 2c)^(1/3) shorter than T, a
    central difference at ±t* (error 8σ/t* + 2c·t*²) is taken too, and the test keeps the
    estimate with the smaller error bar. T is the five-point step full mode refines
    with: every coordinate of the range moves as far as in full mode, so the round-off
    σ/T does not grow with the size of the range (a step shrunk by √c would grow it
    by √c, 1000× at 10⁶ elements).
    """

    def __init__(self, problem, a_leaves, movable, seed, k_dirs, tols, step):
        self.problem, self.k_dirs, self.tols = problem, k_dirs, tols
        self.sizes = [x.size for x in problem.dyn]
        grads = [np.where(np.isfinite(a), a, 0).real.astype(np.float64) if mv else np.zeros(1)
                 for a, mv in zip(a_leaves, movable)]
        # Pilot and Richardson step along a direction (a user's step is taken as given);
        # the lower guard for t*: the central step balancing the dtype's own round-off.
        self.T = problem.relative_step("richardson", step)
        self.t_min = min(policy.relative_step("central", problem.u), self.T)
        self.fixed = step is not None
        self.ev = engine.DirectionEvaluator(
            problem.full_cost, problem.dyn, problem.argarr, problem.scales,
            [g.reshape(x.shape) if mv else g for g, x, mv in zip(grads, problem.dyn, movable)], movable,
            # One call holds a localisation level (4 evaluations per part); a screen of
            # k directions (6 each) takes a few calls of the same compiled shape.
            key=seed, rows=4 * LOCALISE_SPLIT, counter=problem.counter,
        )
        self.offsets = self.ev.offsets
        self.next_seed = 0
        # |g_i v_i| = |g_i|·s_i and |v_i| = s_i whatever the signs, so the norms of every
        # range come from prefix sums on the host (no device work per row).
        self.gs = [np.abs(g.ravel()) * s if mv else np.zeros(1) for g, s, mv in
                   zip(grads, problem.scales, movable)]
        self.cum = [(_prefix(gs**2), _prefix(s**2), _prefix(gs)) for gs, s in zip(self.gs, problem.scales)]

    def norms(self, leaf, lo, hi):
        """‖g∘v‖₂, ‖v‖₂, Σ|g_i v_i| over each range (from prefix sums)."""
        out = np.zeros((3, len(leaf)))
        for r, (k, a, b) in enumerate(zip(leaf, lo, hi)):
            for q in range(3):
                c = self.cum[k][q]
                out[q, r] = c[b] - c[a]
        return np.sqrt(np.maximum(out[0], 0)), np.sqrt(np.maximum(out[1], 0)), out[2]

    def _eval(self, seeds, glo, ghi, steps):
        """J and ⟨g, Δ⟩ at θ + t·v for each test and each of its signed steps (n, p)."""
        p = steps.shape[1]
        rep = lambda a: np.repeat(a, p)
        J, dots = self.ev(rep(seeds), rep(glo), rep(ghi), steps.ravel())
        return J.reshape(-1, p), dots.reshape(-1, p)

    def run(self, leaf, lo, hi, trunc=None) -> _Tests:
        """Test ranges [lo, hi) of leaves ``leaf`` (one random direction each).

        With ``trunc`` (localisation levels) a test takes the five-point estimate at T
        (4 evaluations), its truncation bounded by ``trunc``: the screen's measure of that
        estimate's error along a direction over the whole leaf, which a random direction
        over part of it does not exceed in expectation. An underestimate there only makes
        a part look suspect (its elements are then judged individually); it cannot
        fail a check by itself.
        """
        p = self.problem
        leaf, lo, hi = np.asarray(leaf), np.asarray(lo), np.asarray(hi)
        seeds = np.arange(self.next_seed, self.next_seed + lo.size)
        self.next_seed += lo.size
        glo, ghi = lo + self.offsets[leaf], hi + self.offsets[leaf]
        gv2, v2, gv1 = self.norms(leaf, lo, hi)
        rt = np.array([self.tols[k][0] for k in leaf])
        at = np.array([self.tols[k][1] for k in leaf])
        rs = np.array([self.tols[k][2] for k in leaf])
        as_ = np.array([self.tols[k][3] for k in leaf])
        # Rounding of the float64 dot product ⟨g, Δ⟩ itself.
        dot_round = 4 * policy.unit_roundoff(np.float64) * gv1
        # Screening allowance: the analytic side's own rounding (rs per element, see
        # SCREEN_ROUNDING) combined over random signs (DIRECTION_Z). A test that fails
        # it only starts a search; the elements found are then judged with the user's
        # tolerance, and a range fails by itself only beyond that tolerance summed the
        # same way (the Hoeffding bound of DIRECTION_Z).
        screen_tol = DIRECTION_Z * (rs * gv2 + as_ * v2) + dot_round
        user_tol = DIRECTION_Z * (rt * gv2 + at * v2) + dot_round
        stencil = "richardson" if trunc is None else "central4"
        offs = stencils.offsets(stencil)
        T = np.full(lo.size, self.T)
        steps = T[:, None] * offs[None, :]
        J, dots = self._eval(seeds, glo, ghi, steps)
        a = (dots[:, 0] - dots[:, 1]) / (2 * T)  # offsets start +1, −1
        est = stencils.estimate(stencil, p.j0, J, np.abs(steps))
        num = est.value
        if trunc is not None:
            est.err_trunc = np.full(lo.size, trunc)
        err = compare.method_error(est.err_round, est.err_trunc, p.sigma)
        finite = est.finite
        if trunc is None and not self.fixed:
            # Curvature along v: |D_T − D_2T|/3 is D_T's truncation, c·T²; resolved only
            # above the noise (the same floor as full mode's step pilots).
            d1, d2 = est.table[:, 0], est.table[:, 1]
            c = np.maximum(np.abs(d1 - d2) / (3 * T**2), 4.0 * p.sigma / T**3)
            t_star = np.clip((p.sigma / (2.0 * c)) ** (1.0 / 3.0), self.t_min, self.T)
            short = np.flatnonzero(finite & (t_star < 0.5 * self.T))
            if short.size:
                ts = t_star[short]
                Js, ds = self._eval(seeds[short], glo[short], ghi[short], np.stack([ts, -ts], 1))
                e2 = stencils.estimate("central", p.j0, Js, np.abs(np.stack([ts, -ts], 1)))
                err2 = compare.method_error(e2.err_round, c[short] * ts**2, p.sigma)
                better = e2.finite & (err2 < err[short])
                idx = short[better]
                num[idx], err[idx] = e2.value[better], err2[better]
                a[idx] = ((ds[:, 0] - ds[:, 1]) / (2 * ts))[better]
        floor = 1e-3 * gv2
        codes = compare.classify(a, num, err, screen_tol, finite, floor=floor)
        fails = compare.classify(a, num, err, user_tol, finite, floor=floor) == MISMATCH
        bound = screen_tol + err
        diff = np.abs(a - num)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bound > 0, diff / bound, np.inf)
        return _Tests(codes, fails, np.nan_to_num(ratio, nan=np.inf), a, num, bound, diff,
                      est.err_trunc)

    def power(self, k: int, res: _Tests, sl: slice, elems: np.ndarray) -> np.ndarray:
        """Smallest relative error in each of ``elems`` of leaf k that the screen catches.

        A wrong element e_i adds |e_i|·|g_i|·s_i to |⟨g,v⟩ − D| in every direction, so
        a direction r fails once that exceeds its allowance plus the difference it
        already shows, (bound_r + diff_r) / (|g_i|·s_i). The search that follows must
        then single it out in parts of the leaf against differences like these, so the
        worst direction is the figure: where the analytic side carries errors spread
        over many elements (a float32-rounded gradient checked in float64), those set
        the power, not the allowance.
        """
        need = float(np.max(res.bound[sl] + res.diff[sl]))
        with np.errstate(divide="ignore"):
            return need / self.gs[k][elems]

    def screen(self, leaves) -> _Tests:
        """k directions over the whole of each leaf in ``leaves``, one batch."""
        leaf = np.repeat(np.asarray(leaves, np.int64), self.k_dirs)
        hi = np.asarray([self.sizes[k] for k in leaf], np.int64)
        return self.run(leaf, np.zeros_like(hi), hi)

    def localise(self, k: int, locate: int, trunc: float) -> tuple[list[int], bool]:
        """Group testing in leaf k: (elements isolated, whether the search was exhausted).

        ``trunc``: the screen's truncation measure for this leaf (see ``run``).
        """
        m = self.sizes[k]
        found: list[int] = []
        stack = [(0, m)]
        levels = max(1, math.ceil(math.log(max(m, 2), LOCALISE_SPLIT)))
        calls_left = locate * (levels + 2)  # bounds the search even for spread errors
        while stack and len(found) < locate and calls_left > 0:
            lo, hi = stack.pop()
            if hi - lo == 1:
                found.append(lo)
                continue
            edges = np.linspace(lo, hi, min(LOCALISE_SPLIT, hi - lo) + 1).astype(np.int64)
            res = self.run(np.full(edges.size - 1, k), edges[:-1], edges[1:], trunc=trunc)
            calls_left -= 1
            bad = np.flatnonzero(res.codes == MISMATCH)
            for j in bad[np.argsort(res.ratio[bad])]:  # the worst part ends on top
                stack.append((int(edges[j]), int(edges[j + 1])))
        return sorted(found), not stack


def _prefix(a: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.asarray(a, np.float64).ravel())])


def _judge_leaf(problem, k, a_leaves, elems, *, stencil, step, rtol, atol, g_all, h_rel=None):
    """Judge elements ``elems`` of leaf k individually, as full mode does (at step ``h_rel`` if given)."""
    a_full = a_leaves[k].ravel()
    finite = a_full[np.isfinite(a_full)]
    g_leaf = float(np.max(np.abs(finite), initial=0.0))
    g_ref = g_leaf if g_leaf > 0 else g_all
    m = problem.dyn[k].size
    if elems.size == 0:
        e = np.zeros(0)
        h_rel = problem.relative_step(stencil, step)
        return _leaf_report(problem, k, elems.astype(np.int64), e, e, e, e, e.astype(np.int8), None, h_rel,
                            g_ref), g_ref
    h_rel = problem.leaf_step(k, stencil, step, a_full) if h_rel is None else h_rel
    elems = np.unique(elems % m)
    is_c = bool(jnp.iscomplexobj(problem.dyn[k]))
    c = np.concatenate([elems, elems + m]) if is_c else elems
    a = a_full[elems]
    if is_c and not np.iscomplexobj(a):
        a = a.astype(np.complex128)
    out = _judge(problem, k, c, a, stencil, h_rel, step, rtol, atol, g_ref)
    return _leaf_report(problem, k, out[0], a, *out[1:], h_rel, g_ref), g_ref


def _tolerances(problem, k, a_flat, rtol, atol, g_ref):
    """(rtol, atol, screening rtol, screening atol) of leaf k: see SCREEN_ROUNDING for the last two."""
    adtype = problem.orig_dtypes[k] if a_flat.dtype == problem.orig_dtypes[k] else a_flat.dtype
    rt = policy.default_rtol(adtype) if rtol is None else rtol
    at = policy.default_atol_factor(adtype) * g_ref if atol is None else atol
    ua = SCREEN_ROUNDING * policy.unit_roundoff(adtype)
    return rt, at, min(rt, ua), min(at, ua * g_ref)


def _directional(problem, a_leaves, counts, *, stencil, rtol, atol, step, seed, k_dirs, locate, rng):
    """Screen every leaf, localise failures, judge found and sampled elements."""
    set_gradient_scale(problem, a_leaves)
    g_all = max((float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0)) for a in a_leaves), default=0.0)
    movable = [not jnp.iscomplexobj(x) for x in problem.dyn]
    tols = []
    for k, a in enumerate(a_leaves):
        a_flat = a.ravel()
        g_leaf = float(np.max(np.abs(a_flat[np.isfinite(a_flat)]), initial=0.0))
        tols.append(_tolerances(problem, k, a_flat, rtol, atol, g_leaf if g_leaf > 0 else g_all))
    screened = [k for k, mv in enumerate(movable) if mv]
    dirs = _Directions(problem, a_leaves, movable, seed, k_dirs, tols, step) if screened else None
    res = dirs.screen(screened) if screened else None
    leaves, notes = [], []
    for k, x in enumerate(problem.dyn):
        a_flat = a_leaves[k].ravel()
        elems = [sample_elements(a_flat, counts[k], rng)]
        elems.append(np.flatnonzero(~np.isfinite(a_flat)))  # non-finite analytic: judge directly
        screen_code, unlocalised, h_rel, power = OK, None, None, None
        if movable[k]:
            sl = slice(screened.index(k) * k_dirs, (screened.index(k) + 1) * k_dirs)
            codes, fails = res.codes[sl], res.fails[sl]
            # Beyond the screening allowance only: a search, not yet a mismatch.
            screen_code = int(np.where(fails, MISMATCH, np.where(codes == MISMATCH, OK, codes)).max())
            if np.any(codes == MISMATCH):
                found, exhausted = dirs.localise(k, locate, float(np.max(res.trunc[sl])))
                elems.append(np.asarray(found, np.int64))
                w = sl.start + int(np.argmax(res.ratio[sl]))
                unlocalised = (res.analytic[w], res.numeric[w], res.bound[w], exhausted, len(found))
            h_rel = problem.leaf_step(k, stencil, step, a_flat)
            power = _stated_power(problem, dirs, k, res, sl, a_flat, tols[k], h_rel, stencil, step)
        else:
            notes.append(f"{problem.paths[k]}: complex leaf, not screened by directions; its "
                         f"{counts[k]} sampled elements were checked individually.")
        lr, _ = _judge_leaf(problem, k, a_leaves, np.unique(np.concatenate(elems)).astype(np.int64),
                            stencil=stencil, step=step, rtol=rtol, atol=atol, g_all=g_all, h_rel=h_rel)
        status = max(STATUS_NAMES.index(lr.status), screen_code)
        if unlocalised is not None and screen_code == MISMATCH and lr.counts.get("mismatch", 0) == 0:
            a, n, b = unlocalised[:3]
            notes.append(
                f"{problem.paths[k]}: the directional check fails (⟨g,v⟩ = {a:.6g} vs finite "
                f"difference {n:.6g}, allowed ±{b:.2g}) but no single element could be "
                "isolated: the error is spread over many elements (e.g. a wrong scale of "
                "the whole leaf). Run mode='full' on this leaf to see every element."
            )
        elif unlocalised is not None and not unlocalised[3] and lr.counts.get("mismatch", 0):
            notes.append(f"{problem.paths[k]}: stopped after localising {unlocalised[4]} wrong "
                         f"elements (locate={locate}); more may remain.")
        if power is not None:
            lr = dataclasses.replace(lr, detectable_rel=power[0],
                                     detectable_rel_largest=min(power[1], lr.detectable_rel_largest))
        leaves.append(dataclasses.replace(lr, status=STATUS_NAMES[status]))
    return leaves, notes, len(screened)


def _stated_power(problem, dirs, k, res, sl, a_flat, tols, h_rel, stencil, step):
    """(typical, largest) smallest relative error in one element of leaf k that is caught.

    An element is caught when the screen sees it (``_Directions.power``) and when, once
    localised, its individual judgement does: there the allowed difference is atol +
    rtol·|g_i| plus the round-off 8σ/h of the first pass or 8·1.65σ/H of the Richardson
    refinement at H, whichever is larger (both must fail).
    """
    rt, at = tols[:2]
    g = np.abs(np.where(np.isfinite(a_flat), a_flat, 0.0)).astype(np.float64)
    s = problem.scales[k]
    H = problem.relative_step("richardson", step)
    gain = max(1.0 / h_rel, 1.65 / H)
    with np.errstate(divide="ignore", invalid="ignore"):
        alone = (at + rt * g + policy.ROUNDOFF_SAFETY * problem.sigma * gain / s) / g
        per = np.maximum(dirs.power(k, res, sl, np.arange(g.size)), alone)
    return typical_and_largest(g, np.where(g > 0, per, np.inf))


def _finish(problem, leaves, *, stencil, step, strict, mode, notes):
    h = problem.relative_step(stencil, step)
    rep = make_report(problem, leaves, stencil=stencil, h_rel=h, strict=strict, mode=mode, notes=notes)
    bad = failing_statuses(strict)
    return dataclasses.replace(rep, ok=not any(lf.status in bad or any(lf.counts.get(b, 0) for b in bad)
                                               for lf in leaves))


def run_mode(problem, a_leaves, *, mode, stencil, rtol, atol, step, strict, key=0, samples=None,
             directions=None, budget=None, locate=None, **unknown):
    """Run a non-full mode; see the module docstring and :func:`jgc.check`.

    Options: ``key`` (int or JAX PRNG key; default 0) seeds samples and directions;
    ``samples`` (int per leaf, or a fraction in (0, 1]); ``directions`` (k per leaf);
    ``budget`` (cost evaluations, for "auto" and "sampled"); ``locate`` (wrong
    elements to isolate per failing leaf).
    """
    if unknown:
        raise TypeError(
            f"jgc.check: unexpected options {sorted(unknown)} for mode={mode!r}; the modes take "
            "key, samples, directions, budget and locate."
        )
    seed = _seed(key)
    rng = np.random.default_rng(seed)
    k_dirs = _positive_int("directions", directions) or DEFAULT_DIRECTIONS
    locate = DEFAULT_LOCATE if locate is None else _positive_int("locate", locate, minimum=0)
    budget = _positive_int("budget", budget)
    sizes = [x.size for x in problem.dyn]
    n = sum(sizes)
    coords = [problem.coordinates(k) for k in range(len(sizes))]
    kw = dict(stencil=stencil, rtol=rtol, atol=atol, step=step, strict=strict)

    if mode == "sampled":
        total = None if budget is None else max(len(sizes), budget // 2)  # 2 evaluations per element
        counts = samples_per_leaf(sizes, samples, total)
        elems = [sample_elements(a.ravel(), c, rng) for a, c in zip(a_leaves, counts)]
        picked = sum(e.size for e in elems)
        notes = (f"sampled: {picked} of {n} elements checked individually (per leaf the largest-|g| "
                 f"elements plus a stratified sample, key={key!r}); the other {n - picked} were not "
                 "checked, so 'detect' is inf for a leaf not checked in full (a typical element "
                 "was most likely not in the sample).",)
        with progress.attached(problem.counter, 2 * picked + PILOT_EVALS * len(sizes)):
            rep = judge_coordinates(problem, a_leaves, elems, mode="sampled", notes=notes, **kw)
        # The largest-|g| element is always sampled; a typical one only by chance.
        leaves = tuple(lf if lf.checked == lf.size else dataclasses.replace(lf, detectable_rel=math.inf)
                       for lf in rep.leaves)
        return dataclasses.replace(rep, leaves=leaves)

    if mode == "auto":
        budget = DEFAULT_BUDGET if budget is None else budget
        offs = stencils.offsets(stencil if stencil in ("central", "forward", "central4", "richardson") else "central")
        need = offs.size * sum(coords) + PILOT_EVALS * len(sizes)
        if need <= budget and samples is None:
            notes = (f"auto: full mode, every element checked (≈{need} evaluations ≤ budget {budget}).",)
            with progress.attached(problem.counter, need):
                return judge_coordinates(problem, a_leaves, [np.arange(c) for c in coords],
                                         mode="auto (full)", notes=notes, **kw)
        levels = max(1, math.ceil(math.log(max(max(sizes), 2), LOCALISE_SPLIT)))
        # Set-up already spent, a screen and step pilots per leaf, one localisation.
        overhead = (problem.counter.evaluations + len(sizes) * (SCREEN_EVALS * k_dirs + PILOT_EVALS)
                    + 4 * LOCALISE_SPLIT * (levels + 1) + 8)
        total = max(len(sizes), (budget - overhead) // 2)
        counts = samples_per_leaf(sizes, samples, None if samples is not None else total)
        mode_name = "auto (directional+sampled)"
    elif mode == "directional":
        counts = samples_per_leaf(sizes, samples, None) if samples is not None else [0] * len(sizes)
        mode_name = "directional"
    else:
        raise ValueError(f"jgc.check: unknown mode {mode!r}.")

    start = problem.counter.evaluations
    est = len(sizes) * (SCREEN_EVALS * k_dirs + PILOT_EVALS) + 2 * sum(counts)
    with progress.attached(problem.counter, est):
        leaves, notes, screened = _directional(problem, a_leaves, counts, seed=seed, k_dirs=k_dirs,
                                               locate=locate, rng=rng, stencil=stencil, rtol=rtol,
                                               atol=atol, step=step)
    checked = sum(lf.checked for lf in leaves)
    used = problem.counter.evaluations - start
    head = (f"{mode_name}: {screened} of {len(sizes)} leaves screened with {k_dirs} random directions "
            f"each (all their elements at once; 'detect' is the smallest relative error in one "
            f"element that would fail); {checked} of {n} elements checked individually"
            + (" (largest-|g| and stratified samples, plus any localised)" if sum(counts) else
               " (those localised)")
            + f"; {used} evaluations.")
    if mode == "auto":
        head += f" Full mode needs ≈{need} evaluations, over budget={budget}."
        if problem.counter.evaluations > budget:
            head += (f" The check used {problem.counter.evaluations} in all: set-up, screening and "
                     "localisation are not cut to fit a budget this small.")
    return _finish(problem, leaves, step=step, mode=mode_name, notes=[head] + notes, stencil=stencil,
                   strict=strict)
