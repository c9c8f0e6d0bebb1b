"""The fixture package's own tests: each passes, and each runs some of its rules."""

import fixturepkg as fp
import jax
import jax.numpy as jnp
import numpy as np


def test_smooth_relu_eager():
    assert abs(float(fp.smooth_relu(jnp.float32(0.0)))) < 1e-6


def test_smooth_relu_grad_of_a_jitted_loss():
    g = jax.grad(jax.jit(lambda x: jnp.sum(fp.smooth_relu(x))))(jnp.array([-2.0, 0.5, 3.0]))
    assert g.shape == (3,)


def test_ste_round():
    g = jax.grad(lambda x: jnp.sum(fp.ste_round(x)))(jnp.array([0.3, 1.7]))
    np.testing.assert_allclose(g, 1.0)


def test_cube_values():
    np.testing.assert_allclose(fp.cube(jnp.array([1.0, 2.0])), [1.0, 8.0])


def test_cube_grad_inside_jit():
    g = jax.grad(jax.jit(lambda x: jnp.sum(fp.cube(x))))(jnp.array([1.0, -0.5]))
    assert g.shape == (2,)


def test_mul_sin_grad_both_arguments():
    gx, _ = jax.grad(lambda x, y: jnp.sum(fp.mul_sin(x, y)), argnums=(0, 1))(jnp.array([1.0, 2.0]),
                                                                                 jnp.array([0.3, -0.7]))
    np.testing.assert_allclose(gx, jnp.sin(jnp.array([0.3, -0.7])), rtol=1e-6)


def test_softplus_grad():
    g = jax.grad(lambda x: jnp.sum(fp.softplus(x)))(jnp.array([-1.0, 0.5, 2.0]))
    np.testing.assert_allclose(g, jax.nn.sigmoid(jnp.array([-1.0, 0.5, 2.0])), rtol=1e-6)


def test_tanh_value_and_grad():
    v, g = jax.value_and_grad(lambda x: jnp.sum(fp.tanh_clipped_vjp(x)))(jnp.array([0.1, -0.4]))
    assert np.isfinite(v) and g.shape == (2,)


def test_scaled_sin_batched():
    ys = jax.vmap(fp.scaled_sin)(jnp.array([0.0, 0.0]))  # sin and cos differ at 0, but the test looks at shape
    assert ys.shape == (2,)
