"""The public scalar front doors: ``jgc.check`` and ``jgc.assert_grads_close``.

They compose the scalar check (``check``) with the rules wing (``rules``) from above
both: the check runs first, and only a failing check with ``rules=True`` runs
:func:`jgc.check_rules` on the same loss, so a passing check costs what it did without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .check import check_scalar
from .errors import GradCheckError
from .messages import failure_message, where
from .report import Report
from .rules import attach_rules

__all__ = ["assert_grads_close", "check"]


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
    rep = check_scalar(fn, params, *args, grad=grad, has_aux=has_aux, stencil=stencil, precision=precision,
                       rtol=rtol, atol=atol, step=step, strict=strict, mode=mode, chunk_size=chunk_size,
                       analytic=analytic, **mode_options)
    return attach_rules(rep, fn, params, args, precision=precision) if rules and not rep.ok else rep


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
