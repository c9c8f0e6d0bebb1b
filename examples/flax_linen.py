"""Check a Flax Linen model: the ``params`` collection of ``model.init``.

Linen keeps parameters outside the module, in the variables dict that ``init``
returns. Check a loss of the ``params`` collection and close over the others (such as
``batch_stats``), so only trainable parameters are perturbed::

    variables = model.init(key, x)
    loss = lambda params, x, y: mse(model.apply({"params": params}, x), y)
    jgc.check(loss, variables["params"], x, y)

The bug shown: a hand-written ``jax.custom_jvp`` for a smooth activation (swish,
x·σ(x)) whose rule forgets the product rule's second term: its tangent is σ(x)·ẋ, not
(σ(x) + x·σ(x)(1 − σ(x)))·ẋ. Forward values are exact, so only a gradient check sees it.

Run: ``python -m jgc.examples.flax_linen`` (needs ``pip install flax``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

import jgc


def make_swish(buggy: bool):
    @jax.custom_jvp
    def swish(x):
        return x * jax.nn.sigmoid(x)

    @swish.defjvp
    def swish_jvp(primals, tangents):
        (x,), (dx,) = primals, tangents
        s = jax.nn.sigmoid(x)
        slope = s if buggy else s + x * s * (1 - s)  # the buggy rule drops x·σ'(x)
        return swish(x), slope * dx

    return swish


class MLP(nn.Module):
    hidden: int = 8
    buggy: bool = False

    @nn.compact
    def __call__(self, x):
        act = make_swish(self.buggy)
        x = act(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)[..., 0]


def make_loss(model):
    def loss(params, x, y):
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    return loss


def main(hidden: int = 8, verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    x = jax.random.normal(jax.random.key(0), (16, 3))
    y = jnp.cos(x).sum(-1)
    reports = {}
    for name, buggy in (("good", False), ("bad", True)):
        model = MLP(hidden=hidden, buggy=buggy)
        params = model.init(jax.random.key(1), x)["params"]
        reports[name] = jgc.check(make_loss(model), params, x, y)
        say(f"{'Correct' if not buggy else 'Buggy'} swish custom_jvp:")
        say(reports[name], end="\n\n")
    return reports


if __name__ == "__main__":
    main()
