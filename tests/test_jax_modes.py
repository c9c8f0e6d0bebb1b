"""Every scalar front door under JAX's modes: strict promotion, x64, debug_nans/infs, transfer guards.

Each mode is entered around the call only, as a user would; the checks below also
make sure jgc leaves every flag as it found it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc import testing
from jgc._src.compat import TypePromotionError


# -- costs ------------------------------------------------------------------------
def mlp(p, x):
    """float32 params times float32 data: fine under strict promotion, unless widened alone."""
    return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)


def root(p):
    """sqrt(p − 1): NaN wherever a perturbation steps below 1 (the first element sits at 1 + 2e-6)."""
    return jnp.sum(jnp.sqrt(p - 1.0))


def barrier(p):
    """A log barrier: +inf wherever a perturbation steps below 1."""
    return -jnp.sum(jnp.log(jnp.maximum(p - 1.0, 0.0)))


MLP_PARAMS = {"w": jnp.asarray([[0.3, -0.7], [1.1, 0.4], [-0.2, 0.9]], jnp.float32),
              "b": jnp.asarray([0.1, -0.3], jnp.float32)}
MLP_DATA = (jnp.asarray([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], jnp.float32),)
NEAR_ONE = jnp.asarray([1.0 + 2e-6, 1.5], jnp.float32)


@jax.custom_jvp
def _scaled_tanh(z):
    return jnp.tanh(z)


@_scaled_tanh.defjvp
def _scaled_tanh_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    # Planted bug: the derivative of tanh is 1 − tanh², not 1.5·(1 − tanh²).
    return jnp.tanh(z), 1.5 * (1.0 - jnp.tanh(z) ** 2) * dz


def wrong_mlp(p, x):
    return jnp.sum(_scaled_tanh(x @ p["w"] + p["b"]) ** 2)


# -- front doors ------------------------------------------------------------------
def _wrapped_step(fn, params, *args):
    step = jgc.with_grad_check(lambda p, state, *batch: p, fn)
    step(params, None, *args)
    return step.reports[0][1]


DOORS = {
    **{f"check-{s}": functools.partial(jgc.check, stencil=s)
       for s in ("central", "forward", "central4", "richardson", "complex")},
    **{f"check-{m}": functools.partial(jgc.check, mode=m) for m in ("sampled", "directional", "auto")},
    "numerical_grad": jgc.numerical_grad,
    "assert_grads_close": jgc.assert_grads_close,
    "check_taylor": jgc.check_taylor,
    "testing": testing.assert_grads_close,
    "with_grad_check": _wrapped_step,
}
# A short subset run on the oldest supported JAX as well (pytest -m smoke).
SMOKE_DOORS = ("check-central", "check-complex", "check-directional", "numerical_grad", "check_taylor")


def _flags():
    c = jax.config
    return (c.jax_numpy_dtype_promotion, c.jax_enable_x64, c.jax_debug_nans, c.jax_debug_infs,
            c.jax_transfer_guard_host_to_device, c.jax_transfer_guard_device_to_host)


@pytest.fixture
def x64_on():
    """x64 switched on globally, as a user's script does, and switched off again after."""
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def _outcome(result):
    """What a door decided: the verdict, or the numerical gradient itself."""
    if isinstance(result, dict):
        return {k: np.asarray(jax.device_get(v)) for k, v in result.items()}
    if isinstance(result, jax.Array):
        return np.asarray(jax.device_get(result))
    if isinstance(result, jgc.TaylorReport):
        return result.ok, round(result.order, 6)
    return result.ok, tuple((lf.path, lf.status, lf.checked) for lf in result.leaves)


def _params(door, mode):
    marks = [pytest.mark.smoke] if door in SMOKE_DOORS and mode in ("strict", "transfer_guard") else []
    return pytest.param(door, mode, id=f"{door}-{mode}", marks=marks)


MODES = ("strict", "strict-x64", "debug_nans", "debug_infs", "transfer_guard")


@pytest.mark.parametrize("door, mode", [_params(d, m) for m in MODES for d in DOORS])
def test_front_door_works_under_mode(door, mode, request):
    run = DOORS[door]
    if mode in ("strict", "strict-x64", "transfer_guard"):
        if mode == "strict-x64":
            request.getfixturevalue("x64_on")
        ctx = jax.transfer_guard("disallow") if mode == "transfer_guard" else jax.numpy_dtype_promotion("strict")
        before = _flags()
        with ctx:
            inside = _flags()
            got = run(mlp, MLP_PARAMS, *MLP_DATA)
            assert _flags() == inside
        assert _flags() == before
        if door == "numerical_grad":
            want = jax.grad(mlp)(MLP_PARAMS, *MLP_DATA)
            for k in want:
                np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=2e-3, atol=1e-5)
        else:
            assert got.ok, str(got)
        return
    # debug_nans / debug_infs: the noise probe and the steps cross the point where J
    # stops being finite. The outcome must be the one without the flag, not an error.
    fn = root if mode == "debug_nans" else barrier
    flag = jax.debug_nans if mode == "debug_nans" else jax.debug_infs
    want = _outcome(run(fn, NEAR_ONE))
    with flag(True):
        inside = _flags()
        got = _outcome(run(fn, NEAR_ONE))
        assert _flags() == inside
    if isinstance(want, (dict, np.ndarray)):
        np.testing.assert_array_equal(got, want)
    else:
        assert got == want


@pytest.mark.parametrize("door", [pytest.param(d, marks=[pytest.mark.smoke] if d in SMOKE_DOORS else [])
                                  for d in DOORS if d != "numerical_grad"])
def test_planted_wrong_gradient_is_caught_under_strict_promotion(door):
    run = DOORS[door]
    with jax.numpy_dtype_promotion("strict"):
        if door in ("assert_grads_close", "testing", "with_grad_check"):
            with pytest.raises(jgc.GradCheckError) as info:
                run(wrong_mlp, MLP_PARAMS, *MLP_DATA)
            rep = info.value.report
        else:
            rep = run(wrong_mlp, MLP_PARAMS, *MLP_DATA)
    assert not rep.ok
    if door != "check_taylor":
        assert {lf.path for lf in rep.leaves if lf.status == "mismatch"} == {"['w']", "['b']"}


@pytest.mark.smoke
def test_non_finite_perturbed_points_are_reported_under_debug_flags():
    # A fixed step of 1e-3·s steps past 1 for the first element: J is NaN (sqrt) or
    # +inf (barrier) there, and the element is non-finite, flag or not.
    for fn, flag in ((root, jax.debug_nans), (barrier, jax.debug_infs)):
        plain = jgc.check(fn, NEAR_ONE, step=1e-3)
        with flag(True):
            flagged = jgc.check(fn, NEAR_ONE, step=1e-3)
            assert flag.value
        assert plain.leaves[0].elements("non-finite") == [(0,)]
        assert flagged.leaves[0].elements("non-finite") == [(0,)]
        assert flagged.leaves[0].counts == plain.leaves[0].counts


def test_non_finite_at_the_point_itself_is_the_users_to_see():
    # J(θ) = NaN: the check's own clear error, as without the flag.
    with jax.debug_nans(True), pytest.raises(ValueError, match="finite cost"):
        jgc.check(lambda p: jnp.sum(jnp.sqrt(p)), jnp.asarray([-1.0, 1.0]))
    # J(θ) finite, but jax.grad is inf at θ: the user asked JAX to stop there.
    with jax.debug_infs(True), pytest.raises(FloatingPointError):
        jgc.check(lambda p: jnp.sum(jnp.sqrt(p)), jnp.asarray([0.0, 1.0]))


def fixed_dtype(p):
    """A float32 constant of fn's own: float64 parameters cannot meet it under strict promotion."""
    return jnp.sum(jnp.tanh(p["w"] * jnp.full((3, 2), 0.5, jnp.float32)) ** 2) + jnp.sum(p["b"] ** 2)


@pytest.mark.smoke
def test_strict_promotion_falls_back_to_native_precision_when_fn_fixes_its_dtypes():
    with jax.numpy_dtype_promotion("strict"):
        rep = jgc.check(fixed_dtype, MLP_PARAMS)
        # Nothing float32 inside fn to mix with: the check still widens to float64.
        wide = jgc.check(lambda p: jnp.sum(jnp.sin(p["w"]) * p["b"][0]), MLP_PARAMS)
    assert rep.ok and rep.precision == "native (float32)"
    assert any("strict dtype promotion" in n for n in rep.notes)
    assert wide.ok and wide.precision == "float64"
    # An explicit precision="float64" is kept: fn's own promotion error surfaces.
    with jax.numpy_dtype_promotion("strict"), pytest.raises(TypePromotionError):
        jgc.check(fixed_dtype, MLP_PARAMS, precision="float64")


def test_a_cost_that_fixes_its_float16_dtype_is_checked_at_float16():
    # lax.concatenate refuses to mix fn's float16 constant with float32 or float64
    # parameters, in any promotion mode: the check runs at float16, with a note.
    x = jnp.asarray([[0.3, -1.2, 0.8], [1.5, 0.1, -0.4]], jnp.float16)

    def cost(x):
        return jnp.sum(jnp.sin(jax.lax.concatenate([x, jnp.ones((1, 3), jnp.float16)], 0)) ** 2)

    rep = jgc.check(cost, x)
    assert rep.ok and rep.precision == "native (float16)"
    assert any("refused its inputs at float64" in n for n in rep.notes), rep.notes


def test_plot_step_curve_under_modes():
    pytest.importorskip("matplotlib")
    from jgc._src.plot import step_curve

    with jax.numpy_dtype_promotion("strict"), jax.transfer_guard("disallow"), jax.debug_nans(True):
        curve = step_curve(root, NEAR_ONE, path="<root>", index=0)
    # Steps past 1 give NaN differences; the small ones recover 1 / (2·sqrt(2e-6)).
    assert np.isnan(curve.numeric["float64"]).any()
    small = curve.numeric["float64"][curve.steps < 1e-7]
    np.testing.assert_allclose(small[np.isfinite(small)][-5:], 0.5 / np.sqrt(float(NEAR_ONE[0]) - 1.0), rtol=1e-3)


def wrong_mlp_with_a_float32_constant(p, x):
    """wrong_mlp with a float32 constant of its own (as Flax's LayerNorm has): float64
    params and data meet it, which strict promotion refuses."""
    return jnp.sum(_scaled_tanh(x @ p["w"] + p["b"] * jnp.float32(1.0)) ** 2)


def test_check_rules_under_strict_promotion_checks_code_with_float32_constants_as_given():
    with jax.numpy_dtype_promotion("strict"):
        rep = jgc.check_rules(wrong_mlp_with_a_float32_constant, MLP_PARAMS, *MLP_DATA)
    assert [r.name for r in rep.failing()] == ["_scaled_tanh"], str(rep)
    assert any("strict dtype promotion: checked at the dtypes given (float32)" in n for n in rep.notes), rep.notes


# A custom_jvp with a non-differentiable argument that its own rule passes by keyword, as
# jax.scipy.special.log_ndtr does: under jax_enable_checks, JAX asserts while tracing
# (jit, eval_shape, vmap) its VJP, though the same VJP runs eagerly, where JAX's own
# check_grads evaluates it.
def _keyword_rule_function(factor):
    @functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
    def softplus_k(x, k=3):
        return jnp.logaddexp(x, 0.0) * k

    @softplus_k.defjvp
    def rule(k, primals, tangents):
        (x,), (t,) = primals, tangents
        return softplus_k(x, k=k), jax.nn.sigmoid(x) * k * factor * t

    return softplus_k


@pytest.mark.parametrize("order", [1, 2])
def test_check_grads_under_jax_internal_checks_where_tracing_asserts(order):
    from jax._src import config
    f = _keyword_rule_function(1.0)
    x = jnp.array([-3.0, 0.5, 2.0], jnp.float32)
    with config.enable_checks(True):
        with pytest.raises(AssertionError):  # the JAX behaviour this test is about
            jax.jit(lambda v: jax.vjp(f, v)[1](jnp.ones(3)))(x)
        rep = jgc.check_grads(f, (x,), order)
        assert jax.config.jax_enable_checks  # the user's flag, as it was
    assert rep.ok
    # Said in the report: rows computed one at a time, or traced with the checks off.
    assert any("one tangent at a time" in n or "jax_enable_checks" in n for n in rep.notes), rep.notes


def test_check_grads_under_jax_internal_checks_still_catches_a_wrong_rule():
    from jax._src import config
    f = _keyword_rule_function(1.01)
    x = jnp.array([-3.0, 0.5, 2.0], jnp.float32)
    with config.enable_checks(True):
        with pytest.raises(jgc.GradCheckError):
            jgc.check_grads(f, (x,), 1)


def test_log_ndtr_under_jax_internal_checks():
    from jax._src import config
    x = jnp.array([-3.0, 0.5, 2.0], jnp.float32)
    with config.enable_checks(True):
        rep = jgc.check_grads(jax.scipy.special.log_ndtr, (x,), 2, modes=["rev"])
    assert rep.ok
