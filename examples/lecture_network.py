"""The gradient-checking lecture, made real: a hand-written backprop, checked by jgc.

A small network like the course's: 4 inputs, one sigmoid hidden layer of 6 units and
3 sigmoid outputs, cross-entropy cost with L2 regularisation of the weights (not of
the bias column). Forward and backprop are written by hand, as in the course
(Theta matrices with a bias column, deltas, accumulated D terms). We check:

1. the correct backprop: passes. The course's normwise relative difference
   ‖DVec − gradApprox‖ / ‖DVec + gradApprox‖ is asked below 1e-9 in double precision;
   this backprop runs in float32, as trained (about 1e-7 of rounding), against a float64
   reference;
2. a subtly buggy backprop that also regularises the bias column: gradient descent
   with it still lowers the cost over a few hundred steps, so nothing looks wrong —
   but jgc flags it and names the leaf and the index.

Run: ``jgc demo`` or ``python -m jgc.examples.lecture_network``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jgc

LAMBDA = 1.0


def sigmoid(z):
    return 1.0 / (1.0 + jnp.exp(-z))


def add_bias(a):
    return jnp.concatenate([jnp.ones((a.shape[0], 1), a.dtype), a], axis=1)


def cost(params, X, Y):
    """J(Θ): cross-entropy of sigmoid outputs plus (λ/2m)·Σ Θ² over non-bias columns."""
    t1, t2 = params["Theta1"], params["Theta2"]
    m = X.shape[0]
    a2 = sigmoid(add_bias(X) @ t1.T)
    h = sigmoid(add_bias(a2) @ t2.T)
    data = -jnp.sum(Y * jnp.log(h) + (1 - Y) * jnp.log(1 - h)) / m
    reg = LAMBDA / (2 * m) * (jnp.sum(t1[:, 1:] ** 2) + jnp.sum(t2[:, 1:] ** 2))
    return data + reg


def backprop(params, X, Y, *, regularise_bias=False):
    """Hand-derived gradient (the course's DVec): deltas, then accumulated D terms."""
    t1, t2 = params["Theta1"], params["Theta2"]
    m = X.shape[0]
    a1 = add_bias(X)
    z2 = a1 @ t1.T
    a2 = add_bias(sigmoid(z2))
    a3 = sigmoid(a2 @ t2.T)
    d3 = a3 - Y
    d2 = (d3 @ t2)[:, 1:] * sigmoid(z2) * (1 - sigmoid(z2))
    D1 = d2.T @ a1 / m
    D2 = d3.T @ a2 / m
    if regularise_bias:  # the bug: the bias column is regularised too
        D1 = D1 + LAMBDA / m * t1
        D2 = D2 + LAMBDA / m * t2
    else:
        D1 = D1.at[:, 1:].add(LAMBDA / m * t1[:, 1:])
        D2 = D2.at[:, 1:].add(LAMBDA / m * t2[:, 1:])
    return {"Theta1": D1, "Theta2": D2}


def buggy_backprop(params, X, Y):
    return backprop(params, X, Y, regularise_bias=True)


def make_problem(seed: int = 0, m: int = 20):
    """Random Θ (bias columns included) and a small labelled data set."""
    rng = np.random.default_rng(seed)
    eps_init = 0.5
    params = {
        "Theta1": jnp.asarray(rng.uniform(-eps_init, eps_init, (6, 5)), jnp.float32),
        "Theta2": jnp.asarray(rng.uniform(-eps_init, eps_init, (3, 7)), jnp.float32),
    }
    X = jnp.asarray(rng.normal(size=(m, 4)), jnp.float32)
    labels = rng.integers(0, 3, size=m)
    Y = jnp.asarray(np.eye(3)[labels], jnp.float32)
    return params, X, Y


def train(grad_fn, params, X, Y, steps: int = 300, lr: float = 0.5):
    """Plain gradient descent; returns the cost at every step."""

    @jax.jit
    def step(p):
        g = grad_fn(p, X, Y)
        return jax.tree_util.tree_map(lambda w, d: w - lr * d, p, g), cost(p, X, Y)

    costs = []
    for _ in range(steps):
        params, c = step(params)
        costs.append(float(c))
    return costs


def main(steps: int = 300, verbose: bool = True) -> dict:
    params, X, Y = make_problem()
    say = print if verbose else (lambda *a, **k: None)

    say("1) The correct hand-written backprop against finite differences:")
    good = jgc.check(cost, params, X, Y, grad=backprop)
    say(good)
    say(f"   normwise relative difference {good.normwise:.2e} (the course asks for < 1e-9 in double "
        "precision; this backprop runs in float32, whose rounding is 6e-8)\n")

    say(f"2) A buggy backprop (the bias column is regularised). {steps} steps of gradient descent:")
    costs = train(buggy_backprop, params, X, Y, steps=steps)
    say(f"   cost {costs[0]:.4f} -> {costs[len(costs) // 2]:.4f} -> {costs[-1]:.4f}: "
        "it goes down, nothing looks wrong.\n")

    say("3) ... but jgc catches it:")
    bad = jgc.check(cost, params, X, Y, grad=buggy_backprop)
    say(bad)
    worst = bad.failing()[0] if bad.failing() else None
    if worst is not None:
        say(f"\n   -> wrong gradient at {worst.path}{list(worst.worst_index)}; "
            f"{worst.counts['mismatch']} elements disagree, all in the bias column: "
            f"{sorted({i[1] for i in worst.elements('mismatch')}) == [0]}")
    return {"good": good, "bad": bad, "costs": costs}


if __name__ == "__main__":
    main()
