"""Kinks are not noise: a piecewise-linear cost (relu, abs, max) must not be read as a noisy one.

The noise probe sizes every step. Read as rounding noise, the slope changes of a ReLU
network's hidden units crossed by the probe lines made σ ~1e4 times too large, the steps
~500 times too long, and central differences straddling a unit's switch point then
disagreed with a correct gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src import noise, stencils

U64 = float(np.finfo(np.float64).eps) / 2


def _kinked_lines(noise_level, seed=0):
    """A fake probe: J along 7 lines, linear plus noise of σ = noise_level, and on most
    lines the slope change of a unit switching within the first 1e-6 of θ (at every probe
    spacing it lies in the first interval), one line crossing kinks all along, as the
    probe of a ReLU network sees them."""
    rng = np.random.default_rng(seed)
    slopes = rng.normal(size=(noise.LINES, 1)) * 0.05
    near = np.where(np.arange(noise.LINES)[:, None] >= 2, rng.uniform(1e-7, 1e-6, size=(noise.LINES, 1)), np.inf)
    jumps = rng.choice([-1.0, 1.0], size=(noise.LINES, 1)) * rng.uniform(1e-3, 1e-2, size=(noise.LINES, 1))
    dense = np.sort(rng.uniform(0.0, 9e-5, size=40))  # line 1: a kink every ~2e-6
    dense_slopes = rng.normal(size=dense.size) * 1e-2

    def lines(t):
        t = np.asarray(t, np.float64)[None, :]
        j = 2.3 + slopes * t + jumps * np.maximum(t - near, 0.0)
        j[1] += np.sum(dense_slopes[:, None] * np.maximum(t - dense[:, None], 0.0), axis=0)
        return j + noise_level * rng.normal(size=(noise.LINES, t.size))

    return lines


def test_kinks_are_not_read_as_noise():
    sigma_true = 3e-16
    sigma, _, kept = noise.measure(_kinked_lines(sigma_true), U64)
    # A kink at 5e-7 with a slope change of 5e-3 moves J by ~2.5e-9 ≈ 1e7·σ: read as
    # noise it would dominate the estimate. The median of the differences sees σ.
    assert 0.3 * sigma_true < sigma < 3 * sigma_true, sigma
    assert kept == noise.spacing(U64)
    first = _kinked_lines(sigma_true)(np.arange(noise.POINTS) * noise.spacing(U64))
    assert noise.kinked(first)


@pytest.mark.parametrize("sigma_true", [1e-10, 1e-4])
def test_noisy_smooth_cost_keeps_its_noise(sigma_true):
    # Rounding noise leaves every difference of the same size: no kink, σ as measured.
    rng = np.random.default_rng(3)
    phases = rng.uniform(0, 2 * np.pi, size=(noise.LINES, 1))

    def lines(t):
        t = np.asarray(t, np.float64)[None, :]
        return 2.0 + np.sin(3.0 * t + phases) + sigma_true * rng.normal(size=(noise.LINES, t.size))

    sigma, _, kept = noise.measure(lines, U64)
    assert 0.3 * sigma_true < sigma < 3 * sigma_true, sigma  # the probe is good to a factor ~2
    assert kept == noise.spacing(U64)
    assert not noise.kinked(lines(np.arange(noise.POINTS) * noise.spacing(U64)))


def test_per_output_noise_ignores_a_kink_on_the_line():
    # The vector side: one line per output; output 0 crosses a kink next to θ (within
    # the first spacing, where the switch points closest to θ lie) and one near the end
    # of the line, output 1 is smooth and noisy. Output 0's σ is its rounding, not its
    # slope changes. (A kink in the middle of the line spoils 7 of an output's 10
    # differences and stays in its σ: one line per output has no median over lines.)
    rng = np.random.default_rng(5)
    h = noise.spacing(U64)
    t = np.arange(16) * h
    kinked = (1.0 + 0.1 * t + 1e-2 * np.maximum(t - 0.4 * h, 0.0) - 3e-2 * np.maximum(t - 14.5 * h, 0.0)
              + 1e-16 * rng.normal(size=t.size))
    noisy = 1.0 + 0.1 * t + 1e-9 * rng.normal(size=t.size)
    sigma, _ = noise.per_output(np.stack([kinked, noisy], axis=1), np.array([1.0, 1.0]), U64)
    assert sigma[0] < 1e-15, sigma
    assert 3e-10 < sigma[1] < 3e-9, sigma


def _relu_mlp():
    """The reproducer: an Equinox ReLU MLP's cross-entropy, with its params and data."""
    eqx = pytest.importorskip("equinox", reason="the reproducer is an Equinox MLP")
    x = jax.random.normal(jax.random.key(0), (128, 32))
    lab = jax.random.randint(jax.random.key(4), (128,), 0, 10)
    mlp = eqx.nn.MLP(32, 10, 64, 2, key=jax.random.key(3))

    def loss(m, x, lab):
        return -jnp.mean(jax.nn.log_softmax(jax.vmap(m)(x))[jnp.arange(128), lab])

    return loss, mlp, x, lab


def test_equinox_relu_mlp_is_not_a_false_alarm():
    loss, mlp, x, lab = _relu_mlp()
    eqx = pytest.importorskip("equinox")

    rep = jgc.check(loss, mlp, x, lab)
    assert rep.ok, rep
    assert rep.counts().get("mismatch", 0) == 0, rep
    # The gradient is correct, and the check still has its power: one element of the
    # first layer off by 1% is caught.
    def wrong(m, x, lab):
        g = eqx.filter_grad(loss)(m, x, lab)
        return eqx.tree_at(lambda t: t.layers[0].weight, g, g.layers[0].weight.at[5, 7].multiply(1.01))

    caught = jgc.check(loss, mlp, x, lab, grad=wrong)
    assert not caught.ok, caught


def _one_sided(fwd, bwd):
    """One-sided slopes at h, 2h, 4h in the layout of stencils.Estimate.onesided."""
    return np.array([[fwd[0], bwd[0], fwd[1], bwd[1], fwd[2], bwd[2]]])


def test_a_kink_under_float32_noise_is_read_at_the_widest_step():
    # A switch point at θ: the one-sided slopes are -3.3 and -1.1 at every step (a gap
    # of 2.2, 36× the noise 0.06 of the slopes at h, under the 40× asked at h, but 146×
    # the noise of those at 4h). A smooth point with the same gap at h has it doubled at
    # 2h and 4× at 4h: not a kink. A wrong analytic value beside the kink stays out.
    noise, table = np.array([0.06]), np.array([[-2.2, -2.2, -2.2]])
    kinked = _one_sided([-3.3, -3.3, -3.3], [-1.1, -1.1, -1.1])
    smooth = _one_sided([-3.3, -4.4, -6.6], [-1.1, 0.0, 2.2])
    tol = np.array([1e-6])
    assert stencils.kink(kinked, table, noise, np.array([-3.3]), tol)[0]
    assert not stencils.kink(smooth, table, noise, np.array([-3.3]), tol)[0]
    assert not stencils.kink(kinked, table, noise, np.array([-6.0]), tol)[0]  # beyond the span + 40·noise
    # Under 20× its noise at h, the gap is too close to the noise to call (at 4h as well).
    assert not stencils.kink(_one_sided([-2.6, -2.6, -2.6], [-1.7, -1.7, -1.7]), np.array([[-2.15] * 3]),
                             noise, np.array([-2.6]), tol)[0]


@pytest.mark.slow  # two float32 checks of 6922 elements: ~30 s on 2 busy cores
def test_equinox_relu_mlp_at_float32_is_not_a_false_alarm():
    # precision="native": float32 differences with σ ≈ 5e-7 take steps of 0.037·s; a unit
    # of the second layer switches within ±h of .layers[1].weight[13, 48], whose one-sided
    # slopes (-0.0033 against -0.0011) stand only 36× above their noise at h.
    loss, mlp, x, lab = _relu_mlp()
    eqx = pytest.importorskip("equinox")

    rep = jgc.check(loss, mlp, x, lab, precision="native")
    assert rep.ok and rep.counts()["mismatch"] == 0, rep
    assert rep.leaf(".layers[1].weight").elements("non-smooth") == [(13, 48)], rep
    # Float32 differences see 2.3 % at best here (the detect figure of .layers[2].bias's
    # largest element): an error of 5 % there is caught and located.
    best = rep.leaf(".layers[2].bias")
    assert best.detectable_rel_largest < 0.05, best.detectable_rel_largest

    def wrong(m, x, lab):
        g = eqx.filter_grad(loss)(m, x, lab)
        return eqx.tree_at(lambda t: t.layers[2].bias, g, g.layers[2].bias.at[8].multiply(1.05))

    caught = jgc.check(loss, mlp, x, lab, grad=wrong, precision="native")
    assert not caught.ok, caught
    assert [lf.path for lf in caught.failing()] == [".layers[2].bias"], caught
    assert caught.leaf(".layers[2].bias").elements("mismatch") == [(8,)], caught
