"""Check a Haiku model: the nested dict of parameters from ``init``.

Haiku parameters are a plain pytree, ``{"mlp/~/linear_0": {"w": ..., "b": ...}, ...}``,
so ``jgc.check(loss, params, x, y)`` checks them as they are, and the report names
leaves by their Haiku module path.

The bug shown: a hand-written gradient for the output layer (as in a closed-form or
fused head) that forgets the factor 2 of d/dp (p − y)². The hidden layers' gradients
come from ``jax.grad`` and pass; the report points at exactly the output layer.

Run: ``python -m jgc.examples.haiku_mlp`` (needs ``pip install dm-haiku``).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

import jgc

OUT = "mlp/~/linear_1"  # Haiku's name for the output layer of hk.nets.MLP([hidden, 1])


def make_model(hidden: int):
    return hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([hidden, 1])(x)[..., 0]))


def main(hidden: int = 8, verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    model = make_model(hidden)
    x = jax.random.normal(jax.random.key(0), (16, 3))
    y = jnp.sin(x[:, 0]) * x[:, 1]
    params = model.init(jax.random.key(1), x)

    def loss(params, x, y):
        return jnp.mean((model.apply(params, x) - y) ** 2)

    def hand_grad(params, x, y):
        """jax.grad for the hidden layer, a hand-derived (wrong) output layer."""
        grads = jax.grad(loss)(params, x, y)
        hidden_act = jax.nn.relu(x @ params["mlp/~/linear_0"]["w"] + params["mlp/~/linear_0"]["b"])
        residual = model.apply(params, x) - y
        d_out = residual / x.shape[0]  # bug: d/dp mean((p − y)²) is 2(p − y)/m
        grads[OUT] = {"w": (hidden_act.T @ d_out)[:, None], "b": d_out.sum(keepdims=True)}
        return grads

    good = jgc.check(loss, params, x, y)
    say("jax.grad of the Haiku MLP:")
    say(good, end="\n\n")
    bad = jgc.check(loss, params, x, y, grad=hand_grad)
    say("A hand-written output-layer gradient missing a factor 2:")
    say(bad)
    return {"good": good, "bad": bad}


if __name__ == "__main__":
    main()
