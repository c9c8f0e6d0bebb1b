"""Per-element status codes, their names, and which of them fail a check.

The judge (``compare`` and ``judge``) and the screens (``screening``, ``strategies``)
write these codes for every element of a scalar, Jacobian or product check; ``summary``,
the report, the plot and the text only read them. Codes grow with severity, so the
status of a group of elements is the largest code among them. The rules wing reports
each rule with statuses of its own (``rules.report.RULE_STATUSES``: "intended", "not
executed", ...), drawn from these codes of its call sites' checks.
"""

from __future__ import annotations

OK, INCONCLUSIVE, NON_SMOOTH, IMPRECISE, NON_FINITE, MISMATCH = 0, 1, 2, 3, 4, 5
STATUS_NAMES = ("ok", "inconclusive", "non-smooth", "imprecise", "non-finite", "mismatch")
# Statuses that fail a check only under ``strict=True`` (a mismatch always fails).
STRICT_ONLY = ("inconclusive", "imprecise", "non-finite")


def failing_statuses(strict: bool) -> set:
    """The element statuses that make a check fail: mismatch, and more under ``strict``."""
    return {"mismatch"} | (set(STRICT_ONLY) if strict else set())


def fails(status: str, counts: dict, strict: bool) -> bool:
    """Whether a leaf fails a check: by its own status, or by any of its elements' (name → count)."""
    bad = failing_statuses(strict)
    return status in bad or any(counts.get(s, 0) for s in bad)
