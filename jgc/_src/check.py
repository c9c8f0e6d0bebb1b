"""The scalar gradient check (``check_scalar``, which ``jgc.check`` runs) and ``numerical_grad``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import validate
from .analytic import (
    analytic_gradient,
    analytic_scale,
    cost_cancellation,
    native_gradient,
    runs_natively,
    twin_differs,
)
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


def _options(mode, **given) -> validate.Options:
    """The options of ``jgc.check``, validated once (the stencil, the mode, the rest)."""
    validate.stencil("jgc.check", given["stencil"])
    if mode is not None and mode not in MODES:
        raise ValueError(f"jgc.check: mode must be one of {MODES} or None (chosen by time), got {mode!r}.")
    return validate.options("jgc.check", **given)


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
    opts = _options(mode, stencil=stencil, precision=precision, rtol=rtol, atol=atol, step=step, strict=strict,
                    chunk_size=chunk_size, analytic=analytic)
    # Programs compiled on worker threads while the noise probe runs: jax.grad when it
    # is the analytic side, and in full mode every leaf's evaluator.
    # Without a mode, evaluators are compiled ahead where full mode is certain to run.
    likely_full = mode == "full" or (mode is None and 2 * _size(params) <= DEFAULT_BUDGET)
    native_side = opts.analytic == "native" and runs_natively(params, args, grad, opts.precision)
    ahead = (("grad",) if grad is None and not native_side else ()) + (
        ("evaluators",) if likely_full and opts.stencil != "complex" else ())
    problem = Problem(fn, params, args, precision=opts.precision, chunk_size=opts.chunk_size, ahead=ahead,
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
            mode = "full" if default_full(problem, opts.stencil) else "default"
        if mode != "full":
            rep = run_mode(problem, steps, a_leaves, opts, mode=mode, **mode_options)
            return with_native_figures(rep, native, float(np.real(problem.j0)), twin)
        if mode_options:
            raise TypeError(f"jgc.check: unexpected options {sorted(mode_options)} for mode='full'.")
        elems = [np.arange(x.size) for x in problem.dyn]
        with attached(problem.counter, 2 * sum(problem.coordinates(k) for k in range(len(elems)))):
            rep = judge_all(problem, steps, a_leaves, elems, opts, mode="full")
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
    opts = validate.options("jgc.numerical_grad", stencil=stencil, precision=precision, step=step,
                            chunk_size=chunk_size)
    ahead = ("evaluators",) if opts.stencil != "complex" else ()
    with Problem(fn, params, args, precision=opts.precision, chunk_size=opts.chunk_size,
                 api=opts.api, ahead=ahead, has_aux=has_aux) as problem:
        out = []
        steps = Steps(problem)  # no analytic gradient here: its scale is unknown, taken as 0
        for k, x in enumerate(problem.dyn):
            h_rel = steps.leaf(k, opts.stencil, opts.step)
            est = problem.estimate(k, np.arange(problem.coordinates(k)), opts.stencil, h_rel)
            v = to_elements(est.value, x.size, bool(np.iscomplexobj(x)))
            # Cast on the host and moved explicitly (transfer guards; no eager op on NaN).
            out.append(jax.device_put(np.asarray(v.reshape(x.shape)).astype(problem.orig_dtypes[k])))
        leaves = [None] * len(problem.split.leaves)
        for pos, v in zip(problem.split.dynamic_index, out):
            leaves[pos] = v
        return jax.tree_util.tree_unflatten(problem.split.treedef, leaves)
