"""Summaries: judged elements become a :class:`LeafReport`, leaves become a :class:`Report`.

One summary serves every check: a scalar cost's leaf, a Jacobian block and the
blocks of JVP, VJP and HVP checks differ only in where their elements sit (a flat
index into the leaf, or into an output × input block) and in their labels. A vector
check's report rows are its blocks (:func:`block_report`), and :func:`make_report`
adds the blocks of a derivative rule whose primal output is not f(x).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from . import policy
from .names import function_name
from .report import TWIN_WRONG, LeafReport, Report, verdict
from .statuses import IMPRECISE, MISMATCH, STATUS_NAMES


def typical_and_largest(a: np.ndarray, per_element: np.ndarray) -> tuple[float, float]:
    """A per-element figure at the typical element (median nonzero |a|) and at the largest |a|.

    An element whose analytic value is 0 has no relative error to speak of, so the
    typical element is the median among the nonzero, finite ones. Infinite when there is
    no such element.
    """
    at = typical_and_largest_index(a)
    if at is None:
        return math.inf, math.inf
    return float(per_element[at[0]]), float(per_element[at[1]])


def typical_and_largest_index(a: np.ndarray) -> tuple[int, int] | None:
    """Flat indices of the typical element (median nonzero finite |a|) and of the largest
    |a| (see ``typical_and_largest``), or None when there is no such element; a figure
    needed at these two elements only need not be computed for a whole leaf."""
    mag = np.abs(np.asarray(a)).ravel()
    valid = np.isfinite(mag) & (mag > 0)
    kept = mag[valid]  # no index array: a 10⁸-element leaf would need 800 MB of it
    if kept.size == 0:
        return None
    # The element a stable sort of the kept magnitudes would put at rank (K−1)//2, and
    # the last one: found by selection (O(n), not a sort of a 10⁸-element leaf).
    rank = (kept.size - 1) // 2
    top = kept.max()
    kept.partition(rank)
    v = kept[rank]
    below = int(np.count_nonzero(kept[:rank] < v))
    del kept
    median = np.flatnonzero(valid & (mag == v))[rank - below]
    largest = np.flatnonzero(valid & (mag == top))[-1]
    return int(median), int(largest)


def _scalar(v):
    return complex(v) if np.iscomplexobj(v) else float(v)


def summarize(a, num, bound, codes, *, path: str, shape: tuple, dtype: str, size: int,
              indices: np.ndarray, step: float, g_ref: float, onesided=None, split_index=None,
              output_path: str = "", label: str = "", error=None, reasons=None, twin=None) -> LeafReport:
    """A LeafReport for judged elements (flat arrays; ``indices`` their flat index in ``shape``).

    The worst element is the mismatch (or, without one, the element) that most exceeds
    its allowed difference. ``split_index`` splits its index into (output, input)
    parts for blocks of vector checks. Non-finite pairs are left out of the normwise
    figure. ``error``: the error each numerical value may carry (kept for the float64
    twin's comparison, see :func:`with_native_figures`). ``reasons``: why some elements
    have their status (position among the checked elements -> text; see judge.Judged.why).
    ``twin``: the float64 twin's value per element, NaN where not evaluated (see
    ``LeafReport.twin``), or None.
    """
    a, num, bound, codes = (np.ravel(x) for x in (a, num, bound, codes))
    d = np.abs(a - num)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, d / bound, np.where(d > 0, np.inf, 0.0))
        ratio = np.where(np.isnan(ratio), np.inf, ratio)
        mag = np.maximum(np.abs(a), np.abs(num))
        rel = np.where((mag >= policy.SMALL_DERIVATIVE * g_ref) & (mag > 0), d / mag, 0.0)
        det = np.where(np.abs(a) > 0, (bound + np.where(d <= bound, d, 0.0)) / np.abs(a), np.inf)
    w = 0
    if d.size:
        pool = np.flatnonzero(codes == MISMATCH)
        pool = pool if pool.size else np.arange(d.size)
        w = int(pool[np.argmax(ratio[pool])])
    nrm = float(np.linalg.norm(np.where(np.isfinite(a + num), a + num, 0)))
    dn = float(np.linalg.norm(np.where(np.isfinite(d), d, 0)))
    worst = tuple(int(i) for i in np.unravel_index(int(indices[w]), shape)) if d.size else ()
    out_idx, in_idx = split_index(worst) if (split_index is not None and d.size) else ((), ())
    fin = d[np.isfinite(d)]
    typical, largest = typical_and_largest(a, det)
    return LeafReport(
        path=path, shape=tuple(shape), dtype=dtype, size=size, checked=int(d.size),
        status=STATUS_NAMES[int(codes.max())] if codes.size else "ok",
        counts={nm: int(np.sum(codes == i)) for i, nm in enumerate(STATUS_NAMES)},
        max_abs_err=float(fin.max()) if fin.size else (math.nan if d.size else 0.0),
        max_rel_err=float(np.max(rel[np.isfinite(rel)], initial=0.0)) if fin.size or not d.size else math.nan,
        worst_index=worst, worst_analytic=_scalar(a[w]) if d.size else math.nan,
        worst_numeric=_scalar(num[w]) if d.size else math.nan,
        worst_bound=float(bound[w]) if d.size else math.nan,
        normwise=dn / nrm if nrm > 0 else (0.0 if dn == 0 else math.inf),
        detectable_rel=typical, detectable_rel_largest=largest, step=step,
        indices=indices, analytic=a, numeric=num, bound=bound, codes=codes, onesided=onesided,
        output_path=output_path, output_index=tuple(out_idx), input_index=tuple(in_idx), label=label,
        error=None if error is None else np.ravel(error), reasons=dict(reasons) if reasons else None,
        twin=None if twin is None else np.ravel(twin),
    )


def assemble(source, leaves: list, *, stencil: str, step: float, strict: bool, mode: str,
             notes=(), skipped=None, noise: float | None = None, cost: float = math.nan,
             api: str = "jgc.check") -> Report:
    """The Report of a check over ``leaves``, with the facts of its problem ``source``.

    ``source`` is a scalar or a vector problem: its counter, clock, precision, notes
    and function are read from it; ``skipped`` and ``noise`` default to its own.
    """
    ok, normwise = verdict(leaves, strict)
    return Report(
        ok=ok, leaves=tuple(leaves), skipped=tuple(source.skipped if skipped is None else skipped),
        normwise=normwise, evaluations=source.counter.evaluations, seconds=source.elapsed(),
        precision=source.precision, stencil=stencil, step=step,
        noise=source.sigma if noise is None else noise, cost=cost, mode=mode, strict=strict,
        notes=tuple(source.notes) + tuple(notes), function=function_name(source.fn), api=api,
        rule_errors=tuple(source.rule_errors), compile_seconds=source.compile_clock.seconds(),
        programs=source.compile_clock.programs(),
    )


# -- the blocks of vector checks (one output leaf against one input leaf) ---------------
def gref(a: np.ndarray, fallback: float) -> float:
    """The largest finite |a| of a block, ``fallback`` where there is none or it is 0."""
    fin = np.abs(a[np.isfinite(a)])
    g = float(fin.max()) if fin.size else 0.0
    return g if g > 0 else fallback


def block_report(a, n, bound, codes, *, path, label, output_path, shape, dtype, split_index: Callable,
                 step: float, g_ref: float, twin=None, reasons=None) -> LeafReport:
    """The LeafReport of one block of entries (flat, in the block's C order); ``twin``: the
    float64 twin's values where evaluated (NaN elsewhere), kept where the block has a
    mismatch (see :func:`twin_values`); ``reasons``: why some entries have their status
    (flat index in the block -> text, see :func:`block_reasons`)."""
    size = int(np.prod(shape, dtype=np.int64))
    if twin is not None and not np.any(np.asarray(codes) == MISMATCH):
        twin = None
    return summarize(a, n, bound, codes, indices=np.arange(np.size(a)), path=path, shape=tuple(shape),
                     dtype=dtype, size=size, step=step, g_ref=g_ref, split_index=split_index,
                     output_path=output_path, label=label, twin=twin, reasons=reasons)


def block_reasons(why: dict, shape: tuple, rows: slice, cols: np.ndarray) -> dict:
    """The reasons (``judge.Judged.why``: flat index of a 2-D array of ``shape`` -> text)
    of the block ``rows`` × ``cols`` (the full array's column of each block column, in
    order), re-indexed flat in the block's C order."""
    if not why:
        return {}
    cols = np.asarray(cols)
    at = np.full(shape[1], -1, np.int64)
    at[cols] = np.arange(cols.size)
    out = {}
    for j, text in why.items():
        i, c = divmod(int(j), shape[1])
        if rows.start <= i < rows.stop and at[c] >= 0:
            out[(i - rows.start) * cols.size + int(at[c])] = text
    return out


def twin_values(codes: np.ndarray, twin: Callable | None, lines: int) -> np.ndarray | None:
    """The float64 twin's values of a judged 2-D array of products, evaluated only on
    the lines that hold a mismatch (rows, ``lines=1``: a JVP per row; columns,
    ``lines=0``), NaN elsewhere: nothing is evaluated for a passing check. ``twin``
    (see ``vector_native.twin_of``) maps the positions of those lines to their values,
    a (lines, entries) array. None without a twin or a mismatch, or where the twin
    cannot run."""
    if twin is None:
        return None
    bad = np.flatnonzero(np.any(np.asarray(codes) == MISMATCH, axis=lines))
    if bad.size == 0:
        return None
    try:
        got = np.asarray(twin(bad))
    except Exception:  # noqa: BLE001 - the twin cannot run here: the native and reference values stand
        return None
    out = np.full(np.shape(codes), np.nan, dtype=np.result_type(got.dtype, np.float64))
    if lines == 1:
        out[bad] = got
    else:
        out[:, bad] = got.T
    return out


def primal_blocks(vp, prefixes: dict) -> list:
    """Mismatch blocks for derivative rules whose primal output is not f(x) (see check_primal)."""
    out = []
    for which, again in getattr(vp, "primal_mismatches", {}).items():
        bad = vp._differs(again)
        for ol in vp.out_leaves:
            c = slice(ol.start, ol.stop)
            out.append(block_report(
                again[c], vp.y0[c], np.broadcast_to(vp.primal_bound(), vp.y0.shape)[c],
                np.where(bad[c], MISMATCH, 0).astype(np.int8),
                path=ol.path, label=f"{prefixes.get(which, which + ': ')}primal output {ol.path} (f(x) from "
                f"jax.{which.lower()})", output_path=ol.path, shape=ol.block_shape, dtype=ol.dtype.name,
                split_index=lambda w: (w, ()), step=0.0, g_ref=gref(vp.y0[c], 1.0)))
    return out


def make_report(vp, leaves: list, *, api, mode, stencil, step, strict, notes=(), prefixes=None) -> Report:
    """A vector check's Report: its judged blocks, the primal-output blocks, its skipped inputs and outputs."""
    leaves = list(leaves) + primal_blocks(vp, prefixes or {})
    skipped = tuple(vp.skipped) + tuple((p, f"output {d}") for p, d in vp.out_skipped)
    report = assemble(vp, leaves, stencil=stencil, step=step, strict=strict, mode=mode, notes=notes,
                      skipped=skipped, noise=float(np.max(vp.sigma, initial=0.0)), api=api)
    view = getattr(vp, "native_view", None)
    if view is None:
        return report
    # The derivatives ran at the dtypes given: the correct bits of f(x) there against the
    # reference's, as jgc.check gives for its cost J (each block's own bits are its
    # LeafReport.accurate_bits()).
    try:
        with view.scope():
            y = np.asarray(view.F(view.dyn, view.argarr))
    except Exception:  # noqa: BLE001 - f at the dtypes given failed here: no figure
        return report
    return dataclasses.replace(report, cost_bits=correct_bits(y, vp.y0, view.u))


def correct_bits(native, reference, u: float) -> dict:
    """{"bits", "dtype"}: the correct bits of values computed at a dtype of unit round-off
    ``u`` (float32: 24 bits held), normwise against the reference, capped at those held."""
    held = round(-math.log2(u))  # float32: u = 2^-24, 24 bits; bfloat16: 8
    native, reference = np.ravel(np.asarray(native)), np.ravel(np.asarray(reference))
    keep = np.isfinite(native) & np.isfinite(reference)
    scale = float(np.linalg.norm(reference[keep])) or float(np.linalg.norm(native[keep]))
    rel = float(np.linalg.norm(native[keep] - reference[keep])) / scale if scale > 0 else 0.0
    bits = float(min(held, max(0.0, -math.log2(max(rel, 2.0 ** -held))))) if math.isfinite(rel) else 0.0
    return {"bits": bits, "dtype": held}


def with_native_figures(report: Report, native, j_ref: float, twin: Callable[[], dict]) -> Report:
    """``report`` with the figures of an analytic side that ran at the dtypes given
    (``native``: its cost ``value`` and unit round-off ``u``, see analytic.NativeSide):
    the correct bits of the cost J there against the reference's ``j_ref``
    (``Report.cost_bits``), and, on every leaf with a mismatched or imprecise element,
    the float64 twin's derivative per checked element (``LeafReport.twin``; ``twin()``
    gives the same program's gradient at the reference's precision, per leaf path,
    flat), so that the text can say per element what differs: the program at its
    dtype, or the program itself. None for ``native``: the report as it is.
    """
    if native is None:
        return report
    flagged = {id(lf) for lf in report.leaves if np.any(np.isin(lf.codes, (MISMATCH, IMPRECISE)))}
    values = None
    if flagged:
        try:
            values = twin()
        except Exception:  # noqa: BLE001 - the twin cannot run (a dtype fixed inside): no twin values
            values = None
    leaves = tuple(
        _twin_judged(lf, values[lf.path][np.asarray(lf.indices, np.int64)])
        if values is not None and id(lf) in flagged and lf.path in values else lf
        for lf in report.leaves)
    ok, _ = verdict(leaves, report.strict)
    return dataclasses.replace(report, leaves=leaves, ok=ok, cost_bits=correct_bits(native.value, j_ref, native.u))

# The reference's error bar is an estimate (8σ/h plus a Richardson truncation term), good
# for a verdict on the analytic side; a claim that the program itself is wrong gets 4
# such bars (log_softmax's tail at 20: the reference off by 1.2e-13 with a bar of 8.8e-14).
TWIN_SAFETY = 4.0


def _twin_judged(lf, twin: np.ndarray):
    """The leaf with its twin values; an imprecise element whose float64 twin disagrees
    with the reference too (beyond TWIN_WRONG of it plus float64's rtol) is a mismatch:
    the digits were not only lost at the dtype given, the program computes another value
    (a sign error in a confident cross-entropy's float32 backward, whose digits float32
    loses either way)."""
    codes = np.array(lf.codes, copy=True)
    n = np.asarray(lf.numeric)
    with np.errstate(invalid="ignore"):
        if lf.error is None:
            allowed = (TWIN_WRONG + policy.default_rtol(np.float64)) * np.abs(n)
        else:
            # The reference's own error, float64's rtol, and the native side's absolute
            # tolerance (bound − error) scaled from its dtype's round-off to float64's.
            err = np.asarray(lf.error)
            u64, u = policy.unit_roundoff(np.float64), policy.unit_roundoff(np.dtype(lf.dtype))
            allowed = (TWIN_SAFETY * err + policy.default_rtol(np.float64) * np.maximum(np.abs(twin), np.abs(n))
                       + np.maximum(np.asarray(lf.bound) - err, 0.0) * (u64 / max(u, u64)))
        wrong = (codes == IMPRECISE) & (np.abs(twin - n) > allowed)
    if not wrong.any():
        return dataclasses.replace(lf, twin=twin)
    codes[wrong] = MISMATCH
    counts = {name: int(np.count_nonzero(codes == i)) for i, name in enumerate(STATUS_NAMES)}
    return dataclasses.replace(lf, twin=twin, codes=codes, counts=counts, status=STATUS_NAMES[int(codes.max())])
