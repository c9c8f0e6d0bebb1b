"""The result of a check: an immutable record, a text table and a JSON-ready dict."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from . import compat, policy
from .plot import plot_report
from .statuses import IMPRECISE, MISMATCH, STATUS_NAMES, fails

# What each status means and what would settle it, for the text report.
STATUS_HELP = {
    "inconclusive": (
        "the finite-difference error bar is larger than half the derivative itself, so "
        "even a gross error there would pass. Settle it by (a) checking in float64 "
        "(precision='float64'), (b) a larger step, or (c) a point where these "
        "derivatives are not tiny. Where a note says J moves in a staircase, the cost "
        "computes in low precision inside (bfloat16/float16): compute it in float32 there. "
        "A float64 element listed below as smaller than float64 central differences resolve "
        "is at the reference's own limit: make the cost complex-safe (no abs, real-only or "
        "integer ops on the path) so the complex step resolves it, or check it at a point "
        "off the tail."
    ),
    "non-smooth": (
        "one-sided differences disagree far beyond their error bars (a kink: relu, abs, "
        "max, sort at a switch point) and the analytic value is one of the one-sided "
        "slopes. Not a bug; move the point off the kink to check it."
    ),
    "imprecise": (
        "the analytic value lost relative precision that its dtype could hold: the "
        "reference resolves the true value (to better than a tenth of it) and the analytic "
        "value is off by more than rtol, yet within the leaf's absolute tolerance (a rule "
        "written in terms of the output, like sigmoid' = s(1 - s) or tanh' = 1 - t^2, "
        "rounds to 0 in the tails). Not a failure unless strict=True; rewrite the rule "
        "in terms of the input to keep those digits."
    ),
    "non-finite": (
        "J was NaN or Inf at a perturbed point (log/sqrt/division near the edge of the "
        "domain); the numerical derivative is undefined there."
    ),
    "mismatch": (
        "analytic and numerical derivatives disagree beyond every error the method can "
        "explain. Likely causes: (a) a wrong term or factor in a hand-written gradient or "
        "custom rule, (b) a transposed or mis-indexed array, (c) a stop_gradient or "
        "non-differentiable op on the path."
    ),
}
# Added under "mismatch" when a mismatched analytic value is NaN or inf.
NONFINITE_ANALYTIC_HELP = (
    "the analytic derivative is NaN or inf where J is finite around the point: the rule "
    "divides by zero or takes a log or sqrt of 0 there (jnp.linalg.norm at 0: use "
    "optax.safe_norm; jnp.where whose unused branch is NaN: make that branch safe too)."
)


def _f(x) -> float | None:
    return None if x is None else float(x)


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """The verdict for one perturbed leaf.

    Attributes:
      path: ``jax.tree_util.keystr`` of the leaf.
      shape, dtype: of the leaf as the caller passed it.
      size: elements in the leaf; checked: elements whose derivative was checked.
      status: the worst element status in the leaf ("ok" < "inconclusive" <
        "non-smooth" < "imprecise" < "non-finite" < "mismatch").
      counts: number of checked elements per status.
      max_abs_err: max |analytic − numeric| over checked elements.
      max_rel_err: max |analytic − numeric| / max(|analytic|, |numeric|) over checked
        elements whose derivative is above the leaf's error floor.
      worst_index: multi-dimensional index of the element that most exceeds its allowed
        error (the one to look at first); worst_analytic / worst_numeric / worst_bound
        are the values and the allowed difference there.
      normwise: the lecture's ‖a − n‖ / ‖a + n‖ over the checked elements.
      detectable_rel: the smallest relative error in one typical element (the one
        with the median nonzero |analytic|) that this check would have caught: what it
        could see there, (allowed difference + observed difference) / |analytic|, the
        observed difference left out where it already fails. This
        is the ``detect`` column of the text report. Infinite when no element was
        checked and the mode gives no power statement.
      step: median step h actually taken (absolute).
      detectable_rel_largest: the same figure for the element with the largest
        |analytic| (the easiest one to catch an error in).
      directions: random directions the whole leaf was screened along (directional
        modes; 0 otherwise). directional_rel: the largest relative disagreement
        |⟨g,v⟩ − D_v J| / max(|⟨g,v⟩|, |D_v J|) over them; directional_ratio: the largest
        disagreement over the difference allowed (above 1 a direction failed).
    """

    path: str
    shape: tuple
    dtype: str
    size: int
    checked: int
    status: str
    counts: dict
    max_abs_err: float
    max_rel_err: float
    worst_index: tuple
    worst_analytic: complex | float
    worst_numeric: complex | float
    worst_bound: float
    normwise: float
    detectable_rel: float
    step: float
    # Per checked element (flat indices into the leaf), for plots and localisation.
    indices: np.ndarray = dataclasses.field(repr=False, compare=False)
    analytic: np.ndarray = dataclasses.field(repr=False, compare=False)
    numeric: np.ndarray = dataclasses.field(repr=False, compare=False)
    bound: np.ndarray = dataclasses.field(repr=False, compare=False)
    codes: np.ndarray = dataclasses.field(repr=False, compare=False)
    onesided: Any = dataclasses.field(default=None, repr=False, compare=False)
    # Jacobian / JVP / VJP checks (jgc.check_jacobian and friends): the output leaf of
    # this block and how the worst index splits into output and input parts. Empty for
    # jgc.check, whose "output" is the scalar cost.
    output_path: str = ""
    output_index: tuple = ()
    input_index: tuple = ()
    label: str = ""  # row name in the text table; defaults to ``path``
    detectable_rel_largest: float = math.nan
    directions: int = 0
    directional_rel: float = math.nan
    directional_ratio: float = math.nan
    # Where the analytic side ran at the dtypes given and some element is a mismatch or
    # imprecise: the same program's derivative at the reference's precision (its float64
    # twin) per checked element, beside the native ``analytic`` values; None otherwise.
    twin: Any = dataclasses.field(default=None, repr=False, compare=False)
    # The error the method may have made in each numerical value (None where not kept).
    error: Any = dataclasses.field(default=None, repr=False, compare=False)
    # Why some checked elements have their status where the status alone does not say
    # it (position among the checked elements -> text): a float64 element too small for
    # the reference to resolve is inconclusive, with what was tried. None when none.
    reasons: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The row name in the text report: ``label`` if set, else ``path``."""
        return self.label or self.path

    def accurate_bits(self) -> dict:
        """Correct bits of the analytic values against the reference, per leaf.

        ``median`` and ``worst`` of −log2(|a − n| / |n|) over the judged elements (ok,
        imprecise or mismatch; not non-smooth, inconclusive or non-finite) whose
        reference is at least 1e-3 of the leaf's largest (smaller ones measure the
        reference's absolute error more than the analytic side's), each capped at
        ``dtype``: the bits the leaf's dtype holds (float32: 24, bfloat16: 8). A
        figure below ``dtype`` is precision the analytic side lost; the float64
        reference resolves about 30 bits or more at its steps, so a float32 gradient's
        figure is its own. NaN when no element qualifies.
        """
        try:
            held = int(compat.finfo(self.dtype).nmant) + 1
        except (TypeError, ValueError):
            held = 53
        a = np.abs(np.asarray(self.analytic, np.complex128) - np.asarray(self.numeric, np.complex128))
        n = np.abs(np.asarray(self.numeric, np.complex128))
        # Judged elements only: a kink, an undecided or a non-finite one measures no precision.
        judged = np.isin(np.asarray(self.codes), (STATUS_NAMES.index("ok"), IMPRECISE, MISMATCH))
        keep = judged & np.isfinite(a) & np.isfinite(n) & (n > 0)
        keep &= n >= policy.SMALL_DERIVATIVE * float(np.max(n[keep], initial=0.0))
        if not keep.any():
            return {"median": math.nan, "worst": math.nan, "dtype": held}
        with np.errstate(divide="ignore"):
            bits = np.minimum(-np.log2(np.maximum(a[keep] / n[keep], 2.0 ** -held)), held)
        return {"median": float(np.median(bits)), "worst": float(np.min(bits)), "dtype": held}

    @property
    def ok(self) -> bool:
        return self.status != "mismatch"

    def elements(self, status: str = "mismatch") -> list[tuple]:
        """Return the multi-dimensional indices of the checked elements with ``status``."""
        code = STATUS_NAMES.index(status)
        flat = self.indices[self.codes == code]
        return [tuple(int(i) for i in np.unravel_index(k, self.shape)) for k in flat]

    def flagged(self, limit: int = 100) -> list[dict]:
        """The mismatched and imprecise elements (the first ``limit``), each with its
        index, status, analytic (native) value, float64 twin value (None where not
        evaluated), reference value and error in ulps of the leaf's dtype: the figures
        of the per-element lines of the text report."""
        def num(x):
            if x is None or (np.isscalar(x) and not np.iscomplexobj(x) and math.isnan(float(x))):
                return None
            return {"real": float(np.real(x)), "imag": float(np.imag(x))} if np.iscomplexobj(x) else float(x)

        out = []
        for j in np.flatnonzero(np.isin(self.codes, (MISMATCH, IMPRECISE)))[:limit]:
            a, n = self.analytic[j], self.numeric[j]
            out.append({"index": [int(i) for i in np.unravel_index(int(self.indices[j]), self.shape)],
                        "status": STATUS_NAMES[int(self.codes[j])], "analytic": num(a),
                        "twin": None if self.twin is None else num(self.twin[j]), "reference": num(n),
                        "ulps": _f(ulps(a - n, n, self.dtype)) if np.isfinite(a - n) else None})
        return out

    def to_dict(self) -> dict:
        def num(x):
            if isinstance(x, complex) or np.iscomplexobj(x):
                return {"real": float(np.real(x)), "imag": float(np.imag(x))}
            return _f(x)

        return {
            "path": self.path,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "size": self.size,
            "checked": self.checked,
            "status": self.status,
            "counts": dict(self.counts),
            "max_abs_err": _f(self.max_abs_err),
            "max_rel_err": _f(self.max_rel_err),
            "worst_index": list(self.worst_index),
            "worst_analytic": num(self.worst_analytic),
            "worst_numeric": num(self.worst_numeric),
            "worst_bound": _f(self.worst_bound),
            "normwise": _f(self.normwise),
            "detectable_rel": _f(self.detectable_rel),
            "detectable_rel_largest": _f(self.detectable_rel_largest),
            "accurate_bits": {k: _f(v) if isinstance(v, float) else v for k, v in self.accurate_bits().items()},
            "step": _f(self.step),
            **({"directions": self.directions, "directional_rel": _f(self.directional_rel),
                "directional_ratio": _f(self.directional_ratio)} if self.directions else {}),
            "mismatched_indices": [list(i) for i in self.elements("mismatch")[:100]],
            "imprecise_indices": [list(i) for i in self.elements("imprecise")[:100]],
            "inconclusive_indices": [list(i) for i in self.elements("inconclusive")[:100]],
            **({"flagged": self.flagged()} if np.any(np.isin(self.codes, (MISMATCH, IMPRECISE))) else {}),
            **({"reasons": [{"index": [int(i) for i in np.unravel_index(int(self.indices[j]), self.shape)],
                             "status": STATUS_NAMES[int(self.codes[j])], "reason": why}
                            for j, why in sorted(self.reasons.items())[:100]]} if self.reasons else {}),
            **({"output_path": self.output_path, "output_index": list(self.output_index),
                "input_index": list(self.input_index), "label": self.name}
               if self.output_path else {}),
        }


@dataclasses.dataclass(frozen=True)
class Report:
    """The result of :func:`jgc.check`.

    ``ok`` is True when no checked element is a confirmed mismatch (with
    ``strict=True``, also no inconclusive, imprecise or non-finite element). ``str(report)`` is a
    table with failing leaves first; ``to_dict()`` is JSON-ready; ``plot(path)`` draws
    analytic against numerical derivatives (needs matplotlib).
    """

    ok: bool
    leaves: tuple  # of LeafReport, in tree order
    skipped: tuple  # of (path, description) for leaves that were not perturbed
    normwise: float
    evaluations: int
    seconds: float
    precision: str
    stencil: str
    step: float  # relative step h/s
    noise: float  # measured σ of J (absolute)
    cost: float  # J(θ)
    mode: str = "full"
    strict: bool = False
    notes: tuple = ()
    function: str = ""
    api: str = "jgc.check"  # the front door that made the report (text header)
    # jgc.check(..., rules=True) on a failing check: the jgc.RulesReport of every custom
    # rule inside the cost (None otherwise); its verdict is also in ``notes``.
    rules: Any = dataclasses.field(default=None, repr=False, compare=False)
    # Errors that JAX's own JVP or VJP rules raised at the point, whose values the check
    # took as NaN (jgc.check_grads; a note quotes each): kept for their tracebacks.
    rule_errors: tuple = dataclasses.field(default=(), repr=False, compare=False)
    # Of ``seconds``: the wall time during which a program was being lowered or compiled
    # (on any thread), and the XLA programs compiled while the check ran. The rest of
    # ``seconds`` is evaluation and judging.
    compile_seconds: float = 0.0
    programs: int = 0
    # Where the analytic side ran at the dtypes given: the correct bits of the cost J itself
    # there, against the reference's J ({"bits", "dtype"}; see jgc.check), or of f(x) for
    # the Jacobian, JVP, VJP and HVP checks, next to each leaf's (block's)
    # LeafReport.accurate_bits() for its derivatives; None otherwise.
    cost_bits: Any = None

    # ---- summaries -------------------------------------------------------------
    @property
    def checked(self) -> int:
        return sum(leaf.checked for leaf in self.leaves)

    @property
    def size(self) -> int:
        return sum(leaf.size for leaf in self.leaves)

    def counts(self) -> dict:
        total = {name: 0 for name in STATUS_NAMES}
        for leaf in self.leaves:
            for k, v in leaf.counts.items():
                total[k] += v
        return total

    def failing(self) -> tuple:
        """Leaves whose status makes the check fail, worst first."""
        leaves = [leaf for leaf in self.leaves if fails(leaf.status, leaf.counts, self.strict)]
        return tuple(sorted(leaves, key=lambda lf: -STATUS_NAMES.index(lf.status)))

    def leaf(self, path: str) -> LeafReport:
        """The report of the checked leaf at ``path`` (its ``jax.tree_util.keystr``)."""
        return find(self.leaves, "path", path, "Report.leaf: no checked leaf")

    # ---- output ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "function": self.function,
            "mode": self.mode,
            "strict": self.strict,
            "normwise": _f(self.normwise),
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "compile_seconds": self.compile_seconds,
            "programs": self.programs,
            "precision": self.precision,
            "stencil": self.stencil,
            "step": _f(self.step),
            "noise": _f(self.noise),
            "cost": _f(self.cost),
            "checked": self.checked,
            "size": self.size,
            "counts": self.counts(),
            "leaves": [leaf.to_dict() for leaf in self.leaves],
            "skipped": [{"path": p, "leaf": d} for p, d in self.skipped],
            "notes": list(self.notes),
            "api": self.api,
            **({"cost_bits": {k: _f(v) if isinstance(v, float) else v for k, v in self.cost_bits.items()}}
               if self.cost_bits else {}),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        return format_report(self)

    def plot(self, path, **kwargs):
        """Draw analytic vs numerical derivatives per leaf and the step-size curve."""
        return plot_report(self, path, **kwargs)


def find(items, attr: str, value, what: str):
    """The first of ``items`` whose ``attr`` equals ``value``; a KeyError that lists them otherwise."""
    for item in items:
        if getattr(item, attr) == value:
            return item
    raise KeyError(f"{what} with {attr} {value!r}; found {[getattr(i, attr) for i in items]}.")


def verdict(leaves, strict: bool) -> tuple[bool, float]:
    """Return (ok, normwise ‖a − n‖ / ‖a + n‖) over the checked elements of ``leaves``.

    ok is False when any leaf fails (see ``statuses.fails``): a mismatch, and with
    ``strict`` also inconclusive, imprecise or non-finite elements. Non-finite pairs
    are left out of the norm.
    """
    ok = not any(fails(lf.status, lf.counts, strict) for lf in leaves)
    a = np.concatenate([lf.analytic.ravel() for lf in leaves]) if leaves else np.zeros(0)
    n = np.concatenate([lf.numeric.ravel() for lf in leaves]) if leaves else np.zeros(0)
    if a.size == 0 and any(lf.directions for lf in leaves):
        return ok, math.nan  # screened along directions only: no element compared
    keep = np.isfinite(a) & np.isfinite(n)
    if a.size and not keep.any():
        return ok, math.nan  # no finite pair to compare
    den = float(np.linalg.norm(a[keep] + n[keep]))
    num = float(np.linalg.norm(a[keep] - n[keep]))
    return ok, (num / den if den > 0 else (0.0 if num == 0 else math.inf))


def _g(x, width=9, nan="-") -> str:
    """A number in 3 significant digits; ``nan`` for NaN (a value: "nan"; a summary with
    nothing behind it: "-") and "-" for None."""
    if x is None:
        return "-".rjust(width)
    if isinstance(x, float) and math.isnan(x):
        return nan.rjust(width)
    if isinstance(x, complex) or np.iscomplexobj(x):
        return f"{complex(x):.3g}"
    return f"{float(x):.{3}g}".rjust(width)


# Imprecise elements listed by name in the text report (the rest are counted); as many
# mismatched ones where the analytic side ran at the dtypes given.
IMPRECISE_SHOWN = 5


def ulps(error, reference, dtype) -> float:
    """|error| in units in the last place of ``dtype`` at ``reference`` (an ulp at |r| is
    2^(⌊log2 |r|⌋ − mantissa bits), at least that of the dtype's smallest normal)."""
    try:
        fi = compat.finfo(dtype)
    except (TypeError, ValueError):
        return math.nan
    mag = max(abs(complex(reference)), float(fi.smallest_normal))
    return abs(complex(error)) / 2.0 ** (math.floor(math.log2(mag)) - fi.nmant)


# An imprecise element's reference resolves it to better than a tenth of its value
# (compare.RESOLVED): where the reference's own error is not kept, a float64 twin farther
# from it than that, plus float64's rtol, is wrong in the program itself, at every
# precision, not only rounded at the dtype given (summary.with_native_figures then calls
# the element a mismatch: within the native bound, mismatched by its twin).
TWIN_WRONG = 0.1


def _why(status: str, bound: float, twin_off: bool = False) -> str:
    if twin_off:
        return ("the float64 twin is off from the reference too: the program computes another value at "
                "every precision, not only rounded at its dtype")
    if status == "mismatch":
        return (f"beyond every error the method, the dtype and the measured rounding of the analytic "
                f"side explain (allowed ±{_g(bound, 0)})")
    return ("the reference resolves it and the error is above rtol, yet within the absolute "
            f"tolerance of the leaf's dtype (allowed ±{_g(bound, 0)}): precision lost, not a wrong value")


def _twin_says(twin, reference, bound: float) -> str:
    """What a mismatched element's float64 twin tells: where the error lives."""
    if abs(twin - reference) <= bound:
        return "; the float64 twin agrees with the reference: the error lives at the dtype given"
    return "; the float64 twin is off too: the program computes another value at every precision"


def _element_lines(leaves, native: bool = False) -> list[str]:
    """One line per imprecise element (the first few), and per mismatched one where the
    analytic side ran at the dtypes given (``native``, or a leaf with twin values): which
    status fired and why, the native value, the float64 twin's (where it was evaluated),
    the reference and the error in ulps of the native dtype."""
    out, more = {"imprecise": [], "mismatch": []}, {"imprecise": 0, "mismatch": 0}
    for lf in leaves:
        for status, code in (("mismatch", MISMATCH), ("imprecise", IMPRECISE)):
            if status == "mismatch" and lf.twin is None and not native:
                continue
            for j in np.flatnonzero(lf.codes == code):
                if len(out[status]) == IMPRECISE_SHOWN:
                    more[status] += 1
                    continue
                idx = [int(i) for i in np.unravel_index(int(lf.indices[j]), lf.shape)] if lf.shape else []
                a, n = lf.analytic[j], lf.numeric[j]
                tw = None if lf.twin is None or not np.isfinite(lf.twin[j]) else lf.twin[j]
                if tw is None and native:
                    out[status].append(
                        f"  {status} {lf.name}{idx}: native {_g(a, 0)} ({lf.dtype}), reference {_g(n, 0)}: off by "
                        f"{ulps(a - n, n, lf.dtype):.3g} ulps of {lf.dtype}; {_why(status, float(lf.bound[j]))}.")
                    continue
                if tw is None:
                    rel = abs(a - n) / abs(n) if n != 0 else math.inf
                    out[status].append(f"  imprecise {lf.name}{idx}: analytic {_g(a, 0)} vs reference "
                                       f"{_g(n, 0)} (relative error {rel:.2g})")
                    continue
                out[status].append(
                    f"  {status} {lf.name}{idx}: native {_g(a, 0)} ({lf.dtype}), float64 twin "
                    f"{_g(tw, 0)}, reference {_g(n, 0)}: off by {ulps(a - n, n, lf.dtype):.3g} "
                    f"ulps of {lf.dtype}; {_why(status, float(lf.bound[j]), status == 'mismatch' and abs(a - n) <= lf.bound[j])}"
                    + (_twin_says(tw, n, float(lf.bound[j])) if status == "mismatch" and abs(a - n) > lf.bound[j]
                       else "") + ".")
    lines = out["mismatch"] + out["imprecise"] + _reason_lines(leaves)
    for status in ("mismatch", "imprecise"):
        if more[status]:
            lines.append(f"  ... and {more[status]} more {status} elements (LeafReport.elements({status!r})).")
    return lines


def _reason_lines(leaves) -> list[str]:
    """One line per element with a reason of its own (the first few; the rest counted):
    its status, analytic and reference values, error bar and why."""
    lines, more = [], 0
    for lf in leaves:
        for j, why in sorted((lf.reasons or {}).items()):
            if len(lines) == IMPRECISE_SHOWN:
                more += 1
                continue
            idx = [int(i) for i in np.unravel_index(int(lf.indices[j]), lf.shape)] if lf.shape else []
            bar = "" if lf.error is None else f" ± {float(lf.error[j]):.1e}"
            lines.append(f"  {STATUS_NAMES[int(lf.codes[j])]} {lf.name}{idx}: analytic {_g(lf.analytic[j], 0)}, "
                         f"reference {_g(lf.numeric[j], 0)}{bar}: {why}.")
    if more:
        lines.append(f"  ... and {more} more such elements (LeafReport.reasons).")
    return lines


def format_report(r: Report) -> str:
    verdict = "PASS" if r.ok else "FAIL"
    counts = r.counts()
    parts = [f"{v} {k}" for k, v in counts.items() if v and k != "ok"]
    screened = [lf for lf in r.leaves if lf.directions]
    if screened:
        dirs = sorted({lf.directions for lf in screened})
        head = (
            f"{r.api} {verdict}{': ' + r.function if r.function else ''} — "
            f"{len(screened)}/{len(r.leaves)} leaves screened along "
            f"{'/'.join(map(str, dirs))} random directions each (all {sum(lf.size for lf in screened)} "
            f"of their elements at once), {r.checked}/{r.size} elements checked individually"
            + (f", {counts['ok']} ok" if r.checked else "")
            + (", " + ", ".join(parts) if parts else "")
            + "; mode='full' checks every element"
        )
    else:
        head = (
            f"{r.api} {verdict}{': ' + r.function if r.function else ''} — "
            f"{r.checked}/{r.size} elements checked, {counts['ok']} ok"
            + (", " + ", ".join(parts) if parts else "")
        )
    lines = [head]
    if screened and r.checked == 0:
        agree = max(lf.directional_rel for lf in screened)
        compared = (f"no element compared individually; along directions max "
                    f"|⟨g,v⟩−D_v J|/|D_v J| = {agree:.2e}")
    else:
        compared = f"normwise ‖a−n‖/‖a+n‖={r.normwise:.2e}"
    lines.append(
        f"  mode={r.mode} stencil={r.stencil} precision={r.precision} step={r.step:.2g}·s "
        f"noise σ={r.noise:.2g} evaluations={r.evaluations} time={r.seconds:.2f}s "
        f"(compiling {r.compile_seconds:.2f}s, {r.programs} programs) {compared}"
    )
    failing = r.failing()
    order = list(failing) + [lf for lf in r.leaves if lf not in failing]
    w = max([len("leaf")] + [len(lf.name) for lf in order])
    along = (f" {'dirs':>4} {'dir rel':>9}") if screened else ""
    lines.append(
        f"  {'leaf':<{w}}  {'status':<12}{along} {'checked':>9} {'max abs':>9} {'max rel':>9} "
        f"{'detect':>9}  worst element (analytic vs numeric)"
    )
    for lf in order:
        shape = "x".join(map(str, lf.shape)) or "scalar"
        worst = ""
        if lf.checked:
            worst = (
                f"{list(lf.worst_index)}: {_g(lf.worst_analytic, 0, 'nan')} vs "
                f"{_g(lf.worst_numeric, 0, 'nan')} (allowed ±{_g(lf.worst_bound, 0)})"
            )
        along = (f" {lf.directions:>4} {_g(lf.directional_rel)}" if screened else "")
        lines.append(
            f"  {lf.name:<{w}}  {lf.status:<12}{along} {lf.checked:>4}/{lf.size:<4} "
            + (f"{_g(None)} {_g(None)} " if screened and not lf.checked else
               f"{_g(lf.max_abs_err)} {_g(lf.max_rel_err)} ")
            + f"{_g(lf.detectable_rel)}  "
            f"{worst}  [{shape} {lf.dtype}]"
        )
    for p, d in r.skipped:
        lines.append(f"  {p:<{w}}  {'skipped':<12} (not a floating array: {d})")
    seen = {k for k, v in counts.items() if v and k != "ok"}
    for status in ("mismatch", "non-finite", "imprecise", "non-smooth", "inconclusive"):
        if status in seen:
            lines.append(f"  {status}: {STATUS_HELP[status]}")
        if status == "mismatch" and "mismatch" in seen and any(
                np.any(~np.isfinite(lf.analytic[lf.codes == MISMATCH])) for lf in r.leaves):
            lines.append(f"  mismatch, non-finite analytic: {NONFINITE_ANALYTIC_HELP}")
    lines += _element_lines(order, native=bool(r.cost_bits))
    if r.cost_bits:
        per = [f"{lf.name} {b['median'] + 0.0:.0f}/{b['worst'] + 0.0:.0f} of {b['dtype']}"
               for lf in order[:4] for b in [lf.accurate_bits()] if not math.isnan(b["median"])]
        scalar = r.api == "jgc.check"
        lines.append(f"  accuracy at the dtypes given: {'the cost J' if scalar else 'f(x)'} holds "
                     f"{r.cost_bits['bits']:.0f} of "
                     f"{r.cost_bits['dtype']} bits"
                     + (f"; {'its gradient' + chr(39) + 's' if scalar else 'the derivatives' + chr(39)} bits per "
                        f"{'leaf' if scalar else 'block'} (median/worst): {', '.join(per)}"
                        + (", ... (LeafReport.accurate_bits())" if len(order) > 4 else "") if per else "") + ".")
    for note in r.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
