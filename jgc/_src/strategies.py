"""The modes of ``jgc.check`` beyond "full": which elements a check judges.

:func:`run_mode` chooses the elements and hands them to the one judge (``judge``): the
samples come from ``sampling``, the random-direction screens and the group testing that
localises a failure from ``screening``.

* ``mode="sampled"`` checks a stratified sample of coordinates in every leaf (small
  biases too), always including each leaf's largest-|gradient| elements, reproducibly
  from ``key``. Each sampled element is judged exactly as in full mode.
* ``mode="directional"`` screens every leaf with k random directions v (v_i = ±s_i,
  s the parameter scale) in a few vmapped batches: 6k evaluations per leaf whatever its
  size. The derivative of J along v, from a Richardson table at steps sized along v
  itself (``screening.Directions``), is compared with ⟨g, v⟩. A single wrong element e_i
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
* Without ``mode``, full mode runs when its evaluations fit the budget of "auto" or its
  estimated time fits ``policy.DEFAULT_TIME_BUDGET`` (:func:`default_full`); otherwise
  directional on every leaf plus samples with what that time leaves.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import policy, progress, stencils, validate
from .judge import judge_all, judge_elements
from .sampling import sample_elements, samples_per_leaf, seed_from_key
from .screening import (
    DEFAULT_DIRECTIONS,
    DEFAULT_LOCATE,
    LOCALISE_SPLIT,
    SCREEN_EVALS,
    Directions,
    tolerances,
)
from .statuses import MISMATCH, OK, STATUS_NAMES
from .summary import assemble, typical_and_largest_index

# Evaluation budget of mode="auto": full mode for models up to ~10^4 parameters (2n
# evaluations, seconds on a CPU for small models), directional + sampled beyond.
DEFAULT_BUDGET = 20_000
# Evaluations full mode spends per leaf on top of its passes (step pilots).
PILOT_EVALS = 16


def _directional(problem, steps, a_leaves, counts, opts, *, seed, k_dirs, locate, rng):
    """Screen every leaf, localise failures, judge found and sampled elements."""
    stencil, step = opts.stencil, opts.step
    g_all = max((float(np.max(np.abs(a[np.isfinite(a)]), initial=0.0)) for a in a_leaves), default=0.0)
    movable = [not np.iscomplexobj(x) for x in problem.dyn]
    tols = []
    for k, a in enumerate(a_leaves):
        a_flat = a.ravel()
        g_leaf = float(np.max(np.abs(a_flat[np.isfinite(a_flat)]), initial=0.0))
        tols.append(tolerances(problem, k, a_flat, opts.rtol, opts.atol, g_leaf if g_leaf > 0 else g_all))
    screened = [k for k, mv in enumerate(movable) if mv]
    dirs = Directions(problem, steps, a_leaves, movable=movable, seed=seed, k_dirs=k_dirs, tols=tols,
                      step=step) if screened else None
    groups = dirs.groups(screened) if screened else []
    res = dirs.screen_groups(groups) if screened else None
    group_of = {k: gi for gi, g in enumerate(groups) for k in g}
    by_leaf = {}  # a failing group of several leaves: one test per leaf to single them out
    leaves, notes = [], []
    for k, x in enumerate(problem.dyn):
        a_flat = a_leaves[k].ravel()
        elems = [sample_elements(a_flat, counts[k], rng)]
        elems.append(np.flatnonzero(~np.isfinite(a_flat)))  # non-finite analytic: judge directly
        screen_code, unlocalised, h_rel, power = OK, None, None, None
        if movable[k]:
            gi = group_of[k]
            sl = slice(gi * k_dirs, (gi + 1) * k_dirs)
            codes, fails, tests, tsl = res.codes[sl], res.fails[sl], res, sl
            group = groups[gi]
            if len(group) > 1 and np.any(codes == MISMATCH):
                if gi not in by_leaf:
                    by_leaf[gi] = dirs.run(np.asarray(group), np.zeros(len(group), np.int64),
                                           np.asarray([dirs.sizes[j] for j in group]),
                                           trunc=float(np.max(res.trunc[sl])))
                if np.any(by_leaf[gi].codes == MISMATCH):  # the leaves singled out carry the failure
                    j = group.index(k)
                    tests, tsl = by_leaf[gi], slice(j, j + 1)
                    codes, fails = tests.codes[tsl], tests.fails[tsl]
            # Beyond the screening allowance only: a search, not yet a mismatch.
            screen_code = int(np.where(fails, MISMATCH, np.where(codes == MISMATCH, OK, codes)).max())
            if np.any(codes == MISMATCH):
                found, exhausted = dirs.localise(k, locate, float(np.max(res.trunc[sl])))
                elems.append(np.asarray(found, np.int64))
                w = tsl.start + int(np.argmax(tests.ratio[tsl]))
                unlocalised = (tests.analytic[w], tests.numeric[w], tests.bound[w], exhausted, len(found))
            if dirs.ev.lines and not any(e.size for e in elems) and step is None:
                # A model too big for a batch of two copies, and nothing of this leaf to
                # judge: no step pilots (an evaluator compiled per leaf, for 16
                # evaluations). The power is stated for the shortest step the pilots
                # could choose, so it is never better than what a judgement would give.
                h_rel = min(policy.relative_step(stencil, problem.u), steps.relative("central4", None))
            else:
                h_rel = steps.leaf(k, stencil, step, a_flat)
            power = _stated_power(problem, steps, dirs, k, res=res, sl=sl, a_flat=a_flat, tols=tols[k],
                                  h_rel=h_rel, step=step)
        else:
            notes.append(f"{problem.paths[k]}: complex leaf, not screened by directions; its "
                         f"{counts[k]} sampled elements were checked individually.")
        lr, _ = judge_elements(problem, steps, a_leaves, k, np.unique(np.concatenate(elems)).astype(np.int64),
                               opts, g_all=g_all, h_rel=h_rel)
        status = max(STATUS_NAMES.index(lr.status), screen_code)
        if unlocalised is not None and screen_code == MISMATCH and locate == 0:
            a, n, b = unlocalised[:3]
            notes.append(f"{problem.paths[k]}: the directional check fails (⟨g,v⟩ = {a:.6g} vs finite "
                         f"difference {n:.6g}, allowed ±{b:.2g}); locate=0: no wrong element was searched for.")
        elif unlocalised is not None and screen_code == MISMATCH and lr.counts.get("mismatch", 0) == 0 \
                and unlocalised[4]:
            a, n, b = unlocalised[:3]
            notes.append(f"{problem.paths[k]}: the directional check fails (⟨g,v⟩ = {a:.6g} vs finite "
                         f"difference {n:.6g}, allowed ±{b:.2g}); the search singled out {unlocalised[4]} "
                         "element(s), none of which fails by itself against its own allowance: the error "
                         "is spread over many elements, each below what one element's check resolves. Run "
                         "mode='full' on this leaf to see every element.")
        elif unlocalised is not None and screen_code == MISMATCH and lr.counts.get("mismatch", 0) == 0:
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
        if movable[k]:
            a, d = res.analytic[sl], res.numeric[sl]
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(res.diff[sl] > 0, res.diff[sl] / np.maximum(np.abs(a), np.abs(d)), 0.0)
            lr = dataclasses.replace(lr, directions=k_dirs, directional_rel=float(np.max(rel)),
                                     directional_ratio=float(np.max(res.ratio[sl])))
        leaves.append(dataclasses.replace(lr, status=STATUS_NAMES[status]))
    return leaves, notes, len(screened), len(groups)


def _stated_power(problem, steps, dirs, k, *, res, sl, a_flat, tols, h_rel, step):
    """(typical, largest) smallest relative error in one element of leaf k that is caught.

    An element is caught when the screen sees it (``Directions.power``) and when, once
    localised, its individual judgement does: there the allowed difference is atol +
    rtol·|g_i| plus the round-off 8σ/h of the first pass or 8·1.65σ/H of the Richardson
    refinement at H (1.65: ``policy.RICHARDSON_NOISE_GAIN``), whichever is larger (both
    must fail).
    """
    rt, at = tols[:2]
    at_idx = typical_and_largest_index(a_flat)
    if at_idx is None:
        return math.inf, math.inf
    # Only the typical and the largest element are stated: figures for those two, not
    # arrays over a leaf of 10⁸ elements.
    elems = np.asarray(at_idx, np.int64)
    g = np.abs(a_flat[elems]).astype(np.float64)
    s = problem.scales[k][elems]
    H = steps.relative("richardson", step)
    gain = max(1.0 / h_rel, policy.RICHARDSON_NOISE_GAIN / H)
    alone = (at + rt * g + policy.ROUNDOFF_SAFETY * problem.sigma * gain / s) / g
    per = np.maximum(dirs.power(k, res, sl, elems), alone)
    return float(per[0]), float(per[1])


def full_cost(problem, stencil: str) -> tuple[int, float]:
    """(evaluations, estimated seconds) of a full check: its passes and step pilots,
    each evaluation at the time the noise probe measured for one."""
    offs = stencils.offsets(stencil if stencil in ("central", "forward", "central4", "richardson") else "central")
    need = offs.size * sum(problem.coordinates(k) for k in range(len(problem.dyn))) + PILOT_EVALS * len(problem.dyn)
    return need, need * problem.eval_seconds


def default_full(problem, stencil: str) -> bool:
    """Whether a check without ``mode=`` runs in full: when its evaluations fit the
    evaluation budget of ``mode="auto"`` (every test-sized model, whatever the machine's
    speed) or its estimated time fits ``policy.DEFAULT_TIME_BUDGET``."""
    need, seconds = full_cost(problem, stencil)
    return need <= DEFAULT_BUDGET or seconds <= policy.DEFAULT_TIME_BUDGET


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def run_mode(problem, steps, a_leaves: list, opts: validate.Options, *, mode, key=0, samples=None,
             directions=None, budget=None, locate=None, **unknown):
    """Run a non-full mode with the check's options ``opts``; see the module docstring
    and :func:`jgc.check`.

    Mode options: ``key`` (int or JAX PRNG key; default 0) seeds samples and directions;
    ``samples`` (int per leaf, or a fraction in (0, 1]); ``directions`` (k per leaf);
    ``budget`` (cost evaluations, for "auto" and "sampled"); ``locate`` (wrong
    elements to isolate per failing leaf).
    """
    if unknown:
        raise TypeError(
            f"jgc.check: unexpected options {sorted(unknown)} for mode={mode!r}; the modes take "
            "key, samples, directions, budget and locate."
        )
    seed = seed_from_key(key)
    rng = np.random.default_rng(seed)
    k_dirs = validate.count("jgc.check", "directions", directions) or DEFAULT_DIRECTIONS
    locate = DEFAULT_LOCATE if locate is None else validate.count("jgc.check", "locate", locate, minimum=0)
    budget = validate.count("jgc.check", "budget", budget)
    sizes = [x.size for x in problem.dyn]
    n = sum(sizes)
    stencil, step = opts.stencil, opts.step

    if mode == "sampled":
        total = None if budget is None else max(len(sizes), budget // 2)  # 2 evaluations per element
        counts = samples_per_leaf(sizes, samples, total)
        elems = [sample_elements(a.ravel(), c, rng) for a, c in zip(a_leaves, counts)]
        picked = sum(e.size for e in elems)
        notes = ((f"sampled: {picked} of {n} elements checked individually (per leaf the largest-|g| "
                  f"elements plus a stratified sample, key={key!r}); the other {n - picked} were not "
                  "checked, so 'detect' is inf for a leaf not checked in full (a typical element "
                  "was most likely not in the sample)."),)
        with progress.attached(problem.counter, 2 * picked + PILOT_EVALS * len(sizes)):
            rep = judge_all(problem, steps, a_leaves, elems, opts, mode="sampled", notes=notes)
        # The largest-|g| element is always sampled; a typical one only by chance.
        leaves = tuple(lf if lf.checked == lf.size else dataclasses.replace(lf, detectable_rel=math.inf)
                       for lf in rep.leaves)
        return dataclasses.replace(rep, leaves=leaves)

    if mode == "default":
        # Full mode did not fit the time budget (see default_full): directional on every
        # leaf, plus samples with what the budget leaves when per-leaf programs fit it.
        need, seconds = full_cost(problem, stencil)
        per = max(problem.eval_seconds, 1e-9)
        budget = int(policy.DEFAULT_TIME_BUDGET / per)
        levels = max(1, math.ceil(math.log(max(max(sizes), 2), LOCALISE_SPLIT)))
        overhead = (problem.counter.evaluations + len(sizes) * SCREEN_EVALS * k_dirs
                    + 4 * LOCALISE_SPLIT * (levels + 1) + 8)
        # Each sampled leaf compiles an evaluator of its own (about what the noise probe's took).
        left = policy.DEFAULT_TIME_BUDGET - overhead * per - len(sizes) * (
            problem.compile_seconds + PILOT_EVALS * per)
        if samples is not None:
            counts = samples_per_leaf(sizes, samples, None)
        elif left > 0:
            counts = samples_per_leaf(sizes, None, max(len(sizes), int(left / per) // 2))
        else:
            counts = [0] * len(sizes)
        mode_name = "default (directional+sampled)" if sum(counts) else "default (directional)"
    elif mode == "auto":
        budget = DEFAULT_BUDGET if budget is None else budget
        need = full_cost(problem, stencil)[0]
        if need <= budget and samples is None:
            notes = (f"auto: full mode, every element checked (≈{need} evaluations ≤ budget {budget}).",)
            with progress.attached(problem.counter, need):
                return judge_all(problem, steps, a_leaves, [np.arange(x.size) for x in problem.dyn], opts,
                                 mode="auto (full)", notes=notes)
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
        leaves, notes, screened, n_groups = _directional(problem, steps, a_leaves, counts, opts, seed=seed,
                                                         k_dirs=k_dirs, locate=locate, rng=rng)
    checked = sum(lf.checked for lf in leaves)
    used = problem.counter.evaluations - start
    together = (f" (in {n_groups} groups of consecutive leaves, each along directions over the whole group: "
                f"{SCREEN_EVALS * k_dirs} evaluations a group)" if n_groups < screened else "")
    head = (f"{mode_name}: {screened} of {len(sizes)} leaves screened with {k_dirs} random directions "
            f"each{together} (all their elements at once; 'detect' is the smallest relative error in one "
            f"element that would fail); {checked} of {n} elements checked individually"
            + (" (largest-|g| and stratified samples, plus any localised)" if sum(counts) else
               " (those localised)")
            + f"; {used} evaluations.")
    if mode == "default":
        head = (f"checked by default along random directions, not element by element: full mode "
                f"needs ≈{need} evaluations, ≈{_duration(seconds)} at {per * 1e3:.3g} ms each, over the "
                f"{policy.DEFAULT_TIME_BUDGET:.0f} s default budget; mode='full' checks every element. "
                + head)
    if mode == "auto":
        head += f" Full mode needs ≈{need} evaluations, over budget={budget}."
        if problem.counter.evaluations > budget:
            head += (f" The check used {problem.counter.evaluations} in all: set-up, screening and "
                     "localisation are not cut to fit a budget this small.")
    return assemble(problem, leaves, stencil=stencil, step=steps.relative(stencil, step), strict=opts.strict,
                    mode=mode_name, notes=[head] + notes, cost=problem.j0)
