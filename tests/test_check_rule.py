"""jgc.check_rule: one custom rule checked every way, each planted bug caught by the check named for it.

Every planted rule is wrong in one way only, and the wrong value is derived by hand in
its comment; the controls are right rules of the same kinds (and library code), which
no check may flag.
"""

import doctest
import functools
import json
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.custom_batching import custom_vmap
from jax.custom_derivatives import SymbolicZero

import jgc
from jgc import testing
from jgc._src import cli
from jgc._src.rules import rule as rule_impl

X = jnp.array([0.3, -1.2, 2.0])


# -- planted bugs ----------------------------------------------------------------------------------
@jax.custom_jvp
def cube(x):
    return x ** 3


@cube.defjvp
def cube_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return cube(x), 2 * x ** 2 * t  # d/dx x³ = 3x², not 2x²


A = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.3, 0.0, 1.0]])


@jax.custom_vjp
def tanh_affine(x):
    return jnp.tanh(A @ x)


def tanh_affine_fwd(x):
    y = jnp.tanh(A @ x)
    return y, y


def tanh_affine_bwd(y, g):
    return (A @ ((1 - y ** 2) * g),)  # the transpose is A.T @ (...): A is not symmetric


tanh_affine.defvjp(tanh_affine_fwd, tanh_affine_bwd)


@jax.custom_vjp
def square_clipped(x):
    return x ** 2


# The backward clips the incoming cotangent: right for |g| ≤ 1 (unit cotangents), wrong beyond.
square_clipped.defvjp(lambda x: (x ** 2, x), lambda x, g: (2 * x * jnp.clip(g, -1.0, 1.0),))


@jax.custom_vjp
def square_normalised(x):
    return x ** 2


# The backward normalises the cotangent: right only when ‖g‖ = 1.
square_normalised.defvjp(lambda x: (x ** 2, x), lambda x, g: (2 * x * g / jnp.linalg.norm(g),))


@jax.custom_jvp
def square_tangent_clipped(x):
    return x ** 2


# The JVP clips the tangent: right for |t| ≤ 1 (unit tangents); JAX cannot transpose it either.
square_tangent_clipped.defjvp(lambda p, t: (square_tangent_clipped(p[0]), 2 * p[0] * jnp.clip(t[0], -1.0, 1.0)))


@custom_vmap
def sin_vmapped(x):
    return jnp.sin(x)


@sin_vmapped.def_vmap
def sin_vmapped_rule(axis_size, in_batched, x):
    return jnp.sin(x[::-1]), in_batched[0]  # the lanes come back reversed


@jax.custom_jvp
def softplus_sg(x):
    return jnp.logaddexp(x, 0.0)


@softplus_sg.defjvp
def softplus_sg_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    # σ(x)·t is the right first derivative, but stop_gradient hides σ'(x) from a second one.
    return softplus_sg(x), jax.nn.sigmoid(jax.lax.stop_gradient(x)) * t


@jax.custom_jvp
def mul(x, y):
    return x * y


def mul_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    if isinstance(ty, SymbolicZero):
        return mul(x, y), 2 * tx * y  # the fast path for a constant y doubles the derivative
    if isinstance(tx, SymbolicZero):
        return mul(x, y), x * ty
    return mul(x, y), tx * y + x * ty


mul.defjvp(mul_jvp, symbolic_zeros=True)


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


@jax.custom_vjp
def gelu_fast_fwd(x):
    return _gelu_exact(x)


def gelu_fast_fwd_fwd(x):
    return jax.nn.gelu(x, approximate=True), x  # the tanh approximation, not the primal


def gelu_fast_fwd_bwd(x, g):
    return (g * jax.vmap(jax.grad(_gelu_exact))(x),)


gelu_fast_fwd.defvjp(gelu_fast_fwd_fwd, gelu_fast_fwd_bwd)


PLANTED = [
    # (label, f, args, the check that must name it, every check that fails)
    ("wrong JVP coefficient", cube, (X,), "jvp", {"jvp"}),
    ("VJP not the transpose of the JVP", tanh_affine, (X,), "dot-product", {"vjp", "dot-product"}),
    ("backward clips the cotangent", square_clipped, (X,), "linearity", {"dot-product", "linearity"}),
    # AD through a backward pass that divides by ‖g‖ differentiates that norm too: order 2 fails as well.
    ("backward normalises the cotangent", square_normalised, (X,), "linearity",
     {"dot-product", "linearity", "order 2"}),
    ("JVP clips the tangent", square_tangent_clipped, (X,), "linearity", {"linearity"}),
    ("wrong only under vmap", sin_vmapped, (X,), "batching", {"batching"}),
    ("right at order 1, wrong at order 2", softplus_sg, (X,), "order 2", {"order 2"}),
    ("symbolic-zero fast path wrong", mul, (X, X[::-1] + 1.0), "symbolic zeros", {"symbolic zeros"}),
    ("fwd returns an approximate primal", gelu_fast_fwd, (X,), "primal", {"primal"}),
]


@pytest.mark.parametrize("label,f,args,check,failed", PLANTED, ids=[p[0] for p in PLANTED])
def test_planted_bug_is_caught_by_its_check(label, f, args, check, failed):
    rep = jgc.check_rule(f, *args)
    assert not rep.ok, str(rep)
    assert check in rep.failed_checks(), str(rep)
    assert set(rep.failed_checks()) == failed, str(rep)
    rule = rep.rules[0]
    assert rule.status == "mismatch"
    # The report names the rule by file:line, in this file.
    assert "test_check_rule.py:" in rule.primal_at and "test_check_rule.py:" in rule.rule_at
    assert f"{check} at the given args: mismatch" in str(rep)


def test_primal_mismatch_is_worded_as_a_wrong_forward_value():
    rep = jgc.check_rule(gelu_fast_fwd, X)
    row = next(s for s in rep.rules[0].sites if s.check == "primal")
    assert "wrong forward value" in row.reason and "forward pass (fwd)" in row.reason
    # The derivative itself (bwd of the exact GELU) is right: no derivative check fails.
    assert {s.check for s in rep.rules[0].sites if s.status == "mismatch"} == {"primal"}


def test_wrong_coefficient_worst_element_names_operand_and_values():
    rep = jgc.check_rule(cube, X)
    worst = rep.rules[0].worst
    # At x = 2 the rule gives 2·2² = 8 where the derivative is 3·2² = 12.
    assert worst.operand == "x" and worst.index == (2,)
    assert worst.rule == pytest.approx(8.0, rel=1e-6) and worst.numeric == pytest.approx(12.0, rel=1e-4)


def test_rule_wrong_only_for_negative_inputs_is_found_by_explore():
    @jax.custom_jvp
    def elu(x):
        return jnp.where(x > 0, x, jnp.expm1(x))

    @elu.defjvp
    def elu_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return elu(x), jnp.where(x > 0, 1.0, 1.0) * t  # the negative branch's derivative is eˣ, not 1

    positives = jnp.array([0.5, 1.5, 3.0])
    assert jgc.check_rule(elu, positives, checks=("jvp",)).ok
    rep = jgc.check_rule(elu, positives, checks=("jvp",), explore=True)
    assert not rep.ok
    bad = {s.at for s in rep.rules[0].sites if s.status == "mismatch"}
    assert "point x → −x" in bad and "the given args" not in bad


# -- controls ----------------------------------------------------------------------------------------
@jax.custom_jvp
def gelu_fused(x):
    return 0.5 * x * (1 + jax.lax.erf(x / np.sqrt(2.0)))


@gelu_fused.defjvp
def gelu_fused_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = 0.5 * (1 + jax.lax.erf(x / np.sqrt(2.0)))
    pdf = jnp.exp(-0.5 * x ** 2) / np.sqrt(2 * np.pi)
    return gelu_fused(x), (cdf + x * pdf) * t


@jax.custom_jvp
def softplus(x):
    return jnp.logaddexp(x, 0.0)


@softplus.defjvp
def softplus_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return softplus(x), jax.nn.sigmoid(x) * t


@jax.custom_vjp
def silu(x):
    return x * jax.nn.sigmoid(x)


def silu_fwd(x):
    s = jax.nn.sigmoid(x)
    return x * s, (x, s)


def silu_bwd(res, g):
    x, s = res
    return (g * (s + x * s * (1 - s)),)


silu.defvjp(silu_fwd, silu_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def leaky(x, slope):
    return jnp.where(x > 0, x, slope * x)


@leaky.defjvp
def leaky_jvp(slope, primals, tangents):
    (x,), (t,) = primals, tangents
    return leaky(x, slope), jnp.where(x > 0, 1.0, slope) * t


@eqx.filter_custom_jvp
def scaled_mul(x, y):
    return x * y


@scaled_mul.def_jvp
def scaled_mul_jvp(primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    tx = jnp.zeros_like(x) if tx is None else tx
    ty = jnp.zeros_like(y) if ty is None else ty
    return x * y, tx * y + x * ty


@eqx.filter_custom_vjp
def sin_mul(x, y):
    return x * jnp.sin(y)


@sin_mul.def_fwd
def sin_mul_fwd(perturbed, x, y):
    return x * jnp.sin(y), None


@sin_mul.def_bwd
def sin_mul_bwd(residuals, g, perturbed, x, y):
    return g * jnp.sin(y)  # Equinox differentiates the first argument only


def bce(logits, labels):
    return optax.losses.sigmoid_binary_cross_entropy(logits, labels)


@jax.custom_jvp
def ste_round(x):
    return jnp.round(x)


ste_round.defjvp(lambda p, t: (ste_round(p[0]), t[0]))
jgc.intended(ste_round, reason="straight-through estimator")

CONTROLS = [
    ("fused GELU (custom_jvp)", gelu_fused, (X,), {}),
    ("softplus (custom_jvp)", softplus, (X,), {}),
    ("SiLU (custom_vjp)", silu, (X,), {}),
    ("leaky ReLU with a nondiff slope", leaky, (X, 0.1), {}),
    ("jax.nn.relu away from 0", jax.nn.relu, (X,), {}),
    ("Equinox filter_custom_jvp", scaled_mul, (X, X[::-1] + 1.0), {}),
    ("Equinox filter_custom_vjp", sin_mul, (X, X[::-1]), {}),
    ("optax loss with integer labels held", bce, (X, jnp.array([1.0, 0.0, 1.0])), {"nondiff_argnums": (1,)}),
]


@pytest.mark.parametrize("label,f,args,options", CONTROLS, ids=[c[0] for c in CONTROLS])
def test_right_rules_pass_every_check(label, f, args, options):
    rep = jgc.check_rule(f, *args, **options)
    assert rep.ok, str(rep)
    ran = {s.check for s in rep.rules[0].sites if s.status == "ok"}
    assert {"primal", "linearity", "batching", "order 2"} <= ran, str(rep)
    assert ran & {"jvp", "vjp"}, str(rep)


def test_intended_straight_through_estimator_is_not_a_failure():
    rep = jgc.check_rule(ste_round, jnp.array([0.3, 1.7, -2.2]))
    assert rep.ok, str(rep)
    rule = rep.rules[0]
    assert rule.status == "intended" and "straight-through" in rule.reason
    # Still held to the identities: its rule is linear and batches.
    assert all(s.status == "ok" for s in rule.sites if s.check in ("linearity", "batching", "primal"))


def test_float32_rule_is_judged_at_its_own_precision():
    rep = jgc.check_rule(gelu_fused, X.astype(jnp.float32))
    assert rep.ok, str(rep)
    rep = jgc.check_rule(cube, X.astype(jnp.float32), checks=("jvp",))
    assert rep.failed_checks() == ("jvp",)


def test_two_arguments_only_one_differentiated_by_nondiff_argnums():
    rep = jgc.check_rule(mul, X, X + 1.0, nondiff_argnums=(1,))
    names = {s.worst.operand for s in rep.rules[0].sites if s.worst is not None}
    assert "y" not in names
    # With y held, JAX passes a symbolic zero for it in every call: the planted fast path runs
    # for the JVP itself and the doubled derivative shows against finite differences.
    assert "jvp" in rep.failed_checks()


# -- options, errors, the assertion ------------------------------------------------------------------
def test_checks_option_runs_only_those_and_rejects_unknown_names():
    rep = jgc.check_rule(cube, X, checks=("linearity", "primal"))
    assert {s.check for s in rep.rules[0].sites} == {"linearity", "primal"}
    assert rep.ok
    with pytest.raises(ValueError, match="unknown check"):
        jgc.check_rule(cube, X, checks=("nonsense",))


def test_refuses_traced_values_and_missing_floats():
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda x: jgc.check_rule(cube, x).ok)(X)
    with pytest.raises(TypeError, match="no argument"):
        jgc.check_rule(lambda n: n * 2, jnp.arange(3))


def test_assert_rule_ok_raises_with_the_failed_check_named():
    assert testing.assert_rule_ok(softplus, X).ok
    with pytest.raises(jgc.GradCheckError, match="assert_rule_ok failed: wrong custom rule.*order 2") as e:
        testing.assert_rule_ok(softplus_sg, X)
    assert isinstance(e.value.report, jgc.RulesReport)


def test_report_serialises_with_check_names():
    rep = jgc.check_rule(cube, X, checks=("jvp", "primal"))
    d = rep.to_dict()
    assert [s["check"] for s in d["rules"][0]["sites"]] == ["primal", "jvp"]
    assert rep.summary().startswith("jgc.check_rule(") and "cube" in rep.summary()


def test_leaves_jax_x64_state_as_found():
    before = jax.config.jax_enable_x64
    jgc.check_rule(softplus, X.astype(jnp.float32), checks=("jvp", "order 2"))
    assert jax.config.jax_enable_x64 == before


def test_integer_arguments_get_float0_tangents_and_cotangents():
    @jax.custom_jvp
    def scale(x, n):
        return x * n

    @scale.defjvp
    def scale_jvp(primals, tangents):
        (x, n), (tx, _) = primals, tangents
        return scale(x, n), tx * n

    rep = jgc.check_rule(scale, jnp.array([1.0, 2.0]), jnp.array([2, 3]))
    assert rep.ok, str(rep)
    assert any(s.check == "symbolic zeros" and s.status == "ok" for s in rep.rules[0].sites)

    @jax.custom_jvp
    def scale_bad(x, n):
        return x * n

    @scale_bad.defjvp
    def scale_bad_jvp(primals, tangents):
        (x, n), (tx, tn) = primals, tangents
        return scale_bad(x, n), tx * n + tn  # arithmetic on the float0 tangent of n raises

    rep = jgc.check_rule(scale_bad, jnp.array([1.0, 2.0]), jnp.array([2, 3]))
    assert not rep.ok and "float0" in str(rep)


RULE_MODULE = """
import jax, jax.numpy as jnp

@jax.custom_jvp
def cube(x):
    return x ** 3

cube.defjvp(lambda p, t: (cube(p[0]), 2 * p[0] ** 2 * t[0]))   # should be 3x²

@jax.custom_jvp
def square(x):
    return x ** 2

square.defjvp(lambda p, t: (square(p[0]), 2 * p[0] * t[0]))

def inputs():
    return jnp.array([0.5, 2.0])
"""


def test_command_line_rule_exit_codes(tmp_path, monkeypatch, capsys):
    name = f"rule_case_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(RULE_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["rule", f"{name}:cube", "--args", f"{name}:inputs", "--checks", "jvp", "primal"]) == 1
    assert "jvp at the given args: mismatch" in capsys.readouterr().out
    assert cli.main(["rule", f"{name}:square", "--args", f"{name}:inputs", "--checks", "jvp", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert cli.main(["rule", f"{name}:cube", "--args", f"{name}:inputs", "--checks", "nonsense"]) == 2
    assert "unknown check" in capsys.readouterr().err


def test_docstring_example_runs():
    failed, attempted = doctest.testmod(rule_impl)
    assert attempted and not failed


def test_under_jax_modes_strict_promotion_transfer_guard_debug_nans():
    with jax.numpy_dtype_promotion("strict"), jax.transfer_guard("disallow"), jax.debug_nans(True):
        assert jgc.check_rule(softplus_sg, X).failed_checks() == ("order 2",)
        assert jgc.check_rule(silu, X).ok
        # The caller's guard is in force again after the check.
        with pytest.raises(Exception, match="[Dd]isallowed"):
            jnp.asarray(np.ones(2)) + 1


def test_a_python_number_the_wrapper_branches_on_is_held_not_a_false_flag():
    # optax.scale_gradient(x, scale) tests `scale == 1.0` in Python before calling its
    # rule: scale cannot be traced, by JAX or by the check. It is held as given, the rule
    # is checked in x, and the library's known surrogate is reported as intended.
    rep = jgc.check_rule(optax.scale_gradient, jnp.array([0.3, -1.2, 2.0]), 0.5)
    assert rep.ok, str(rep)
    (r,) = rep.rules
    assert r.status == "intended", str(rep)
    assert any(n.startswith("held as given: scale") for n in rep.notes), rep.notes
