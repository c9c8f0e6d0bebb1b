"""jgc.testing: chex-style assertions, inside chex.TestCase and under chex.variants."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jgc
from jgc import testing
from jgc._src import testing as testing_impl

PARAMS = {"w": jnp.array([0.3, -1.2, 2.0]), "b": jnp.array(0.5), "n": 3}
X = jnp.array([[1.0, 2.0, -1.0], [0.5, -0.3, 0.2]])


def loss(params, x):
    return jnp.sum(jnp.tanh(x @ params["w"] + params["b"]) ** 2) * params["n"]


def wrong_grad(params, x):
    """jax.grad, except element 1 of w is off by 10%."""
    g = jax.grad(lambda p: loss({**params, **p}, x))({"w": params["w"], "b": params["b"]})
    return {"w": g["w"].at[1].multiply(1.1), "b": g["b"], "n": None}


@jax.custom_vjp
def cube(x):
    return x**3


cube.defvjp(lambda x: (x**3, x), lambda x, g: (2 * x**2 * g,))  # wrong: 3x²


def test_public_names_are_pinned():
    # Not identifiers: the names pytest's assert rewriting adds (see tests/test_api.py).
    public = {n for n in dir(testing) if not n.startswith("_") and n.isidentifier()}
    assert public == set(testing.__all__) == {
        "PREFIX", "assert_grads_close", "assert_grads_differ", "assert_report_ok", "assert_rule_ok",
        "assert_rules_ok"}


def test_docstring_examples_run():
    failed, attempted = doctest.testmod(testing_impl)
    assert attempted >= 2 and failed == 0


def test_failure_message_golden_first_line_and_report():
    with pytest.raises(jgc.GradCheckError) as info:
        testing.assert_grads_close(loss, PARAMS, X, grad=wrong_grad, custom_message="layer w")
    msg = str(info.value)
    first = msg.splitlines()[0]
    assert first.startswith("[jgc] Assertion assert_grads_close failed: gradients disagree at ['w'][1]: ")
    assert first.endswith("[layer w]")
    assert "jgc.check FAIL" in msg and "mismatch" in msg  # the report follows
    assert isinstance(info.value, AssertionError)
    rep = info.value.report
    assert [lf.path for lf in rep.failing()] == ["['w']"]
    assert rep.leaf("['w']").elements("mismatch") == [(1,)]


def test_assert_grads_differ_catches_a_wrong_custom_vjp_in_the_right_leaf():
    def f(p, x):
        return jnp.sum(cube(p["a"]) * x[0, :2]) + jnp.sum(p["c"] ** 2)

    p = {"a": jnp.array([0.7, -1.3]), "c": jnp.array([1.0, 2.0])}
    rep = testing.assert_grads_differ(f, p, X, leaves="['a']")
    assert rep.leaf("['c']").ok
    # A correct gradient makes assert_grads_differ fail, with its own prefix.
    with pytest.raises(AssertionError, match=r"^\[jgc\] Assertion assert_grads_differ failed: gradients agree"):
        testing.assert_grads_differ(loss, PARAMS, X)
    # ... and so does a failure in other leaves than the ones named.
    with pytest.raises(AssertionError, match=r"expected exactly leaves \['c'\] to fail, but the failing leaves are \['a'\]"):
        testing.assert_grads_differ(f, p, X, leaves=["['c']"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"leaves \['x'\] are not checked leaves of params; the checked leaves are \['b'\], \['w'\]"):
        testing.assert_grads_differ(loss, PARAMS, X, grad=wrong_grad, leaves="['x']")
    with pytest.raises(TypeError, match="leaves must be a keystr path"):
        testing.assert_grads_differ(loss, PARAMS, X, leaves=[0])
    with pytest.raises(TypeError, match="report must be a jgc.Report"):
        testing.assert_report_ok({"ok": True})


def test_assert_report_ok_shows_the_report():
    rep = jgc.check(loss, PARAMS, X, grad=wrong_grad)
    with pytest.raises(AssertionError, match=r"^\[jgc\] Assertion assert_report_ok failed: the check failed at \['w'\]\[1\]") as info:
        testing.assert_report_ok(rep, custom_message="from a saved report")
    assert "[from a saved report]" in str(info.value).splitlines()[0]


def test_inside_jit_is_refused_with_a_sentence_that_says_what_to_do():
    @jax.jit
    def inside(w):
        testing.assert_grads_close(lambda v: jnp.sum(v**2), w)
        return w

    with pytest.raises(TypeError, match=r"jgc.testing.assert_grads_close got traced values.*self.variant\(loss\)"):
        inside(jnp.ones(2))


def test_caller_arrays_are_not_modified():
    w = np.array([0.3, -1.2, 2.0], dtype=np.float32)
    before = w.copy()
    testing.assert_grads_close(lambda p, x: jnp.sum(jnp.sin(x @ p)), w, X)
    np.testing.assert_array_equal(w, before)


class ChexStyleTest(chex.TestCase):
    """The assertions inside chex.TestCase, with the function under test jitted or not."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_passes_for_a_correct_gradient(self):
        f = self.variant(loss)  # jitted by the with_jit variant; the check runs outside
        rep = testing.assert_grads_close(f, PARAMS, X)
        self.assertTrue(rep.ok)
        self.assertEqual([p for p, _ in rep.skipped], ["['n']"])  # the int leaf is not perturbed

    @chex.variants(with_jit=True, without_jit=True)
    def test_fails_for_a_wrong_custom_vjp_with_a_stable_prefix(self):
        f = self.variant(lambda p, x: jnp.sum(cube(x @ p)))
        with self.assertRaisesRegex(AssertionError, r"^\[jgc\] Assertion assert_grads_close failed: "
                                                    r"gradients disagree at <root>\[\d\]"):
            testing.assert_grads_close(f, jnp.array([0.4, 0.1, -0.2]), X, custom_message="cube")

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("f32", jnp.float32), ("f64", jnp.float64))
    def test_hand_gradient_variant_and_dtypes(self, dtype):
        with jax.enable_x64(dtype == jnp.float64):
            w = jnp.array([0.3, -1.2, 2.0], dtype)
            grad = self.variant(lambda w, x: 2 * x.T @ (x @ w))  # d/dw ‖xw‖²
            testing.assert_grads_close(lambda w, x: jnp.sum((x @ w) ** 2), w, X.astype(dtype), grad=grad)
