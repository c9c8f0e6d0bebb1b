"""Check a Flax NNX model: the module itself, or its State from ``nnx.split``.

In Flax 0.12 an ``nnx.Module`` is a JAX pytree: its ``nnx.Param`` arrays are leaves and
its other attributes (ints, activation functions, dtypes) are static. So
``jgc.check(loss, model, x, y)`` works on the model as it is, with
``loss(model, x, y)``. For older Flax, or to check only some variables, split it::

    graphdef, state = nnx.split(model, nnx.Param)
    jgc.check(lambda state, x, y: loss(nnx.merge(graphdef, state), x, y), state, x, y)

The bug shown: a ``jax.lax.stop_gradient`` left on the skip connection, so
``jax.grad`` misses a term. The forward pass is unchanged and training still runs.

Run: ``python -m jgc.examples.flax_nnx`` (needs ``pip install flax``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jgc


class ResidualMLP(nnx.Module):
    def __init__(self, din: int, hidden: int, *, rngs: nnx.Rngs, detach_skip: bool = False):
        self.inp = nnx.Linear(din, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)
        self.activation = nnx.gelu  # a function attribute: static, not perturbed
        self.detach_skip = detach_skip

    def __call__(self, x):
        h = self.inp(x)
        skip = jax.lax.stop_gradient(h) if self.detach_skip else h  # the bug, when on
        h = self.activation(h) + skip
        return self.out(h)[..., 0]


def loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def main(hidden: int = 8, verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    x = jax.random.normal(jax.random.key(0), (16, 3))
    y = jnp.sin(x).sum(-1)
    model = ResidualMLP(3, hidden, rngs=nnx.Rngs(0))

    say("1) The NNX module as a pytree: jgc.check(loss, model, x, y)")
    good = jgc.check(loss, model, x, y)
    say(good)

    say("\n2) A stop_gradient left on the skip connection, checked through nnx.split:")
    buggy = ResidualMLP(3, hidden, rngs=nnx.Rngs(0), detach_skip=True)
    graphdef, state = nnx.split(buggy, nnx.Param)
    bad = jgc.check(lambda state, x, y: loss(nnx.merge(graphdef, state), x, y), state, x, y)
    say(bad)
    return {"good": good, "bad": bad}


if __name__ == "__main__":
    main()
