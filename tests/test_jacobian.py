"""check_jacobian, check_jvp, check_vjp and check_hvp: verdicts, localisation, conventions."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src import check_grads as check_grads_mod
from jgc._src import hvp as hvp_mod
from jgc._src import jacobian as jacobian_mod
from jgc._src import products as products_mod


def f_tree(x, y):
    return {"a": jnp.sin(x) * y[0], "b": jnp.outer(x, y)}


X = np.array([0.5, 2.0, -1.0], np.float32)
Y = np.array([1.5, -0.3], np.float32)


def true_jacobian_a_wrt_x(x, y):
    # d(sin(x_i)·y_0)/dx_j = δ_ij cos(x_i) y_0, written out by hand.
    return np.diag(np.cos(x) * y[0])


@pytest.mark.parametrize("mode", ["fwd", "rev", "auto"])
def test_jacobian_of_pytree_output_passes_and_matches_hand_truth(mode):
    rep = jgc.check_jacobian(f_tree, X, Y, mode=mode)
    assert rep.ok, rep
    names = {(lf.output_path, lf.path) for lf in rep.leaves}
    assert names == {("out['a']", "args[0]"), ("out['a']", "args[1]"),
                     ("out['b']", "args[0]"), ("out['b']", "args[1]")}
    blk = next(lf for lf in rep.leaves if lf.output_path == "out['a']" and lf.path == "args[0]")
    assert blk.shape == (3, 3)
    np.testing.assert_allclose(blk.numeric.reshape(3, 3), true_jacobian_a_wrt_x(X.astype(np.float64), Y),
                               rtol=1e-8, atol=1e-10)
    blk_b = next(lf for lf in rep.leaves if lf.output_path == "out['b']" and lf.path == "args[1]")
    assert blk_b.shape == (3, 2, 2)


def test_wrong_user_jacobian_entry_is_located_on_both_sides():
    def jac(x, y):
        j = jax.jacfwd(f_tree, argnums=(0, 1))(x, y)
        j["b"] = (j["b"][0], j["b"][1].at[2, 1, 0].add(1e-3))  # ∂b[2,1]/∂y[0] wrong
        return j

    rep = jgc.check_jacobian(f_tree, X, Y, jac=jac)
    assert not rep.ok
    (bad,) = rep.failing()
    assert (bad.output_path, bad.path) == ("out['b']", "args[1]")
    assert bad.output_index == (2, 1) and bad.input_index == (0,)
    assert bad.worst_index == (2, 1, 0)
    assert bad.elements("mismatch") == [(2, 1, 0)]
    assert "out['b'] wrt args[1]" in str(rep)


def test_argnums_int_and_has_aux_and_integer_outputs():
    def f(x, y, n):
        return (x * y, n + 1), {"aux": "ignored"}

    n = np.array(3, np.int32)
    rep = jgc.check_jacobian(f, X, X + 1, n, argnums=1, has_aux=True)
    assert rep.ok
    assert {lf.path for lf in rep.leaves} == {"args[1]"}
    assert ("out[1]", "output int32[]") in rep.skipped
    # A user Jacobian in jax.jacfwd's layout for an int argnums (no tuple level).
    g = lambda x, y, n: f(x, y, n)[0]  # noqa: E731
    rep = jgc.check_jacobian(g, X, X + 1, n, argnums=1, jac=lambda x, y, n: (np.diag(x), np.zeros(3)))
    assert rep.ok
    with pytest.raises(ValueError, match="shape"):
        jgc.check_jacobian(g, X, X + 1, n, argnums=1, jac=lambda x, y, n: (np.ones((3, 2)), np.zeros(3)))


def test_float32_native_precision_no_false_alarm():
    k = jax.random.split(jax.random.key(1), 2)
    W = jax.random.normal(k[0], (5, 4), jnp.float32)
    x = jax.random.normal(k[1], (4,), jnp.float32)
    f = lambda W, x: jax.nn.softmax(jnp.tanh(W @ x))  # noqa: E731
    rep = jgc.check_jacobian(f, W, x, precision="native")
    assert rep.ok and rep.precision == "native (float32)"
    assert jgc.check_jvp(f, W, x, precision="native").ok
    assert jgc.check_vjp(f, W, x, precision="native").ok


def test_complex_jacobian_follows_jax_convention():
    z = jnp.array([1 + 2j, -0.5 + 0.3j], jnp.complex64)
    f = lambda z: jnp.conj(z) * z**2  # noqa: E731  (not holomorphic)
    for mode in ("fwd", "rev"):
        rep = jgc.check_jacobian(f, z, mode=mode)
        assert rep.ok, rep
        assert rep.leaves[0].shape == (2, 2, 2, 2)  # (out, Re/Im, in, Re/Im)
    # Hand truth for z=1+2i, f = |z|²·z: ∂Re f/∂x = 3x² + y² = 7 at entry [0, 0, 0, 0].
    assert rep.leaves[0].numeric.reshape(2, 2, 2, 2)[0, 0, 0, 0] == pytest.approx(7.0, rel=1e-7)
    g = lambda z: jnp.sin(z) * z  # noqa: E731  (holomorphic)
    assert jgc.check_jacobian(g, z, jac=jax.jacfwd(g, holomorphic=True)).ok
    rep = jgc.check_jacobian(g, z, jac=lambda z: jnp.conj(jax.jacfwd(g, holomorphic=True)(z)))
    assert not rep.ok  # conjugated derivative: wrong in JAX's convention
    h = lambda z: jnp.sum(jnp.abs(z) ** 2 * jnp.real(z))  # noqa: E731  complex → real
    assert jgc.check_jacobian(h, z, jac=jax.grad(h)).ok
    assert not jgc.check_jacobian(h, z, jac=lambda z: jnp.conj(jax.grad(h)(z))).ok
    assert jgc.check_jvp(f, z).ok and jgc.check_vjp(f, z).ok


def test_check_jvp_catches_wrong_user_jvp_and_names_the_input_leaf():
    def jvp(primals, tangents):
        (x, y), (tx, ty) = primals, tangents
        out, tout = jax.jvp(f_tree, (x, y), (tx, ty))
        return out, {"a": tout["a"], "b": tout["b"] + 0.5 * jnp.outer(tx, jnp.zeros_like(ty) + 1)}

    rep = jgc.check_jvp(f_tree, X, Y, jvp=jvp)
    assert not rep.ok
    assert {(lf.output_path, lf.path) for lf in rep.failing()} == {("out['b']", "args[0]")}
    assert jgc.check_jvp(f_tree, X, Y, num_directions=2, key=jax.random.key(3)).ok


def test_check_jvp_refuses_custom_vjp_with_a_clear_type_error():
    @jax.custom_vjp
    def f(x):
        return x**2

    f.defvjp(lambda x: (x**2, x), lambda x, g: (2 * x * g,))
    with pytest.raises(TypeError, match="custom_vjp function, which has no JVP.*check_vjp"):
        jgc.check_jvp(f, X)
    rep = jgc.check_jacobian(f, X)  # auto picks reverse mode
    assert rep.ok and any("reverse mode" in n for n in rep.notes)


def test_check_vjp_transpose_identity_catches_a_wrong_hand_vjp_without_differences():
    A = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0], [0.0, 1.0, 1.0]], np.float32)

    def f(x):
        return jnp.asarray(A) @ x

    def vjp_wrong(x):
        return f(x), lambda g: (jnp.asarray(A) @ g,)  # missing transpose

    rep = jgc.check_vjp(f, X, vjp=vjp_wrong, against="jvp")
    assert not rep.ok and rep.evaluations <= 17  # only the noise probe and the point
    assert all("transpose" in lf.label for lf in rep.leaves)
    assert jgc.check_vjp(f, X, vjp=lambda x: (f(x), lambda g: (jnp.asarray(A).T @ g,)), against="jvp").ok


def test_kink_in_direction_is_non_smooth_not_mismatch():
    x = np.array([0.0, 1.0, -2.0], np.float32)
    rep = jgc.check_jvp(lambda x: jax.nn.relu(x) * 2.0, x, num_directions=3)
    assert rep.ok
    assert rep.counts()["non-smooth"] > 0 and rep.counts()["mismatch"] == 0


def test_check_hvp_default_user_and_third_order():
    def f(p, data):
        return jnp.sum(jnp.sin(p["w"] * data) ** 2) + jnp.sum(p["b"] ** 4) * p["w"][0]

    p = {"w": np.array([0.3, -0.7, 1.1]), "b": np.array([0.5, 2.0]), "steps": np.array(3)}
    data = np.array([1.0, 2.0, -0.5])
    rep = jgc.check_hvp(f, p, data)
    assert rep.ok
    assert {lf.output_path for lf in rep.leaves} == {"grad['w']", "grad['b']"}
    assert ("params['steps']", "int64[]") in rep.skipped or any("steps" in s[0] for s in rep.skipped)

    def hvp_gauss_newton(p, v, data):  # drops the b-curvature term: a planted HVP bug
        full = jax.jvp(jax.grad(lambda q: f(dict(q, steps=p["steps"]), data)),
                       ({"w": p["w"], "b": p["b"]},), ({"w": v["w"], "b": v["b"]},))[1]
        return {"w": full["w"], "b": full["b"] - 12 * p["b"] ** 2 * v["b"] * p["w"][0], "steps": p["steps"]}

    bad = jgc.check_hvp(f, p, data, hvp=hvp_gauss_newton)
    assert not bad.ok
    assert {(lf.output_path, lf.path) for lf in bad.failing()} == {("grad['b']", "params['b']")}
    assert jgc.check_hvp(lambda x: jnp.sum(jnp.exp(x) * x**2), np.array([0.2, -0.4]), order=3).ok


def test_errors_are_full_sentences():
    with pytest.raises(TypeError, match="f must be callable"):
        jgc.check_jacobian(3, X)
    with pytest.raises(ValueError, match="argnums=5 refers to argument 5"):
        jgc.check_jacobian(f_tree, X, Y, argnums=5)
    with pytest.raises(TypeError, match="argnums must be None"):
        jgc.check_jvp(f_tree, X, Y, argnums="0")
    with pytest.raises(TypeError, match="has_aux=True expects f to return a pair"):
        jgc.check_vjp(lambda x: x * 2, X, has_aux=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        jgc.check_jacobian(f_tree, X, Y, mode="backward")
    with pytest.raises(ValueError, match="no floating-point output"):
        jgc.check_jacobian(lambda x: jnp.argmax(x), X)
    with pytest.raises(ValueError, match="not deterministic"):
        jgc.check_jvp(lambda x: x * np.random.rand(), X)
    with pytest.raises(ValueError, match="num_directions must be a positive int"):
        jgc.check_jvp(f_tree, X, Y, num_directions=0)
    with pytest.raises(ValueError, match="order must be an int ≥ 2"):
        jgc.check_hvp(lambda p: jnp.sum(p**2), X, order=1)


def test_report_dict_and_inputs_not_modified():
    x = X.copy()
    rep = jgc.check_jacobian(f_tree, x, Y)
    np.testing.assert_array_equal(x, X)
    d = rep.to_dict()
    assert d["api"] == "jgc.check_jacobian" and d["ok"] is True
    assert {lf["output_path"] for lf in d["leaves"]} == {"out['a']", "out['b']"}
    assert str(rep).startswith("jgc.check_jacobian PASS")


def test_docstring_examples_run():
    for mod in (jacobian_mod, products_mod, hvp_mod, check_grads_mod):
        res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert res.failed == 0 and res.attempted > 0


@pytest.mark.smoke
def test_bfloat16_parameters_are_checked_on_every_supported_numpy():
    # NumPy 1.26 (with the oldest supported JAX) has no finfo for bfloat16 and no common
    # dtype of bfloat16 and a Python float; the checks take both from ml_dtypes.
    w = jnp.array([0.3, -0.7, 1.2], jnp.bfloat16)

    def f(w):
        return jnp.sum(jnp.tanh(w) ** 2)

    rep = jgc.check(f, w)
    assert rep.ok and [leaf.checked for leaf in rep.leaves] == [3]
    assert jgc.check_jacobian(f, w).ok
    jgc.check_grads(f, (w,), order=2)
    # A gradient off by half is still told apart at bfloat16's precision.
    bad = jgc.check(f, w, grad=lambda w: 1.5 * jax.grad(f)(w))
    assert not bad.ok


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_an_empty_output_has_nothing_to_check_in_every_mode(mode):
    x = jnp.array([0.3, -0.7, 1.2])
    rep = jgc.check_jacobian(lambda w: w[:0] * 2.0, x, mode=mode)
    assert rep.ok and [leaf.checked for leaf in rep.leaves] == [0]
    assert jgc.check_jvp(lambda w: w[:0] * 2.0, x).ok
    assert jgc.check_vjp(lambda w: w[:0] * 2.0, x).ok


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_an_empty_input_leaf_has_nothing_to_check_as_in_check(mode):
    params = {"a": jnp.zeros((0,)), "b": jnp.array([0.3, -0.7, 1.2])}
    scalar = jgc.check(lambda p: jnp.sum(p["a"]) + jnp.sum(jnp.sin(p["b"])), params)
    assert scalar.ok and [leaf.checked for leaf in scalar.leaves] == [0, 3]

    def f(p):
        return jnp.concatenate([p["a"], jnp.sin(p["b"])])

    rep = jgc.check_jacobian(f, params, mode=mode)
    assert rep.ok and [leaf.checked for leaf in rep.leaves] == [0, 9]
    # The non-empty leaf is still judged: a wrong derivative of it is a mismatch.
    wrong = jax.custom_jvp(f)
    wrong.defjvp(lambda p, t: (f(p[0]), jnp.concatenate([t[0]["a"], 2.0 * jnp.cos(p[0]["b"]) * t[0]["b"]])))
    bad = jgc.check_jacobian(wrong, params, mode=mode)
    assert not bad.ok and [leaf.checked for leaf in bad.leaves] == [0, 9]
