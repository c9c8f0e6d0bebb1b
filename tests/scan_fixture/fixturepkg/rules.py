"""Custom rules: two right, one intended surrogate, five wrong in five different ways, one never run."""

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

import jgc


# Right.
@jax.custom_jvp
def smooth_relu(x):
    return jnp.logaddexp(x, 0.0) - jnp.log(2.0)


@smooth_relu.defjvp
def _smooth_relu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return smooth_relu(x), jax.nn.sigmoid(x) * t


# Intended: a straight-through estimator.
@jax.custom_jvp
def ste_round(x):
    return jnp.round(x)


@ste_round.defjvp
def _ste_round_jvp(primals, tangents):
    return ste_round(primals[0]), tangents[0]


ste_round = jgc.intended(ste_round, reason="straight-through estimator")


# Wrong: plain JVP (the derivative of x**3 is 3x², not 2x²).
@jax.custom_jvp
def cube(x):
    return x ** 3


@cube.defjvp
def _cube_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return cube(x), 2 * x ** 2 * t


# Wrong for its second argument only: d/dy x·sin(y) is x·cos(y).
@jax.custom_jvp
def mul_sin(x, y):
    return x * jnp.sin(y)


@mul_sin.defjvp
def _mul_sin_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    return mul_sin(x, y), jnp.sin(y) * tx + x * jnp.sin(y) * ty


# Wrong at order 2 only: the rule stops the gradient through its own coefficient.
@jax.custom_jvp
def softplus(x):
    return jnp.logaddexp(x, 0.0)


@softplus.defjvp
def _softplus_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return softplus(x), jax.nn.sigmoid(jax.lax.stop_gradient(x)) * t


# Wrong as a linear map: the backward pass clips the cotangent.
@jax.custom_vjp
def tanh_clipped_vjp(x):
    return jnp.tanh(x)


def _tanh_fwd(x):
    return jnp.tanh(x), x


def _tanh_bwd(x, g):
    return (jnp.clip(g, -1.0, 1.0) * (1 - jnp.tanh(x) ** 2),)


tanh_clipped_vjp.defvjp(_tanh_fwd, _tanh_bwd)


# Wrong only under vmap: the batching rule computes cos, the primal sin.
@custom_vmap
def scaled_sin(x):
    return 2.0 * jnp.sin(x)


@scaled_sin.def_vmap
def _scaled_sin_vmap(axis_size, in_batched, xs):
    return 2.0 * jnp.cos(xs), in_batched[0]


# Never run by the tests.
@jax.custom_jvp
def ignored(x):
    return jnp.exp(x)


@ignored.defjvp
def _ignored_jvp(primals, tangents):
    return ignored(primals[0]), 2 * ignored(primals[0]) * tangents[0]
