"""Each verdict status, the precision rules and the Taylor-remainder second opinion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
import zoo


def test_inconclusive_when_the_noise_floor_hides_the_derivative():
    # float32 cross-entropy of a very confident softmax: J is ~1e-13, a difference of
    # O(30) terms, so float32 differences cannot see gradients of ~1e-8. The check
    # must say "inconclusive", not "mismatch" and not a silent "ok".
    c = zoo.make_confident_softmax(jnp.float32)
    rep = jgc.check(c.cost, c.params, *c.args, grad=c.grad, precision="native")
    assert rep.ok
    assert rep.counts()["inconclusive"] > 0 and rep.counts()["mismatch"] == 0
    assert "inconclusive" in str(rep) and "float64" in str(rep)
    assert not jgc.check(c.cost, c.params, *c.args, grad=c.grad, precision="native", strict=True).ok
    # In float64 (the default) the same gradient is checked for real.
    assert jgc.check(c.cost, c.params, *c.args, grad=c.grad).counts()["inconclusive"] == 0


def test_non_smooth_points_of_relu_abs_and_where():
    # At each switch point JAX returns one one-sided slope; the central difference is
    # their average. jgc must call these non-smooth, not mismatches.
    x = jnp.array([0.0, 0.0, 0.0, 0.25, 2.0])

    def f(x):
        leaky = jnp.where(x[2] > 0, x[2], 0.1 * x[2])
        # jnp.max at a tie splits the gradient evenly: that *is* the central
        # difference, so x[3] (tie of 3x − 0.5 and x at 0.25) must come out ok.
        return jax.nn.relu(x[0]) + jnp.abs(x[1]) + leaky + jnp.max(jnp.stack([3 * x[3] - 0.5, x[3]])) \
            + jnp.sin(x[4])

    rep = jgc.check(f, x)
    assert rep.ok, rep
    assert rep.leaves[0].elements("non-smooth") == [(0,), (1,), (2,)]
    assert rep.leaves[0].elements("ok") == [(3,), (4,)]


def test_wrong_derivative_at_a_kink_is_still_a_mismatch():
    x = jnp.array([0.0, 1.0])
    rep = jgc.check(lambda x: jnp.sum(jax.nn.relu(x)), x, grad=lambda x: jnp.array([3.0, 1.0]))
    assert not rep.ok and rep.leaves[0].elements("mismatch") == [(0,)]


def test_detection_power_is_reported_per_leaf():
    c = zoo.make_mlp(jnp.float32)
    f64 = jgc.check(c.cost, c.params, *c.args, grad=c.grad, analytic="reference")
    default = jgc.check(c.cost, c.params, *c.args, grad=c.grad)  # a float32 gradient, float64 reference
    f32 = jgc.check(c.cost, c.params, *c.args, grad=c.grad, precision="native")
    for a, n, b in zip(f64.leaves, default.leaves, f32.leaves):
        assert 0 < a.detectable_rel < 1e-6  # float64: single-element errors of 1e-6
        assert a.detectable_rel < n.detectable_rel < 1e-3  # float32 gradient: errors of 1e-3
        assert n.detectable_rel <= b.detectable_rel < 1e-2  # float32 reference too: 1% errors
    assert f64.to_dict()["leaves"][0]["detectable_rel"] == f64.leaves[0].detectable_rel


def test_bfloat16_parameters_never_give_an_all_zero_derivative():
    p = jnp.array([0.5, -1.0, 2.0], jnp.bfloat16)
    f = lambda p: jnp.sum(jnp.tanh(p.astype(jnp.float32)) ** 2)  # noqa: E731
    g = jgc.numerical_grad(f, p, precision="native")
    assert g.dtype == jnp.bfloat16 and np.all(np.asarray(g, np.float32) != 0)
    rep = jgc.check(f, p, precision="native")
    assert rep.ok and "float32" in rep.precision and any("bfloat16" in n for n in rep.notes)


@pytest.mark.parametrize("bad_op", ["abs", "real"])
def test_complex_step_refuses_a_cost_that_is_not_complex_safe(bad_op):
    op = {"abs": jnp.abs, "real": jnp.real}[bad_op]
    with pytest.raises(ValueError, match="complex-safe"):
        jgc.check(lambda p: jnp.sum(op(p) ** 3), jnp.array([1.0, -2.0]), stencil="complex")


def test_complex_step_is_exact_to_roundoff_on_a_safe_cost():
    with jax.enable_x64(True):
        p = jnp.array([0.3, 1.2, -0.7])
    rep = jgc.check(lambda p: jnp.sum(jnp.exp(p) * jnp.sin(p)), p, stencil="complex")
    assert rep.ok and max(lf.max_rel_err for lf in rep.leaves) < 1e-13


@pytest.mark.parametrize("stencil", ["forward", "central4", "richardson"])
def test_every_stencil_passes_right_and_fails_wrong(stencil):
    c = zoo.make_layernorm(jnp.float32)
    assert jgc.check(c.cost, c.params, *c.args, grad=c.grad, stencil=stencil).ok
    bug = c.bugs["missing mean term"]
    rep = jgc.check(c.cost, c.params, *c.args, grad=bug.grad, stencil=stencil)
    assert [lf.path for lf in rep.failing()] == [bug.leaf]


def test_taylor_remainder_order():
    c = zoo.make_mlp(jnp.float32)
    good = jgc.check_taylor(c.cost, c.params, *c.args, grad=c.grad)
    assert good.ok and abs(good.order - 2) < 0.2
    with jax.enable_x64(True):
        bug = zoo.single_element_bug(c, "W1", 1e-3)
    bad = jgc.check_taylor(c.cost, c.params, *c.args, grad=bug.grad)
    assert not bad.ok and abs(bad.order - 1) < 0.3
    assert "observed order" in str(bad) and bad.to_dict()["ok"] is False


def test_a_nan_gradient_is_named_nan_in_the_report():
    # jax.grad of the norm at 0 is NaN (0/0) where the norm itself is finite around 0.
    rep = jgc.check(jnp.linalg.norm, jnp.zeros(3))
    assert not rep.ok and np.isnan(rep.normwise)  # no finite pair to compare
    text = str(rep)
    assert ": nan vs 0 " in text and "non-finite analytic" in text and "optax.safe_norm" in text, text
