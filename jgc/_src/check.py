"""Front doors: ``check``, ``numerical_grad`` and ``assert_grads_close``."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import compare, compat, policy, report as report_mod, stencils
from .errors import GradCheckError
from .problem import Problem, leaf_info, to_elements
from .report import STATUS_NAMES, LeafReport, Report, typical_and_largest

MODES = ("full", "sampled", "directional", "auto")


# -- the analytic side -----------------------------------------------------------
def _is_gradient_tree(grad, split) -> bool:
    """True when a callable ``grad`` is itself a pytree shaped like params.

    An Equinox module of gradients is callable, yet it is a tree of gradients, not a
    gradient function: it is taken as a pytree when its structure matches params.
    """
    structure = jax.tree_util.tree_structure(grad)
    if jax.tree_util.treedef_is_leaf(structure):
        return False
    try:
        split.treedef.flatten_up_to(grad)
    except (ValueError, TypeError):
        return False
    return True


def _reads_as_gradient(tree, problem: Problem) -> bool:
    """True when ``tree`` has the structure of params with an array at every checked leaf."""
    try:
        per_leaf = problem.split.treedef.flatten_up_to(tree)
    except (ValueError, TypeError):
        return False
    return all(isinstance(per_leaf[pos], (np.ndarray, np.generic, jax.Array))
               for pos in problem.split.dynamic_index)


def _drop_grad_aux(tree, problem: Problem):
    """With has_aux, a grad callable returns the gradient or (gradient, aux): tell which.

    A pair whose first element reads as a gradient of params is (gradient, aux), as
    ``jax.grad(fn, has_aux=True)`` returns; anything else is the gradient. A plain
    gradient's first element is the gradient of params' first subtree, one level shallower
    than params, so it reads as a whole gradient only if the gradient holds a subtree
    where params has a non-array leaf.
    """
    if isinstance(tree, (tuple, list)) and len(tree) == 2 and _reads_as_gradient(tree[0], problem):
        return tree[0]
    return tree


def analytic_gradient(problem: Problem, grad) -> list:
    """Return the analytic gradient of every perturbed leaf, as NumPy arrays."""
    api, split = problem.api, problem.split
    if grad is None:
        return [compat.host(x) for x in problem.gradient()]
    if callable(grad) and not _is_gradient_tree(grad, split):
        try:
            tree = grad(split.combine(problem.dyn), *problem.rebuild_args(problem.argarr))
        except Exception as e:
            e.add_note(f"{api}: raised while calling grad(params, *args).")
            raise
        what = "grad(params, *args)"
        if problem.has_aux:
            tree = _drop_grad_aux(tree, problem)
    else:
        tree, what = grad, "grad"
    try:
        per_leaf = split.treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        got = jax.tree_util.tree_structure(tree)
        raise ValueError(
            f"{api}: {what} must have the tree structure of params.\n  params: "
            f"{split.treedef}\n  {what}: {got}\nReturn a pytree shaped like params "
            "(e.g. the same dict keys, list lengths and NamedTuple fields)"
            + (", or a pair (gradient, aux) with has_aux=True." if what != "grad" and problem.has_aux
               else ".")
        ) from e
    out = []
    for k, pos in enumerate(split.dynamic_index):
        path, x = problem.paths[k], problem.dyn[k]
        g = per_leaf[pos]
        if not isinstance(g, (np.ndarray, np.generic, jax.Array)):
            raise TypeError(
                f"{api}: {what} has {type(g).__name__} at leaf {path}, where params has a "
                f"{problem.orig_dtypes[k].name}{list(x.shape)} array; return an array of that shape."
            )
        if tuple(g.shape) != tuple(x.shape):
            raise ValueError(
                f"{api}: {what} at leaf {path} has shape {tuple(g.shape)}, but the parameter "
                f"has shape {tuple(x.shape)}. A gradient has the shape of its parameter "
                "(check for a transpose or a missing sum over the batch)."
            )
        gd = np.dtype(g.dtype)
        if gd not in (problem.orig_dtypes[k], problem.eval_dtypes[k]):
            raise TypeError(
                f"{api}: {what} at leaf {path} has dtype {gd.name}, but the parameter is "
                f"{problem.orig_dtypes[k].name}"
                + (f" (evaluated as {problem.eval_dtypes[k].name})" if problem.widen else "")
                + ". Return gradients in the parameter's dtype."
            )
        out.append(compat.host(g))
    return out


def set_gradient_scale(problem: Problem, a_leaves: list) -> None:
    """Tell the problem how much J moves per relative unit change of a coordinate."""
    scale = 0.0
    for a, s in zip(a_leaves, problem.scales):
        v = np.abs(np.asarray(a)).ravel() * s
        v = v[np.isfinite(v)]
        scale = max(scale, float(v.max(initial=0.0)))
    problem.grad_scale = scale


# -- per-leaf comparison ---------------------------------------------------------
def _judge(problem: Problem, k: int, coords: np.ndarray, a_elems: np.ndarray, stencil: str,
           h_rel: float, step: float | None, rtol: float | None, atol: float | None, g_ref: float):
    """Estimate, compare and refine one leaf. Returns per-element arrays."""
    x = problem.dyn[k]
    m, is_c = x.size, bool(jnp.iscomplexobj(x))
    est = problem.estimate(k, coords, stencil, h_rel)
    elems = np.unique(coords % m)
    # Coordinates → elements. With complex leaves the caller passes both halves.
    num = to_elements(est.value, elems.size, is_c)
    err_c = compare.method_error(est.err_round, est.err_trunc, problem.sigma)
    err = err_c[: elems.size] + (err_c[elems.size :] if is_c else 0.0)
    finite = est.finite[: elems.size] & (est.finite[elems.size :] if is_c else True)
    a = a_elems
    adtype = problem.orig_dtypes[k] if a.dtype == problem.orig_dtypes[k] else a.dtype
    rt = policy.default_rtol(adtype) if rtol is None else rtol
    at = policy.default_atol_factor(adtype) * g_ref if atol is None else atol
    tol = compare.tolerance(a, num, rt, at)
    floor = 1e-3 * g_ref
    tiny = float(np.finfo(adtype).tiny)
    codes = compare.classify(a, num, err, tol, finite, floor=floor, rel=rt * np.maximum(np.abs(a), np.abs(num)),
                             tiny=tiny)
    onesided = None
    # Refine only what failed the cheap pass: Richardson over h, 2h, 4h for an error
    # estimate with truncation, plus one-sided differences for the kink test.
    cand = np.nonzero(codes == report_mod.MISMATCH)[0]
    cand = cand[np.isfinite(a[cand])]
    if cand.size and stencil != "richardson":
        sel = elems[cand]
        rc = np.concatenate([sel, sel + m]) if is_c else sel
        rich = problem.estimate(k, rc, "richardson", problem.relative_step("richardson", step))
        n2 = to_elements(rich.value, sel.size, is_c)
        e2c = compare.method_error(rich.err_round, rich.err_trunc, problem.sigma)
        e2 = e2c[: sel.size] + (e2c[sel.size :] if is_c else 0.0)
        f2 = rich.finite[: sel.size] & (rich.finite[sel.size :] if is_c else True)
        t2 = compare.tolerance(a[cand], n2, rt, at)
        kink = None
        if not is_c:
            noise = problem.sigma * rich.err_round / 1.65
            kink = stencils.kink(rich.onesided, rich.table, noise, a[cand], t2)
            onesided = (cand, rich.onesided)
        codes[cand] = compare.classify(a[cand], n2, e2, t2, f2, kink=kink, floor=floor,
                                       rel=rt * np.maximum(np.abs(a[cand]), np.abs(n2)), tiny=tiny)
        num[cand], err[cand], tol[cand] = n2, e2, t2
        if not is_c:
            _step_ladder(problem, k, elems, cand, a, num, err, tol, codes, h_rel, floor)
    if not is_c and stencil != "complex":
        _complex_probe(problem, k, elems, a, num, err, tol, codes, rt, at, tiny)
    return elems, num, err, tol, codes, onesided


# Elements per leaf probed with the complex step (1 evaluation each, plus 2 at the
# validation elements): enough for the saturated tails of a layer, bounded for leaves
# full of exact zeros (dead ReLU units), which the probe confirms as zeros.
COMPLEX_PROBES = 256


def _complex_probe(problem, k, elems, a, num, err, tol, codes, rt, at, tiny):
    """Resolve tiny derivatives that central differences cannot, with the complex step.

    An element hidden under the absolute tolerance (|a| ≤ atol) whose central
    difference does not resolve it (error bar above ``compare.RESOLVED`` of its value)
    may still be a derivative that the analytic side rounded away: σ' = σ(1 − σ) is 0
    at x = 40 in float64, where the truth is 4e-18, far below the ≈1e-13 that central
    differences resolve. Im J(θ + ih)/h has no subtraction, so it resolves such values
    when the cost is complex-safe. Whether it is, we test on the same leaf: the complex
    step at the two largest-|a| elements must agree with their resolved analytic values
    (an abs, conj or real-only op breaks that). A cost that is not complex-safe, or
    that fails with complex inputs, is left as it was, without a note. The probe only
    ever adds ``IMPRECISE``: it never turns a pass into a mismatch.
    """
    mag = np.maximum(np.abs(a), np.abs(num))
    unresolved = (err > compare.RESOLVED * mag) & np.isfinite(a) & (np.abs(a) <= at)
    cand = np.flatnonzero(unresolved & ((codes == report_mod.OK) | (codes == report_mod.INCONCLUSIVE)))
    if cand.size == 0 or at <= 0:
        return
    if cand.size > COMPLEX_PROBES:
        cand = cand[np.linspace(0, cand.size - 1, COMPLEX_PROBES).astype(np.int64)]
    m = problem.dyn[k].size
    a_flat = np.abs(np.asarray(a))
    good = np.flatnonzero((err <= compare.RESOLVED * np.abs(num)) & (np.abs(a - num) <= tol))
    check_at = good[np.argsort(-a_flat[good])[:2]]
    if check_at.size == 0:
        return  # nothing resolved to validate the complex step against
    h = problem.relative_step("complex", None)
    rows = np.concatenate([elems[check_at], elems[cand]]) % m
    try:
        with np.errstate(all="ignore"):
            e1 = problem.estimate(k, rows, "complex", h)
            e3 = problem.estimate(k, elems[cand] % m, "complex", 3.0 * h)
    except Exception:  # noqa: BLE001 - not complex-safe: central differences stand
        return
    v = np.concatenate([e1.value, e3.value])
    fin = np.concatenate([e1.finite, e3.finite])
    vc, v1, v3 = v[: check_at.size], v[check_at.size: check_at.size + cand.size], v[check_at.size + cand.size:]
    # Complex-safe only if the probe reproduces the resolved elements.
    if not np.all(fin[: check_at.size]) or np.any(
            np.abs(vc - a[check_at]) > tol[check_at] + err[check_at]):
        return
    # Rounding of the imaginary part is relative to the terms summed for that element,
    # not to its value: two steps (h, 3h) round differently, so their spread (×8, as the
    # round-off safety) measures it; 16u|v| covers a chain of complex operations.
    e_c = policy.ROUNDOFF_SAFETY * np.abs(v1 - v3) + 16.0 * problem.u * np.abs(v1)
    ok_fin = fin[check_at.size: check_at.size + cand.size] & fin[check_at.size + cand.size:]
    rel = rt * np.maximum(np.abs(a[cand]), np.abs(v1))
    passed = np.abs(a[cand] - v1) <= compare.tolerance(a[cand], v1, rt, at) + e_c
    flag = compare.imprecise(a[cand], v1, e_c, rel, passed & ok_fin, tiny)
    idx = cand[flag]
    num[idx], err[idx] = v1[flag], e_c[flag]
    codes[idx] = report_mod.IMPRECISE



# Rungs of the step ladder: h/4, h/16, ... down to the step that balances the dtype's
# own round-off, at most this many (2 evaluations per rung and suspect element).
LADDER_RUNGS = 6


def _step_ladder(problem, k, elems, cand, a, num, err, tol, codes, h_rel, floor):
    """Last look at confirmed mismatches: is the numerical derivative stable in h?

    A function that varies on a scale shorter than the step (cos(w⁹) at |w| = 2, a
    high-frequency feature) can make both the central difference and its Richardson
    table wrong while looking self-consistent, and it inflates the measured noise
    (the probe sees its fast variation). So before we call a mismatch, we shrink the
    step by 4 per rung down to the round-off-balanced step. Rung j's truncation error is
    estimated from the next rung, |D_j − D_(j+1)|·16/15, plus 8σ/h_j for round-off. If a
    rung agrees with the analytic value within that bar, the bar is conclusive (below
    half the derivative) *and* the rung contradicts the refined estimate beyond both
    their bars, the refined estimate was unreliable and the element is ok at that
    rung; otherwise the mismatch stands. A wide bar never excuses a disagreement.
    """
    bad = cand[codes[cand] == report_mod.MISMATCH]
    if bad.size == 0:
        return
    lo = policy.relative_step("central", problem.u)
    steps = [h_rel / 4.0**j for j in range(1, LADDER_RUNGS + 1) if h_rel / 4.0**j >= lo] or [lo]
    if len(steps) < 2:
        steps = [steps[0], steps[0] / 4.0]
    ests = [problem.estimate(k, elems[bad], "central", h) for h in steps]
    values = np.stack([e.value for e in ests])
    gains = np.stack([e.err_round for e in ests])
    finite = np.stack([e.finite for e in ests])
    trunc = np.empty_like(values)
    trunc[:-1] = np.abs(values[:-1] - values[1:]) * 16.0 / 15.0
    trunc[-1] = np.abs(values[-1] - values[-2])
    bars = policy.ROUNDOFF_SAFETY * problem.sigma * gains + trunc
    ab = a[bad]
    t = tol[bad]
    # A rung may overrule the refined estimate R only if the two are inconsistent
    # with each other (R was unreliable); a noisier rung whose bar merely covers both
    # R and the analytic value proves nothing.
    r, e_r = num[bad], err[bad]
    agree = finite & (np.abs(values - ab) <= t + bars) & (
        bars <= 0.5 * np.maximum(np.maximum(np.abs(ab), np.abs(values)), floor)) & (
        np.abs(values - r) > e_r + bars)
    rescued = agree.any(axis=0)
    if rescued.any():
        best = np.argmax(agree, axis=0)  # the largest agreeing step (least round-off)
        cols = np.arange(bad.size)
        idx = bad[rescued]
        num[idx] = values[best, cols][rescued]
        err[idx] = bars[best, cols][rescued]
        codes[idx] = report_mod.OK


def _leaf_report(problem, k, elems, a, num, err, tol, codes, onesided, h_rel, g_ref) -> LeafReport:
    x = problem.dyn[k]
    info = leaf_info(problem, k)
    d = np.abs(a - num)
    bound = tol + err
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, d / bound, np.where(d > 0, np.inf, 0.0))
        ratio = np.where(np.isnan(ratio), np.inf, ratio)
        mag = np.maximum(np.abs(a), np.abs(num))
        sig = mag >= 1e-3 * g_ref
        rel = np.where(sig & (mag > 0), d / mag, 0.0)
        det = np.where(np.abs(a) > 0, (bound + np.where(d <= bound, d, 0.0)) / np.abs(a), np.inf)
    # The worst element: mismatches first, then the largest difference / allowed.
    w = int(np.lexsort((ratio, codes == report_mod.MISMATCH))[-1]) if d.size else 0
    counts = {name: int(np.sum(codes == i)) for i, name in enumerate(STATUS_NAMES)}
    status = STATUS_NAMES[int(codes.max())] if codes.size else "ok"
    nrm = float(np.linalg.norm(a + num))
    normwise = float(np.linalg.norm(a - num)) / nrm if nrm > 0 else (0.0 if not np.any(d) else math.inf)

    def scalar(v):
        return complex(v) if np.iscomplexobj(v) else float(v)

    finite_d = d[np.isfinite(d)]
    typical = typical_and_largest(a, det)
    return LeafReport(
        path=info["path"], shape=info["shape"], dtype=info["dtype"], size=int(x.size),
        checked=int(elems.size), status=status, counts=counts,
        max_abs_err=float(finite_d.max()) if finite_d.size else (math.nan if d.size else 0.0),
        max_rel_err=float(np.max(rel[np.isfinite(rel)], initial=0.0)),
        worst_index=tuple(int(i) for i in np.unravel_index(int(elems[w]), x.shape)) if d.size else (),
        worst_analytic=scalar(a[w]) if d.size else math.nan,
        worst_numeric=scalar(num[w]) if d.size else math.nan,
        worst_bound=float(bound[w]) if d.size else math.nan,
        normwise=normwise,
        detectable_rel=typical[0], detectable_rel_largest=typical[1],
        step=float(np.median(h_rel * problem.scales[k][elems])) if elems.size else math.nan,
        indices=elems, analytic=a, numeric=num, bound=bound, codes=codes, onesided=onesided,
    )


def _validate(stencil, mode, rtol, atol, strict):
    if stencil not in policy.STENCILS:
        raise ValueError(f"jgc.check: stencil must be one of {policy.STENCILS}, got {stencil!r}.")
    if mode not in MODES:
        raise ValueError(f"jgc.check: mode must be one of {MODES}, got {mode!r}.")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
            raise ValueError(f"jgc.check: {name} must be a non-negative number or None, got {v!r}.")


def check(fn: Callable, params: Any, *args, grad=None, has_aux: bool = False, stencil: str = "central",
          precision: str = "auto", rtol: float | None = None, atol: float | None = None,
          step: float | None = None, strict: bool = False, mode: str = "full",
          chunk_size: int | None = None, rules: bool = False, **mode_options) -> Report:
    """Check the gradient of a scalar cost against finite differences, element by element.

    Every inexact array leaf of ``params`` is perturbed, one coordinate at a time, by
    ±h (the lecture's two-sided difference (J(θ+h) − J(θ−h)) / 2h), vectorised with
    ``jax.vmap`` and compiled once per leaf. The result is compared with the analytic
    gradient: element i agrees when

        |a_i − n_i| ≤ atol + rtol·max(|a_i|, |n_i|) + (error the method can explain)

    where the last term is 8·σ/h from the measured noise σ of J plus, for elements that
    fail the cheap pass, a Richardson truncation estimate from steps h, 2h and 4h.

    Args:
      fn: the cost, ``fn(params, *args) -> scalar`` (or ``(scalar, aux)`` with
        ``has_aux``). ``args`` are data and are never perturbed.
      params: any pytree. Floating and complex array leaves are checked; integer and
        bool arrays, PRNG keys (typed ``jax.random.key`` and raw uint32 ones), Python
        scalars, callables and None are carried through untouched and listed as
        skipped.
      *args: extra arguments passed to ``fn`` (and to ``grad`` when callable): data,
        model state (batch statistics, ``eqx.nn.State``), PRNG keys, at any depth.
        Array leaves are traced under ``jax.jit`` and reach ``fn`` as arrays of the
        same kind (keys stay keys). When the check evaluates in float64, floating
        array leaves of ``args`` are widened to float64 too (exact casts of copies),
        so state that ``fn`` checks against values computed from the parameters
        (Equinox's ``State.set``, a ``lax.scan`` carry) has one dtype; a note in the
        report says so, and ``precision="native"`` passes them as given.
      grad: None to use ``jax.grad(fn)`` (w.r.t. the checked leaves only); a callable
        ``grad(params, *args)`` returning a pytree like params (hand-written backprop);
        or a pytree of already computed gradients. With ``has_aux`` the callable may
        return the gradient or ``(gradient, aux)`` (as ``jax.grad(fn, has_aux=True)``
        does): a pair whose first element has the structure of params is read as the
        latter.
      has_aux: as in ``jax.grad``: ``fn`` returns a pair ``(cost, aux)``; only the cost is
        perturbed and differentiated, aux (any pytree, arrays or not) is ignored.
      stencil: "central" (default, O(h²)), "forward" (O(h)), "central4" (O(h⁴)),
        "richardson" (O(h⁶) from h, 2h, 4h) or "complex" (complex step; needs a
        complex-safe cost).
      precision: "auto" (default) evaluates float32/16 parameters (and floating data
        in ``args``) in float64 inside a scoped ``jax.enable_x64`` where the backend
        has float64; "float64" forces it; "native" keeps the parameters' and the
        data's own dtypes (steps and tolerances follow them).
      rtol, atol: tolerance on the analytic side; default per dtype
        (``jgc`` policy: float64 1e-7, float32 1e-4; atol = 32·u·max|g| of the leaf).
      step: relative step h/s (s = max(|θ_i|, rms of the leaf)); default from the
        measured precision of J, e.g. ≈ 6.9e-6 for central differences in float64.
      strict: also fail on inconclusive and non-finite elements.
      mode: "full" checks every coordinate. "sampled", "directional" and "auto"
        (see ``jgc.check`` modes in the README) take ``key``, ``samples``, ``budget``.
      chunk_size: coordinates per vmapped batch (default from a memory budget).
      rules: when the check fails, also run :func:`jgc.check_rules` on ``fn``: the
        report's ``rules`` holds its :class:`jgc.RulesReport`, and the text names the
        custom rule that disagrees with its primal, with its ``file:line``.

    Returns:
      A :class:`jgc.Report`; ``report.ok`` is False when any element is a mismatch.

    Raises:
      TypeError, ValueError: for bad input (the message names the argument or leaf),
        among them a ``(cost, aux)`` pair from ``fn`` without ``has_aux=True``.

    Example:
      >>> import jax.numpy as jnp, jgc
      >>> report = jgc.check(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.arange(3.0)})
      >>> report.ok
      True
    """
    _validate(stencil, mode, rtol, atol, strict)
    if rules:
        from .rules import attach_rules  # a front door above this one: imported on use

        rep = check(fn, params, *args, grad=grad, has_aux=has_aux, stencil=stencil, precision=precision,
                    rtol=rtol, atol=atol, step=step, strict=strict, mode=mode, chunk_size=chunk_size,
                    **mode_options)
        return rep if rep.ok else attach_rules(rep, fn, params, args, precision=precision)
    # Programs compiled on worker threads while the noise probe runs: jax.grad when it
    # is the analytic side, and in full mode every leaf's evaluator.
    ahead = (("grad",) if grad is None else ()) + (
        ("evaluators",) if mode == "full" and stencil != "complex" else ())
    with Problem(fn, params, args, precision=precision, chunk_size=chunk_size, ahead=ahead,
                 has_aux=has_aux) as problem:
        a_leaves = analytic_gradient(problem, grad)
        if mode != "full":
            from .modes import run_mode

            return run_mode(problem, a_leaves, mode=mode, stencil=stencil, rtol=rtol,
                            atol=atol, step=step, strict=strict, **mode_options)
        if mode_options:
            raise TypeError(f"jgc.check: unexpected options {sorted(mode_options)} for mode='full'.")
        coords = [np.arange(problem.coordinates(k)) for k in range(len(problem.dyn))]
        from .progress import attached  # a bar on stderr for long checks on a terminal

        with attached(problem.counter, 2 * sum(c.size for c in coords)):
            return judge_coordinates(problem, a_leaves, coords, stencil=stencil, rtol=rtol, atol=atol,
                                     step=step, strict=strict, mode="full")


def judge_coordinates(problem: Problem, a_leaves: list, coords: list, *, stencil, rtol, atol,
                      step, strict, mode, notes=()) -> Report:
    """Check the given real coordinates of every leaf and build the report."""
    set_gradient_scale(problem, a_leaves)
    g_all = max((float(np.max(np.abs(a), initial=0.0)) for a in a_leaves), default=0.0)
    g_all = g_all if np.isfinite(g_all) else 0.0
    leaves, steps = [], []
    for k, c in enumerate(coords):
        a_full = a_leaves[k].ravel()
        h_rel = problem.leaf_step(k, stencil, step, a_full)
        steps.append(h_rel)
        g_leaf = float(np.max(np.abs(a_full[np.isfinite(a_full)]), initial=0.0))
        g_ref = g_leaf if g_leaf > 0 else g_all
        m = problem.dyn[k].size
        if c.size == 0:
            elems = np.zeros(0, dtype=np.int64)
            e = np.zeros(0)
            leaves.append(_leaf_report(problem, k, elems, e, e, e, e, e.astype(np.int8), None, h_rel, g_ref))
            continue
        elems = np.unique(c % m)
        if np.iscomplexobj(problem.dyn[k]):
            c = np.concatenate([elems, elems + m])  # both parts of each chosen element
        else:
            c = elems
        a = a_full[elems]
        if np.iscomplexobj(a) is False and np.iscomplexobj(problem.dyn[k]):
            a = a.astype(np.complex128)
        out = _judge(problem, k, c, a, stencil, h_rel, step, rtol, atol, g_ref)
        leaves.append(_leaf_report(problem, k, *out[:1], a, *out[1:], h_rel, g_ref))
    return make_report(problem, leaves, stencil=stencil, h_rel=float(np.median(steps)), strict=strict,
                       mode=mode, notes=notes)


def make_report(problem: Problem, leaves: list, *, stencil, h_rel, strict, mode, notes=()) -> Report:
    ok, normwise = report_mod.verdict(leaves, strict)
    return Report(
        ok=ok, leaves=tuple(leaves), skipped=problem.split.skipped, normwise=normwise,
        evaluations=problem.counter.evaluations, seconds=problem.elapsed(),
        precision=problem.precision, stencil=stencil, step=h_rel, noise=problem.sigma,
        cost=problem.j0, mode=mode, strict=strict, notes=tuple(problem.notes) + tuple(notes),
        function=_name(problem.fn),
    )


def _name(fn) -> str:
    mod = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{mod}.{name}" if mod and mod not in ("__main__",) else name


def numerical_grad(fn: Callable, params: Any, *args, has_aux: bool = False,
                   stencil: str = "central", precision: str = "auto", step: float | None = None,
                   chunk_size: int | None = None) -> Any:
    """Return the finite-difference gradient of ``fn`` at ``params`` (the lecture's gradApprox).

    Each element is (J(θ + h·e_i) − J(θ − h·e_i)) / 2h with the representable step,
    computed as in :func:`check` (same stencils, steps and precision rules). With
    ``has_aux=True``, ``fn`` returns ``(cost, aux)`` and only the cost is differenced.

    Returns:
      A pytree shaped like ``params``: every checked leaf holds its numerical gradient
      in that leaf's dtype; skipped (non-floating) leaves are None.

    Example:
      >>> import jax.numpy as jnp, jgc
      >>> g = jgc.numerical_grad(lambda p: jnp.sum(p ** 3), jnp.array([1.0, 2.0]))
      >>> [round(float(v), 4) for v in g]
      [3.0, 12.0]
    """
    if stencil not in policy.STENCILS:
        raise ValueError(f"jgc.numerical_grad: stencil must be one of {policy.STENCILS}, got {stencil!r}.")
    ahead = ("evaluators",) if stencil != "complex" else ()
    with Problem(fn, params, args, precision=precision, chunk_size=chunk_size,
                 api="jgc.numerical_grad", ahead=ahead, has_aux=has_aux) as problem:
        out = []
        for k, x in enumerate(problem.dyn):
            h_rel = problem.leaf_step(k, stencil, step)
            est = problem.estimate(k, np.arange(problem.coordinates(k)), stencil, h_rel)
            v = to_elements(est.value, x.size, bool(jnp.iscomplexobj(x)))
            # Cast on the host and moved explicitly (transfer guards; no eager op on NaN).
            out.append(jax.device_put(np.asarray(v.reshape(x.shape)).astype(problem.orig_dtypes[k])))
        leaves = [None] * len(problem.split.leaves)
        for pos, v in zip(problem.split.dynamic_index, out):
            leaves[pos] = v
        return jax.tree_util.tree_unflatten(problem.split.treedef, leaves)


def assert_grads_close(fn: Callable, params: Any, *args, grad=None, custom_message: str | None = None,
                       **options) -> Report:
    """Like :func:`check`, but raise :class:`jgc.GradCheckError` when the check fails.

    Returns the report when it passes. The error message starts with
    ``"jgc.assert_grads_close: gradients disagree"`` and holds the full report, failing
    leaves first; ``err.report`` is the :class:`jgc.Report`. ``options`` are those of
    :func:`check`, ``has_aux`` among them.
    """
    rep = check(fn, params, *args, grad=grad, **options)
    if not rep.ok:
        raise GradCheckError(failure_message("jgc.assert_grads_close", rep, custom_message), rep)
    return rep


def failure_message(api: str, rep: Report, custom_message: str | None = None) -> str:
    worst = rep.failing()[0] if rep.failing() else None
    where = ""
    if worst is not None:
        where = (f" at {worst.path}{list(worst.worst_index)}: analytic {worst.worst_analytic:.6g} "
                 f"vs numerical {worst.worst_numeric:.6g}")
    head = f"{api}: gradients disagree{where}."
    for rule in rep.rules.failing() if rep.rules is not None else ():
        head += f" Wrong custom rule: {rule.name} ({rule.primal_at}), rule {rule.rule_name} ({rule.rule_at})."
    if custom_message:
        head += f" {custom_message}"
    return f"{head}\n{rep}"
