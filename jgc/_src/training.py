"""Check the gradient once in a training loop, then get out of the way.

The lecture's rule: run the gradient check before training (and, as CS231n advises,
once more after a short burn-in, since gradients at initialisation can hide bugs),
then turn it off, because it is slow. :func:`with_grad_check` makes that one line
around an optax-style training step::

    step = jgc.with_grad_check(step, loss_fn, at_steps=(0, 100))

The check runs on the host, on the real parameters and batch that the step receives,
before the step runs. Every other call goes to the step you passed: the same jitted
function and compiled executable, with no host callback inside it. After the last
check the wrapper stops running Python of its own: its class's ``__call__`` becomes the
step itself, so a call costs what calling the step costs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from . import validate
from .api import check
from .errors import GradCheckError
from .messages import failure_message, where
from .report import Report

ON_FAILURE = ("raise", "warn")


def default_select(params, opt_state=None, *batch, **kwargs):
    """Return ``(params, loss_args)`` from a step called as ``step(params, opt_state, *batch)``."""
    return params, batch


def _api_error(msg: str) -> str:
    return f"jgc.with_grad_check: {msg}"


class CheckedStep:
    """A training step that checks the gradient of ``loss_fn`` on chosen calls.

    Made by :func:`with_grad_check`; call it exactly like the step it wraps.

    Attributes:
      step: the wrapped step, unchanged.
      calls: calls counted while checks were pending. Once the last check has run
        (``done``) calls go straight to ``step`` without any Python of the wrapper's, so
        they are no longer counted.
      reports: a list of ``(call_index, jgc.Report)`` for the checks that ran.
      done: True once every scheduled check has run.
    """

    def __init__(self, step, loss_fn, *, at_steps, on_failure, select, has_aux, options):
        self.step = step
        self.loss_fn = loss_fn
        self.calls = 0
        self.reports: list[tuple[int, Report]] = []
        self._pending = sorted(set(at_steps))
        self._on_failure = on_failure
        self._select = select
        self._has_aux = has_aux
        self._options = options
        if not self._pending:
            self._hand_over()

    def _hand_over(self) -> None:
        # A Python-level __call__ costs more than the few hundred ns of a function call:
        # measured in one process with interleaved loops (as benchmarks/bench_optax.py
        # times them), a class __call__ around a 150 µs jitted Adam step added 2-3 % to
        # its median, a function wrapper about 0.6 %. So once no check is left, this instance gets its own subclass whose
        # __call__ *is* the step: CPython then calls the step directly, with no frame of
        # ours (staticmethod keeps a plain function from being bound to the instance).
        self.__class__ = type(type(self).__name__, (type(self),),
                              {"__call__": staticmethod(self.step), "__slots__": ()})

    @property
    def done(self) -> bool:
        return not self._pending

    def __call__(self, *args, **kwargs):
        # Runs only while checks are pending (see _hand_over).
        i = self.calls
        self.calls = i + 1
        if i == self._pending[0]:
            self._pending.pop(0)
            if not self._pending:
                self._hand_over()  # the next call goes straight to the step
            self.run_check(i, args, kwargs)
        return self.step(*args, **kwargs)

    def run_check(self, i: int, args: tuple, kwargs: dict) -> Report:
        """Run the check for call ``i`` on the arguments the step is about to get."""
        try:
            params, loss_args = self._select(*args, **kwargs)
        except TypeError as e:
            raise TypeError(_api_error(
                f"select could not take (params, loss_args) from the step's arguments: {e}. "
                "The default expects step(params, opt_state, *batch); for another signature "
                "pass select=lambda state, batch: (state.params, (batch,))."
            )) from e
        if not isinstance(loss_args, tuple):
            raise TypeError(_api_error(
                f"select must return (params, loss_args) with loss_args a tuple, got "
                f"{type(loss_args).__name__}. Wrap a single batch as (batch,)."
            ))
        if validate.traced((params, loss_args)):
            raise TypeError(_api_error(
                "the checked step was called inside jit (its arguments are tracers). Jit the "
                "step first and wrap the jitted one: jgc.with_grad_check(jax.jit(step), loss_fn)."
            ))
        report = check(self.loss_fn, params, *loss_args, has_aux=self._has_aux, **self._options)
        self.reports.append((i, report))
        if not report.ok:
            msg = failure_message(f"jgc.with_grad_check: the gradient of the loss disagrees with finite "
                                  f"differences at training step {i}{where(report)}.", report)
            if self._on_failure == "raise":
                raise GradCheckError(msg, report)
            warnings.warn(msg, UserWarning, stacklevel=3)
        return report


def with_grad_check(step: Callable, loss_fn: Callable, *, at_steps: Sequence[int] = (0,),
                    on_failure: str = "raise", select: Callable | None = None,
                    has_aux: bool = False, **check_options: Any) -> CheckedStep:
    """Wrap a training step so the loss gradient is checked on a few calls, then never.

    On each call whose index (0, 1, 2, ... counted by the wrapper) is in ``at_steps``,
    :func:`jgc.check` runs ``loss_fn(params, *batch)`` on the real parameters and batch
    that the step is about to receive, before the step runs (so donated buffers are
    still alive). Every other call is ``step(*args, **kwargs)``: the step you passed,
    with its own jit cache; nothing is traced into it. After the last check the wrapper
    hands every call straight to ``step`` (no Python frame of its own), so a step after
    the checks costs what the plain step costs (``benchmarks/bench_optax.py`` measures it).

    Args:
      step: the training step, usually jitted, e.g.
        ``step(params, opt_state, x, y) -> (params, opt_state, loss)``.
      loss_fn: the cost whose gradient the step uses: ``loss_fn(params, *batch)``
        returning a scalar (or ``(scalar, aux)`` with ``has_aux=True``).
      at_steps: call indices at which to check. ``(0,)`` checks at initialisation;
        ``(0, 100)`` adds a check after a 100-step burn-in.
      on_failure: "raise" a :class:`jgc.GradCheckError` (default) or "warn" with a
        ``UserWarning`` and go on training.
      select: ``select(*step_args, **step_kwargs) -> (params, loss_args_tuple)``. The
        default takes ``step(params, opt_state, *batch)``; for a Flax ``TrainState``
        use ``select=lambda state, batch: (state.params, (batch,))``.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; only the loss is checked (as
        :func:`jgc.check` with ``has_aux=True``, aux may be any pytree).
      **check_options: passed to :func:`jgc.check` (``rtol``, ``mode``, ``precision``...).

    Returns:
      A :class:`CheckedStep`, called like ``step``; its ``reports`` list holds
      ``(call_index, report)`` for every check that ran.

    Raises:
      TypeError, ValueError: at once, for bad arguments here.
      jgc.GradCheckError: from a call, when a check fails and ``on_failure="raise"``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jgc
      >>> loss = lambda w, x: jnp.mean((x @ w) ** 2)
      >>> opt = optax.sgd(0.1)
      >>> @jax.jit
      ... def step(w, state, x):
      ...     g = jax.grad(loss)(w, x)
      ...     updates, state = opt.update(g, state)
      ...     return optax.apply_updates(w, updates), state
      >>> step = jgc.with_grad_check(step, loss)
      >>> w = jnp.ones(3); state = opt.init(w); x = jnp.eye(3)
      >>> for _ in range(3):
      ...     w, state = step(w, state, x)
      >>> len(step.reports), step.reports[0][1].ok
      (1, True)
    """
    if not callable(step):
        raise TypeError(_api_error(f"step must be the callable training step, got {type(step).__name__}."))
    if not callable(loss_fn):
        raise TypeError(_api_error(
            f"loss_fn must be callable as loss_fn(params, *batch) -> scalar, got {type(loss_fn).__name__}."
        ))
    if on_failure not in ON_FAILURE:
        raise ValueError(_api_error(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}."))
    if isinstance(at_steps, int):
        at_steps = (at_steps,)
    try:
        at_steps = [int(s) for s in at_steps]
    except TypeError as e:
        raise TypeError(_api_error(
            f"at_steps must be a sequence of step indices such as (0, 100), got {at_steps!r}."
        )) from e
    if any(s < 0 for s in at_steps):
        raise ValueError(_api_error(
            f"at_steps must be non-negative call indices (0 is the first call), got {at_steps}."
        ))
    if not isinstance(has_aux, bool):
        raise TypeError(_api_error(f"has_aux must be True or False, got {has_aux!r}."))
    if select is not None and not callable(select):
        raise TypeError(_api_error(
            "select must be a callable select(*step_args) -> (params, loss_args), got "
            f"{type(select).__name__}."
        ))
    return CheckedStep(step, loss_fn, at_steps=at_steps, on_failure=on_failure,
                       select=select or default_select, has_aux=has_aux, options=check_options)
