"""Rules that close over values traced inside the loss, checked on the calls of an eager run.

A rule defined inside the loss that closes over a value computed there cannot be
differentiated again once the loss's trace has ended. Its call sites are checked on
the Python custom_jvp/custom_vjp object the loss calls when it runs op by op.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types

import jax

from ..jacobian import check_jacobian
from .sites import FIRST_CALLS, RULE_FUNCTION, VJP_CALL, _magnitude, _Site, _site_base
from .report import SiteReport, Worst
from .sources import Where, _closure, _code_span, _functions_in, _primal_function


def _closes_over_traced_values(eqn) -> bool:
    """Whether the rule's Python functions hold tracers of the loss's trace in their closures.

    Such a rule (defined inside the loss, closing over a value computed there) cannot be
    differentiated again once that trace has ended; its site is checked on the Python
    object called in an eager run instead.
    """
    funs = [eqn.params[RULE_FUNCTION[eqn.primitive.name]]]
    if eqn.primitive.name == VJP_CALL:
        funs.append(eqn.params["fwd_jaxpr_thunk"])
    for fun in funs:
        for fn in _functions_in(fun):
            for v in _closure(fn).values():
                if isinstance(v, (types.FunctionType, functools.partial)):
                    continue
                with contextlib.suppress(Exception):
                    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(v)):
                        return True
    return False


@contextlib.contextmanager
def _intercepted(calls: list):
    """Record every call of a custom_jvp/custom_vjp object (with its arguments) while active."""
    from jax._src import custom_derivatives as cd  # private: pinned by tests/test_rules.py

    saved = {cls: cls.__call__ for cls in (cd.custom_jvp, cd.custom_vjp)}

    def recorder(original):
        def __call__(self, *a, **k):
            calls.append((self, a, k))
            return original(self, *a, **k)
        return __call__

    for cls, original in saved.items():
        cls.__call__ = recorder(original)
    try:
        yield
    finally:
        for cls, original in saved.items():
            cls.__call__ = original


def _eager_calls(fn, p, args) -> list:
    """Run the loss op by op (no jit), recording the custom rules it calls with concrete arguments."""
    calls: list = []
    with _intercepted(calls), jax.disable_jit():
        fn(p, *args)
    concrete = []
    for obj, a, k in calls:
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((a, k))):
            concrete.append((obj, a, k))
    return concrete


def _matches(obj, primal: Where) -> bool:
    span = _code_span(_primal_function(obj))
    return bool(span) and os.path.abspath(span[0]) == os.path.abspath(primal.file) and \
        span[1] <= primal.line <= span[2]


def _check_eager(site: _Site, primal: Where, eager: list, options: dict, precision: str = "native") -> SiteReport:
    """Check a rule that closes over traced values on the Python object called in an eager run.

    ``precision``: that of the check; the operands are as the eager run received them
    (at the dtypes given where check_rules captured them so), and the object, called
    again, runs at any dtype, so its rule runs at theirs and the differences at the
    reference's precision.
    """
    base = _site_base(site)
    mine = [(o, a, k) for o, a, k in eager if _matches(o, primal)]
    if not mine:
        return SiteReport(**base, checked=0, status="not checked",
                          reason="the rule closes over values computed inside the loss, and no call "
                                 "with concrete operands was seen in an eager run (it runs under vmap or "
                                 "checkpoint)")
    picks = mine[:FIRST_CALLS]
    rest = mine[FIRST_CALLS:]
    if rest:
        picks.append(max(rest, key=lambda c: _magnitude(jax.tree_util.tree_leaves(c[1]))))
    reports = []
    for obj, a, k in picks:
        nondiff = set(getattr(obj, "nondiff_argnums", ()) or ())
        nums = tuple(i for i in range(len(a)) if i not in nondiff)
        rep = check_jacobian(lambda *x, obj=obj, k=k: obj(*x, **k), *a, argnums=nums, precision=precision,
                             **options)
        reports.append(rep)
        if not rep.ok:
            lf = rep.failing()[0]
            worst = Worst(operand=lf.path, index=tuple(lf.input_index), call=len(reports) - 1, step="eager call",
                          input=None, rule=lf.worst_analytic, numeric=lf.worst_numeric, allowed=lf.worst_bound,
                          block=lf.name)
            return SiteReport(**base, checked=len(reports), status="mismatch", report=rep, worst=worst,
                              method=rep.mode + " on an eager call (the rule closes over traced values)")
    return SiteReport(**base, checked=len(reports), status="ok", report=reports[-1],
                      method=reports[-1].mode + " on eager calls (the rule closes over traced values)")
