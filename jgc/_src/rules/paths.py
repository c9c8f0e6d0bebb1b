"""Which operands and outputs of each rule lie on the differentiated path of the loss.

A rule's operand is *on the path* when it depends, through differentiable operations,
on the parameters being differentiated (forward from the params); a rule's output is
on the path when its cotangent reaches the cost (backward from the cost). Everything
else never meets the gradient: a buffer the library writes once (a constant operand),
a solver residual that only feeds a termination test, a value marked not to be
differentiated. ``check_rules`` compares a rule only on the operands and outputs on
the path, and lists the rest.

The analysis reads the jaxpr's data flow. It is conservative: a construct it does not
know passes dependence from every input to every output, so an unknown construct can
only keep an operand on the path, never drop one that is on it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.extend import core as jcore

from .sites import KINDS, _subjaxprs

# Primitives whose derivative is zero (or that JAX does not differentiate): no
# dependence passes through them, in either direction.
BLOCKING = frozenset({
    "stop_gradient", "floor", "ceil", "round", "sign", "is_finite", "argmax", "argmin",
    "nondifferentiable", "random_bits", "random_seed", "random_wrap", "random_unwrap",
    "iota", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "population_count",
})
# Equinox's marker: its tangent passes (forward), its cotangent may not (backward).
BACKWARD_BLOCKING = frozenset({"nondifferentiable_backward"})
CALLS = ("pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "remat2")


def _inexact(v) -> bool:
    aval = getattr(v, "aval", None)
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _union(xs, ys) -> list[bool]:
    """Elementwise or of two flags lists: on the path in either."""
    return [a or b for a, b in zip(xs, ys)]


def _is_var(v) -> bool:
    return not isinstance(v, jcore.Literal)


class Paths:
    """Per rule equation (by id): which operands carry the params, which outputs reach the cost."""

    def __init__(self):
        self.operands: dict[int, list[bool]] = {}
        self.outputs: dict[int, list[bool]] = {}

    # forward: which values depend on the params -------------------------------------------------
    def forward(self, jaxpr, tainted_in: list[bool]) -> list[bool]:
        t = {v: b for v, b in zip(jaxpr.invars, tainted_in)}

        def get(v):
            return _is_var(v) and t.get(v, False)

        for eqn in jaxpr.eqns:
            ins = [get(v) for v in eqn.invars]
            outs = self._forward_eqn(eqn, ins)
            for v, b in zip(eqn.outvars, outs):
                t[v] = b and _inexact(v)
        return [get(v) for v in jaxpr.outvars]

    def _forward_eqn(self, eqn, ins):
        name, p = eqn.primitive.name, eqn.params
        n_out = len(eqn.outvars)
        if name in BLOCKING:
            return [False] * n_out
        if name in KINDS:
            prev = self.operands.get(id(eqn))
            self.operands[id(eqn)] = ins if prev is None else _union(prev, ins)
            # The primal's data flow: a right rule's derivative is non-zero only where it is.
            return self.forward(p["call_jaxpr"].jaxpr, ins)
        if name in CALLS:
            jx = p.get("jaxpr", p.get("call_jaxpr"))
            return self.forward(getattr(jx, "jaxpr", jx), ins)
        if name == "scan":
            nc, ncar = p["num_consts"], p["num_carry"]
            carry = ins[nc:nc + ncar]
            while True:
                out = self.forward(p["jaxpr"].jaxpr, ins[:nc] + carry + ins[nc + ncar:])
                new = _union(carry, out[:ncar])
                if new == carry:
                    return out
                carry = new
        if name == "while":
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            consts, carry = ins[cn:cn + bn], ins[cn + bn:]
            while True:
                out = self.forward(p["body_jaxpr"].jaxpr, consts + carry)
                new = _union(carry, out)
                if new == carry:
                    return carry
                carry = new
        if name == "cond":
            outs = [False] * n_out
            for b in p["branches"]:
                outs = _union(outs, self.forward(b.jaxpr, ins[1:]))
            return outs
        # anything else: every output depends on every input (its sub-programs, if
        # any, are walked with every input on the path)
        for sub in _subjaxprs(eqn):
            self.forward(sub, [any(ins)] * len(sub.invars))
        # Kept for every other primitive too: the rules registered on a primitive are checked likewise.
        prev = self.operands.get(id(eqn))
        self.operands[id(eqn)] = ins if prev is None else _union(prev, ins)
        return [any(ins)] * n_out

    # backward: which values reach the cost ------------------------------------------------------
    def backward(self, jaxpr, needed_out: list[bool]) -> list[bool]:
        need = {}
        for v, b in zip(jaxpr.outvars, needed_out):
            if _is_var(v) and b:
                need[v] = True
        for eqn in reversed(jaxpr.eqns):
            outs = [need.get(v, False) and _inexact(v) for v in eqn.outvars]
            ins = self._backward_eqn(eqn, outs)
            for v, b in zip(eqn.invars, ins):
                if _is_var(v) and b and _inexact(v):
                    need[v] = True
        return [_is_var(v) and need.get(v, False) for v in jaxpr.invars]

    def _backward_eqn(self, eqn, outs):
        name, p = eqn.primitive.name, eqn.params
        n_in = len(eqn.invars)
        if name in BLOCKING or name in BACKWARD_BLOCKING:
            return [False] * n_in
        if name in KINDS:
            prev = self.outputs.get(id(eqn))
            self.outputs[id(eqn)] = outs if prev is None else _union(prev, outs)
            return self.backward(p["call_jaxpr"].jaxpr, outs)
        if name in CALLS:
            jx = p.get("jaxpr", p.get("call_jaxpr"))
            return self.backward(getattr(jx, "jaxpr", jx), outs)
        if name == "scan":
            nc, ncar = p["num_consts"], p["num_carry"]
            carry = outs[:ncar]
            while True:
                ins = self.backward(p["jaxpr"].jaxpr, carry + outs[ncar:])
                new = _union(carry, ins[nc:nc + ncar])
                if new == carry:
                    return ins
                carry = new
        if name == "while":
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            carry = outs
            while True:
                ins = self.backward(p["body_jaxpr"].jaxpr, carry)
                new = _union(carry, ins[bn:])
                if new == carry:
                    return [False] * cn + ins[:bn] + carry
                carry = new
        if name == "cond":
            ins = [False] * (n_in - 1)
            for b in p["branches"]:
                ins = _union(ins, self.backward(b.jaxpr, outs))
            return [False] + ins
        for sub in _subjaxprs(eqn):
            self.backward(sub, [any(outs)] * len(sub.outvars))
        prev = self.outputs.get(id(eqn))
        self.outputs[id(eqn)] = outs if prev is None else _union(prev, outs)
        return [any(outs)] * n_in


def differentiated_paths(jaxpr, tainted_in: list[bool]) -> Paths:
    """The paths of every rule equation in ``jaxpr`` (inputs flagged by ``tainted_in``, every output a cost)."""
    paths = Paths()
    paths.forward(jaxpr, tainted_in)
    paths.backward(jaxpr, [True] * len(jaxpr.outvars))
    return paths
