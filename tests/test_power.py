"""What a check says it could catch (`detect`), held to what it catches; imprecise derivatives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc


def _problem(n, dtype, seed=0):
    """sum(sin(w)·c) + ½‖w‖²: smooth, with |g| spread over [0, 3]."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n).astype(dtype)
    c = rng.uniform(0.5, 1.5, size=n).astype(dtype)

    def f(w, c):
        return jnp.sum(jnp.sin(w) * c) + 0.5 * jnp.sum(w * w)

    g = (np.cos(w.astype(np.float64)) * c + w).astype(dtype)
    return f, w, c, g


def _typical_and_largest(g):
    mag = np.abs(g)
    order = np.argsort(mag, kind="stable")
    return int(order[(order.size - 1) // 2]), int(order[-1])


def _with_error(g, i, rel):
    bad = g.copy()
    bad[i] = bad[i] * (1 + rel)
    return bad


@pytest.mark.parametrize("mode", ["full", "directional"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_detect_is_what_the_check_catches(mode, dtype):
    # For the typical (median |g|) and the largest element: an error 1.5x the stated
    # power is caught and located; one a tenth of it passes.
    f, w, c, g = _problem(3000, dtype)
    clean = jgc.check(f, w, c, grad=g, mode=mode)
    assert clean.ok, clean
    lf = clean.leaves[0]
    typical, largest = _typical_and_largest(g)
    for i, stated in ((typical, lf.detectable_rel), (largest, lf.detectable_rel_largest)):
        assert 0 < stated < 1, (i, stated)
        above = jgc.check(f, w, c, grad=_with_error(g, i, 1.5 * stated), mode=mode)
        assert not above.ok and above.leaves[0].elements("mismatch") == [(i,)], (i, stated, above)
        below = jgc.check(f, w, c, grad=_with_error(g, i, 0.1 * stated), mode=mode)
        assert below.ok, (i, stated, below)
    # The typical element is harder to catch an error in than the largest.
    assert lf.detectable_rel > lf.detectable_rel_largest
    assert clean.to_dict()["leaves"][0]["detectable_rel_largest"] == lf.detectable_rel_largest


def test_directional_power_is_close_to_full_mode():
    # Every test moves all 2·10⁴ coordinates; its step is sized along its direction,
    # so a typical element's power stays within 10x of checking it on its own.
    f, w, c, g = _problem(20_000, np.float64, seed=1)
    full = jgc.check(f, w, c, grad=g).leaves[0].detectable_rel
    directional = jgc.check(f, w, c, grad=g, mode="directional").leaves[0].detectable_rel
    assert directional < 10 * full, (directional, full)


def test_sampled_states_no_power_over_elements_it_did_not_check():
    f, w, c, g = _problem(500, np.float64)
    rep = jgc.check(f, w, c, grad=g, mode="sampled", samples=20)
    lf = rep.leaves[0]
    assert lf.detectable_rel == np.inf and np.isfinite(lf.detectable_rel_largest)
    assert "inf" in str(rep).splitlines()[3]
    everything = jgc.check(f, w[:10], c[:10], grad=g[:10], mode="sampled", samples=20)
    assert np.isfinite(everything.leaves[0].detectable_rel)


@pytest.mark.slow
def test_directional_finds_one_element_in_a_million():
    # The cost is about 5·10⁵; one element with |g| ≈ 0.5 is off by a relative 1e-3.
    f, w, c, g = _problem(10**6, np.float64)
    i = int(np.flatnonzero(np.abs(np.abs(g) - 0.5) < 0.01)[0])
    rep = jgc.check(f, w, c, grad=_with_error(g, i, 1e-3), mode="directional")
    assert not rep.ok and rep.leaves[0].elements("mismatch") == [(i,)]
    assert jgc.check(f, w, c, grad=g, mode="directional").ok


# -- tail derivatives ------------------------------------------------------------------
def _accurate(fn, deriv):
    """fn with a derivative rule written in terms of the input."""

    @jax.custom_jvp
    def h(x):
        return fn(x)

    h.defjvp(lambda p, t: (fn(p[0]), deriv(p[0]) * t[0]))
    return h


def _sigmoid_deriv(x):
    e = jnp.exp(-jnp.abs(x))
    return e / (1 + e) ** 2


TAILS = {
    # name: (function as JAX writes its derivative, correct rule, tail point f32, f64)
    "logistic": (jax.nn.sigmoid, _accurate(jax.nn.sigmoid, _sigmoid_deriv), 20.0, 40.0),
    "tanh": (jnp.tanh, _accurate(jnp.tanh, lambda x: 1 / jnp.cosh(x) ** 2), 10.0, 20.0),
    "expm1": (jnp.expm1, _accurate(jnp.expm1, jnp.exp), -20.0, -40.0),
}


def _tail_case(name, dtype, correct):
    jax_fn, good_fn, x32, x64 = TAILS[name]
    fn = good_fn if correct else jax_fn
    x = x32 if dtype == np.float32 else x64
    w = np.array([0.3, -1.0, 0.7, x], dtype)

    def cost(w):
        return jnp.sum(fn(w))

    with jax.enable_x64(dtype == np.float64):
        g = np.asarray(jax.grad(cost)(jnp.asarray(w)))  # in the parameters' own dtype
    return cost, w, g


@pytest.mark.parametrize("name", sorted(TAILS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_tail_derivatives_rounded_away_are_imprecise(name, dtype):
    cost, w, g = _tail_case(name, dtype, correct=False)
    assert g[3] == 0  # the rule, written in terms of its output, rounds to 0 there
    rep = jgc.check(cost, w, grad=g)
    lf = rep.leaves[0]
    if name == "expm1" and dtype == np.float64:
        # Below central differences' resolution only the complex step can see it, and
        # XLA's complex expm1 forms e^x as expm1(x) + 1 too (Im expm1(-40 + ih) = 0): the
        # reference loses the same digits, so nothing is claimed either way.
        assert rep.ok and lf.status == "ok" and float(lf.numeric[3]) == 0.0, str(rep)
        return
    assert rep.ok and lf.status == "imprecise" and lf.elements("imprecise") == [(3,)], str(rep)
    true = {"logistic": _sigmoid_deriv, "tanh": lambda x: 1 / np.cosh(x) ** 2, "expm1": np.exp}[name]
    ref = float(lf.numeric[list(lf.indices).index(3)])
    assert ref == pytest.approx(float(true(np.float64(w[3]))), rel=1e-3)
    text = str(rep)
    assert "1 imprecise" in text.splitlines()[0]
    assert f"imprecise <root>[3]: analytic 0 vs reference {ref:.3g}" in text
    strict = jgc.check(cost, w, grad=g, strict=True)
    assert not strict.ok and strict.failing()[0].status == "imprecise"


@pytest.mark.parametrize("name", sorted(TAILS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_tail_derivatives_written_correctly_are_ok(name, dtype):
    cost, w, g = _tail_case(name, dtype, correct=True)
    assert g[3] != 0
    rep = jgc.check(cost, w, grad=g, strict=True)
    assert rep.ok and rep.leaves[0].status == "ok", str(rep)


def test_complex_step_falls_back_quietly_when_the_cost_is_not_complex_safe():
    # abs() drops the imaginary part: the complex step disagrees with the resolved
    # elements, so the float64 tail element stays unjudged by it, without an error.
    def cost(w):
        return jnp.sum(jax.nn.sigmoid(w)) + jnp.sum(jnp.abs(w))

    w = np.array([0.3, -1.0, 0.7, 40.0])
    with jax.enable_x64(True):
        g = np.asarray(jax.grad(cost)(jnp.asarray(w)))
    rep = jgc.check(cost, w, grad=g, strict=True)
    assert rep.ok and rep.leaves[0].counts["imprecise"] == 0, rep


def test_tiny_correct_elements_are_not_imprecise():
    # Elements 1e-15 of the leaf's largest, computed to full relative precision.
    c = np.logspace(-15, 0, 16)
    w = np.linspace(0.5, 2.0, 16)

    def cost(w):
        return 0.5 * jnp.sum(c * w * w)

    for dtype in (np.float32, np.float64):
        rep = jgc.check(cost, w.astype(dtype), grad=(c * w).astype(dtype), strict=True)
        assert rep.ok and rep.leaves[0].counts["imprecise"] == 0, rep
