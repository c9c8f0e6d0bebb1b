"""Rules a traced loss does not show as calls: ``custom_vmap``, and rules under the loss's own AD.

``jax.make_jaxpr`` of a loss shows each ``custom_jvp`` / ``custom_vjp`` call as one
equation, except where the loss transforms the call itself: under its own ``jax.jvp``,
``jax.linearize``, ``jax.grad`` or ``jax.hessian`` the rule is applied while tracing
(its JVP's operations appear, not the call; inside a ``jax.jit`` that the loss
differentiates too, which :func:`through_calls` sees by tracing again with jit
disabled), and under ``jax.vmap`` a
``jax.custom_batching.custom_vmap`` function's batching rule is. :func:`watching` sees
these calls while the loss is traced; :func:`replay` runs the loss op by op and records
each such call with concrete operands (a value under ``vmap`` is taken at lane 0, one
under AD at its primal); ``sitechecks.check_hidden`` checks each rule at its first call
and at its call with the largest operand, with :func:`jgc.check_rule`'s checks (order 2
too where the loss differentiates through the rule).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import custom_batching as cb  # private: pinned by tests/test_rules.py
from jax._src import custom_derivatives as cd  # private: pinned by tests/test_rules.py
from jax._src.interpreters import ad, batching  # private: tracer types, pinned by tests/test_rules.py

from .sites import CALL_PRIMS, KINDS, REMAT_PRIMS, _subjaxprs, rule_names
from .sources import _is_wrapper_file

# Tracers of the loss's own differentiation (forward mode, and JAX's linearize, which
# jax.grad and jax.vjp run on) and of its own vmap.
AD_TRACERS = tuple(t for t in (getattr(ad, "JVPTracer", None), getattr(ad, "LinearizeTracer", None)) if t)
BATCH_TRACER = batching.BatchTracer
UNDER_AD = "under the loss's own jax.jvp / jax.linearize / jax.grad"
UNDER_VMAP = "custom_vmap under jax.vmap"
CALLED = "custom_vmap"
_JAX_DIR = os.path.dirname(os.path.abspath(jax.__file__))
_JGC_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass
class _Call:
    obj: object
    why: str
    args: tuple
    kwargs: dict
    at: str  # file:line of the call in the user's code


def _why(cls, leaves) -> str:
    if cls is cb.custom_vmap:
        return UNDER_VMAP if any(isinstance(x, BATCH_TRACER) for x in leaves) else CALLED
    if any(isinstance(x, AD_TRACERS) for x in leaves):
        return UNDER_AD
    return ""


def _user_call_site() -> str:
    for fr in reversed(traceback.extract_stack()[:-2]):
        f = os.path.abspath(fr.filename)
        if not (f.startswith((_JAX_DIR, _JGC_DIR)) or _is_wrapper_file(f) or "equinox" in f):
            return f"{fr.filename}:{fr.lineno}"
    return "?"


@contextlib.contextmanager
def watching(calls: list, concrete: bool = False):
    """Record the calls a traced loss hides while active (with concrete operands when ``concrete``)."""
    classes = (cd.custom_jvp, cd.custom_vjp, cb.custom_vmap)
    saved = {cls: cls.__call__ for cls in classes}
    depth = [0]

    def recorder(cls, original):
        def __call__(self, *a, **k):
            if depth[0] == 0:  # a rule inside a recorded rule is checked through it
                why = _why(cls, jax.tree_util.tree_leaves((a, k)))
                if why:
                    got = _concrete((a, k)) if concrete else (a, k)
                    if got is not None:
                        calls.append(_Call(self, why, got[0], got[1], _user_call_site()))
            depth[0] += 1
            try:
                return original(self, *a, **k)
            finally:
                depth[0] -= 1
        return __call__

    for cls, original in saved.items():
        cls.__call__ = recorder(cls, original)
    try:
        yield
    finally:
        for cls, original in saved.items():
            cls.__call__ = original


def _concrete(tree):
    """``tree`` with every tracer replaced by its concrete value (lane 0 under vmap), or None."""
    failed = []

    def one(x):
        axes = []
        for _ in range(32):
            if not isinstance(x, jax.core.Tracer):
                break
            if isinstance(x, BATCH_TRACER):
                axes.append(x.batch_dim)
                x = x.val
            elif hasattr(x, "primal"):
                x = x.primal
            else:
                failed.append(x)
                return x
        if isinstance(x, jax.core.Tracer):
            failed.append(x)
            return x
        v = np.asarray(x) if axes else x
        for d in reversed(axes):  # the outermost vmap's axis indexes the concrete value first
            if isinstance(d, int):
                v = np.take(v, 0, axis=d)
        return jnp.asarray(v, dtype=x.dtype) if axes else x

    out = jax.tree_util.tree_map(one, tree)
    return None if failed else out


def replay(fn, p, args) -> list:
    """The hidden calls of one op-by-op run of the loss, with concrete operands."""
    calls: list = []
    with watching(calls, concrete=True), jax.disable_jit():
        fn(p, *args)
    return calls


def _user_rule_inside_call(jaxpr, inside: bool = False, depth: int = 0) -> bool:
    """Whether a rule defined outside JAX sits inside a jit, closed_call or checkpoint of ``jaxpr``."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in KINDS:  # a rule inside a rule is checked through it
            if inside and not os.path.abspath(rule_names(eqn)[0].file or _JAX_DIR).startswith(_JAX_DIR):
                return True
            continue
        into = inside or name in CALL_PRIMS or name in REMAT_PRIMS
        if depth < 32 and any(_user_rule_inside_call(j, into, depth + 1) for j in _subjaxprs(eqn)):
            return True
    return False


# With jit disabled, lax.scan runs its body once per step in Python: above this many
# steps in all (nested scans multiply) the second trace would cost more than the checks,
# and a rule inside a jit there keeps the verdicts of its call sites.
MAX_UNROLLED_STEPS = 256


def _unrolled_steps(jaxpr, depth: int = 0) -> int:
    """The scan steps a run of ``jaxpr`` with jit disabled takes in Python (nested scans multiply)."""
    total = 0
    for eqn in jaxpr.eqns:
        inner = max((_unrolled_steps(j, depth + 1) for j in _subjaxprs(eqn)), default=0) if depth < 32 else 0
        if eqn.primitive.name == "scan":
            total += int(eqn.params.get("length", 1)) * max(1, inner)
        else:
            total += inner
    return total


def through_calls(trace, jaxpr) -> list:
    """The calls :func:`watching` sees when ``trace()`` (a trace of the loss, whose program is
    ``jaxpr``) runs again with jit disabled, where a user's rule sits inside a jit of it.

    A rule inside ``jax.jit`` (or ``jax.checkpoint``) is traced into that function's program
    first, with the jit's own tracers, and the loss's own ``jax.grad`` then differentiates
    the program: the call never meets the loss's AD. With jit disabled (as :func:`replay`
    runs the loss) it does, so a rule differentiated there is found, and checked at order 2.
    A second trace, only where the program holds a user's rule inside such a call (JAX's
    own rules inside ``jax.nn``'s jitted functions do not count).
    """
    if not _user_rule_inside_call(jaxpr) or _unrolled_steps(jaxpr) > MAX_UNROLLED_STEPS:
        return []
    calls: list = []
    try:
        with watching(calls), jax.disable_jit():
            trace()
    except Exception:  # noqa: BLE001 (a loss that cannot be traced without jit: its rules stay as first found)
        return []
    return calls
