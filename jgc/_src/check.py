"""The scalar front doors: ``check`` (full mode), ``numerical_grad`` and ``assert_grads_close``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import policy, validate
from .analytic import analytic_gradient, native_gradient, runs_natively, twin_differs
from .errors import GradCheckError
from .judge import judge_all
from .messages import failure_message, where
from .problem import Problem, to_elements
from .progress import attached
from .report import Report
from .steps import Steps, gradient_scale
from .strategies import DEFAULT_BUDGET, default_full, run_mode
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


def check(fn: Callable, params: Any, *args, grad=None, has_aux: bool = False, stencil: str = "central",
          precision: str = "auto", rtol: float | None = None, atol: float | None = None,
          step: float | None = None, strict: bool = False, mode: str | None = None,
          chunk_size: int | None = None, rules: bool = False, analytic: str = "native",
          **mode_options) -> Report:
    """Check the gradient of a scalar cost against finite differences, element by element.

    Every inexact array leaf of ``params`` is perturbed, one coordinate at a time, by
    ±h (the lecture's two-sided difference (J(θ+h) − J(θ−h)) / 2h), vectorised with
    ``jax.vmap`` and compiled once per leaf. The result is compared with the analytic
    gradient: element i agrees when

        |a_i − n_i| ≤ atol + rtol·max(|a_i|, |n_i|) + (error the method can explain)

    where the last term is 8·σ/h from the measured noise σ of J plus, for elements that
    fail the cheap pass, a Richardson truncation estimate from steps h, 2h and 4h.

    Args:
      fn: the cost, ``fn(params, *args) -> scalar`` (or ``(scalar, aux)`` with
        ``has_aux``). ``args`` are data and are never perturbed.
      params: any pytree. Floating and complex array leaves are checked; integer and
        bool arrays, PRNG keys (typed ``jax.random.key`` and raw uint32 ones), Python
        scalars, callables and None are carried through untouched and listed as
        skipped.
      *args: extra arguments passed to ``fn`` (and to ``grad`` when callable): data,
        model state (batch statistics, ``eqx.nn.State``), PRNG keys, at any depth.
        Array leaves are traced under ``jax.jit`` and reach ``fn`` as arrays of the
        same kind (keys stay keys). When the check evaluates in float64, floating
        array leaves of ``args`` are widened to float64 too (exact casts of copies),
        so state that ``fn`` checks against values computed from the parameters
        (Equinox's ``State.set``, a ``lax.scan`` carry) has one dtype; a note in the
        report says so, and ``precision="native"`` passes them as given.
      grad: None to use ``jax.grad(fn)`` (w.r.t. the checked leaves only); a callable
        ``grad(params, *args)`` returning a pytree like params (hand-written backprop);
        or a pytree of already computed gradients. With ``has_aux`` the callable may
        return the gradient or ``(gradient, aux)`` (as ``jax.grad(fn, has_aux=True)``
        does): a pair whose first element has the structure of params is read as the
        latter.
      has_aux: as in ``jax.grad``: ``fn`` returns a pair ``(cost, aux)``; only the cost is
        perturbed and differentiated, aux (any pytree, arrays or not) is ignored.
      stencil: "central" (default, O(h²)), "forward" (O(h)), "central4" (O(h⁴)),
        "richardson" (O(h⁶) from h, 2h, 4h) or "complex" (complex step; needs a
        complex-safe cost).
      precision: "auto" (default) evaluates float32/16 parameters (and floating data
        in ``args``) in float64 inside a scoped ``jax.enable_x64`` where the backend
        has float64; "float64" forces it; "native" keeps the parameters' and the
        data's own dtypes (steps and tolerances follow them). This is the precision
        of the reference (the finite differences).
      analytic: "native" (default) evaluates the analytic side (``jax.grad`` or the
        ``grad`` callable) on params and args as given, as the program trains, with
        its own rounding measured; "reference" evaluates it at the reference's
        precision instead.
      rtol, atol: tolerance on the analytic side; default per dtype
        (``jgc`` policy: float64 1e-7, float32 1e-4; atol = 32·u·max|g| of the leaf).
      step: relative step h/s (s = max(|θ_i|, rms of the leaf)); default from the
        measured precision of J, e.g. ≈ 6.9e-6 for central differences in float64.
      strict: also fail on inconclusive and non-finite elements.
      mode: None (default): "full" when its estimated time (evaluations needed × the
        measured time of one evaluation) fits ``DEFAULT_TIME_BUDGET`` (60 s, see
        ``jgc/_src/policy.py``) or its evaluations fit the budget of "auto" (every
        test-sized model), otherwise directional screening of every leaf plus a sample;
        the report's first note says which. "full" checks every coordinate.
        "sampled", "directional" and "auto" (see ``jgc.check`` modes in the README)
        take ``key``, ``samples``, ``budget``.
      chunk_size: coordinates per vmapped batch (default from a memory budget).
      rules: when the check fails, also run :func:`jgc.check_rules` on ``fn``: the
        report's ``rules`` holds its :class:`jgc.RulesReport`, and the text names the
        custom rule that disagrees with its primal, with its ``file:line``.

    Returns:
      A :class:`jgc.Report`; ``report.ok`` is False when any element is a mismatch.

    Raises:
      TypeError, ValueError: for bad input (the message names the argument or leaf),
        among them a ``(cost, aux)`` pair from ``fn`` without ``has_aux=True``.

    Example:
      >>> import jax.numpy as jnp, jgc
      >>> report = jgc.check(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.arange(3.0)})
      >>> report.ok
      True
    """
    _validate(stencil, mode, rtol, atol)
    if rules:
        from .rules import attach_rules  # a front door above this one: imported on use

        rep = check(fn, params, *args, grad=grad, has_aux=has_aux, stencil=stencil, precision=precision,
                    rtol=rtol, atol=atol, step=step, strict=strict, mode=mode, chunk_size=chunk_size,
                    analytic=analytic, **mode_options)
        return rep if rep.ok else attach_rules(rep, fn, params, args, precision=precision)
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
            problem.analytic_scale = 0.0 if native is None or native.leaves is None else max(
                (float(np.max(np.where(np.isfinite(a), np.abs(a), 0.0).ravel() * s, initial=0.0))
                 for a, s in zip(native.leaves, problem.scales)), default=0.0)
        a_leaves = analytic_gradient(problem, grad, native=native)
        steps = Steps(problem, gradient_scale(a_leaves, problem.scales))
        if mode is None:
            mode = "full" if default_full(problem, stencil) else "default"
        if mode != "full":
            return run_mode(problem, steps, a_leaves, mode=mode, stencil=stencil, rtol=rtol,
                            atol=atol, step=step, strict=strict, **mode_options)
        if mode_options:
            raise TypeError(f"jgc.check: unexpected options {sorted(mode_options)} for mode='full'.")
        elems = [np.arange(x.size) for x in problem.dyn]
        with attached(problem.counter, 2 * sum(problem.coordinates(k) for k in range(len(elems)))):
            return judge_all(problem, steps, a_leaves, elems, stencil=stencil, rtol=rtol, atol=atol,
                             step=step, strict=strict, mode="full")


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


def assert_grads_close(fn: Callable, params: Any, *args, grad=None, custom_message: str | None = None,
                       **options) -> Report:
    """Like :func:`check`, but raise :class:`jgc.GradCheckError` when the check fails.

    Returns the report when it passes. The error message starts with
    ``"jgc.assert_grads_close: gradients disagree"`` and holds the full report, failing
    leaves first; ``err.report`` is the :class:`jgc.Report`. ``options`` are those of
    :func:`check`, ``has_aux`` among them.
    """
    rep = check(fn, params, *args, grad=grad, **options)
    if not rep.ok:
        head = f"jgc.assert_grads_close: gradients disagree{where(rep)}."
        raise GradCheckError(failure_message(head, rep, custom_message=custom_message), rep)
    return rep
