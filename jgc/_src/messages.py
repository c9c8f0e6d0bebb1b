"""The failure message of a check: what failed and where, with the values there, then the report.

Every front door and shell that raises on a failed check (``assert_grads_close``,
``jgc.testing``, ``with_grad_check``, ``check_grads``) builds its message here: a
first line that a test can match, naming the worst element of the first failing
leaf and any wrong custom rule, then the full report, failing leaves first.
"""

from __future__ import annotations

from collections.abc import Callable

from .report import LeafReport, Report


def where(report: Report, position: Callable[[LeafReport], str] | None = None) -> str:
    """`` at leaf[index]: analytic a vs numerical n, allowed difference b`` for the worst failure.

    ``position`` names the place in a leaf (default: its path and index); empty when
    nothing fails.
    """
    failing = report.failing()
    if not failing:
        return ""
    lf = failing[0]
    place = position(lf) if position is not None else f" at {lf.path}{list(lf.worst_index)}"
    more = f" (and {len(failing) - 1} more leaves)" if len(failing) > 1 else ""
    return (f"{place}: analytic {lf.worst_analytic:.6g} vs numerical {lf.worst_numeric:.6g}, "
            f"allowed difference {lf.worst_bound:.3g}{more}")


def wrong_rules(report) -> str:
    """`` Wrong custom rule: name (file:line), rule name (file:line).`` for each failing rule.

    Only a :class:`Report` of ``jgc.check(..., rules=True)`` carries the rules it ran.
    """
    rules = report.rules if isinstance(report, Report) else None
    return "".join(f" Wrong custom rule: {r.name} ({r.primal_at}), rule {r.rule_name} ({r.rule_at})."
                   for r in (rules.failing() if rules is not None else ()))


def failure_message(head: str, report, *, custom_message: str | None = None, hint: str = "") -> str:
    """``head`` (one sentence), wrong rules, ``[custom_message]``, ``hint``, then the report."""
    line = head + wrong_rules(report)
    if custom_message:
        line += f" [{custom_message}]"
    return f"{line}{hint}\n{report}"
