"""jgc.check_grads as a drop-in for jax.test_util.check_grads.

An op suite written the way JAX's own op tests call ``check_grads`` (elementwise,
reductions, linear algebra, control flow; float32 and float64) must pass with no false
alarm, and wrong rules planted into ops must raise ``jgc.GradCheckError``.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import jax.scipy.special as jss
import numpy as np
import pytest
from jax.test_util import check_grads as jax_check_grads

import jgc

RNG = np.random.default_rng(0)


def _spd(n):
    m = RNG.standard_normal((n, n))
    return m @ m.T + n * np.eye(n)


def _while_pow(x):
    # A while_loop with a trip count that depends on nothing differentiable (JVP only
    # is defined for while_loop; reverse mode is not).
    def body(c):
        i, y = c
        return i + 1, y * jnp.cos(x) + x

    return jax.lax.while_loop(lambda c: c[0] < 4, body, (0, x))[1]


def _scan_rnn(h0, w):
    def step(h, xs):
        h = jnp.tanh(w @ h + xs)
        return h, h

    xs = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    hT, hs = jax.lax.scan(step, h0, xs)
    return hT + 0.1 * hs.sum(0)


def _cond(x, y):
    return jax.lax.cond(jnp.sum(x) > 0, lambda a, b: jnp.sin(a) * b, lambda a, b: a**2 - b, x, y)


# (name, f, args builder, order): the args are away from kinks and branch switches.
OPS = [
    ("sin", jnp.sin, lambda: (RNG.uniform(-2, 2, (3, 2)),), 2),
    ("exp_log1p", lambda x: jnp.exp(x) * jnp.log1p(x**2), lambda: (RNG.uniform(-1, 1, 4),), 1),
    ("tanh_logistic", lambda x: jnp.tanh(x) + jax.nn.sigmoid(2 * x), lambda: (RNG.uniform(-2, 2, 5),), 1),
    ("sqrt_pow", lambda x, y: jnp.sqrt(x) ** y, lambda: (RNG.uniform(0.5, 2, 3), RNG.uniform(0.5, 2, 3)), 1),
    ("arctan2", jnp.arctan2, lambda: (RNG.uniform(0.5, 2, 3), RNG.uniform(-2, 2, 3)), 1),
    ("erf_lgamma", lambda x: jss.erf(x) + jss.gammaln(x + 3), lambda: (RNG.uniform(-1, 1, 4),), 1),
    ("softplus_relu_offkink", lambda x: jax.nn.softplus(x) + jax.nn.relu(x), lambda: (np.array([-1.2, 0.7, 2.1]),), 1),
    ("sum_prod", lambda x: jnp.array([jnp.sum(x**2), jnp.prod(x)]), lambda: (RNG.uniform(0.5, 1.5, 4),), 1),
    ("logsumexp", lambda x: jss.logsumexp(x, axis=1), lambda: (RNG.standard_normal((2, 4)),), 1),
    ("max_cumsum", lambda x: jnp.max(x) + jnp.cumsum(x), lambda: (np.array([0.3, 1.7, -0.4, 0.9]),), 1),
    ("mean_var_norm", lambda x: jnp.var(x, axis=0) + jnp.linalg.norm(x), lambda: (RNG.standard_normal((3, 2)),), 1),
    ("softmax", lambda x: jax.nn.softmax(x, axis=-1), lambda: (RNG.standard_normal((2, 3)),), 1),
    ("matmul", lambda a, b: jnp.tanh(a @ b), lambda: (RNG.standard_normal((2, 3)), RNG.standard_normal((3, 2))), 2),
    ("solve", jnp.linalg.solve, lambda: (_spd(3), RNG.standard_normal(3)), 1),
    ("inv_det", lambda a: jnp.linalg.inv(a).sum(0) * jnp.linalg.det(a), lambda: (_spd(3),), 1),
    ("slogdet", lambda a: jnp.linalg.slogdet(a)[1], lambda: (_spd(3),), 1),
    ("cholesky", jnp.linalg.cholesky, lambda: (_spd(3),), 1),
    ("eigvalsh", lambda a: jnp.linalg.eigvalsh(a + a.T), lambda: (np.diag([1.0, 2.5, 4.0]) + 0.1 * RNG.standard_normal((3, 3)),), 1),
    ("svd_values", lambda a: jnp.linalg.svd(a, compute_uv=False), lambda: (np.diag([3.0, 2.0, 1.0]) + 0.1 * RNG.standard_normal((3, 3)),), 1),
    ("cond", _cond, lambda: (np.array([0.5, 0.2]), np.array([1.3, -0.7])), 2),
    ("while_loop_fwd_only", _while_pow, lambda: (np.array([0.4, -0.9]),), 1),
    ("scan_rnn", _scan_rnn, lambda: (RNG.standard_normal(3) * 0.5, RNG.standard_normal((3, 3)) * 0.5), 1),
    ("fori_loop_static", lambda x: jax.lax.fori_loop(0, 3, lambda i, y: jnp.sin(y) * x, x), lambda: (RNG.uniform(-1, 1, 3),), 1),
]
ARGS = {name: build() for name, _, build, _ in OPS}
# float32 runs on a cross-section of the suite (one or two ops per family) to keep the
# file near a minute on 2 cores; float64 runs every op.
F32 = {"sin", "tanh_logistic", "arctan2", "logsumexp", "max_cumsum", "softmax", "matmul", "solve",
       "cond", "while_loop_fwd_only", "scan_rnn"}
CASES = [(n, f, o, d) for n, f, _, o in OPS for d in ("float64", "float32") if d == "float64" or n in F32]


@pytest.mark.parametrize("name,f,order,dtype", CASES, ids=[f"{c[0]}-{'f64' if c[3] == 'float64' else 'f32'}"
                                                          for c in CASES])
def test_op_suite_passes_with_no_false_alarm(name, f, order, dtype):
    # float32 is checked in its own precision (precision="native"): the hard case for
    # false alarms. The default would evaluate it in float64, like float64 inputs.
    args = tuple(np.asarray(a, dtype) for a in ARGS[name])
    if dtype == "float64":
        with jax.enable_x64(True):
            rep = jgc.check_grads(f, args, order)
    else:
        rep = jgc.check_grads(f, args, min(order, 1), precision="native")
    assert rep.ok and rep.counts()["mismatch"] == 0
    assert rep.api == "jgc.check_grads"


def test_jax_tolerance_arguments_are_accepted_as_in_jax_tests():
    x = np.array([0.3, -1.1, 0.8], np.float32)
    # The call shapes JAX's own tests use: positional modes, dict tolerances, eps.
    jax_check_grads(jnp.sin, (x,), 2, ["fwd", "rev"], atol=1e-2, rtol=1e-2, eps=1e-3)
    jgc.check_grads(jnp.sin, (x,), 1, ["fwd", "rev"], atol=1e-2, rtol=1e-2, eps=1e-3)
    jgc.check_grads(jnp.sin, (x,), 1, modes=("rev",), atol={np.float32: 1e-3}, rtol={np.float32: 1e-3})
    jgc.check_grads(jnp.sin, (0.5,), 1)  # Python scalars, as JAX allows
    assert list(inspect.signature(jgc.check_grads).parameters)[:7] == list(
        inspect.signature(jax_check_grads).parameters)


def test_custom_vjp_does_not_raise_type_error_unlike_jax():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, g: (c * g,))
    x = np.array([0.2, 1.0])
    with pytest.raises(TypeError):
        jax_check_grads(f, (x,), 1)
    rep = jgc.check_grads(f, (x,), 2)
    assert rep.ok and any("replaced by 'rev'" in n for n in rep.notes)


def test_tolerance_is_not_multiplied_by_array_size():
    # JAX scales atol/rtol by the array size: on 10⁴ elements a 1% error passes its
    # check_grads with rtol=1e-5. Ours compares every element at the given tolerance.
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda p, t: (jnp.sin(p[0]), jnp.cos(p[0]) * t[0] * 1.01))
    x = np.linspace(0.1, 1.0, 10_000)
    with jax.enable_x64(True):
        jax_check_grads(f, (x,), 1, modes=("fwd",), atol=1e-5, rtol=1e-5)  # passes: the gap
        with pytest.raises(jgc.GradCheckError):
            jgc.check_grads(f, (x,), 1, modes=("fwd",), atol=1e-5, rtol=1e-5)


# -- planted wrong rules in ops ---------------------------------------------------------------
def _bad_cumsum():
    @jax.custom_vjp
    def cumsum(x):
        return jnp.cumsum(x)

    # Transpose of cumsum is a reversed cumsum; the bug uses cumsum itself.
    cumsum.defvjp(lambda x: (jnp.cumsum(x), None), lambda _, g: (jnp.cumsum(g),))
    return cumsum, (np.array([0.3, 1.7, -0.4, 0.9]),)


def _bad_solve():
    @jax.custom_vjp
    def solve(a, b):
        return jnp.linalg.solve(a, b)

    def bwd(res, g):
        a, x = res
        w = jnp.linalg.solve(a, g)  # bug: needs aᵀ (a is not symmetric here)
        return -jnp.outer(w, x), w

    solve.defvjp(lambda a, b: (jnp.linalg.solve(a, b), (a, jnp.linalg.solve(a, b))), bwd)
    return solve, (np.array([[3.0, 1.0, 0.0], [0.5, 2.0, 1.0], [0.0, -1.0, 4.0]]), np.array([1.0, 2.0, 3.0]))


def _bad_logsumexp():
    @jax.custom_jvp
    def lse(x):
        return jss.logsumexp(x)

    # Bug: the unnormalised weights exp(x) instead of softmax(x).
    lse.defjvp(lambda p, t: (lse(p[0]), jnp.sum(jnp.exp(p[0]) * t[0])))
    return lse, (np.array([0.5, -1.0, 2.0]),)


def _bad_second_order():
    # First derivative right, second wrong: the rule's tangent uses a stop_gradient.
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x) * x

    f.defjvp(lambda p, t: (f(p[0]), jax.lax.stop_gradient(jnp.cos(p[0]) * p[0] + jnp.sin(p[0])) * t[0]))
    return f, (np.array([0.4, 1.3]),)


def _bad_scan_body():
    @jax.custom_jvp
    def act(h):
        return jnp.tanh(h)

    act.defjvp(lambda p, t: (jnp.tanh(p[0]), (1.0 - jnp.tanh(p[0])) * t[0]))  # bug: not squared

    def rnn(h0, w):
        return jax.lax.scan(lambda h, _: (act(w @ h), None), h0, None, length=3)[0]

    return rnn, (np.array([0.3, -0.2]), np.array([[0.5, 0.1], [-0.3, 0.8]]))


PLANTED = [("cumsum custom_vjp: no reversal", _bad_cumsum, 1),
           ("solve custom_vjp: missing transpose", _bad_solve, 1),
           ("logsumexp custom_jvp: unnormalised", _bad_logsumexp, 1),
           ("sin·x custom_jvp: wrong only at order 2", _bad_second_order, 2),
           ("tanh custom_jvp in scan body", _bad_scan_body, 1)]


@pytest.mark.parametrize("name,make,order", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_wrong_rules_are_caught(name, make, order):
    f, args = make()
    with jax.enable_x64(True), pytest.raises(jgc.GradCheckError) as info:
        jgc.check_grads(f, args, order)
    rep = info.value.report
    assert not rep.ok and rep.failing()
    assert "derivatives disagree in " in str(info.value).splitlines()[0]
    if order == 2:  # the first-order checks pass; only the second-order ones fail
        assert all(" of " in lf.name.split(":")[0] for lf in rep.failing())


def test_bad_arguments():
    with pytest.raises(ValueError, match="order must be a positive int"):
        jgc.check_grads(jnp.sin, (np.ones(2),), 0)
    with pytest.raises(ValueError, match="modes must be"):
        jgc.check_grads(jnp.sin, (np.ones(2),), 1, modes=("forward",))
    with pytest.raises(TypeError, match="args must be a tuple"):
        jgc.check_grads(jnp.sin, np.ones(2) if False else 3.0, 1)


# -- behaving as jax.test_util.check_grads does where JAX's own tests rely on it ------------
def test_nan_outputs_at_the_point_compare_as_in_jax():
    # JAX's own asin/acos tests evaluate on [-1.3, 1.3]: outputs outside [-1, 1] are NaN,
    # and its checker compares them NaN == NaN. jgc gives the same pass, not an error.
    x = np.linspace(-1.3, 1.3, 9, dtype=np.float32)
    for f in (jnp.arcsin, jnp.arccos):
        jax_check_grads(f, (x,), 1, modes=("fwd", "rev"))
        rep = jgc.check_grads(f, (x,), 1)
        assert rep.ok and rep.counts()["non-finite"] > 0 and rep.counts()["ok"] > 0
        assert any("NaN == NaN" in n for n in rep.notes)


def test_nan_outputs_do_not_hide_a_wrong_rule_on_the_finite_part():
    @jax.custom_jvp
    def asin(x):
        return jnp.arcsin(x)

    asin.defjvp(lambda p, t: (jnp.arcsin(p[0]), 1.1 * t[0] / jnp.sqrt(1 - p[0] ** 2)))
    x = np.linspace(-1.3, 1.3, 9)
    with jax.enable_x64(True), pytest.raises(jgc.GradCheckError):
        jgc.check_grads(asin, (x,), 1)


def test_eigh_without_symmetrization_gets_a_verdict_like_jax():
    # eigh's JVP rule symmetrizes its input, so its primal output is not f(x) for a
    # non-symmetric x: JAX's checker fails on "JVP primal". jgc used to call f "not
    # deterministic"; f is deterministic, and the wrong derivative is a mismatch.
    a = np.random.RandomState(0).randn(4, 4)
    f = lambda x: jnp.linalg.eigh(x, symmetrize_input=False)  # noqa: E731
    with jax.enable_x64(True):
        with pytest.raises(AssertionError):
            jax_check_grads(f, (a,), 1)
        with pytest.raises(jgc.GradCheckError) as info:
            jgc.check_grads(f, (a,), 1)
    names = [lf.name for lf in info.value.report.failing()]
    assert any("primal output" in n for n in names), names


def test_real_randomness_is_still_refused():
    def noisy(x):
        return jnp.sin(x) + np.random.default_rng().standard_normal(x.shape)  # new draw per trace

    with pytest.raises(ValueError, match="not deterministic"):
        jgc.check_grads(noisy, (np.ones(3),), 1)


def test_complex_integer_and_boolean_arguments_under_strict_promotion():
    rng = np.random.default_rng(1)
    z = (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64)
    i = np.array([1, 2, 3])
    b = np.array([True, False, True])

    def f(z, i, b):
        return jnp.where(b, jnp.sin(z) * i.astype(z.dtype), z * z)

    with jax.numpy_dtype_promotion("strict"):
        jax_check_grads(lambda z: f(z, i, b), (z,), 1)
        rep = jgc.check_grads(f, (z, i, b), 2)
    assert rep.ok and {p for p, _ in rep.skipped} >= {"args[1]", "args[2]"}


def test_eps_is_an_absolute_step_as_in_jax():
    # x spans four decades. JAX's eps moves every element by eps·t (t ~ N(0, 1)); a step
    # relative to the leaf's scale (~600) would cross log's pole next to x = 0.05.
    x = np.array([0.05, 0.5, 1e3])
    with jax.enable_x64(True):
        jax_check_grads(jnp.log, (x,), 1, eps=1e-4)
        rep = jgc.check_grads(jnp.log, (x,), 1, eps=1e-4, strict=True)
    assert rep.ok and rep.counts()["non-finite"] == 0


SPD3 = _spd(3)


def _f16_fixed(x):
    """A float16 constant of f's own: lax.concatenate refuses to mix it with wider inputs."""
    return jnp.sin(jax.lax.concatenate([x, jnp.ones((1, 6), jnp.float16)], 0)) * 2


def test_code_that_fixes_its_float16_dtype_is_checked_at_the_dtype_given():
    x = jnp.asarray(RNG.standard_normal((4, 6)), jnp.float16)

    @jax.custom_jvp
    def wrong(x):
        return _f16_fixed(x)

    wrong.defjvp(lambda p, t: (wrong(p[0]), 1.1 * jax.jvp(_f16_fixed, p, t)[1]))
    with jax.numpy_dtype_promotion("strict"):
        rep = jgc.check_grads(_f16_fixed, (x,), 1)
        with pytest.raises(jgc.GradCheckError):
            jgc.check_grads(wrong, (x,), 1, modes=("fwd",))
        # An explicit float64 is kept: f's own error surfaces.
        with pytest.raises(TypeError, match="same dtypes"):
            jgc.check_grads(_f16_fixed, (x,), 1, precision="float64")
    assert rep.ok and rep.precision == "native (float16)"
    assert any("refused its inputs at float64" in n for n in rep.notes), rep.notes


def test_a_function_that_changes_with_the_dtype_is_checked_at_the_dtype_given():
    # bitcast_convert_type of a float64 to float32 splits every element in two: widened,
    # f computes something else. jgc sees the output shapes change and checks float32.
    # JAX defines the derivative of a bitcast as zero; the float32 identity's slope is 1.
    x = np.asarray(RNG.standard_normal((2, 3)), np.float32)

    def same_bits(x):
        return jax.lax.bitcast_convert_type(x, jnp.float32)

    with pytest.raises(jgc.GradCheckError) as info:
        jgc.check_grads(same_bits, (x,), 1)
    rep = info.value.report
    assert rep.precision == "native (float32)"
    assert any("computes something else at float64" in n for n in rep.notes), rep.notes


@jax.custom_jvp
def _callback_tangent(x):
    return jnp.sin(x)


@_callback_tangent.defjvp
def _callback_tangent_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    dt = jax.pure_callback(lambda a, b: np.cos(a) * b, jax.ShapeDtypeStruct(t.shape, t.dtype), x, t,
                           vmap_method="sequential")
    return jnp.sin(x), dt


@jax.custom_vjp
def _scale(t, c):
    return t * c


_scale.defvjp(lambda t, c: (t * c, c), lambda c, g: (g * c, jnp.zeros_like(c)))


@jax.custom_jvp
def _custom_vjp_tangent(x):
    return jnp.sin(x)


_custom_vjp_tangent.defjvp(lambda p, t: (jnp.sin(p[0]), _scale(t[0], jnp.cos(p[0]))))


@pytest.mark.parametrize("name,f", [
    # reduce_window with a non-identity init value has a JVP, no transpose.
    ("reduce_window", lambda x: jax.lax.reduce_window(x, jnp.asarray(1.0, x.dtype), jax.lax.add, (2,), (1,),
                                                      "VALID")),
    # custom_linear_solve without transpose_solve.
    ("custom_linear_solve", lambda b: jax.lax.custom_linear_solve(
        lambda v: SPD3 @ v, b, lambda mv, r: jnp.linalg.solve(SPD3, r))),
    # A JVP rule whose tangent goes through a callback (JAX cannot transpose callbacks).
    ("pure_callback in a JVP rule", lambda x: _callback_tangent(x)),
    # A JVP rule whose tangent goes through a custom_vjp function (no transpose rule).
    ("custom_vjp in a JVP rule", lambda x: _custom_vjp_tangent(x)),
])
def test_rev_falls_back_to_fwd_where_jax_has_no_reverse_rule(name, f):
    x = np.asarray(RNG.standard_normal(3))
    with jax.enable_x64(True):
        with pytest.raises((ValueError, TypeError, NotImplementedError)):
            out, pullback = jax.vjp(f, x)
            pullback(out)
        rep = jgc.check_grads(f, (x,), 1, modes=("rev",))
    assert rep.ok and all(lf.name.startswith("JVP") for lf in rep.leaves)
    assert any("no reverse-mode derivative (JAX says:" in n for n in rep.notes), rep.notes


def test_the_float16_fallback_keeps_debug_nans_quiet_at_perturbed_points():
    # sqrt is NaN at the negative elements: reported as non-finite, as in the widened check.
    x = jnp.asarray(RNG.standard_normal((4, 6)), jnp.float16)

    def f(x):
        return jnp.sqrt(jax.lax.concatenate([x, jnp.ones((1, 6), jnp.float16)], 0))

    with jax.debug_nans(True), jax.numpy_dtype_promotion("strict"):
        rep = jgc.check_grads(f, (x,), 1)
    assert rep.precision == "native (float16)" and rep.counts()["non-finite"] > 0


def _bwd_with_two_cotangents():
    # A backward rule that returns a cotangent per output and residual instead of one
    # per primal input: JAX raises TypeError as soon as the VJP is evaluated.
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, g: (g * c, g))
    return f


def _jvp_with_wrong_shape():
    # A JVP rule whose tangent has the wrong shape: JAX raises in forward and reverse mode.
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda p, t: (jnp.sin(p[0]), (jnp.cos(p[0]) * t[0])[:2]))
    return f


@pytest.mark.parametrize("make,failing", [(_bwd_with_two_cotangents, {"VJP"}),
                                          (_jvp_with_wrong_shape, {"JVP", "VJP"})],
                         ids=["custom_vjp bwd", "custom_jvp rule"])
def test_a_derivative_jax_cannot_compute_fails_the_check(make, failing):
    f = make()
    x = jnp.asarray(RNG.standard_normal(3))
    with pytest.raises(TypeError):  # what JAX's own derivative does at the point
        out, pullback = jax.vjp(f, x)
        pullback(out)
    with pytest.raises(jgc.GradCheckError) as info:
        jgc.check_grads(f, (x,), 1)
    rep = info.value.report
    assert {lf.name.split(":")[0] for lf in rep.failing()} == failing, rep
    assert any("eagerly too (no jit, no vmap): TypeError" in n and "taken as NaN" in n for n in rep.notes), rep.notes
    assert "analytic nan vs numerical" in str(info.value)
    assert isinstance(info.value.__cause__, TypeError)  # JAX's error, with its traceback
    assert "jgc.check_jacobian" not in str(info.value).splitlines()[0]  # it would raise the same


def test_other_checks_raise_the_error_of_a_derivative_jax_cannot_compute():
    f, x = _bwd_with_two_cotangents(), jnp.asarray(RNG.standard_normal(3))
    with pytest.raises(TypeError) as info:
        jgc.check_vjp(f, x)
    assert any("the VJP of f cannot be computed there" in n for n in info.value.__notes__)


@pytest.mark.parametrize("factor", [1.0, 1.01])
def test_a_rule_that_cannot_be_batched_is_checked_one_row_at_a_time(factor):
    # jax.vmap cannot batch a pure_callback without vmap_method; JAX's own VJP at the
    # point, unbatched, works. So the VJPs are computed one cotangent at a time, a note
    # says so, and the verdict is kept: right for the right rule, a failure for a wrong one.
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)),
             lambda c, g: (jax.pure_callback(lambda a, b: np.asarray(a * b * factor),
                                             jax.ShapeDtypeStruct(g.shape, g.dtype), g, c),))
    x = jnp.asarray(RNG.standard_normal(3))
    with pytest.raises(NotImplementedError):  # the batched program this test is about
        jax.vmap(jax.vjp(f, x)[1])(jnp.ones((2, 3)))
    if factor == 1.0:
        rep = jgc.check_grads(f, (x,), 1)
        assert any("one tangent at a time" in n for n in rep.notes), rep.notes
    else:
        with pytest.raises(jgc.GradCheckError):
            jgc.check_grads(f, (x,), 1)


def test_a_function_that_rounds_in_bfloat16_inside_is_not_called_random():
    # float32 params, bfloat16 data and matmul: two compilations of f round differently
    # by about its own measured noise (σ/|y| ~ 6e-4). That is no randomness.
    w = jnp.asarray(RNG.standard_normal((3, 2)), jnp.float32)
    x = jnp.asarray(RNG.standard_normal((5, 3)), jnp.bfloat16)

    def f(w):
        return jnp.mean(jnp.tanh((x @ w.astype(jnp.bfloat16)).astype(jnp.float32)) ** 2)

    assert jgc.check_grads(f, (w,), 1).ok


def test_an_output_clamped_next_to_the_point_is_not_taken_for_noise():
    # optax.safe_norm of a zero row is flat within 1e-3 of it. The noise probe leaves
    # that ball, sees a kink, and probes finer; there the row's output does not move at
    # all. A flat line is no staircase, so the finer σ (rounding) is kept and the steps
    # stay small; with the coarse σ they were 0.14·s and order 2 raised a false alarm.
    import optax

    x = jax.random.normal(jax.random.key(0), (4, 3)).at[0].set(0.0)
    rep = jgc.check_grads(lambda p: optax.safe_norm(p, 1e-3, axis=-1), (x,), 2)
    assert rep.ok and rep.counts()["non-smooth"] == 0, rep
