"""Bad input gets a clear error naming the argument or leaf and the fix."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc

P = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(0.5)}


def f(p):
    return jnp.sum(p["w"] ** 2) + p["b"]


def test_fn_not_callable():
    with pytest.raises(TypeError, match="fn must be callable"):
        jgc.check("loss", P)


def test_non_scalar_cost():
    with pytest.raises(ValueError, match=r"must return a scalar cost J.*shape \(2,\).*jnp.mean"):
        jgc.check(lambda p: p["w"] ** 2, P)


def test_integer_cost():
    with pytest.raises(ValueError, match="real floating scalar"):
        jgc.check(lambda p: jnp.sum(p["w"]).astype(jnp.int32), P)


def test_non_finite_cost():
    with pytest.raises(ValueError, match="finite cost"):
        jgc.check(lambda p: jnp.log(p["w"][0] - 1.0), P)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_params_name_the_leaf(bad):
    with pytest.raises(ValueError, match=r"leaf \['w'\] holds non-finite values.*index \(1,\)"):
        jgc.check(f, {"w": jnp.array([1.0, bad]), "b": jnp.array(0.5)})


def test_no_floating_leaves():
    with pytest.raises(ValueError, match="no floating-point array leaves"):
        jgc.check(lambda p: jnp.sum(p), jnp.arange(3))
    with pytest.raises(ValueError, match="no floating-point array leaves"):
        jgc.check(lambda p: p * 2.0, 3.0)


def test_grad_with_wrong_structure():
    with pytest.raises(ValueError, match="tree structure of params"):
        jgc.check(f, P, grad={"w": jnp.zeros(2)})


def test_grad_with_wrong_shape_names_leaf():
    with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(1, 2\).*shape \(2,\)"):
        jgc.check(f, P, grad={"w": jnp.zeros((1, 2)), "b": jnp.array(1.0)})


def test_grad_with_wrong_dtype_names_leaf():
    with pytest.raises(TypeError, match=r"leaf \['w'\] has dtype int32"):
        jgc.check(f, P, grad={"w": jnp.zeros(2, jnp.int32), "b": jnp.array(1.0)})


def test_grad_callable_returning_none_for_a_float_leaf():
    with pytest.raises(TypeError, match=r"NoneType at leaf \['b'\]"):
        jgc.check(f, P, grad=lambda p: {"w": 2 * p["w"], "b": None})


def test_cost_that_raises_keeps_type_and_gains_context():
    def broken(p):
        raise KeyError("missing_layer")

    with pytest.raises(KeyError) as info:
        jgc.check(broken, P)
    assert any("jgc.check: raised while evaluating" in n for n in info.value.__notes__)


def test_nondeterministic_cost_is_refused():
    counter = itertools.count()

    def noisy(p):  # dropout without a fixed key: a fresh mask at every call
        key = jax.random.key(next(counter))
        mask = jax.random.bernoulli(key, 0.5, p["w"].shape)
        return jnp.sum(jnp.where(mask, p["w"], 0.0) ** 2) + p["b"]

    params = {"w": jnp.linspace(0.5, 2.0, 64), "b": jnp.array(0.5)}
    with pytest.raises(ValueError, match="not deterministic.*fixed PRNG key"):
        jgc.check(noisy, params)


def test_called_inside_jit_is_refused():
    @jax.jit
    def inside(p):
        jgc.check(f, p)
        return p

    with pytest.raises(TypeError, match="outside transformations"):
        inside(P)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"stencil": "fivepoint"}, "stencil must be one of"),
        ({"precision": "float128"}, "precision must be one of"),
        ({"mode": "quick"}, "mode must be one of"),
        ({"rtol": -1.0}, "rtol must be a non-negative"),
        ({"step": 0.0}, "step must be a positive"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jgc.check(f, P, **kwargs)


def test_complex_step_on_complex_params_is_refused():
    with pytest.raises(ValueError, match="stencil='complex' needs real parameters"):
        jgc.check(lambda z: jnp.sum(jnp.abs(z) ** 2), jnp.array([1 + 1j]), stencil="complex")
