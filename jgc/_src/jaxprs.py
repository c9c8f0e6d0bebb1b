"""Reading and writing variables while interpreting a jaxpr.

An interpreter of a jaxpr holds one value per variable: the constants and inputs
first, then each equation's outputs as it runs. :func:`interpret` keeps that
environment and hands each equation its operands' values.
"""

from __future__ import annotations

from collections.abc import Callable

from jax.extend import core as jcore

from . import compat


def interpret(jaxpr, consts, args, apply: Callable, *, literal: Callable = lambda x: x) -> list:
    """Run ``jaxpr`` on ``consts`` and ``args``, ``apply(eqn, values)`` giving each equation's outputs.

    ``apply`` returns the list of the equation's output values; ``literal`` turns the
    value of a literal operand into an interpreter value. Returns the values of the
    jaxpr's outputs.
    """
    env = {}

    def read(v):
        return literal(v.val) if isinstance(v, jcore.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    for eqn in jaxpr.eqns:
        outs = apply(eqn, [read(v) for v in eqn.invars])
        for var, val in zip(eqn.outvars, outs):
            if not isinstance(var, compat.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]
