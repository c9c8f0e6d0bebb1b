"""A numerically stable softplus with a hand-written ``jax.custom_vjp`` rule, checked.

softplus(x) = log(1 + eˣ) overflows in eˣ for large x when written naively. The stable
form is max(x, 0) + log1p(e^(−|x|)), and its derivative is the logistic sigmoid
σ(x) = 1 / (1 + e^(−x)). We give it a ``custom_vjp`` (saving σ(x) in the forward pass)
and check the rule three ways:

1. ``jgc.check_vjp``: ⟨u, J t⟩ for random u, t against central differences;
2. ``jgc.check_grads``: the drop-in for ``jax.test_util.check_grads`` — JAX's own
   raises TypeError on this function in its default modes (a custom_vjp has no JVP);
   ours checks the VJP, up to second order;
3. ``jgc.check_jacobian``: every entry of the (diagonal) Jacobian.

Then we plant the classic slip, σ(−x) instead of σ(x) in the backward pass, but only
where x > 0 (the branch that was "optimised"): gradient descent would still run, the
check fails and names the elements.

Run: ``python -m jgc.examples.custom_vjp_softplus`` (or ``python examples/custom_vjp_softplus.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jgc


@jax.custom_vjp
def softplus(x):
    """log(1 + eˣ) without overflow: max(x, 0) + log1p(e^(−|x|))."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _softplus_fwd(x):
    return softplus(x), jax.nn.sigmoid(x)  # residual: σ(x), the derivative


def _softplus_bwd(sig, g):
    return (g * sig,)


softplus.defvjp(_softplus_fwd, _softplus_bwd)


@jax.custom_vjp
def softplus_buggy(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _buggy_fwd(x):
    # The planted bug: σ(−x) on the positive branch (a sign slip in a "fast path").
    return softplus_buggy(x), jnp.where(x > 0, jax.nn.sigmoid(-x), jax.nn.sigmoid(x))


softplus_buggy.defvjp(_buggy_fwd, _softplus_bwd)


def main(n: int = 8, verbose: bool = True) -> dict:
    """Check the correct rule and the buggy one; return the reports."""
    x = jnp.linspace(-30.0, 30.0, n) + 0.1  # large |x| too, where the naive form overflows
    good_vjp = jgc.check_vjp(softplus, x)
    good_grads = jgc.check_grads(softplus, (x,), order=2)
    good_jac = jgc.check_jacobian(softplus, x)
    bad_jac = jgc.check_jacobian(softplus_buggy, x)
    bad_vjp = jgc.check_vjp(softplus_buggy, x)
    try:
        jgc.check_grads(softplus_buggy, (x,), order=1)
        caught = None
    except jgc.GradCheckError as e:
        caught = e
    if verbose:
        print(good_vjp, good_grads, good_jac, bad_jac, sep="\n\n")
        print("\ncheck_grads on the buggy rule raised:\n", str(caught).splitlines()[0])
    return {"good_vjp": good_vjp, "good_grads": good_grads, "good_jacobian": good_jac,
            "bad_jacobian": bad_jac, "bad_vjp": bad_vjp, "bad_error": caught, "x": x}


if __name__ == "__main__":
    main()
