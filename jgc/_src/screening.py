"""Directional screening: random directions over whole leaves, and group testing to localise.

A screen compares the derivative of J along a random direction v (v_i = ±s_i, s the
parameter scale) with ⟨g, v⟩ for every leaf at once, at a cost independent of the
leaf's size. A single wrong element e_i shows as |e_i|·s_i in *every* direction
(random signs cannot hide one term). When a screen fails, group testing localises the
culprit: the failing range is split into parts, each tested with its own direction,
and the failing parts are split again (``localise``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import compare, engine, policy, stencils
from .judge import Evidence, Limits, judge
from .statuses import MISMATCH

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
# Largest share of a big model's elements one screening group holds (see
# Directions.groups): a handful of groups, so a transformer of 150 leaves costs 6k
# evaluations per group instead of per leaf.
SCREEN_GROUP_SHARE = 0.25
# Share of the smallest screening allowance that the rounding of θ + t·v may take when
# the analytic side reads t·⟨g, v⟩ (one dot per direction) instead of ⟨g, Δ⟩ for the
# representable Δ (one pass over the parameters per evaluation; see
# engine.DirectionEvaluator's exact_dots). That rounding moves J by at most
# u·(1 + |t|)·Σ|g_i|s_i, at most u·(1 + |t|)·√m·‖g∘v‖₂; it is added to the method's
# error bar. At 1% it cannot change a verdict noticeably: float32 gradients of models
# up to 10⁹ parameters take the cheap path, float64 gradients keep the exact dots.
CHEAP_DOTS_SHARE = 0.01
# Elements summed at once for the norms of a range (2^20: 8 MiB temporaries, however
# large the leaf).
NORM_PIECE = 2**20


@dataclasses.dataclass
class Tests:
    codes: np.ndarray  # against the screening allowance (guides localisation)
    fails: np.ndarray  # beyond the user's tolerance summed over the range (a mismatch by itself)
    ratio: np.ndarray  # |a − D| / allowed
    analytic: np.ndarray  # ⟨g, v⟩
    numeric: np.ndarray  # the directional derivative of J
    bound: np.ndarray  # allowed difference (screening allowance + method error)
    diff: np.ndarray  # |a − D|
    trunc: np.ndarray  # |R − D₄| of the Richardson table: the five-point estimate's error


class Directions:
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

    def __init__(self, problem, steps, a_leaves, *, movable, seed, k_dirs, tols, step):
        self.problem, self.k_dirs, self.tols = problem, k_dirs, tols
        self.sizes = [x.size for x in problem.dyn]
        # The gradient stays in its own dtype (a float32 gradient: 4 bytes an element on the
        # device, none on the host); non-finite values count as 0 in ⟨g, v⟩ (they are
        # judged element by element).
        self.a_leaves = a_leaves
        grads = [np.where(np.isfinite(a), a, np.zeros((), a.dtype)).real.reshape(x.shape) if mv else np.zeros(1)
                 for a, x, mv in zip(a_leaves, problem.dyn, movable)]
        # Pilot and Richardson step along a direction (a user's step is taken as given);
        # the lower guard for t*: the central step balancing the dtype's own round-off.
        self.T = steps.relative("richardson", step)
        self.t_min = min(policy.relative_step("central", problem.u), self.T)
        self.fixed = step is not None
        # The largest rounding of θ + t·v against the smallest allowance (CHEAP_DOTS_SHARE).
        n = sum(m for m, mv in zip(self.sizes, movable) if mv)
        rs = min((t[2] for t, mv in zip(tols, movable) if mv), default=0.0)
        worst = (problem.u * (1 + 4 * self.T) * math.sqrt(max(n, 1)) * policy.RICHARDSON_NOISE_GAIN
                 / self.t_min)
        self.ev = engine.DirectionEvaluator(
            # Each leaf's scales are max(|θ_i|, rms of the leaf) (policy.coordinate_scale),
            # so the smallest of them, the rms, rebuilds them on the device: no copy of
            # them there.
            problem.full_cost, problem.dyn, problem.argarr,
            [np.float64(s.min()) if s.size else s for s in problem.scales],
            grads=grads, movable=movable,
            # One call holds a localisation level (4 evaluations per part); a screen of
            # k directions (6 each) takes a few calls of the same compiled shape.
            key=seed, rows=4 * LOCALISE_SPLIT, counter=problem.counter,
            exact_dots=worst > CHEAP_DOTS_SHARE * DIRECTION_Z * rs,
        )
        del grads
        self.offsets = self.ev.offsets
        self.next_seed = 0
        self._totals = {}  # whole-leaf norms, the screens' (a leaf is screened more than once)

    def gs(self, k, elems):
        """|g_i v_i| = |g_i|·s_i (whatever the signs) at ``elems`` (an index or a slice) of leaf k."""
        a = np.asarray(self.a_leaves[k]).reshape(-1)[elems]
        return np.where(np.isfinite(a), np.abs(a), 0).astype(np.float64) * self.problem.scales[k][elems]

    def _sums(self, k, a, b):
        """Σ|g_i v_i|², Σ v_i², Σ|g_i v_i| over [a, b) of leaf k, in pieces (no array of the
        range's size)."""
        out = np.zeros(3)
        for c in range(a, b, NORM_PIECE):
            sl = slice(c, min(b, c + NORM_PIECE))
            gs, s = self.gs(k, sl), self.problem.scales[k][sl]
            out += [np.dot(gs, gs), np.dot(s, s), gs.sum()]
        return out

    def norms(self, leaf, lo, hi):
        """‖g∘v‖₂, ‖v‖₂, Σ|g_i v_i| over each range, summed on the host (no device work per
        row): O(range) each, less than the evaluations of the test that asks."""
        out = np.zeros((3, len(leaf)))
        for r, (k, a, b) in enumerate(zip(leaf, lo, hi)):
            k, a, b = int(k), int(a), int(b)
            if a == 0 and b == self.sizes[k]:
                if k not in self._totals:
                    self._totals[k] = self._sums(k, 0, b)
                out[:, r] = self._totals[k]
            else:
                out[:, r] = self._sums(k, a, b)
        return np.sqrt(np.maximum(out[0], 0)), np.sqrt(np.maximum(out[1], 0)), out[2]

    def _eval(self, seeds, glo, ghi, steps):
        """J and ⟨g, Δ⟩ at θ + t·v for each test and each of its signed steps (n, p)."""
        p = steps.shape[1]
        rep = lambda a: np.repeat(a, p)
        J, dots = self.ev(rep(seeds), rep(glo), rep(ghi), steps.ravel())
        return J.reshape(-1, p), dots.reshape(-1, p)

    def _spanning(self, leaf, lo, hi, last):
        """(‖g∘v‖₂, ‖v‖₂, Σ|g_i v_i|, screening tolerance, user tolerance) of rows whose
        range runs from [lo of leaf ``leaf``] to [hi of leaf ``last``] (see ``groups``).

        Each leaf's part adds its norms; the allowances of the parts are independent
        sums over random signs, so they combine as the root of their sum of squares.
        """
        out = np.zeros((7, len(leaf)))
        for r, (k0, a, k1, b) in enumerate(zip(leaf, lo, last, hi)):
            for k in range(int(k0), int(k1) + 1):
                ka = int(a) if k == k0 else 0
                kb = int(b) if k == k1 else self.sizes[k]
                gv2, v2, gv1 = self.norms([k], [ka], [kb])
                rt, at, rs, as_ = self.tols[k]
                out[:, r] += [gv2[0] ** 2, v2[0] ** 2, gv1[0], (rs * gv2[0]) ** 2, (as_ * v2[0]) ** 2,
                              (rt * gv2[0]) ** 2, (at * v2[0]) ** 2]
        gv2, v2, gv1 = np.sqrt(out[0]), np.sqrt(out[1]), out[2]
        dot_round = 4 * policy.unit_roundoff(np.float64) * gv1
        screen_tol = DIRECTION_Z * (np.sqrt(out[3]) + np.sqrt(out[4])) + dot_round
        user_tol = DIRECTION_Z * (np.sqrt(out[5]) + np.sqrt(out[6])) + dot_round
        return gv2, v2, gv1, screen_tol, user_tol

    def groups(self, leaves) -> list[list[int]]:
        """Leaves screened together: runs of consecutive leaves of at most SCREEN_GROUP_SHARE
        of the elements in all (a larger leaf alone), for models whose batches hold a single
        copy of the parameters (``engine.DirectionEvaluator.lines``); one leaf each otherwise.

        A screen costs 6k evaluations whatever the size of its range, so a model of 150
        leaves screened leaf by leaf needs 7,200 evaluations, each a pass over 10⁸
        parameters; in groups it needs 6k per group. A leaf in a group is screened along
        directions over the whole group: its ``detect`` is stated against them.
        """
        leaves = list(leaves)
        if not self.ev.lines:
            return [[k] for k in leaves]
        cap = SCREEN_GROUP_SHARE * sum(self.sizes[k] for k in leaves)
        out, size = [], 0
        for k in leaves:
            if out and out[-1][-1] == k - 1 and size + self.sizes[k] <= cap:
                out[-1].append(k)
                size += self.sizes[k]
            else:
                out.append([k])
                size = self.sizes[k]
        return out

    def run(self, leaf, lo, hi, trunc=None, last=None) -> Tests:
        """Test ranges [lo, hi) of leaves ``leaf`` (one random direction each).

        With ``trunc`` (localisation levels) a test takes the five-point estimate at T
        (4 evaluations), its truncation bounded by ``trunc``: the screen's measure of that
        estimate's error along a direction over the whole leaf, which a random direction
        over part of it does not exceed in expectation. An underestimate there only makes
        a part look suspect (its elements are then judged individually); it cannot
        fail a check by itself. With ``last`` a row's range runs on to ``hi`` in leaf
        ``last`` (a group of leaves, see ``groups``).
        """
        p = self.problem
        leaf, lo, hi = np.asarray(leaf), np.asarray(lo), np.asarray(hi)
        seeds = np.arange(self.next_seed, self.next_seed + lo.size)
        self.next_seed += lo.size
        if last is not None and np.any(np.asarray(last) != leaf):
            last = np.asarray(last)
            glo, ghi = lo + self.offsets[leaf], hi + self.offsets[last]
            gv2, v2, gv1, screen_tol, user_tol = self._spanning(leaf, lo, hi, last)
        else:
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
        err = compare.method_error(est.err_round, est.err_trunc, p.sigma) + self._step_rounding(est, gv1, 4 * T)
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
                err2 = (compare.method_error(e2.err_round, c[short] * ts**2, p.sigma)
                        + self._step_rounding(e2, gv1[short], ts))
                better = e2.finite & (err2 < err[short])
                idx = short[better]
                num[idx], err[idx] = e2.value[better], err2[better]
                a[idx] = ((ds[:, 0] - ds[:, 1]) / (2 * ts))[better]
        # The directional adapter of the judge: the screen's estimate is its only look,
        # against an absolute allowance per test (the screening one, then the user's).
        floor = policy.inconclusive_floor(gv2)
        screen = Evidence(lambda: (num, err, finite), imprecise=False)
        codes = judge(a, Limits(0.0, screen_tol, floor), screen).judged.codes
        fails = judge(a, Limits(0.0, user_tol, floor), screen).judged.codes == MISMATCH
        bound = screen_tol + err
        diff = np.abs(a - num)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bound > 0, diff / bound, np.inf)
        return Tests(codes, fails, np.nan_to_num(ratio, nan=np.inf), a, num, bound, diff,
                      est.err_trunc)

    def _step_rounding(self, est, gv1, t_max):
        """What the rounding of θ + t·v can add to an estimate when the analytic side is
        t·⟨g, v⟩ (see CHEAP_DOTS_SHARE): each J moves by at most u·(1 + |t|)·Σ|g_i v_i|,
        and the stencil's noise gain (a sum of |weights| / step) carries it through."""
        if self.ev.exact_dots:
            return 0.0
        return est.err_round * self.problem.u * (1 + t_max) * gv1

    def power(self, k: int, res: Tests, sl: slice, elems: np.ndarray) -> np.ndarray:
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
            return need / self.gs(k, elems)

    def screen(self, leaves) -> Tests:
        """k directions over the whole of each leaf in ``leaves``, one batch."""
        leaf = np.repeat(np.asarray(leaves, np.int64), self.k_dirs)
        hi = np.asarray([self.sizes[k] for k in leaf], np.int64)
        return self.run(leaf, np.zeros_like(hi), hi)

    def screen_groups(self, groups) -> Tests:
        """k directions over the whole of each group of consecutive leaves (see ``groups``)."""
        if all(len(g) == 1 for g in groups):
            return self.screen([g[0] for g in groups])
        first = np.repeat(np.asarray([g[0] for g in groups], np.int64), self.k_dirs)
        last = np.repeat(np.asarray([g[-1] for g in groups], np.int64), self.k_dirs)
        hi = np.asarray([self.sizes[k] for k in last], np.int64)
        return self.run(first, np.zeros_like(hi), hi, last=last)

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


def tolerances(problem, k, a_flat, rtol, atol, g_ref):
    """(rtol, atol, screening rtol, screening atol) of leaf k: see SCREEN_ROUNDING for the last two."""
    adtype = problem.orig_dtypes[k] if a_flat.dtype == problem.orig_dtypes[k] else a_flat.dtype
    rt, at = policy.default_tolerances(adtype, g_ref, rtol, atol)
    ua = SCREEN_ROUNDING * policy.unit_roundoff(adtype)
    return rt, at, min(rt, ua), min(at, ua * g_ref)
