"""jgc.check on pytrees: verdicts, localisation, skipped leaves, reports, precision."""

import json
from typing import NamedTuple

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["W1"] + params["b1"])
    out = h @ params["W2"] + params["b2"]
    return jnp.mean((out - y) ** 2) + 1e-3 * jnp.sum(params["W1"] ** 2)


def make_mlp(n_in=20, n_hidden=30, n_out=5, batch=16, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "W1": (jax.random.normal(k[0], (n_in, n_hidden)) / np.sqrt(n_in)).astype(dtype),
        "b1": jnp.zeros(n_hidden, dtype),
        "W2": (jax.random.normal(k[1], (n_hidden, n_out)) / np.sqrt(n_hidden)).astype(dtype),
        "b2": jnp.zeros(n_out, dtype),
    }
    x = jax.random.normal(k[2], (batch, n_in)).astype(dtype)
    y = jax.random.normal(k[3], (batch, n_out)).astype(dtype)
    return params, x, y


@pytest.mark.parametrize("dtype", ["float32", "float64"], ids=["f32", "f64"])
@pytest.mark.parametrize("precision", ["auto", "native"])
def test_correct_mlp_gradient_passes(dtype, precision):
    with jax.enable_x64(dtype == "float64"):
        params, x, y = make_mlp(dtype=jnp.dtype(dtype))
    rep = jgc.check(mlp_loss, params, x, y, precision=precision)
    assert rep.ok, rep
    assert rep.counts()["mismatch"] == 0
    assert {lf.path for lf in rep.leaves} == {"['W1']", "['b1']", "['W2']", "['b2']"}
    assert rep.checked == rep.size == 20 * 30 + 30 + 30 * 5 + 5
    if precision == "auto":
        assert rep.precision == "float64"
    else:
        assert rep.precision.startswith("float64" if dtype == "float64" else "native")


def _grad64(params, x, y):
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        return jax.grad(mlp_loss)(p64, jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64))


@pytest.mark.parametrize("leaf", ["W1", "b1", "W2", "b2"])
def test_single_element_error_1e6_in_f64_is_caught_and_located(leaf):
    with jax.enable_x64(True):
        params, x, y = make_mlp(n_in=40, n_hidden=60, n_out=10, dtype=jnp.float64, seed=1)
        params["b1"] = params["b1"] + 0.1  # non-zero biases so every gradient is generic
        g = jax.grad(mlp_loss)(params, x, y)
        rng = np.random.default_rng(["W1", "b1", "W2", "b2"].index(leaf))
        flat = np.asarray(g[leaf]).ravel()
        # Corrupt a random element whose gradient is not negligible in its leaf.
        candidates = np.flatnonzero(np.abs(flat) > 1e-2 * np.abs(flat).max())
        i = int(rng.choice(candidates))
        idx = np.unravel_index(i, g[leaf].shape)
        bad = dict(g)
        bad[leaf] = g[leaf].at[idx].multiply(1 + 1e-6)
    rep = jgc.check(mlp_loss, params, x, y, grad=bad)
    assert not rep.ok
    lf = rep.leaf(f"['{leaf}']")
    assert lf.status == "mismatch"
    assert lf.worst_index == tuple(int(j) for j in idx)
    assert lf.elements("mismatch") == [tuple(int(j) for j in idx)]
    assert all(o.status == "ok" for o in rep.leaves if o.path != lf.path)


def test_mutation_in_1e4_parameter_model():
    with jax.enable_x64(True):
        params, x, y = make_mlp(n_in=100, n_hidden=96, n_out=4, batch=32, dtype=jnp.float64, seed=2)
        g = jax.grad(mlp_loss)(params, x, y)
        flat = np.asarray(g["W1"]).ravel()
        i = int(np.argsort(np.abs(flat))[len(flat) // 2])  # a median-sized element
        idx = np.unravel_index(i, g["W1"].shape)
        bad = dict(g, W1=g["W1"].at[idx].multiply(1 + 1e-6))
    n = sum(p.size for p in jax.tree_util.tree_leaves(params))
    assert n >= 10_000
    rep = jgc.check(mlp_loss, params, x, y, grad=bad)
    assert not rep.ok
    assert rep.leaf("['W1']").elements("mismatch") == [tuple(int(j) for j in idx)]


def test_hand_written_grad_callable_and_lecture_norm():
    def f(p, x):
        return jnp.sum(jnp.sin(p["a"] * x) ** 2) + jnp.sum(p["b"] ** 3)

    def grad(p, x):
        s = jnp.sin(p["a"] * x)
        return {"a": 2 * s * jnp.cos(p["a"] * x) * x, "b": 3 * p["b"] ** 2}

    p = {"a": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([[1.0, -2.0]])}
    x = jnp.array([1.0, 0.3, -0.7])
    rep = jgc.check(f, p, x, grad=grad)
    # The lecture's 1e-9 is for double precision; this grad runs in float32 (as given),
    # whose relative rounding is 6e-8. At the reference precision it meets the lecture's.
    assert rep.ok and rep.normwise < 1e-6
    assert jgc.check(f, p, x, grad=grad, analytic="reference").normwise < 1e-9

    def wrong(p, x):
        g = grad(p, x)
        return {"a": g["a"], "b": 2 * p["b"] ** 2}  # wrong factor

    rep = jgc.check(f, p, x, grad=wrong)
    assert not rep.ok
    assert [lf.path for lf in rep.failing()] == ["['b']"]
    assert rep.leaf("['b']").elements("mismatch") == [(0, 0), (0, 1)]


class Params(NamedTuple):
    w: jax.Array
    steps: jax.Array


@dataclasses.dataclass
class Cfg:
    scale: float


jax.tree_util.register_dataclass(Cfg, data_fields=[], meta_fields=["scale"])


def test_pytrees_with_non_float_leaves_are_carried_and_listed():
    params = {
        "nt": Params(w=jnp.array([1.0, 2.0]), steps=jnp.array(3, jnp.int32)),
        "list": [jnp.array(0.5), None, "relu", jax.nn.relu, 7, True],
        "cfg": Cfg(scale=2.0),
        "mask": jnp.array([True, False]),
    }

    def f(p):
        act = p["list"][3]
        return jnp.sum(act(p["nt"].w) * p["cfg"].scale) * p["list"][0] + p["nt"].steps * 0.0

    rep = jgc.check(f, params)
    assert rep.ok, rep
    assert {lf.path for lf in rep.leaves} == {"['nt'].w", "['list'][0]"}
    skipped = dict(rep.skipped)
    assert "['nt'].steps" in skipped and "['mask']" in skipped and "['list'][3]" in skipped
    assert "skipped" in str(rep)


def test_inputs_are_never_modified():
    w = np.array([0.5, -1.5, 2.0], dtype=np.float32)
    x = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    w0, x0 = w.copy(), x.copy()
    params = {"w": w}
    jgc.check(lambda p, x: jnp.sum(jnp.exp(p["w"] * x)), params, x)
    jgc.numerical_grad(lambda p, x: jnp.sum(jnp.exp(p["w"] * x)), params, x)
    np.testing.assert_array_equal(w, w0)
    np.testing.assert_array_equal(x, x0)
    assert params["w"] is w and w.dtype == np.float32


def test_float32_is_checked_in_float64_without_leaking_x64():
    p = jnp.array([0.1, 0.2, 0.3], jnp.float32)
    rep = jgc.check(lambda p: jnp.sum(jnp.log1p(p**2)), p)
    assert rep.precision == "float64"
    assert not jax.config.jax_enable_x64
    rep = jgc.check(lambda p: jnp.sum(jnp.log1p(p**2)), p, precision="native")
    assert rep.precision == "native (float32)"


def test_report_text_and_dict():
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.ones((2, 2))}
    bad = {"a": jnp.array([2.0, 4.0]), "b": jnp.full((2, 2), 0.0)}
    rep = jgc.check(lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(p["b"]), params, grad=bad)
    text = str(rep)
    assert text.startswith("jgc.check FAIL")
    lines = text.splitlines()
    # Failing leaves first, with their index and both values.
    assert lines[3].split()[0] == "['b']" and "mismatch" in lines[3]
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["ok"] is False and d["evaluations"] == rep.evaluations > 0
    leaf_b = [lf for lf in d["leaves"] if lf["path"] == "['b']"][0]
    assert leaf_b["status"] == "mismatch" and leaf_b["checked"] == 4
    assert sorted(map(tuple, leaf_b["mismatched_indices"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rep.seconds > 0 and rep.step > 0


def test_assert_grads_close_raises_with_report():
    f = lambda p: jnp.sum(p**2)  # noqa: E731
    p = jnp.array([1.0, 2.0, 3.0])
    assert jgc.assert_grads_close(f, p).ok
    with pytest.raises(jgc.GradCheckError) as info:
        jgc.assert_grads_close(f, p, grad=lambda p: 2 * p.at[1].set(0.0), custom_message="see eq. 3")
    msg = str(info.value)
    assert msg.startswith("jgc.assert_grads_close: gradients disagree at <root>[1]")
    assert "see eq. 3" in msg
    assert isinstance(info.value, AssertionError) and not info.value.report.ok


def test_forward_stencil_passes_and_catches():
    params, x, y = make_mlp(n_in=6, n_hidden=5, n_out=2)
    assert jgc.check(mlp_loss, params, x, y, stencil="forward").ok
    g = _grad64(params, x, y)
    with jax.enable_x64(True):
        bad = dict(g, W2=g["W2"].at[1, 1].multiply(1.01))
    rep = jgc.check(mlp_loss, params, x, y, grad=bad, stencil="forward")
    assert rep.leaf("['W2']").elements("mismatch") == [(1, 1)]


def test_complex_parameters_follow_jax_convention():
    z = jnp.array([1.0 + 2.0j, -0.5 + 0.1j], jnp.complex64)
    f = lambda z: jnp.sum(jnp.abs(z) ** 2 + jnp.real(z) * jnp.imag(z))  # noqa: E731
    rep = jgc.check(f, z)
    assert rep.ok, rep
    bad = jax.grad(f)(z).at[1].set(0.0)
    rep = jgc.check(f, z, grad=bad)
    assert rep.leaves[0].elements("mismatch") == [(1,)]


def test_kink_is_reported_as_non_smooth_not_mismatch():
    p = jnp.array([0.0, 1.0, -2.0, 0.5])
    rep = jgc.check(lambda p: jnp.sum(jax.nn.relu(p)) + jnp.max(p), p)
    assert rep.ok
    assert rep.leaves[0].elements("non-smooth") == [(0,)]


def test_non_finite_perturbation_is_its_own_status():
    # sqrt at 0: J(θ−h) is NaN, so the numerical derivative is undefined there.
    p = jnp.array([0.0, 1.0])
    rep = jgc.check(lambda p: jnp.sum(jnp.sqrt(p) * 0.0 + p**2) + jnp.sum(jnp.sqrt(p[1:])), p,
                    grad=lambda p: jnp.array([0.0, 2.0 + 0.5]))
    lf = rep.leaves[0]
    assert lf.elements("non-finite") == [(0,)]
    assert rep.ok
    assert not jgc.check(lambda p: jnp.sum(jnp.sqrt(p) * 0.0 + p**2) + jnp.sum(jnp.sqrt(p[1:])), p,
                         grad=lambda p: jnp.array([0.0, 2.5]), strict=True).ok


@dataclasses.dataclass
class CallableTree:
    """A pytree that is also callable, like an Equinox module of gradients."""

    w: jax.Array
    b: jax.Array

    def __call__(self, x):
        return x @ self.w + self.b


# Fields named: the bare decorator form needs a newer JAX than the oldest supported.
jax.tree_util.register_dataclass(CallableTree, data_fields=["w", "b"], meta_fields=[])


def test_callable_pytree_is_taken_as_gradients_not_as_a_function():
    params = CallableTree(w=jnp.array([[1.0, -2.0], [0.5, 3.0]]), b=jnp.array([0.1, -0.2]))
    x = jnp.array([[1.0, 2.0], [-1.0, 0.5]])

    def loss(m, x):
        return jnp.sum(jnp.tanh(m(x)) ** 2)

    g = jax.grad(loss)(params, x)
    assert callable(g)
    assert jgc.check(loss, params, x, grad=g).ok
    bad = CallableTree(w=g.w.at[1, 0].multiply(1.01), b=g.b)
    rep = jgc.check(loss, params, x, grad=bad)
    assert rep.leaf(".w").elements("mismatch") == [(1, 0)]
