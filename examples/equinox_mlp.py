"""Check an Equinox model: a module holding functions and ints as well as arrays.

An ``eqx.Module`` is a pytree whose leaves include non-arrays: ``eqx.nn.MLP`` holds
its activation functions, and your own modules may hold ints or flags. jgc perturbs
only the floating array leaves, differentiates with respect to those same leaves,
and lists the rest as skipped, so the model is checked as it is (no
``eqx.partition`` needed)::

    jgc.check(loss, model, x, y)                          # jax.grad w.r.t. float leaves
    jgc.check(loss, model, x, y, grad=eqx.filter_grad(loss))   # or Equinox's own grad

The bug shown: a straight-through clip written with ``jax.custom_vjp`` that passes
the cotangent through everywhere, also where the clip is active (the usual rule for
quantisation, wrong for a plain clip). Run: ``python -m jgc.examples.equinox_mlp``.
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

import jgc


def make_clip(buggy: bool, limit: float = 1.0):
    @jax.custom_vjp
    def clip(x):
        return jnp.clip(x, -limit, limit)

    def fwd(x):
        return clip(x), x

    def bwd(x, g):
        inside = (jnp.abs(x) < limit).astype(g.dtype)
        return (g if buggy else g * inside,)  # the buggy rule ignores the clip

    clip.defvjp(fwd, bwd)
    return clip


class Regressor(eqx.Module):
    mlp: eqx.nn.MLP  # holds jax.nn.tanh (a function) and ints (sizes, depth)
    squash: Callable  # a function leaf
    n_outputs: int  # an int leaf
    temperature: jax.Array  # a float scalar: perturbed like any parameter

    def __init__(self, hidden: int, *, key, buggy: bool = False):
        self.mlp = eqx.nn.MLP(3, 1, hidden, depth=1, activation=jax.nn.tanh, key=key)
        self.squash = make_clip(buggy)
        self.n_outputs = 1
        self.temperature = jnp.asarray(2.0)

    def __call__(self, x):
        return self.squash(self.temperature * self.mlp(x))[: self.n_outputs].sum()


def loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def main(hidden: int = 8, verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    x = jax.random.normal(jax.random.key(0), (16, 3))
    y = jnp.tanh(x.sum(-1))
    model = Regressor(hidden, key=jax.random.key(1))
    good = jgc.check(loss, model, x, y)
    say("Correct model (functions and ints are skipped, floats are checked):")
    say(good, end="\n\n")
    # Equinox's own gradient works as grad= (None for the non-array leaves is fine).
    buggy = Regressor(hidden, key=jax.random.key(1), buggy=True)
    bad = jgc.check(loss, buggy, x, y, grad=eqx.filter_grad(loss))
    say("Straight-through clip (wrong where the clip is active), grad=eqx.filter_grad(loss):")
    say(bad)
    return {"good": good, "bad": bad}


if __name__ == "__main__":
    main()
