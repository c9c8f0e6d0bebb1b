"""The rules wing: every custom derivative rule inside a loss, found, captured and checked alone.

Its modules share their private names among themselves only; the rest of jgc, the
shells and the tests use what this file exports.

- ``sources``: where a Python function is defined, seen through JAX's and Equinox's wrappers.
- ``surrogates``: rules whose derivative is a surrogate on purpose (``jgc.intended``, library
  surrogates).
- ``sites``: the rules of a traced program, their call sites and captured operands.
- ``eager``: rules that close over values traced inside the loss, checked on eager calls.
- ``report``: :class:`RulesReport` and its parts.
- ``check``: :func:`check_rules` and :func:`attach_rules`.
- ``subject``: one rule at given arguments as a function of its differentiated leaves, and
  the judge of exact identities.
- ``identities``: the checks of one rule that need no finite differences (primal, dot
  product, linearity, batching, symbolic zeros).
- ``derivatives``: the checks of one rule against finite differences (first order, order 2).
- ``points``: points made from the given one (signs, tails, 0 and ±1) and sweeps of the domain.
- ``rule``: :func:`check_rule`.
"""

from .check import attach_rules, check_rules
from .rule import check_rule
from .surrogates import approximate, intended
from .report import RuleReport, RulesReport, SiteReport, Worst
from .sites import OLDEST_JAX, JaxInternalsChanged

__all__ = ["OLDEST_JAX", "JaxInternalsChanged", "RuleReport", "RulesReport", "SiteReport", "Worst",
           "approximate", "attach_rules", "check_rule", "check_rules", "intended"]
