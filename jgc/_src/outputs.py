"""The form of fn's result: a cost alone, or a pair (output, aux) with ``has_aux``.

Both kinds of check trace fn and take from its result the part that is
differentiated; a result of the wrong form for its ``has_aux`` setting raises
:class:`OutputFormError` with a message saying which form was expected.
"""

from __future__ import annotations

from .names import short_name


class OutputFormError(TypeError):
    """fn's result has the wrong form for its ``has_aux`` setting (found while tracing)."""


def is_cost_and_aux(out) -> bool:
    """True for a pair (scalar, anything): what a has_aux loss returns."""
    return (isinstance(out, (tuple, list)) and len(out) == 2
            and (isinstance(out[0], (int, float)) or getattr(out[0], "shape", None) == ()))


def describe_output(out) -> str:
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} elements"
    shape = getattr(out, "shape", None)
    return f"an array of shape {tuple(shape)}" if shape is not None else f"a {type(out).__name__}"


def drop_aux(out, has_aux: bool, *, api: str, fn, arg: str = "fn", first: str = "cost"):
    """Return the part of ``fn``'s result that is differentiated: all of it, or ``out[0]``.

    With ``has_aux`` (as in ``jax.grad``) ``fn`` returns a pair ``(output, aux)``, a tuple
    or a list. aux may hold anything (arrays, ints, PRNG keys, strings) and is dropped
    here, inside the traced function, so it is never perturbed, compared, converted or
    returned from a transformation.

    Raises:
      OutputFormError: a ``TypeError``, when ``has_aux`` is set and ``out`` is not a pair.
    """
    if not has_aux:
        return out
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0]
    raise OutputFormError(
        f"{api}: has_aux=True expects {arg} to return a pair ({first}, aux), as "
        f"jax.grad(..., has_aux=True) does, but {short_name(fn)} returned {describe_output(out)}. "
        f"Return ({first}, aux), or pass has_aux=False."
    )


def cost_of(out, has_aux: bool, *, api: str, fn):
    """The cost J in a scalar cost's result; a (cost, aux) pair without ``has_aux`` is refused.

    Raises:
      OutputFormError: ``out`` is a (scalar, aux) pair and ``has_aux`` is not set, or
        ``has_aux`` is set and ``out`` is not a pair.
    """
    if not has_aux and is_cost_and_aux(out):
        raise OutputFormError(
            f"{api}: fn must return a scalar cost J, but {short_name(fn)} returned "
            f"{describe_output(out)}, the first a scalar: a (cost, aux) pair. Pass "
            "has_aux=True to check the cost and ignore aux, as jax.grad(fn, has_aux=True) "
            "does, or return the cost alone."
        )
    return drop_aux(out, has_aux, api=api, fn=fn)
