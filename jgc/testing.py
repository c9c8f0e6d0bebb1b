"""chex-style assertions for tests: ``from jgc import testing``.

``assert_*`` functions return the :class:`jgc.Report` when they hold and raise
:class:`jgc.GradCheckError` (an ``AssertionError``) when they do not, with messages that
start with ``testing.PREFIX`` (``"[jgc] Assertion "``) followed by the assertion's name
and ``" failed: "``. They work in ``chex.TestCase`` and under
``@chex.variants(with_jit=True, without_jit=True)``: jit the function under test with
``self.variant`` and call the assertion outside it.
"""

from ._src.testing import PREFIX, assert_grads_close, assert_grads_differ, assert_report_ok, assert_rule_ok, \
    assert_rules_ok

__all__ = ["PREFIX", "assert_grads_close", "assert_grads_differ", "assert_report_ok", "assert_rule_ok",
           "assert_rules_ok"]
