"""The scalar gradient check (``check_scalar``, which ``jgc.check`` runs) and ``numerical_grad``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import policy, validate
from .analytic import analytic_gradient, analytic_scale, cost_cancellation, native_gradient, runs_natively, twin_differs
from .judge import judge_all
from .problem import Problem
from .progress import attached
from .report import Report
from .stencils import to_elements
from .steps import Steps, gradient_scale
from .strategies import DEFAULT_BUDGET, default_full, run_mode
from .summary import with_native_figures
from .trees import is_inexact_array

MODES = ("full", "sampled", "directional", "auto")


def _validate(stencil, mode, rtol, atol):
    if stencil not in policy.STENCILS:
        raise ValueError(f"jgc.check: stencil must be one of {policy.STENCILS}, got {stencil!r}.")
    if mode is not None and mode not in MODES:
        raise ValueError(f"jgc.check: mode must be one of {MODES} or None (chosen by time), got {mode!r}.")
    validate.tolerances("jgc.check", rtol, atol)


# Where the analytic side runs: "native", the user's program at the dtypes given (its
# float32/bfloat16 rounding, its casts inside; what training uses); "reference", the same
# program at the reference precision (float64), which hides bugs that live only at the
# user's dtype.
ANALYTIC = ("native", "reference")


def _native_note(params, args) -> str:
    given = sorted({np.dtype(x.dtype).name for x in jax.tree_util.tree_leaves((params, args))
                    if is_inexact_array(x)})
    return (f"analytic side at the dtypes given ({', '.join(given)}), as the program trains; "
            "the finite-difference reference at the precision shown (analytic='reference' "
            "evaluates both there).")


def _size(params) -> int:
    return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params) if is_inexact_array(x))


def check_scalar(fn: Callable, params: Any, *args, grad=None, has_aux: bool = False, stencil: str = "central",
          precision: str = "auto", rtol: float | None = None, atol: float | None = None,
          step: float | None = None, strict: bool = False, mode: str | None = None,
          chunk_size: int | None = None, analytic: str = "native",
          **mode_options) -> Report:
    """The scalar gradient check of :func:`jgc.check`, without its ``rules`` option.

    ``jgc.check`` (in ``api``) composes it with the rules wing; the arguments and the
    result are those documented there.
    """
    _validate(stencil, mode, rtol, atol)
    # Programs compiled on worker threads while the noise probe runs: jax.grad when it
    # is the analytic side, and in full mode every leaf's evaluator.
    # Without a mode, evaluators are compiled ahead where full mode is certain to run.
    likely_full = mode == "full" or (mode is None and 2 * _size(params) <= DEFAULT_BUDGET)
    if analytic not in ANALYTIC:
        raise ValueError(f"jgc.check: analytic must be one of {ANALYTIC}, got {analytic!r}.")
    native_side = analytic == "native" and runs_natively(params, args, grad, precision)
    ahead = (("grad",) if grad is None and not native_side else ()) + (
        ("evaluators",) if likely_full and stencil != "complex" else ())
    problem = Problem(fn, params, args, precision=precision, chunk_size=chunk_size, ahead=ahead,
                      has_aux=has_aux)
    # The analytic side as the user's program runs it: before the reference's precision
    # scope is entered (inputs already validated by Problem), at the dtypes given.
    native = native_gradient(fn, params, args, grad, has_aux=has_aux, api="jgc.check") if native_side else None
    with problem:
        if isinstance(native, Exception):
            raise native
        if native is not None:
            differs = twin_differs(native, problem)
            problem.notes.append(differs or _native_note(params, args))
            native = None if differs else native
            problem.analytic_spread = native.spread if native is not None else None
            problem.analytic_scale = analytic_scale(native, problem)
            problem.cost_cancellation = cost_cancellation(native, problem)
        a_leaves = analytic_gradient(problem, grad, native=native)

        def twin():  # the same program's gradient at the reference's precision, per leaf
            return {path: np.asarray(g).ravel() for path, g in zip(problem.paths, analytic_gradient(problem, grad))}
        steps = Steps(problem, gradient_scale(a_leaves, problem.scales))
        if mode is None:
            mode = "full" if default_full(problem, stencil) else "default"
        if mode != "full":
            rep = run_mode(problem, steps, a_leaves, mode=mode, stencil=stencil, rtol=rtol,
                           atol=atol, step=step, strict=strict, **mode_options)
            return with_native_figures(rep, native, float(np.real(problem.j0)), twin)
        if mode_options:
            raise TypeError(f"jgc.check: unexpected options {sorted(mode_options)} for mode='full'.")
        elems = [np.arange(x.size) for x in problem.dyn]
        with attached(problem.counter, 2 * sum(problem.coordinates(k) for k in range(len(elems)))):
            rep = judge_all(problem, steps, a_leaves, elems, stencil=stencil, rtol=rtol, atol=atol,
                            step=step, strict=strict, mode="full")
        # The cost's own accurate bits at the dtypes given, and the float64 twin's
        # derivative beside every mismatched or imprecise element.
        return with_native_figures(rep, native, float(np.real(problem.j0)), twin)


def numerical_grad(fn: Callable, params: Any, *args, has_aux: bool = False,
                   stencil: str = "central", precision: str = "auto", step: float | None = None,
                   chunk_size: int | None = None) -> Any:
    """Return the finite-difference gradient of ``fn`` at ``params`` (the lecture's gradApprox).

    Each element is (J(θ + h·e_i) − J(θ − h·e_i)) / 2h with the representable step,
    computed as in :func:`check` (same stencils, steps and precision rules). With
    ``has_aux=True``, ``fn`` returns ``(cost, aux)`` and only the cost is differenced.

    Returns:
      A pytree shaped like ``params``: every checked leaf holds its numerical gradient
      in that leaf's dtype; skipped (non-floating) leaves are None.

    Example:
      >>> import jax.numpy as jnp, jgc
      >>> g = jgc.numerical_grad(lambda p: jnp.sum(p ** 3), jnp.array([1.0, 2.0]))
      >>> [round(float(v), 4) for v in g]
      [3.0, 12.0]
    """
    if stencil not in policy.STENCILS:
        raise ValueError(f"jgc.numerical_grad: stencil must be one of {policy.STENCILS}, got {stencil!r}.")
    ahead = ("evaluators",) if stencil != "complex" else ()
    with Problem(fn, params, args, precision=precision, chunk_size=chunk_size,
                 api="jgc.numerical_grad", ahead=ahead, has_aux=has_aux) as problem:
        out = []
        steps = Steps(problem)  # no analytic gradient here: its scale is unknown, taken as 0
        for k, x in enumerate(problem.dyn):
            h_rel = steps.leaf(k, stencil, step)
            est = problem.estimate(k, np.arange(problem.coordinates(k)), stencil, h_rel)
            v = to_elements(est.value, x.size, bool(np.iscomplexobj(x)))
            # Cast on the host and moved explicitly (transfer guards; no eager op on NaN).
            out.append(jax.device_put(np.asarray(v.reshape(x.shape)).astype(problem.orig_dtypes[k])))
        leaves = [None] * len(problem.split.leaves)
        for pos, v in zip(problem.split.dynamic_index, out):
            leaves[pos] = v
        return jax.tree_util.tree_unflatten(problem.split.treedef, leaves)
