"""The result of :func:`jgc.check_rules`: per custom rule, where it is, where it is called, the verdict."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from ..report import find

# Rule statuses, most severe first (the text report lists rules in this order).
RULE_STATUSES = ("mismatch", "error", "not checked", "approximate", "ok", "intended", "not on the differentiated path",
                 "not executed")
FAILING = ("mismatch",)

SURROGATE_HINT = (
    "surrogate gradient? The primal is locally constant here (its finite differences are "
    "zero) but the rule gives a non-zero derivative. If that is on purpose (a "
    "straight-through estimator, gradient scaling or clipping), declare it with "
    "jgc.intended(fn, reason=...)."
)


def _num(x):
    if x is None:
        return None
    if isinstance(x, complex):
        return {"real": x.real, "imag": x.imag} if x.imag else _fin(x.real)
    return _fin(float(x))


def _fin(x: float):
    return x if math.isfinite(x) else str(x)


def _g(x) -> str:
    if isinstance(x, complex) and x.imag:
        return f"{x:.6g}"
    return f"{float(x.real if isinstance(x, complex) else x):.6g}"


@dataclasses.dataclass(frozen=True)
class Worst:
    """The element of a rule's check that most exceeds its allowed error.

    Attributes:
      operand: the rule's argument (its name in the primal's signature when known).
      index: index into that operand, within one call.
      call: which captured call (0, 1, 2: the first calls; 3: the largest input).
      step: the loop steps of that call, e.g. "scan step 7".
      input: the operand's value at ``index`` (None when the check went along random
        directions and the element cannot be attributed to one input).
      rule, numeric, allowed: the rule's derivative, central differences of the
        primal, and the allowed difference there.
      block: the row of the underlying :class:`jgc.Report`.
      locally_constant: the primal's differences are zero where the rule is not.
    """

    operand: str
    index: tuple
    call: int | None
    step: str
    input: float | None
    rule: Any
    numeric: Any
    allowed: float
    block: str
    locally_constant: bool = False

    def describe(self) -> str:
        where = f"operand {self.operand}" + (f"[{', '.join(map(str, self.index))}]" if self.index else "")
        if self.call is not None:
            where += f", call {self.call}" + (f" ({self.step})" if self.step else "")
        value = f" = {_g(self.input)}" if self.input is not None else ""
        return (f"{where}{value}: rule {_g(self.rule)} vs finite differences {_g(self.numeric)} "
                f"(allowed difference {self.allowed:.2g})")

    def to_dict(self) -> dict:
        return {"operand": self.operand, "index": list(self.index), "call": self.call, "step": self.step,
                "input": _num(self.input), "rule": _num(self.rule), "finite_differences": _num(self.numeric),
                "allowed": _num(self.allowed), "block": self.block, "locally_constant": self.locally_constant}


@dataclasses.dataclass(frozen=True)
class SiteReport:
    """One place a rule is called, how often, and the verdict there.

    Attributes:
      at: ``file:line`` of the call; function: the function that calls it.
      under: the constructs around the call, outermost first ("scan > cond").
      calls: how many times the loss called it; checked: how many calls were checked.
      status: "ok", "mismatch", "error", "not checked" or "not executed".
      reason: why, for "error" / "not checked" / "not executed" / "intended".
      report: the :class:`jgc.Report` of the isolated check (None when none ran).
      worst: the worst element (:class:`Worst`) when the status is "mismatch".
      method: how it was checked ("jacobian (rev)", "jvp (4 directions per leaf)", …).
      held: the operands held fixed and the outputs not compared, with why (off the
        differentiated path, non-finite), or "".
      error: the measured relative error, max |rule − differences| over the largest
        |derivative| of the site (None when nothing was compared).
      check: for :func:`jgc.check_rule`, the check this row is the verdict of ("jvp",
        "linearity", "batching", …), and ``at`` the point it ran at; "" for a call site.
    """

    at: str
    function: str
    under: str
    calls: int
    checked: int
    status: str
    reason: str = ""
    report: Any = dataclasses.field(default=None, repr=False, compare=False)
    worst: Worst | None = None
    method: str = ""
    held: str = ""
    check: str = ""
    error: float | None = None

    def describe(self) -> str:
        if self.check:
            counted = f" ({self.checked} compared)" if self.checked and self.status in ("ok", "mismatch") else ""
            return f"{self.check} at {self.at}: {self.status}{counted}" + (f": {self.reason}" if self.reason else "")
        under = f" under {self.under}" if self.under else ""
        head = f"called at {self.at} ({self.function}){under}: {self.calls} call{'s' * (self.calls != 1)}"
        held = f"; held fixed: {self.held}" if self.held else ""
        if self.status in ("ok", "mismatch", "approximate"):
            why = f" ({self.reason})" if self.reason else ""
            return f"{head}, {self.checked} checked, {self.status}{why}{held}"
        return f"{head}, {self.status}" + (f": {self.reason}" if self.reason else "") + held

    def to_dict(self) -> dict:
        return {"at": self.at, "function": self.function, "under": self.under, "calls": self.calls,
                "checked": self.checked, "status": self.status, "reason": self.reason, "method": self.method,
                "held": self.held, "check": self.check, "error": _num(self.error), "worst": self.worst.to_dict() if self.worst else None}


@dataclasses.dataclass(frozen=True)
class RuleReport:
    """The verdict for one custom rule (one primal with its rule), over all its call sites.

    Attributes:
      kind: "custom_jvp" or "custom_vjp".
      name, primal_at: the primal function and its ``file:line``.
      rule_name, rule_at: the rule function (the JVP rule, or the VJP's backward pass).
      fwd_name, fwd_at: a custom_vjp's forward pass ("" for custom_jvp).
      status: the worst site status ("mismatch" > "error" > "not checked" > "ok"),
        "intended" for a declared surrogate, "not executed" when no call ran.
      reason: why, for "intended" or "error".
      sites: the :class:`SiteReport` of every call site.
      calls: calls seen over all sites.
      hint: a likely explanation ("surrogate gradient?") or "".
      checks: for :func:`jgc.check_rules`, the rows of :func:`jgc.check_rule`'s checks run
        at its call sites (linearity, batching, primal, symbolic zeros, order 2), each
        naming its check and the call site in ``at``; they count in ``status``.
    """

    kind: str
    name: str
    primal_at: str
    rule_name: str
    rule_at: str
    fwd_name: str
    fwd_at: str
    status: str
    reason: str
    sites: tuple
    calls: int
    hint: str = ""
    checks: tuple = ()

    @classmethod
    def from_sites(cls, base: dict, sites: tuple, calls: int, checks: tuple = ()) -> RuleReport:
        ran = [s for s in tuple(sites) + tuple(checks) if s.status != "not executed"]
        status = min((s.status for s in ran), key=RULE_STATUSES.index, default="not executed")
        reason = next((s.reason for s in tuple(sites) + tuple(checks) if s.status == status and s.reason), "")
        worst = next((s.worst for s in sites if s.worst is not None), None)
        hint = SURROGATE_HINT if worst is not None and worst.locally_constant else ""
        return cls(**base, status=status, reason=reason, sites=sites, calls=calls, hint=hint, checks=tuple(checks))

    @property
    def ok(self) -> bool:
        return self.status not in FAILING

    @property
    def checked(self) -> int:
        """Calls checked: over the call sites, and the points where a first-derivative check ran."""
        done = ("ok", "mismatch", "approximate")
        return sum(s.checked for s in self.sites if s.status in done and not s.check) \
            + len({s.at for s in self.sites if s.check in ("jvp", "vjp") and s.status in done})

    @property
    def worst(self) -> Worst | None:
        """The worst element over the failing sites (None when the rule is not wrong)."""
        return next((s.worst for s in self.sites if s.worst is not None), None)

    def headline(self) -> str:
        rule = f"rule {self.rule_name} at {self.rule_at}"
        if self.fwd_name:
            rule = f"fwd {self.fwd_name} at {self.fwd_at}, bwd {self.rule_name} at {self.rule_at}"
        return f"{self.status:<12} {self.kind} {self.name} defined at {self.primal_at}; {rule}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "primal_at": self.primal_at, "rule_name": self.rule_name,
                "rule_at": self.rule_at, "fwd_name": self.fwd_name, "fwd_at": self.fwd_at,
                "status": self.status, "reason": self.reason, "hint": self.hint, "calls": self.calls,
                "checked": self.checked, "worst": self.worst.to_dict() if self.worst else None,
                "sites": [s.to_dict() for s in self.sites], "checks": [s.to_dict() for s in self.checks]}


@dataclasses.dataclass(frozen=True)
class RulesReport:
    """The result of :func:`jgc.check_rules`.

    Attributes:
      ok: True when no rule disagrees with its primal (intended surrogates, rules
        that did not run and rules that could not be checked do not fail it; their
        status says so).
      rules: one :class:`RuleReport` per rule, wrong ones first.
      function: the loss that was traced.
      seconds: wall time of the whole check.
      notes: remarks about precision and method.
      api: the check that made it ("jgc.check_rules" or "jgc.check_rule").
    """

    ok: bool
    rules: tuple
    function: str
    seconds: float
    notes: tuple = ()
    api: str = "jgc.check_rules"

    @classmethod
    def build(cls, rules, *, function: str, seconds: float, notes=(), api: str = "jgc.check_rules") -> RulesReport:
        rules = tuple(sorted(rules, key=lambda r: RULE_STATUSES.index(r.status)))
        return cls(ok=all(r.ok for r in rules), rules=rules, function=function, seconds=seconds,
                   notes=tuple(notes), api=api)

    def failed_checks(self) -> tuple:
        """The checks that found a failure, in the order they ran ("jvp", "linearity", "batching", …)."""
        # A call site's finite-difference row (check_rules) is the check of the rule's JVP or VJP.
        seen = dict.fromkeys(s.check or ("vjp" if r.kind == "custom_vjp" else "jvp") for r in self.rules
                             for s in r.sites + r.checks if s.status in FAILING)
        return tuple(seen)

    def failing(self) -> tuple:
        """The rules that disagree with their primal."""
        return tuple(r for r in self.rules if not r.ok)

    def rule(self, name: str) -> RuleReport:
        """The report of the rule whose primal is called ``name``."""
        return find(self.rules, "name", name, "RulesReport.rule: no rule")

    def summary(self) -> str:
        bad = self.failing()
        calls = sum(r.calls for r in self.rules)
        checked = sum(r.checked for r in self.rules)
        n = len(self.rules)
        verdict = (f"{len(bad)} of {n} rule{'s' * (n != 1)} wrong" if bad
                   else "no custom rules found" if not n else f"no wrong rule among {n}")
        counts = {st: sum(r.status == st for r in self.rules) for st in RULE_STATUSES}
        statuses = ", ".join(f"{c} {st}" for st, c in counts.items() if c)
        if self.api == "jgc.check_rule":  # one rule: its rows are checks, not call sites
            rows = [s for r in self.rules for s in r.sites]
            failed = self.failed_checks()
            tail = (f"; failed: {', '.join(failed)}" if failed else "") + f"; {len(rows)} checks run"
            return f"{self.api}({self.function}): {verdict}{tail}, {self.seconds:.2f} s"
        return (f"{self.api}({self.function}): {verdict}" + (f" ({statuses})" if n else "")
                + f"; {calls} call{'s' * (calls != 1)} seen, {checked} checked, {self.seconds:.2f} s")

    def __str__(self) -> str:
        lines = [self.summary()]
        for r in self.rules:
            lines.append("")
            lines.append(r.headline())
            if r.status == "intended":
                lines.append(f"  intended: {r.reason}")
            for s in r.sites + r.checks:
                lines.append(f"  {s.describe()}")
                if s.worst is not None:
                    lines.append(f"    worst: {s.worst.describe()}")
            if r.hint:
                lines.append(f"  hint: {r.hint}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "function": self.function, "seconds": self.seconds, "notes": list(self.notes),
                "rules": [r.to_dict() for r in self.rules]}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def as_approximate(site: SiteReport, tol: float, reason: str) -> SiteReport:
    """A rule approximate by construction: "approximate" within ``tol``, still "mismatch" beyond it."""
    if site.status != "mismatch" or site.error is None:
        return site
    measured = f"relative error {site.error:.1e}, tolerance {tol:.0e}"
    if site.error <= tol:
        return dataclasses.replace(site, status="approximate", reason=f"{reason}; {measured}")
    return dataclasses.replace(site, reason=f"approximate by construction ({reason}), but {measured}: beyond "
                                            "what the approximation explains")


def relative_error(leaves) -> float | None:
    """max |rule − differences| over the largest |derivative| of the site (finite entries only)."""
    diff, scale = 0.0, 0.0
    for lf in leaves:
        a, n = np.asarray(lf.analytic), np.asarray(lf.numeric)
        ok = np.isfinite(a) & np.isfinite(n)
        if ok.any():
            diff = max(diff, float(np.max(np.abs(a[ok] - n[ok]))))
            scale = max(scale, float(np.max(np.abs(n[ok]))), float(np.max(np.abs(a[ok]))))
    return diff / scale if scale > 0 else None
