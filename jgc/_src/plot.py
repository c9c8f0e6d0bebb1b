"""Pictures of a check: analytic against numerical derivatives, and the step-size curve.

``report.plot(path)`` draws, for up to ``max_leaves`` leaves (failing ones first):

* top row: numerical against analytic derivative of every checked element, on
  symmetric-log axes, with the diagonal and the band of allowed differences
  (tolerance + finite-difference error); failing elements are red crosses;
* bottom row: |analytic − numerical| / allowed difference per element (log scale);
  everything above the line at 1 fails.

Given ``fn``, ``params`` and ``args``, a last panel shows, for the worst element, the
error of the central difference against the step h: the V-shaped curve whose right arm
is truncation (slope 2: error ∝ h²) and whose left arm is round-off (slope −1:
error ∝ u·|J|/h), evaluated in float64 (as jgc evaluates by default) and, for float32
leaves, in float32 too. A gradient bug shows as a disagreement far above the bottom of
the V, which no choice of h can explain.

matplotlib is an optional dependency: ``pip install "jgc[plot]"``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import compat, trees
from .statuses import MISMATCH, STATUS_NAMES

# One colour per status, in the order of STATUS_NAMES: ok, inconclusive, non-smooth,
# imprecise, non-finite, mismatch.
COLOURS = ("#1f77b4", "#7f7f7f", "#ff7f0e", "#bcbd22", "#9467bd", "#d62728")
MARKERS = ("o", "s", "^", "D", "v", "x")


def _require_matplotlib(api: str):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{api} needs matplotlib, an optional dependency of jgc. Install it with "
            "pip install \"jgc[plot]\" (or pip install matplotlib)."
        ) from e
    return Figure


# -- the step-size curve ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepCurve:
    """Central differences of one element at many steps.

    Attributes:
      path, index: the leaf (keystr path) and the element (multi-index).
      steps: the absolute steps h asked for.
      numeric: per precision name ("float64", "float32", ...), the central difference
        (J(θ+h) − J(θ−h)) / (taken steps) at every step (NaN where h vanished in θ+h).
      scale: s = max(|θ_i|, rms of the leaf), the scale jgc sizes its steps by.
    """

    path: str
    index: tuple
    steps: np.ndarray
    numeric: dict
    scale: float

    def reference(self) -> float:
        """The best estimate of the derivative from the curve itself.

        Richardson's (4·D(h) − D(2h)) / 3 (error O(h⁴)) at the step nearest to
        (11.25·u)^(1/5)·s, which balances that truncation against round-off, in the
        widest precision computed. (Where successive steps agree best is no guide:
        at tiny steps the differences are quantised and repeat exactly.)
        """
        name = max(self.numeric, key=lambda k: compat.finfo(k).precision)
        d, h = self.numeric[name], self.steps
        best = (11.25 * compat.finfo(name).eps / 2) ** 0.2 * self.scale
        order = np.argsort(np.abs(np.log(h / best)))
        for i in order:
            j = np.flatnonzero(np.isclose(h, 2 * h[i]))
            if j.size and np.isfinite(d[i]) and np.isfinite(d[j[0]]):
                return float((4 * d[i] - d[j[0]]) / 3)
        finite = d[np.isfinite(d)]
        return float(np.median(finite)) if finite.size else math.nan


def _find_leaf(params, path: str):
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(p) or "<root>" for p, _ in path_leaves]
    if path not in paths:
        raise ValueError(
            f"jgc step_curve: path {path!r} is not a leaf of params; its leaves are {paths}. "
            "Pass a path as the report prints it (report.leaves[i].path)."
        )
    return paths.index(path), [leaf for _, leaf in path_leaves], treedef


def _central(fn, params, args, path, flat, *, hs, dtype) -> np.ndarray:
    """Central differences of J along element ``flat`` of leaf ``path`` at steps ``hs``,
    with every floating leaf of params cast to ``dtype``'s precision."""
    pos, leaves, treedef = _find_leaf(params, path)
    wide = np.dtype(dtype)

    def cast(x):
        if not trees.is_inexact_array(x):
            return x
        target = wide if not jnp.iscomplexobj(x) else np.result_type(wide, np.complex64)
        return jax.device_put(compat.host(x).astype(target))  # explicit transfer

    leaves = [cast(x) for x in leaves]
    x = leaves[pos]
    rebuild_args, argarr = trees.split_args(args, widen=wide == np.float64)  # as jgc.check does
    dyn_pos = [i for i, v in enumerate(leaves) if isinstance(v, jax.Array)]

    def cost(t, dyn, argarr):
        full = list(leaves)
        for i, v in zip(dyn_pos, dyn):
            full[i] = v
        moved = full[pos].ravel().at[flat].add(t.astype(full[pos].dtype)).reshape(x.shape)
        full[pos] = moved
        return jnp.real(fn(jax.tree_util.tree_unflatten(treedef, full), *rebuild_args(argarr)))

    ts = np.concatenate([hs, -hs]).astype(x.dtype)
    with compat.float_checks_off():  # very small or large steps may give a non-finite J
        values = jax.jit(jax.vmap(cost, in_axes=(0, None, None)))(
            jax.device_put(ts), [leaves[i] for i in dyn_pos], argarr)
        values = compat.host(values).astype(np.float64)
    x0 = compat.host(x).ravel()[flat]
    # The step actually taken is the representable difference (θ+h) − θ.
    taken = (np.asarray(x0 + ts, dtype=x.dtype) - x0).astype(np.float64)
    m = hs.size
    denom = taken[:m] - taken[m:]
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (values[:m] - values[m:]) / denom
    return np.where(denom != 0, d, np.nan)


def step_curve(fn: Callable, params: Any, *args, path: str, index, steps=None,
               precisions: tuple | None = None) -> StepCurve:
    """Evaluate the central difference of one element of ``params`` at many steps.

    Args:
      fn: the cost ``fn(params, *args) -> scalar`` that was checked.
      params, *args: as passed to :func:`jgc.check`.
      path: the leaf, as ``jax.tree_util.keystr`` prints it (``report.leaves[i].path``).
      index: the element's multi-index in that leaf (``leaf.worst_index``) or flat index.
      steps: absolute steps h; default 2^k·s for k = −44 … 0 (s the element's scale).
      precisions: dtype names to evaluate in; default ("float64",) plus the leaf's own
        dtype when that is narrower (float32: the native curve, to compare).

    Returns:
      A :class:`StepCurve`.
    """
    pos, leaves, _ = _find_leaf(params, path)
    x = leaves[pos]
    if not trees.is_inexact_array(x):
        raise ValueError(f"jgc step_curve: leaf {path} is not a floating array, so it has no step curve.")
    shape = tuple(np.shape(x))
    flat = int(index) if np.ndim(index) == 0 and not isinstance(index, tuple) else (
        int(np.ravel_multi_index(tuple(index), shape)) if shape else 0)
    xa = np.abs(compat.host(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)).ravel()
    rms = float(np.sqrt(np.mean(xa**2))) if xa.size else 0.0
    scale = max(float(xa[flat]) if xa.size else 0.0, rms) or 1.0
    if steps is None:
        steps = scale * 2.0 ** np.arange(-44, 1, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.float64)
    if precisions is None:
        native = compat.finfo(x.dtype).dtype
        precisions = ("float64",) + (() if native == np.float64 else (native.name,))
    numeric = {}
    with compat.enable_x64(True):
        for name in precisions:
            numeric[name] = _central(fn, params, args, path, flat, hs=steps, dtype=name)
    index = tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()
    return StepCurve(path=path, index=index, steps=steps, numeric=numeric, scale=scale)


# -- drawing --------------------------------------------------------------------------
def _linthresh(values: np.ndarray) -> float:
    v = np.abs(values[np.isfinite(values)])
    v = v[v > 0]
    if not v.size:
        return 1.0
    # Linear only near zero: below the 5th percentile of the magnitudes, and at least
    # 1e-9 of the largest (symlog needs a positive threshold). A power of ten keeps the
    # ticks on decades.
    t = max(np.percentile(v, 5), 1e-9 * v.max())
    return float(10.0 ** np.floor(np.log10(t)))


def _leaf_name(lf) -> str:
    return getattr(lf, "name", None) or lf.path


def _scatter_panel(ax, lf):
    a = np.real(np.asarray(lf.analytic, dtype=np.complex128)).astype(np.float64)
    n = np.real(np.asarray(lf.numeric, dtype=np.complex128)).astype(np.float64)
    bound = np.asarray(lf.bound, dtype=np.float64)
    codes = np.asarray(lf.codes)
    lt = _linthresh(np.concatenate([a, n]))
    order = np.argsort(a)
    ax.fill_between(a[order], (a - bound)[order], (a + bound)[order], color="#2ca02c", alpha=0.25,
                    lw=0, label="allowed difference")
    both = np.concatenate([a, n])
    both = both[np.isfinite(both)]
    lo, hi = (float(both.min()), float(both.max())) if both.size else (-1.0, 1.0)
    # Limits a little beyond the data in symlog space; zero is shown only when the
    # data straddle it (an all-positive leaf looks like a log-log plot).
    lo = lo / 1.6 if lo > lt else lo * 1.6 - lt
    hi = hi / 1.6 if hi < -lt else hi * 1.6 + lt
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, label="numerical = analytic")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    for code in range(len(STATUS_NAMES)):
        sel = codes == code
        if np.any(sel):
            big = code == MISMATCH
            ax.scatter(a[sel], n[sel], s=36 if big else 12, marker=MARKERS[code], color=COLOURS[code],
                       lw=1.5 if big else 0.5, zorder=3 if big else 2,
                       label=f"{STATUS_NAMES[code]} ({int(sel.sum())})")
    ax.set_xscale("symlog", linthresh=lt)
    ax.set_yscale("symlog", linthresh=lt)
    ax.set_xlabel("analytic derivative")
    ax.set_ylabel("numerical derivative")
    title = f"{_leaf_name(lf)}  {lf.status.upper()}"
    if np.iscomplexobj(lf.analytic):
        title += " (real parts)"
    ax.set_title(title, color=COLOURS[STATUS_NAMES.index(lf.status)], fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, alpha=0.3)


def _ratio_panel(ax, lf):
    a = np.asarray(lf.analytic)
    n = np.asarray(lf.numeric)
    bound = np.asarray(lf.bound, dtype=np.float64)
    codes = np.asarray(lf.codes)
    d = np.abs(a - n).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(bound > 0, d / bound, np.where(d > 0, np.inf, 0.0))
    finite = r[np.isfinite(r) & (r > 0)]
    floor = float(finite.min()) / 10 if finite.size else 1e-12
    top = max(float(finite.max()) * 10 if finite.size else 10.0, 10.0)
    r = np.clip(np.where(np.isfinite(r), r, top), floor, top)
    x = np.asarray(lf.indices)
    for code in range(len(STATUS_NAMES)):
        sel = codes == code
        if np.any(sel):
            ax.scatter(x[sel], r[sel], s=30 if code == MISMATCH else 8, marker=MARKERS[code],
                       color=COLOURS[code], lw=1.5 if code == MISMATCH else 0.5)
    ax.axhline(1.0, color="#d62728", lw=1, ls="--", label="fails above this line")
    ax.set_yscale("log")
    ax.set_ylim(floor, top)
    ax.set_xlabel(f"element (flat index into {'x'.join(map(str, lf.shape)) or 'scalar'})")
    ax.set_ylabel("|analytic − numerical| / allowed")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, alpha=0.3)


def _curve_panel(ax, curve: StepCurve, lf, step_used: float | None):
    ref = float(np.real(lf.worst_numeric)) if lf is not None and math.isfinite(np.real(lf.worst_numeric)) \
        else curve.reference()
    h = curve.steps
    lines = {"float64": ("#1f77b4", "-"), "float32": ("#ff7f0e", "-"), "float16": ("#9467bd", "-")}
    ymin = np.inf
    for name, d in curve.numeric.items():
        err = np.abs(d - ref)
        ok = np.isfinite(err) & (err > 0)
        colour, ls = lines.get(name, ("#7f7f7f", "-"))
        label = f"{name}" + (" (how jgc evaluates)" if name == "float64" else " (native)")
        ax.loglog(h[ok], err[ok], marker=".", color=colour, ls=ls, label=label)
        if np.any(ok):
            ymin = min(ymin, float(err[ok].min()))
    if lf is not None:
        gap = abs(float(np.real(lf.worst_analytic)) - ref)
        if gap > 0 and math.isfinite(gap):
            ax.axhline(gap, color="#d62728", lw=1.5, ls="--",
                       label=f"|analytic − numerical| = {gap:.2g}")
    if step_used is not None and math.isfinite(step_used) and step_used > 0:
        ax.axvline(step_used, color="#2ca02c", lw=1, ls=":", label=f"step jgc used ≈ {step_used:.1g}")
    # Guide slopes through the bottom of the float64 V.
    if "float64" in curve.numeric and math.isfinite(ymin):
        err = np.abs(curve.numeric["float64"] - ref)
        ok = np.isfinite(err) & (err > 0)
        if np.any(ok):
            i = int(np.argmin(np.where(ok, err, np.inf)))
            h0, e0 = h[i], max(err[i], 1e-300)
            left, right = h[h <= h0], h[h >= h0]
            ax.loglog(right, e0 * (right / h0) ** 2, color="black", lw=0.6, ls="--",
                      label="∝ h² (truncation)")
            ax.loglog(left, e0 * (h0 / left), color="black", lw=0.6, ls="-.", label="∝ 1/h (round-off)")
    ax.set_xlabel("step h (absolute)")
    ax.set_ylabel("|central difference − best estimate|")
    ax.set_title(f"step size vs error at {curve.path}{list(curve.index)}", fontsize=10)
    # Below the axes: inside, it would cover one arm of the V.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    ax.grid(True, which="major", alpha=0.3)


def plot_report(report, path=None, *, fn: Callable | None = None, params: Any = None,
                args: tuple = (), curve: StepCurve | None = None, max_leaves: int = 4, dpi: int = 110):
    """Draw a report (see the module docstring) and save it to ``path`` if given.

    Args:
      report: a :class:`jgc.Report`.
      path: file to write (the format follows the suffix: .png, .pdf, .svg); None to
        only return the figure.
      fn, params, args: the checked cost and its inputs. When given, the worst
        element's step-size curve is drawn too (a few dozen extra evaluations).
      curve: a :class:`StepCurve` computed already (instead of fn/params/args).
      max_leaves: at most this many leaves are drawn, failing ones first.
      dpi: resolution of raster output.

    Returns:
      The ``matplotlib.figure.Figure`` (not shown; no pyplot state is touched).
    """
    Figure = _require_matplotlib("jgc.Report.plot")
    if not isinstance(max_leaves, int) or max_leaves < 1:
        raise ValueError(f"jgc.Report.plot: max_leaves must be a positive int, got {max_leaves!r}.")
    if (fn is None) != (params is None):
        raise TypeError(
            "jgc.Report.plot: pass both fn and params (and args) to draw the step-size curve, "
            "or neither to draw the per-leaf panels only."
        )
    if not isinstance(args, tuple):
        raise TypeError(f"jgc.Report.plot: args must be a tuple of the extra arguments of fn, got "
                        f"{type(args).__name__}. Write args=(x, y).")
    failing = list(report.failing())
    rest = sorted((lf for lf in report.leaves if lf not in failing and lf.checked),
                  key=lambda lf: (-STATUS_NAMES.index(lf.status), -lf.checked))
    drawn = [lf for lf in failing + rest if lf.checked][:max_leaves]
    worst = (failing or rest or [None])[0]
    if curve is None and fn is not None and worst is not None and worst.path:
        try:
            curve = step_curve(fn, params, *args, path=worst.path, index=worst.worst_index)
        except ValueError:
            curve = None  # e.g. a Jacobian report, whose paths are not leaves of params
    ncols = max(len(drawn), 1) + (curve is not None)
    fig = Figure(figsize=(4.6 * ncols, 8.2), dpi=dpi, layout="constrained")
    grid = fig.add_gridspec(2, ncols)
    for j, lf in enumerate(drawn):
        _scatter_panel(fig.add_subplot(grid[0, j]), lf)
        _ratio_panel(fig.add_subplot(grid[1, j]), lf)
    if curve is not None:
        lf = worst if worst is not None and worst.path == curve.path else None
        used = None
        if lf is not None and math.isfinite(lf.step):
            used = lf.step
        _curve_panel(fig.add_subplot(grid[:, -1]), curve, lf, used)
    verdict = "PASS" if report.ok else "FAIL"
    more = len([lf for lf in report.leaves if lf.checked]) - len(drawn)
    title = (f"{getattr(report, 'api', 'jgc.check')} {verdict}: {report.function or 'fn'} — "
             f"{report.checked}/{report.size} elements, precision {report.precision}, "
             f"normwise ‖a−n‖/‖a+n‖ = {report.normwise:.1e}")
    if more > 0:
        title += f"  (+{more} more leaves not drawn)"
    fig.suptitle(title, fontsize=11, color="#d62728" if not report.ok else "black")
    if path is not None:
        fig.savefig(path)
    return fig

