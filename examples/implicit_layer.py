"""An implicit layer: a fixed point z* = tanh(W z* + x), differentiated by the implicit
function theorem, and its VJP checked against finite differences of the solver.

The forward pass iterates z ← tanh(W z + x) until it stops changing (W is scaled so
that the map is a contraction). Backpropagating through the iterations would store
them all; instead a ``jax.custom_vjp`` uses the implicit function theorem. With
F(z, W, x) = tanh(W z + x) and z* = F(z*, W, x),

    dz* = (I − ∂F/∂z)⁻¹ (∂F/∂W dW + ∂F/∂x dx),

so for a cotangent g the backward pass solves the adjoint system
w = g + (∂F/∂z)ᵀ w (again by fixed-point iteration) and returns (∂F/∂(W, x))ᵀ w.
The easy mistake is the missing transpose: iterating w = g + (∂F/∂z) w. It still
converges, training still moves, and the gradients are wrong. ``jgc.check_vjp`` compares
⟨u, J t⟩ against central differences of the whole forward solve and catches it.

Run: ``python -m jgc.examples.implicit_layer`` (or ``python examples/implicit_layer.py``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jgc

ITERATIONS = 200  # contraction factor ≤ 0.5: 2⁻²⁰⁰ is far below float64 round-off


def _cell(z, W, x):
    return jnp.tanh(W @ z + x)


def _solve(step, z0):
    """Iterate z ← step(z) a fixed number of times (enough to reach round-off)."""
    return jax.lax.fori_loop(0, ITERATIONS, lambda _, z: step(z), z0)


def make_layer(transpose_in_adjoint: bool = True):
    """Return the fixed-point layer f(W, x) = z*; the flag plants the missing-transpose bug."""

    @jax.custom_vjp
    def layer(W, x):
        return _solve(lambda z: _cell(z, W, x), jnp.zeros_like(x))

    def fwd(W, x):
        z = layer(W, x)
        return z, (z, W, x)

    def bwd(res, g):
        z, W, x = res
        _, vjp_z = jax.vjp(lambda zz: _cell(zz, W, x), z)  # w ↦ (∂F/∂z)ᵀ w
        if transpose_in_adjoint:
            adjoint = lambda w: g + vjp_z(w)[0]  # noqa: E731
        else:
            _, jvp_z = jax.linearize(lambda zz: _cell(zz, W, x), z)  # w ↦ (∂F/∂z) w: wrong
            adjoint = lambda w: g + jvp_z(w)  # noqa: E731
        w = _solve(adjoint, g)
        _, vjp_wx = jax.vjp(partial(_cell, z), W, x)
        return vjp_wx(w)

    layer.defvjp(fwd, bwd)
    return layer


def make_problem(n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, n))
    W = 0.5 * W / np.linalg.norm(W, 2)  # spectral norm 0.5: a contraction (|tanh'| ≤ 1)
    x = rng.standard_normal(n)
    return W, x


def main(n: int = 6, verbose: bool = True) -> dict:
    """Check the implicit layer's VJP (correct and with the planted bug)."""
    with jax.enable_x64(True):  # the example's own scope; jgc scopes its checks too
        W, x = make_problem(n)
        W, x = jnp.asarray(W), jnp.asarray(x)
        layer, buggy = make_layer(True), make_layer(False)
        loss = lambda W, x: jnp.sum(layer(W, x) ** 2)  # noqa: E731
        good = jgc.check_vjp(layer, W, x)
        good_loss = jgc.check(lambda p: loss(p["W"], p["x"]), {"W": W, "x": x})
        bad = jgc.check_vjp(buggy, W, x)
        bad_jac = jgc.check_jacobian(buggy, W, x)
    if verbose:
        print(good, good_loss, bad, sep="\n\n")
    return {"good": good, "good_loss": good_loss, "bad": bad, "bad_jacobian": bad_jac}


if __name__ == "__main__":
    main()
