"""Custom rules whose derivative differs from their primal's on purpose (``jgc.intended``).

Rules declared with :func:`intended`, and surrogate gradients that libraries define
on purpose (``optax.scale_gradient``, Equinox's non-differentiable markers), are
reported by :func:`jgc.check_rules` as ``intended``, never as failures. A rule is
recognised by where its primal is defined.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from ..names import short_name
from .sources import Where, _code_span, _primal_function, inspect_unwrap

_INTENDED: dict[tuple[str, str], list[tuple[int, int, str]]] = {}


def intended(fn: Callable | None = None, *, reason: str):
    """Declare that a custom rule's derivative differs from its primal's on purpose.

    Straight-through estimators, gradient scaling or clipping and other surrogate
    gradients are not bugs: :func:`jgc.check_rules` reports a rule declared here as
    ``intended`` (with ``reason``) and never as a failure. Works as a call or a
    decorator on a ``jax.custom_jvp`` / ``jax.custom_vjp`` function, Equinox's
    ``filter_custom_jvp`` / ``filter_custom_vjp``, or the plain primal function, and
    returns its argument unchanged. The rule is recognised by where its primal is
    defined, so every call of it in any loss is covered.

    Args:
      fn: the custom rule (or its primal function). Omit it to get a decorator.
      reason: a short sentence saying why the derivative is a surrogate.

    Returns:
      ``fn`` itself (or, without ``fn``, a decorator).

    Raises:
      TypeError: ``reason`` is not a non-empty string, or ``fn`` has no Python source.

    Example:
      >>> import jax, jax.numpy as jnp, jgc
      >>> @jax.custom_jvp
      ... def ste_round(x):
      ...     return jnp.round(x)
      >>> _ = ste_round.defjvp(lambda p, t: (ste_round(p[0]), t[0]))
      >>> ste_round = jgc.intended(ste_round, reason="straight-through estimator")
      >>> jgc.check_rules(lambda p: jnp.sum(ste_round(p)), jnp.array([0.3, 1.7])).ok
      True
    """
    if not isinstance(reason, str) or not reason.strip():
        raise TypeError("jgc.intended: reason must be a non-empty string saying why the derivative is a "
                        f"surrogate, e.g. reason='straight-through estimator'; got {reason!r}.")
    if fn is None:
        return lambda f: intended(f, reason=reason)
    span = _code_span(_primal_function(fn))
    if span is None:
        raise TypeError(f"jgc.intended: fn must be a custom_jvp/custom_vjp function or a Python function, "
                        f"got {type(fn).__name__}, which has no Python source to recognise it by.")
    file, first, last = span
    name = short_name(inspect_unwrap(_primal_function(fn))).rsplit(".", 1)[-1]
    _INTENDED.setdefault((os.path.abspath(file), name), []).append((first, last, reason))
    return fn


def _user_intended(primal: Where) -> str | None:
    name = primal.name.rsplit(".", 1)[-1]
    for first, last, reason in _INTENDED.get((os.path.abspath(primal.file), name), ()):
        if first <= primal.line <= last:
            return reason
    return None


def _library_intended(primal: Where) -> str | None:
    """Surrogate gradients that libraries define on purpose."""
    path = primal.file.replace(os.sep, "/")
    if "/optax/" in path and primal.name.startswith("_scale_gradient"):
        return "optax.scale_gradient scales the gradient on purpose"
    if "/equinox/" in path and "nondifferentiable" in primal.name:
        return "Equinox marks this value as not to be differentiated"
    return None
