"""Numerical behaviour of the engine and the stencils: exactness and convergence order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
def test_quadratic_is_exact_up_to_roundoff(dtype):
    # Central differences of a quadratic have no truncation error at all.
    with jax.enable_x64(dtype == jnp.float64):
        A = jnp.asarray([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 4.0]], dtype)
        b = jnp.asarray([1.0, -2.0, 0.5], dtype)
        x = jnp.asarray([0.3, -1.2, 2.0], dtype)

        def f(x):
            return 0.5 * x @ A @ x - b @ x

        exact = np.asarray(A @ x - b, np.float64)
    g = jgc.numerical_grad(f, x)
    assert g.dtype == dtype
    # Evaluated in float64 (precision="auto"); the only error is round-off ≈ u|J|/h.
    np.testing.assert_allclose(np.asarray(g, np.float64), exact, rtol=2e-6 if dtype == jnp.float32 else 1e-9)


def _errors_at_steps(stencil, steps):
    with jax.enable_x64(True):
        x = jnp.asarray([0.7], jnp.float64)
        f = lambda x: jnp.sum(jnp.exp(jnp.sin(3 * x)))  # noqa: E731
        exact = float(jax.grad(f)(x)[0])
    errs = []
    for h in steps:
        g = jgc.numerical_grad(f, x, stencil=stencil, step=h)
        errs.append(abs(float(g[0]) - exact))
    return np.array(errs)


@pytest.mark.parametrize("stencil,order", [("central", 2), ("forward", 1), ("central4", 4)])
def test_convergence_order(stencil, order):
    # Steps large enough that truncation dominates round-off in float64.
    steps = np.array([4e-2, 2e-2, 1e-2]) if order < 4 else np.array([1.6e-1, 8e-2, 4e-2])
    errs = _errors_at_steps(stencil, steps)
    observed = np.log(errs[:-1] / errs[1:]) / np.log(2.0)
    assert np.all(np.abs(observed - order) < 0.25), observed


def test_complex_step_matches_grad_to_roundoff():
    with jax.enable_x64(True):
        x = jnp.asarray([0.7, -0.2, 1.5])
        f = lambda x: jnp.sum(jnp.exp(x) * jnp.sin(x) ** 2)  # noqa: E731
        exact = np.asarray(jax.grad(f)(x))
    g = jgc.numerical_grad(f, x, stencil="complex")
    np.testing.assert_allclose(np.asarray(g, np.float64), exact, rtol=1e-6)  # float32 output


def test_step_taken_is_representable_difference():
    from jgc._src.engine import actual_steps

    x0 = np.array([1.0, 1e8], np.float32)
    deltas = np.array([[1e-3, -1e-3], [1.0, -1.0]], np.float32)
    taken = actual_steps(x0, np.array([0, 1]), deltas)
    # 1e8 + 1 is not representable in float32: the step actually taken is 0 or 8.
    assert taken[1, 0] in (0.0, 8.0)
    assert taken[0, 0] == (np.float32(1.0) + np.float32(1e-3)) - np.float32(1.0)


def test_zero_parameter_gets_nonzero_step():
    g = jgc.numerical_grad(lambda p: jnp.sum(jnp.cos(p) + 2 * p), jnp.zeros(3))
    np.testing.assert_allclose(np.asarray(g), 2.0, rtol=1e-6)


def test_noise_estimate_sees_lower_internal_precision():
    # Float64 parameters, but the cost rounds to float32 inside: the measured noise must
    # reflect float32, and a correct gradient must not be called a mismatch.
    with jax.enable_x64(True):
        w = jnp.asarray(np.random.default_rng(0).normal(size=50))

        def f(w):
            y = jnp.tanh(w.astype(jnp.float32) * 1.3)
            return jnp.sum(y**2).astype(jnp.float64)

    rep = jgc.check(f, w)
    assert rep.ok, rep
    assert rep.noise > 1e3 * np.finfo(np.float64).eps * abs(rep.cost)


def _lines_of(fun, noise_level, seed=0):
    """A fake probe: J along 7 lines is fun(t) plus independent noise of the given σ."""
    from jgc._src import noise

    rng = np.random.default_rng(seed)
    phases = rng.uniform(0, 2 * np.pi, size=(noise.LINES, 1))
    return lambda t: fun(np.asarray(t)[None, :], phases) + noise_level * rng.normal(
        size=(noise.LINES, np.asarray(t).size))


def test_noise_probe_is_not_fooled_by_a_short_wave():
    # cos(ω t) with ω·spacing ≈ 3 looks like noise of σ ≈ 1 at the default spacing;
    # the finer probes must find the true noise, 1e-6, and say at which spacing.
    from jgc._src import noise

    u = 6e-8
    omega = 3.0 / noise.spacing(u)
    sigma, values, kept = noise.measure(
        _lines_of(lambda t, ph: 2.0 + np.cos(omega * t + ph), 1e-6), u)
    assert 0.3e-6 < sigma < 3e-6
    assert kept < noise.spacing(u)
    assert values.shape == (noise.LINES, noise.POINTS)


def test_noise_probe_keeps_white_noise_at_the_default_spacing():
    from jgc._src import noise

    u = 6e-8
    sigma, _, kept = noise.measure(_lines_of(lambda t, ph: 1.0 + 0.0 * t + 0.0 * ph, 1e-4), u)
    assert 0.3e-4 < sigma < 3e-4
    assert kept == noise.spacing(u)


@pytest.mark.parametrize("guard", [True, False])
def test_noise_probe_does_not_trust_a_staircase(monkeypatch, guard):
    # The cost rounds its input to a quantum q (a lower precision inside) and J jumps
    # pseudo-randomly from one quantum to the next. Along a line of the default probe
    # (9 spacings = 3 quanta) that is noise; finer probes sit inside one quantum, where runs of identical values
    # make σ look tiny. Without the staircase guard the probe would believe them.
    from jgc._src import noise

    if not guard:
        monkeypatch.setattr(noise, "STAIRCASE", 2.0)
    u = 6e-8
    q = 3 * noise.spacing(u)
    rng = np.random.default_rng(1)
    table = rng.normal(size=100_000)
    offsets = rng.integers(0, 50_000, size=(noise.LINES, 1))

    def lines(t):
        cell = np.floor(np.asarray(t)[None, :] / q).astype(np.int64) + offsets
        return 1.0 + 1e-3 * table[cell]

    sigma, _, kept = noise.measure(lines, u)
    if guard:
        assert kept == noise.spacing(u) and sigma > 1e-4
    else:
        assert kept < noise.spacing(u)


def test_fast_oscillation_is_not_a_false_alarm_in_native_float32():
    # cos(w⁹) at w ≈ -1.66: period ≈ 0.012 in w, shorter than the default step.
    p = {"w": jnp.asarray([-1.6574033], jnp.float32)}
    f = lambda p: jnp.sum(jnp.cos((p["w"] ** 3) ** 3))
    rep = jgc.check(f, p, precision="native")
    assert rep.ok, rep
    # J is ~150× noisier than float32 here (cos of an argument near 94), so the check
    # resolves about 1% (its detect column); a 5% error must be caught.
    g = jax.grad(f)(p)
    bad = jgc.check(f, p, grad={"w": g["w"] * 1.05}, precision="native")
    assert not bad.ok, bad


def test_vector_steps_stop_growing_where_the_measured_noise_is_large():
    # Noise of 1% of |y| that JAX does not differentiate (stop_gradient of a fast wave
    # that no finer probe resolves): steps sized for it would reach (3e-2)^(1/3) ≈ 0.31·s;
    # as in jgc.check, they stop at the float16-sized 0.14·s and the error bars take the rest.
    from jgc._src import policy

    def f(x):
        return jnp.tanh(x) * (1.0 + jax.lax.stop_gradient(1e-2 * jnp.sin(1e9 * x)))

    with jax.enable_x64(True):
        rep = jgc.check_jacobian(f, jnp.array([0.4, -1.1, 0.7]))
    assert rep.ok and any("noisier than its dtype" in n for n in rep.notes), rep
    assert rep.step <= (3 * policy.MAX_U_EFF) ** (1 / 3) * (1 + 1e-12)
