"""Which of the custom rules is wrong? ``jgc.check`` names the leaf, ``jgc.check_rules`` the rule.

A small classifier uses three hand-written derivative rules, as models with fused
kernels do:

* ``rms_norm``, a ``jax.custom_vjp`` whose backward pass saves a reduction;
* ``fused_swish``, a Pallas kernel (``pallas_call`` with ``interpret=True``, so it runs
  on CPU) with a hand-written backward pass;
* ``logistic_loss``, a ``jax.custom_jvp`` for a stable log(1 + e^(−m)).

One of them is subtly wrong: ``rms_norm``'s backward pass drops the 1/n of the mean in
its projection term. Training would still run. ``jgc.check`` finds that the gradient of
``W1`` disagrees with finite differences (``W2`` is fine: its gradient does not pass
through the norm), but a leaf does not say which of the three rules to open.
``jgc.check_rules`` traces the loss, checks each rule on the inputs it receives there,
and names ``rms_norm`` with its file and line.

Run: ``python -m jgc.examples.find_the_wrong_rule`` (or ``python examples/find_the_wrong_rule.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

import jgc


# -- rule 1: RMS normalisation, custom_vjp (the planted bug is here) ---------------------------
@jax.custom_vjp
def rms_norm(x):
    """x / rms(x) over the last axis, rms(x) = sqrt(mean(x²) + 1e-6)."""
    return x / jnp.sqrt(jnp.mean(x**2, axis=-1, keepdims=True) + 1e-6)


def _rms_norm_fwd(x):
    r = jnp.sqrt(jnp.mean(x**2, axis=-1, keepdims=True) + 1e-6)
    return x / r, (x, r)


def _rms_norm_bwd(res, g):
    x, r = res
    # Correct: g/r − x·Σ(g·x) / (n·r³). The slip: the n of the mean is forgotten.
    return (g / r - x * jnp.sum(g * x, axis=-1, keepdims=True) / r**3,)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# -- rule 2: swish as a Pallas kernel with a hand-written backward pass -------------------------
def _swish_kernel(x_ref, o_ref):
    x = x_ref[...]
    o_ref[...] = x * jax.nn.sigmoid(x)


def _swish_pallas(x):
    return pl.pallas_call(_swish_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)


@jax.custom_vjp
def fused_swish(x):
    """x·σ(x), computed by a Pallas kernel."""
    return _swish_pallas(x)


def _swish_fwd(x):
    return _swish_pallas(x), x


def _swish_bwd(x, g):
    s = jax.nn.sigmoid(x)
    return (g * (s + x * s * (1 - s)),)


fused_swish.defvjp(_swish_fwd, _swish_bwd)


# -- rule 3: a stable logistic loss, custom_jvp ------------------------------------------------
@jax.custom_jvp
def logistic_loss(m):
    """log(1 + e^(−m)) without overflow."""
    return jnp.maximum(-m, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(m)))


@logistic_loss.defjvp
def _logistic_loss_jvp(primals, tangents):
    (m,), (t,) = primals, tangents
    return logistic_loss(m), -jax.nn.sigmoid(-m) * t


# -- the model --------------------------------------------------------------------------------
def loss(params, x, y):
    """Mean logistic loss of a two-layer classifier: x → W1 → rms_norm → swish → W2."""
    h = fused_swish(rms_norm(x @ params["W1"]))
    return jnp.mean(logistic_loss(y * (h @ params["W2"])))


def make_problem(batch: int = 4, d_in: int = 3, d_hidden: int = 4, seed: int = 0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    params = {"W1": jax.random.normal(k1, (d_in, d_hidden)) / jnp.sqrt(d_in),
              "W2": jax.random.normal(k2, (d_hidden,)) / jnp.sqrt(d_hidden)}
    x = jax.random.normal(k3, (batch, d_in))
    y = jnp.where(jax.random.bernoulli(k4, 0.5, (batch,)), 1.0, -1.0)
    return params, x, y


def main(batch: int = 4, verbose: bool = True) -> dict:
    """Check the gradient, then the rules; return both reports."""
    params, x, y = make_problem(batch)
    grads = jgc.check(loss, params, x, y)
    rules = jgc.check_rules(loss, params, x, y)
    if verbose:
        print(grads)
        print()
        print(rules)
    return {"check": grads, "rules": rules}


if __name__ == "__main__":
    main()
