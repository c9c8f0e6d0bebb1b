"""chex-style test assertions built on :func:`jgc.check`.

Each ``assert_*`` returns the :class:`jgc.Report` when it holds and raises
:class:`jgc.GradCheckError` (an ``AssertionError``) when it does not. Messages start
with a fixed prefix, ``"[jgc] Assertion <name> failed: "``, in the manner of chex's
``"[Chex] Assertion <name> failed: "``, so that tests can match them; the optional
``custom_message`` follows in brackets on the first line, and the full report follows
on the next lines, failing leaves first.

The function under test may be jitted (for example by ``self.variant`` in a
``chex.TestCase`` under ``@chex.variants(with_jit=True, without_jit=True)``); the
assertion itself evaluates concrete numbers and must be called outside ``jit``,
``vmap`` and ``grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from . import validate
from .api import check
from .errors import GradCheckError
from .messages import failure_message, where
from .report import Report
from .rules import check_rule, check_rules

PREFIX = "[jgc] Assertion "


def _message(name: str, what: str, custom_message: str | None, report) -> str:
    return failure_message(f"{PREFIX}{name} failed: {what}", report, custom_message=custom_message)


def _paths(paths) -> str:
    return ", ".join(paths) if paths else "none"


def _refuse_tracers(name: str, params, args) -> None:
    # Checked here (not only in jgc.check) so the message names this assertion.
    validate.concrete(f"jgc.testing.{name}", (params, args), "", message=(
        f"jgc.testing.{name} got traced values: it was called inside jit, vmap or grad "
        "(for example inside a function passed to self.variant). A gradient check needs "
        "concrete numbers. Jit the function under test instead and call the assertion "
        "outside it: jgc.testing." + name + "(self.variant(loss), params, batch)."))


def assert_grads_close(fn: Callable, params: Any, *args, grad=None,
                       custom_message: str | None = None, **options) -> Report:
    """Assert that the gradient of ``fn`` agrees with finite differences.

    Runs :func:`jgc.check` (same arguments and options) and raises when any checked
    element is a confirmed mismatch (with ``strict=True``, also when one is
    inconclusive or non-finite). The rule per element is
    ``|a − n| ≤ atol + rtol·max(|a|, |n|) + (error the finite differences can explain)``.

    Cases:
      * ``grad=None`` checks ``jax.grad(fn)``, so it tests custom_vjp / custom_jvp
        rules used inside ``fn``; a callable ``grad(params, *args)`` checks a
        hand-written gradient; a pytree checks already computed gradients.
      * Integer, bool and non-array leaves of ``params`` (Equinox fields holding
        ``jax.nn.relu`` or ints, Flax NNX static attributes) are skipped, not perturbed.
      * ``fn`` may be jitted (``self.variant(fn)`` under ``chex.variants``); the
        assertion itself must run outside transformations.
      * ``has_aux=True``: ``fn`` returns ``(cost, aux)`` as for ``jax.grad``; aux is
        ignored, and a ``grad`` callable may return the gradient or ``(gradient, aux)``.

    Args:
      fn: the cost, ``fn(params, *args) -> scalar`` (``(scalar, aux)`` with ``has_aux``).
      params: the pytree whose floating leaves are checked.
      *args: data passed to ``fn``; never perturbed.
      grad: None, a gradient function or a gradient pytree (see :func:`jgc.check`).
      custom_message: text added, in brackets, to the first line of the failure.
      **options: passed to :func:`jgc.check` (``has_aux``, ``rtol``, ``atol``,
        ``precision``, ``stencil``, ``strict``, ``mode``, ...).

    Returns:
      The :class:`jgc.Report`, when the gradients agree.

    Raises:
      jgc.GradCheckError: an ``AssertionError`` whose message starts with
        ``"[jgc] Assertion assert_grads_close failed: gradients disagree"`` and holds
        the report; ``err.report`` is the :class:`jgc.Report`.
      TypeError, ValueError: for bad input, as :func:`jgc.check`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jgc import testing
      >>> rep = testing.assert_grads_close(lambda w: jnp.sum(jnp.sin(w)), jnp.ones(3))
      >>> rep.ok
      True
    """
    _refuse_tracers("assert_grads_close", params, args)
    report = check(fn, params, *args, grad=grad, **options)
    if not report.ok:
        msg = _message("assert_grads_close", "gradients disagree" + where(report) + ".",
                       custom_message, report)
        raise GradCheckError(msg, report)
    return report


def assert_grads_differ(fn: Callable, params: Any, *args, grad=None,
                        leaves: str | Sequence[str] | None = None,
                        custom_message: str | None = None, **options) -> Report:
    """Assert that the gradient of ``fn`` *disagrees* with finite differences.

    The mutation test of a checker: a deliberately wrong gradient, ``custom_vjp`` rule
    or backprop must be caught, and caught in the right place.

    Args:
      fn, params, *args, grad, **options: as :func:`assert_grads_close` (``has_aux``
        included).
      leaves: a ``jax.tree_util.keystr`` path (e.g. ``"['w']"``) or a list of them.
        When given, exactly these leaves must fail; None accepts any failing leaf.
      custom_message: text added, in brackets, to the first line of the failure.

    Returns:
      The failing :class:`jgc.Report`, for further checks (``report.failing()``,
      ``leaf.elements("mismatch")``).

    Raises:
      jgc.GradCheckError: when the check passes (message prefix
        ``"[jgc] Assertion assert_grads_differ failed: "``), or fails in other
        leaves than ``leaves``.
      TypeError: if ``leaves`` is not a string or a sequence of strings.

    Example:
      >>> import jax.numpy as jnp
      >>> from jgc import testing
      >>> wrong = lambda w: {"w": 3.0 * w["w"]}           # d/dw of w² is 2w, not 3w
      >>> rep = testing.assert_grads_differ(lambda w: jnp.sum(w["w"] ** 2),
      ...                                   {"w": jnp.ones(2)}, grad=wrong, leaves="['w']")
      >>> rep.ok
      False
    """
    name = "assert_grads_differ"
    if leaves is not None:
        if isinstance(leaves, str):
            leaves = [leaves]
        elif not all(isinstance(p, str) for p in leaves):
            raise TypeError(
                f"jgc.testing.{name}: leaves must be a keystr path such as \"['w']\" or a list "
                f"of them, got {leaves!r}. Take paths from report.leaves[i].path."
            )
        leaves = list(leaves)
    _refuse_tracers(name, params, args)
    report = check(fn, params, *args, grad=grad, **options)
    if report.ok:
        raise GradCheckError(
            _message(name, "gradients agree with finite differences everywhere; a "
                     "disagreement was expected.", custom_message, report), report)
    if leaves is not None:
        paths = {lf.path for lf in report.leaves}
        unknown = [p for p in leaves if p not in paths]
        if unknown:
            raise ValueError(
                f"jgc.testing.{name}: leaves {_paths(unknown)} are not checked leaves of params; "
                f"the checked leaves are {_paths(sorted(paths))}. Use those paths."
            )
        failing = sorted(lf.path for lf in report.failing())
        if failing != sorted(leaves):
            raise GradCheckError(
                _message(name, f"expected exactly leaves {_paths(sorted(leaves))} to fail, but "
                         f"the failing leaves are {_paths(failing)}.", custom_message, report), report)
    return report


def assert_report_ok(report: Report, custom_message: str | None = None) -> Report:
    """Assert that a report from any jgc check passed; show it when it did not.

    Use it for reports you already have (from ``jgc.check`` with options, or from
    the Jacobian and custom-rule checks), so a test failure prints the table.

    Raises:
      TypeError: if ``report`` is not a :class:`jgc.Report`.
      jgc.GradCheckError: with prefix ``"[jgc] Assertion assert_report_ok failed: "``.
    """
    if not isinstance(report, Report):
        raise TypeError(
            f"jgc.testing.assert_report_ok: report must be a jgc.Report (what jgc.check "
            f"returns), got {type(report).__name__}."
        )
    if not report.ok:
        raise GradCheckError(
            _message("assert_report_ok", "the check failed" + where(report) + ".",
                     custom_message, report), report)
    return report


def assert_rules_ok(fn: Callable, params: Any, *args, custom_message: str | None = None, **options):
    """Assert that every custom derivative rule inside ``fn`` agrees with its primal.

    Runs :func:`jgc.check_rules` (same arguments and options): every ``custom_jvp`` /
    ``custom_vjp`` rule that ``fn(params, *args)`` calls is checked on the inputs it
    receives there. Rules declared with :func:`jgc.intended`, library surrogates and
    rules that did not run do not fail it.

    Args:
      fn: the cost, ``fn(params, *args)``.
      params: the point; its floating leaves are traced in float64 where possible.
      *args: data passed to ``fn``.
      custom_message: text added, in brackets, to the first line of the failure.
      **options: passed to :func:`jgc.check_rules` (``precision``, ``rtol``, ``atol``,
        ``step``, ``key``).

    Returns:
      The :class:`jgc.RulesReport`, when every rule agrees.

    Raises:
      jgc.GradCheckError: an ``AssertionError`` whose message starts with
        ``"[jgc] Assertion assert_rules_ok failed: wrong custom rule"``, names each
        wrong rule with its ``file:line`` and holds the report; ``err.report`` is the
        :class:`jgc.RulesReport`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jgc import testing
      >>> testing.assert_rules_ok(lambda w: jnp.sum(jax.nn.relu(w)), jnp.array([0.5, -1.0])).ok
      True
    """
    _refuse_tracers("assert_rules_ok", params, args)
    report = check_rules(fn, params, *args, **options)
    if not report.ok:
        names = "; ".join(f"{r.name} ({r.primal_at}), rule {r.rule_name} ({r.rule_at})" for r in report.failing())
        raise GradCheckError(_message("assert_rules_ok", f"wrong custom rule: {names}.", custom_message,
                                      report), report)
    return report


def assert_rule_ok(f: Callable, *args, custom_message: str | None = None, **options):
    """Assert that one custom derivative rule passes every check of :func:`jgc.check_rule`.

    Runs :func:`jgc.check_rule` (same arguments and options): the rule's primal output,
    its JVP or VJP against finite differences, the dot-product identity, linearity in
    the tangent and cotangent, ``vmap`` against a loop, the derivative of its gradient
    and partial differentiation (symbolic zeros), at ``args``.

    Args:
      f: the rule, called as ``f(*args)``.
      *args: the point.
      custom_message: text added, in brackets, to the first line of the failure.
      **options: passed to :func:`jgc.check_rule` (``nondiff_argnums``, ``seed``,
        ``checks``, ``explore``, ``precision``, ``rtol``, ``atol``, ``step``).

    Returns:
      The :class:`jgc.RulesReport`, when every check passes.

    Raises:
      jgc.GradCheckError: an ``AssertionError`` whose message starts with
        ``"[jgc] Assertion assert_rule_ok failed: wrong custom rule"``, names the rule
        with its ``file:line`` and the checks that failed; ``err.report`` is the
        :class:`jgc.RulesReport`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jgc import testing
      >>> testing.assert_rule_ok(jax.nn.relu, jnp.array([0.5, -1.0])).ok
      True
    """
    _refuse_tracers("assert_rule_ok", (), args)
    report = check_rule(f, *args, **options)
    if not report.ok:
        names = "; ".join(f"{r.name} ({r.primal_at}), rule {r.rule_name} ({r.rule_at})" for r in report.failing())
        raise GradCheckError(_message("assert_rule_ok", f"wrong custom rule: {names}; failed checks: "
                                      f"{', '.join(report.failed_checks())}.", custom_message, report), report)
    return report
