"""Modes beyond full: sampled, directional with localisation, auto under a budget."""

import math

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import jgc
from jgc._src import sampling


def mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["W1"] + params["b1"])
    out = h @ params["W2"] + params["b2"]
    return jnp.mean((out - y) ** 2)


def make_mlp(n_in, n_hidden, n_out=3, batch=16, dtype=jnp.float64, seed=0):
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(seed), 4)
        params = {
            "W1": (jax.random.normal(k[0], (n_in, n_hidden)) / np.sqrt(n_in)).astype(dtype),
            "b1": jnp.full(n_hidden, 0.1, dtype),
            "W2": (jax.random.normal(k[1], (n_hidden, n_out)) / np.sqrt(n_hidden)).astype(dtype),
            "b2": jnp.zeros(n_out, dtype),
        }
        x = jax.random.normal(k[2], (batch, n_in)).astype(dtype)
        y = jax.random.normal(k[3], (batch, n_out)).astype(dtype)
        return params, x, y


def corrupt(params, x, y, leaf, rel, which="median", count=1, seed=0):
    """The true gradient with `count` elements of `leaf` off by a relative `rel`."""
    with jax.enable_x64(True):
        g = jax.grad(mlp_loss)(params, x, y)
        flat = np.asarray(g[leaf]).ravel()
        order = np.argsort(np.abs(flat))
        rng = np.random.default_rng(seed)
        picks = order[len(order) // 2: len(order) // 2 + 1] if which == "median" else order[-1:]
        if count > 1:
            picks = rng.choice(order[len(order) // 4:], count, replace=False)
        idx = [np.unravel_index(int(i), g[leaf].shape) for i in picks]
        bad = dict(g)
        for i in idx:
            bad[leaf] = bad[leaf].at[i].multiply(1 + rel)
        return bad, sorted(tuple(int(j) for j in i) for i in idx)


# -- sampled ---------------------------------------------------------------------
def test_sampled_covers_every_leaf_and_is_reproducible():
    params, x, y = make_mlp(30, 40)
    rep = jgc.check(mlp_loss, params, x, y, mode="sampled", samples=8, key=3)
    assert rep.ok and rep.mode == "sampled"
    checked = {lf.path: lf.checked for lf in rep.leaves}
    assert checked == {"['W1']": 8, "['b1']": 8, "['W2']": 8, "['b2']": 3}  # small b2: all of it
    assert any("not checked" in n for n in rep.notes)
    f = lambda w: jnp.sum(jnp.sin(w) ** 2)
    w = jnp.linspace(-2.0, 2.0, 200)
    idx = lambda key: jgc.check(f, w, mode="sampled", samples=6, key=key).leaves[0].indices.tolist()
    assert idx(jax.random.key(3)) == idx(jax.random.key(3)) != idx(jax.random.key(4))
    assert sampling.seed_from_key(7) == 7 and sampling.seed_from_key(jax.random.PRNGKey(7)) == sampling.seed_from_key(jax.random.PRNGKey(7))


def test_sampled_always_includes_the_largest_gradients():
    a = np.linspace(-1, 1, 1000)
    a[[17, 512, 900]] = [50.0, -60.0, 40.0]
    got = sampling.sample_elements(a, 12, np.random.default_rng(0))
    assert {17, 512, 900} <= set(got.tolist()) and got.size == 12
    # stratified: the rest spread over the whole index range
    rest = np.setdiff1d(got, [17, 512, 900])
    assert rest.min() < 200 and rest.max() > 800


def test_sampled_catches_a_wrong_bias_gradient_and_budget_splits():
    params, x, y = make_mlp(30, 40)
    with jax.enable_x64(True):
        g = jax.grad(mlp_loss)(params, x, y)
        bad = dict(g, b1=g["b1"] * 1.01)  # a wrong factor in a small leaf
    rep = jgc.check(mlp_loss, params, x, y, grad=bad, mode="sampled", budget=100)
    assert not rep.ok and [lf.path for lf in rep.failing()] == ["['b1']"]
    assert all(lf.checked >= 3 for lf in rep.leaves)
    assert rep.checked <= 60


# -- directional -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_directional_passes_correct_gradients(dtype):
    params, x, y = make_mlp(20, 25, dtype=dtype)
    rep = jgc.check(mlp_loss, params, x, y, mode="directional")
    assert rep.ok, rep
    assert rep.mode == "directional" and rep.checked == 0
    if dtype == jnp.float32:
        # A float32 gradient (as the program trains) is screened with its own rounding
        # allowed (screening.SCREEN_ROUNDING): a few percent at this size. Its float64
        # twin (analytic="reference") keeps the float64 power.
        assert all(lf.detectable_rel < 5e-2 for lf in rep.leaves)
        twin = jgc.check(mlp_loss, params, x, y, mode="directional", analytic="reference")
        assert twin.ok and all(lf.detectable_rel < 1e-4 for lf in twin.leaves)
    else:
        assert all(lf.detectable_rel < 1e-4 for lf in rep.leaves)
    if dtype == jnp.float64:
        assert jgc.check(jax.jit(mlp_loss), params, x, y, mode="directional", directions=4).ok


def test_directional_cost_does_not_grow_with_leaf_size():
    def f(w):
        return jnp.sum(jnp.sin(w) ** 2 * jnp.cos(w[::-1]))

    small = jgc.check(f, jnp.linspace(-1.0, 1.0, 10), mode="directional", directions=4)
    big = jgc.check(f, jnp.linspace(-1.0, 1.0, 20_000), mode="directional", directions=4)
    assert small.ok and big.ok
    # Set-up evaluations plus, for the leaf, 6k (a Richardson table per direction), 2k
    # more where the curvature along a direction calls for a shorter step, and 16 step
    # pilots: whatever its size.
    assert abs(small.evaluations - big.evaluations) <= 2 * 4
    assert _mode_evaluations(small) <= 8 * 4 + 16 and _mode_evaluations(big) <= 8 * 4 + 16


def _mode_evaluations(rep) -> int:
    """Evaluations the mode itself used (after set-up), from the report's note."""
    note = [n for n in rep.notes if n.startswith(rep.mode)][0]
    return int(note.split(" evaluations")[0].rsplit(" ", 1)[-1])


def _custom_vjp_with(grad_tree, f):
    """f with its reverse-mode rule replaced by a fixed (possibly wrong) gradient."""

    @jax.custom_vjp
    def g(p, x, y):
        return f(p, x, y)

    def fwd(p, x, y):
        return f(p, x, y), None

    def bwd(_, ct):
        return jax.tree_util.tree_map(lambda a: ct * a, grad_tree), None, None

    g.defvjp(fwd, bwd)
    return g


def test_directional_finds_what_check_grads_misses():
    # One element of 5,000 off by a relative 1e-3 in float64 (the target).
    params, x, y = make_mlp(50, 100, batch=32, seed=1)
    bad, where = corrupt(params, x, y, "W1", 1e-3)
    with jax.enable_x64(True):
        wrong = _custom_vjp_with(bad, mlp_loss)
        # jax.test_util.check_grads compares one random direction with tolerances
        # scaled by the whole array: it passes this wrong rule.
        jax.test_util.check_grads(lambda p: wrong(p, x, y), (params,), order=1, modes=("rev",))
    rep = jgc.check(wrong, params, x, y, mode="directional")
    assert not rep.ok
    lf = rep.leaf("['W1']")
    assert lf.status == "mismatch" and lf.elements("mismatch") == where and lf.worst_index == where[0]
    assert [f.path for f in rep.failing()] == ["['W1']"]
    # Screening 4 leaves (at most 8k = 64 each, and 16 step pilots), O(log m)
    # localisation (4-way splits, 16 per level), then the element is judged as in full
    # mode (2 + 6 evaluations): far below the 2m = 10,000 of full mode.
    levels = math.ceil(math.log(5000, 4))
    assert _mode_evaluations(rep) <= 4 * (64 + 16) + 16 * levels + 2 + 6


def test_directional_localises_several_elements_and_says_when_it_stops():
    params, x, y = make_mlp(20, 30, seed=2)
    bad, where = corrupt(params, x, y, "W1", 1e-2, count=2, seed=1)
    rep = jgc.check(mlp_loss, params, x, y, grad=bad, mode="directional")
    assert rep.leaf("['W1']").elements("mismatch") == where
    with jax.enable_x64(True):
        g = jax.grad(mlp_loss)(params, x, y)
        scaled = dict(g, W2=g["W2"] * (1 + 1e-3))  # an error in every element
    rep = jgc.check(mlp_loss, params, x, y, grad=scaled, mode="directional", locate=2)
    lf = rep.leaf("['W2']")
    assert not rep.ok and lf.status == "mismatch" and len(lf.elements("mismatch")) == 2
    assert any("more may remain" in n for n in rep.notes)


def test_directional_with_samples_and_complex_leaf():
    z = jnp.array([1.0 + 2.0j, -0.5 + 0.1j], jnp.complex64)
    w = jnp.linspace(-1.0, 1.0, 50)

    def f(p):
        return jnp.sum(jnp.abs(p["z"]) ** 2) + jnp.sum(jnp.sin(p["w"]) ** 2)

    rep = jgc.check(f, {"z": z, "w": w}, mode="directional", samples=5)
    assert rep.ok, rep
    assert rep.leaf("['z']").checked == 2 and rep.leaf("['w']").checked == 5
    assert any("complex leaf" in n for n in rep.notes)


# -- auto ----------------------------------------------------------------------------
def test_auto_is_full_within_budget_and_directional_beyond():
    params, x, y = make_mlp(20, 30, seed=3)
    bad, where = corrupt(params, x, y, "W1", 1e-3, seed=3)
    full = jgc.check(mlp_loss, params, x, y, grad=bad, mode="auto", budget=10_000)
    assert full.mode == "auto (full)" and full.checked == full.size
    assert full.leaf("['W1']").elements("mismatch") == where
    cheap = jgc.check(mlp_loss, params, x, y, grad=bad, mode="auto", budget=400, key=1)
    assert cheap.mode == "auto (directional+sampled)"
    assert 0 < cheap.checked < cheap.size and not cheap.ok
    assert cheap.leaf("['W1']").elements("mismatch") == where
    assert any("over budget=400" in n for n in cheap.notes)
    assert cheap.evaluations < full.evaluations


def test_mode_options_are_validated():
    params, x, y = make_mlp(3, 4)
    with pytest.raises(TypeError, match="unexpected options"):
        jgc.check(mlp_loss, params, x, y, mode="sampled", sample=3)
    with pytest.raises(ValueError, match="samples"):
        jgc.check(mlp_loss, params, x, y, mode="sampled", samples=0)
    with pytest.raises(ValueError, match="budget"):
        jgc.check(mlp_loss, params, x, y, mode="auto", budget=-1)
    with pytest.raises(TypeError, match="key"):
        jgc.check(mlp_loss, params, x, y, mode="sampled", key="seed")
