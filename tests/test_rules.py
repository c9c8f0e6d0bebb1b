"""jgc.check_rules: every custom rule inside a loss, found, captured and checked on its own.

Planted wrong rules must be named (with their file:line), correct library rules must not
be. Expected names and lines are written by hand from the code below, never read back
from the report.
"""

from __future__ import annotations

import doctest
import inspect
import json
import os
import textwrap
from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jgc
from jgc import testing
from jgc._src import cli
from jgc._src.rules import check as rules_impl
from jgc._src.rules import surrogates as intended_impl
from jgc._src.rules import sites as rule_sites

HERE = os.path.relpath(__file__)


def line_of(fn) -> int:
    """The line JAX reports for a function: its code object's first line."""
    return inspect.unwrap(fn).__code__.co_firstlineno


def source_line(text: str) -> int:
    """The line of this file that starts with ``text``."""
    with open(__file__) as f:
        return next(i for i, ln in enumerate(f, 1) if ln.startswith(text))


# -- rules used below -------------------------------------------------------------------------
def make_cube(wrong: bool):
    @jax.custom_jvp
    def cube(x):
        return x**3

    @cube.defjvp
    def cube_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return cube(x), (2.0 if wrong else 3.0) * x**2 * t  # the plant: 2x² for 3x²

    return cube


def make_mul(wrong: bool):
    @jax.custom_vjp
    def mul(x, y):
        return x * y

    def mul_fwd(x, y):
        return mul(x, y), (x, y)

    def mul_bwd(res, g):
        x, y = res
        return (g * y, g * (y if wrong else x))  # the plant: y for x

    mul.defvjp(mul_fwd, mul_bwd)
    return mul


# -- the JAX structure check_rules reads ----------------------------------------------------------
def test_jaxpr_structure_it_relies_on():
    cube, mul = make_cube(False), make_mul(False)
    closed = jax.make_jaxpr(lambda p: jnp.sum(cube(p)) + jnp.sum(mul(p, p)))(jnp.ones(2))
    eqns = {e.primitive.name: e for e in closed.jaxpr.eqns}
    assert set(rule_sites.KINDS) <= set(eqns)
    for name, eqn in eqns.items():
        if name in rule_sites.KINDS:
            rule_sites.pin_equation(eqn)  # raises JaxInternalsChanged if a param is gone
            assert all(w.line > 0 for w in rule_sites.rule_names(eqn) if w is not None)
            site = rule_sites.call_site(eqn)
            assert site.file == __file__
    jvp_eqn, vjp_eqn = eqns["custom_jvp_call"], eqns["custom_vjp_call"]
    assert rule_sites.rule_names(jvp_eqn)[0].name == "cube"
    assert rule_sites.rule_names(jvp_eqn)[1].name == "cube_jvp"
    names = rule_sites.rule_names(vjp_eqn)
    assert (names[0].name, names[1].name, names[2].name) == ("mul", "mul_bwd", "mul_fwd")
    # Binding the equation again under jax.jvp runs the hand-written rule.
    _, tan = jax.jvp(lambda x: jvp_eqn.primitive.bind(
        x, **jvp_eqn.primitive.get_bind_params(jvp_eqn.params)), (jnp.array([2.0, 2.0]),),
        (jnp.ones(2),))
    np.testing.assert_allclose(tan, 12.0)
    # Private names used to find user frames and to record eager calls of rules.
    from jax._src import custom_derivatives, source_info_util

    assert custom_derivatives.custom_jvp is jax.custom_jvp and custom_derivatives.custom_vjp is jax.custom_vjp
    assert callable(source_info_util.user_frames) and callable(source_info_util.user_frame)


def test_changed_structure_fails_with_the_jax_version():
    closed = jax.make_jaxpr(lambda p: jnp.sum(make_cube(False)(p)))(jnp.ones(2))
    (eqn,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "custom_jvp_call"]
    broken = eqn.replace(params={k: v for k, v in eqn.params.items() if k != "jvp_jaxpr_fun"})
    with pytest.raises(rule_sites.JaxInternalsChanged, match=f"no jvp_jaxpr_fun param.*in JAX {jax.__version__}"):
        rule_sites.pin_equation(broken)


# -- planted wrong rules under every transformation -----------------------------------------------
def everywhere(cube):
    """The same rule called plainly and under jit, vmap, scan, fori_loop, while_loop, cond,
    checkpoint, and inside another rule's primal."""

    @jax.custom_jvp
    def wrapper(x):
        return jnp.sum(cube(x))

    wrapper.defjvp(lambda p, t: (wrapper(p[0]), jnp.sum(3 * p[0] ** 2 * t[0])))

    def loss(p):
        terms = [
            jnp.sum(cube(p)),
            jax.jit(lambda q: jnp.sum(cube(q)))(p),
            jnp.sum(jax.vmap(cube)(p)),
            jax.lax.scan(lambda c, x: (c + cube(x), None), 0.0, p)[0],
            jax.lax.fori_loop(0, 2, lambda i, c: c + jnp.sum(cube(p + i)), 0.0),
            jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] + jnp.sum(cube(p))), (0, 0.0))[1],
            jax.lax.cond(p[0] > 0, lambda q: jnp.sum(cube(q)), lambda q: jnp.sum(q), p),
            jax.checkpoint(lambda q: jnp.sum(cube(q)))(p),
            wrapper(p),
        ]
        return sum(terms)

    return loss


UNDER = ["", "jit", "scan", "while", "cond", "checkpoint", "custom_jvp wrapper"]


@pytest.mark.parametrize("wrong", [False, True], ids=["correct", "planted"])
def test_rule_is_checked_under_every_transformation(wrong):
    cube = make_cube(wrong)
    rep = jgc.check_rules(everywhere(cube), jnp.array([0.5, 1.5]))
    r = rep.rule("cube")
    unders = {s.under for s in r.sites}
    # fori_loop with a static trip count is a scan; vmap leaves the batched rule in place.
    assert {"", "jit", "scan", "while", "cond", "checkpoint", "custom_jvp wrapper"} <= unders
    assert all(s.calls >= 1 for s in r.sites)
    # lax.scan over two elements and fori_loop(0, 2): two steps each; while_loop: two steps.
    loops = sorted((s.under, s.calls) for s in r.sites if s.under in ("scan", "while"))
    assert loops == [("scan", 2), ("scan", 2), ("while", 2)]
    if wrong:
        assert not rep.ok and r.status == "mismatch"
        assert {s.status for s in r.sites} == {"mismatch"}
        assert [x.name for x in rep.failing()] == ["cube"]
        assert r.rule_name == "cube_jvp" and r.primal_at.endswith(f"{HERE}:{line_of(make_cube) + 1}")
        text = str(rep)
        assert text.index("mismatch     custom_jvp cube") < text.index("custom_jvp wrapper defined")
    else:
        assert rep.ok and r.status == "ok", str(rep)


def test_custom_vjp_planted_names_bwd_and_operand():
    mul = make_mul(True)
    # y is data: the loss's gradient never uses the rule's (wrong) derivative in y, so by
    # default y is held fixed and the rule agrees on what reaches the gradient ...
    quiet = jgc.check_rules(lambda p, y: jnp.sum(mul(p, y)), jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0]))
    assert quiet.ok and quiet.rule("mul").status == "ok"
    assert "y (not on the differentiated path)" in quiet.rule("mul").sites[0].held
    # ... and all_operands=True compares every operand, as a library author wants.
    rep = jgc.check_rules(lambda p, y: jnp.sum(mul(p, y)), jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0]),
                          all_operands=True)
    r = rep.rule("mul")
    assert r.kind == "custom_vjp" and r.status == "mismatch"
    assert (r.rule_name, r.fwd_name) == ("mul_bwd", "mul_fwd")
    w = r.worst
    assert w.operand == "y" and w.call == 0
    # d(x·y)/dy = x, the plant gives y: at index i the rule says y_i, differences say x_i.
    i = w.index[0]
    assert w.input == [3.0, -1.0][i]
    assert w.rule == pytest.approx([3.0, -1.0][i]) and w.numeric == pytest.approx([1.0, 2.0][i])


def test_one_of_two_rules_wrong_only_that_one_is_named():
    cube, mul = make_cube(False), make_mul(True)
    rep = jgc.check_rules(lambda p: jnp.sum(cube(p)) + jnp.sum(mul(p, 2 * p)), jnp.array([0.5, 1.5]))
    assert [r.name for r in rep.failing()] == ["mul"]
    assert rep.rule("cube").status == "ok"
    text = str(rep)
    assert "mismatch     custom_vjp mul" in text and "ok           custom_jvp cube" in text
    assert text.index("custom_vjp mul") < text.index("custom_jvp cube")


def make_wrong_above_20():
    @jax.custom_jvp
    def soft(x):
        return jnp.log1p(jnp.exp(-jnp.abs(x))) + jnp.maximum(x, 0.0)

    @soft.defjvp
    def soft_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        slope = jax.nn.sigmoid(x)
        return soft(x), jnp.where(x > 20.0, 0.5, slope) * t  # the plant: wrong only above 20

    return soft


@pytest.mark.parametrize("scale,caught", [(1.0, False), (3.0, True)], ids=["below-20", "above-20"])
def test_rule_wrong_only_above_20(scale, caught):
    soft = make_wrong_above_20()

    def loss(p):
        # The carry grows by p each step: with p = 3 it passes 20 on step 7 of 10 (after
        # the first three calls), with p = 1 it never does.
        def body(c, _):
            c = c + p
            return c, soft(c)

        return jnp.sum(jax.lax.scan(body, jnp.zeros(2), None, length=10)[1])

    rep = jgc.check_rules(loss, jnp.array([scale, scale * 0.9]))
    r = rep.rule("soft")
    assert r.calls == 10 and r.checked == 4
    assert rep.ok is (not caught), str(rep)
    if caught:
        assert r.worst.input > 20 and r.worst.step == "scan step 9"


# -- closed-over values, integers, nondiff_argnums, rules that never run ----------------------------
@pytest.mark.parametrize("wrong", [False, True], ids=["correct", "planted"])
def test_rule_closing_over_a_value_computed_in_the_loss(wrong):
    def loss(p):
        s = 2.0 * p

        @jax.custom_jvp
        def scaled(x):
            return x * s

        scaled.defjvp(lambda pr, tg: (scaled(pr[0]), tg[0] * (s + (1.0 if wrong else 0.0))))
        return jnp.sum(jax.jit(scaled)(jnp.sin(p)))

    rep = jgc.check_rules(loss, jnp.array([0.5, 1.5]))
    assert rep.rule("scaled").status == ("mismatch" if wrong else "ok"), str(rep)


def test_nondiff_argnums_and_integer_operands_are_held_fixed():
    @partial(jax.custom_jvp, nondiff_argnums=(1,))
    def scale(x, n):
        return jnp.sin(x) * n

    @scale.defjvp
    def scale_jvp(n, primals, tangents):
        return scale(primals[0], n), jnp.cos(primals[0]) * tangents[0] * n

    @jax.custom_jvp
    def shift(x, k):
        return x + k

    shift.defjvp(lambda p, t: (shift(*p), t[0]))

    rep = jgc.check_rules(lambda p: jnp.sum(scale(p, p * 3.0) + shift(p, jnp.arange(2))), jnp.array([0.5, 1.5]))
    assert rep.ok, str(rep)
    assert {r.name: r.status for r in rep.rules} == {"scale": "ok", "shift": "ok"}


def test_rule_in_a_branch_not_taken_is_not_executed():
    cube = make_cube(True)
    rep = jgc.check_rules(lambda p: jax.lax.cond(p[0] > 0, jnp.sum, lambda q: jnp.sum(cube(q)), p),
                          jnp.array([0.5, 1.5]))
    assert rep.ok and rep.rule("cube").status == "not executed"


def test_large_operands_go_along_random_directions():
    mul = make_mul(True)
    x = jnp.linspace(0.5, 2.0, 300)
    rep = jgc.check_rules(lambda p: jnp.sum(mul(p, jnp.cos(p))), x)
    site = rep.rule("mul").sites[0]
    assert site.status == "mismatch" and site.method.startswith("vjp")


# -- intended surrogates -----------------------------------------------------------------------------
def test_straight_through_estimator_gets_a_hint_then_is_intended_once_marked():
    @jax.custom_jvp
    def ste_round(x):
        return jnp.round(x)

    ste_round.defjvp(lambda p, t: (ste_round(p[0]), t[0]))
    loss = lambda p: jnp.sum(ste_round(p))
    rep = jgc.check_rules(loss, jnp.array([0.3, 1.7]))
    assert not rep.ok and rep.rule("ste_round").hint.startswith("surrogate gradient?")
    assert jgc.intended(ste_round, reason="straight-through estimator") is ste_round
    rep = jgc.check_rules(loss, jnp.array([0.3, 1.7]))
    r = rep.rule("ste_round")
    assert rep.ok and r.status == "intended" and r.reason == "straight-through estimator"


def test_intended_as_a_decorator_and_bad_reason():
    @jgc.intended(reason="gradient clipping")
    @jax.custom_vjp
    def clip_grad(x):
        return x

    clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))
    rep = jgc.check_rules(lambda p: jnp.sum(clip_grad(p) ** 2), jnp.array([1.0, 2.0]))
    assert rep.ok and rep.rule("clip_grad").status == "intended"
    with pytest.raises(TypeError, match="reason must be a non-empty string"):
        jgc.intended(clip_grad, reason="")


def test_library_surrogates_are_intended():
    def loss(p):
        return jnp.sum(optax.scale_gradient(p, 0.5) ** 2) + jnp.sum(eqx.internal.nondifferentiable_backward(p))

    rep = jgc.check_rules(loss, jnp.array([1.0, 2.0]))
    assert rep.ok
    assert {r.status for r in rep.rules} == {"intended"}
    assert any(r.name == "_scale_gradient" for r in rep.rules)


# -- Equinox and Pallas ------------------------------------------------------------------------------
@eqx.filter_custom_jvp
def eqx_scale(x, y):
    return x * jnp.sin(y)


@eqx_scale.def_jvp
def eqx_scale_jvp(primals, tangents):
    x, y = primals
    tx, ty = tangents
    return eqx_scale(x, y), tx * jnp.sin(y) + ty * x * jnp.cos(y) * 1.5  # the plant: 1.5


@eqx.filter_custom_vjp
def eqx_tanh(vjp_arg, x):
    return jnp.tanh(vjp_arg) * x


@eqx_tanh.def_fwd
def eqx_tanh_fwd(perturbed, vjp_arg, x):
    return eqx_tanh(vjp_arg, x), None


@eqx_tanh.def_bwd
def eqx_tanh_bwd(res, g, perturbed, vjp_arg, x):
    return g * x * (1 - jnp.tanh(vjp_arg) ** 2)


def test_equinox_filtered_rules_are_named_through_the_wrappers():
    rep = jgc.check_rules(lambda p: jnp.sum(eqx_scale(p, p) + eqx_tanh(p, 2.0)), jnp.array([0.5, 1.5]))
    assert [r.name for r in rep.failing()] == ["eqx_scale"]
    bad = rep.rule("eqx_scale")
    assert bad.rule_name == "eqx_scale_jvp"
    # Equinox's wrappers are in equinox/_ad.py; the report names this file: the primal by
    # its def line, the rule by its code object (decorator line).
    assert bad.primal_at == f"{HERE}:{source_line('def eqx_scale(')}"
    assert bad.rule_at == f"{HERE}:{source_line('@eqx_scale.def_jvp')}"
    good = rep.rule("eqx_tanh")
    assert good.status == "ok" and (good.rule_name, good.fwd_name) == ("eqx_tanh_bwd", "eqx_tanh_fwd")


def _pallas_sin(x):
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = jnp.sin(x_ref[...])

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)


@pytest.mark.parametrize("wrong", [False, True], ids=["correct", "planted"])
def test_pallas_kernel_with_hand_written_backward(wrong):
    @jax.custom_vjp
    def kernel_sin(x):
        return _pallas_sin(x)

    def bwd(x, g):
        return (g * jnp.cos(x) * (jnp.where(x > 1.0, 0.9, 1.0) if wrong else 1.0),)

    kernel_sin.defvjp(lambda x: (_pallas_sin(x), x), bwd)
    rep = jgc.check_rules(lambda p: jnp.sum(kernel_sin(p)), jnp.array([0.5, 1.5]))
    r = rep.rule("kernel_sin")
    assert r.status == ("mismatch" if wrong else "ok"), str(rep)
    if wrong:
        assert r.worst.index == (1,) and r.worst.input == 1.5


# -- correct library rules are not flagged ------------------------------------------------------------
def test_jax_nn_and_optax_rules_pass():
    def loss(p):
        acts = jax.nn.relu(p) + jax.nn.relu6(p) + jax.nn.silu(p) + jax.nn.gelu(p) + jax.nn.softplus(p)
        ce = optax.safe_softmax_cross_entropy(p[None], jax.nn.one_hot(jnp.array([1]), 3))
        proj = optax.projections.projection_simplex(p)
        return jnp.sum(acts) + jnp.sum(ce) + jnp.sum(proj**2)

    rep = jgc.check_rules(loss, jnp.array([0.5, -1.5, 2.0]))
    assert rep.ok, str(rep)
    names = {r.name for r in rep.rules}
    assert {"relu", "relu6", "_projection_unit_simplex"} <= names
    assert all(r.status == "ok" for r in rep.rules), str(rep)


def test_flax_and_equinox_models_pass():
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(jax.nn.relu6(nn.Dense(4)(x)))

    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    flax_params = MLP().init(jax.random.key(0), x)
    rep = jgc.check_rules(lambda p, x: jnp.sum(MLP().apply(p, x) ** 2), flax_params, x)
    assert rep.ok and rep.rules and all(r.status == "ok" for r in rep.rules), str(rep)

    model = eqx.nn.MLP(3, 1, 4, 2, activation=jax.nn.relu, key=jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    rep = jgc.check_rules(lambda p, x: jnp.sum(jax.vmap(eqx.combine(p, static))(x) ** 2), params, x)
    assert rep.ok and rep.rule("relu").status == "ok", str(rep)


# -- the report --------------------------------------------------------------------------------------
def test_report_dict_and_text():
    rep = jgc.check_rules(lambda p: jnp.sum(make_mul(True)(p, p + 1)), jnp.array([1.0, 2.0]))
    d = json.loads(rep.to_json())
    assert d["ok"] is False and d["rules"][0]["status"] == "mismatch"
    assert d["rules"][0]["worst"]["operand"] in ("x", "y")
    assert d["rules"][0]["sites"][0]["at"].startswith(f"{HERE}:")
    text = str(rep)
    assert text.splitlines()[0].startswith("jgc.check_rules(") and "1 of 1 rule wrong" in text
    assert "worst: operand" in text


def test_bad_input():
    with pytest.raises(TypeError, match="fn must be callable"):
        jgc.check_rules(3, jnp.ones(2))
    with pytest.raises(ValueError, match="precision"):
        jgc.check_rules(jnp.sum, jnp.ones(2), precision="half")


def test_docstring_examples_run():
    results = [doctest.testmod(m) for m in (rules_impl, intended_impl)]
    failed, attempted = sum(r.failed for r in results), sum(r.attempted for r in results)
    assert attempted >= 6 and failed == 0


# -- where users meet it -------------------------------------------------------------------------------
def two_layer(act):
    def loss(p, x):
        return jnp.sum(act(x @ p["W1"]) @ p["W2"])

    params = {"W1": jnp.array([[0.3, -0.2], [0.1, 0.5]]), "W2": jnp.array([0.7, -1.1])}
    return loss, params, jnp.array([[1.0, 2.0]])


def make_tanh(wrong: bool):
    @jax.custom_vjp
    def tanh_act(x):
        return jnp.tanh(x)

    def tanh_bwd(x, g):
        return (g * (1 - jnp.tanh(x) if wrong else 1 - jnp.tanh(x) ** 2),)  # the plant: tanh for tanh²

    tanh_act.defvjp(lambda x: (jnp.tanh(x), x), tanh_bwd)
    return tanh_act


def test_check_with_rules_names_the_rule_only_when_the_gradient_disagrees():
    loss, params, x = two_layer(make_tanh(True))
    rep = jgc.check(loss, params, x, rules=True)
    assert not rep.ok and rep.rules is not None
    assert [r.name for r in rep.rules.failing()] == ["tanh_act"]
    assert "custom rule custom_vjp tanh_act" in str(rep)
    with pytest.raises(jgc.GradCheckError, match=r"Wrong custom rule: tanh_act \(tests/test_rules.py:\d+\)"):
        jgc.assert_grads_close(loss, params, x, rules=True)
    loss, params, x = two_layer(make_tanh(False))
    assert jgc.check(loss, params, x, rules=True).rules is None  # passing checks stay as cheap as before


def test_assert_rules_ok():
    loss, params, x = two_layer(make_tanh(False))
    assert testing.assert_rules_ok(loss, params, x).ok
    loss, params, x = two_layer(make_tanh(True))
    with pytest.raises(jgc.GradCheckError, match=r"^\[jgc\] Assertion assert_rules_ok failed: wrong custom rule: "
                                                 r"tanh_act \(tests/test_rules.py:\d+\), rule tanh_bwd") as info:
        testing.assert_rules_ok(loss, params, x)
    assert isinstance(info.value.report, jgc.RulesReport)


CLI_SOURCE = """
import jax, jax.numpy as jnp

@jax.custom_jvp
def cube(x):
    return x ** 3

cube.defjvp(lambda p, t: (cube(p[0]), {factor} * p[0] ** 2 * t[0]))

def loss(params, x):
    return jnp.sum(cube(params * x))

def make_params():
    return jnp.array([0.5, 1.5])

def make_args():
    return (jnp.array([1.0, 2.0]),)
"""


@pytest.mark.parametrize("factor,code", [(3.0, 0), (2.0, 1)], ids=["correct", "planted"])
def test_cli_rules_exit_codes_and_json(tmp_path, monkeypatch, capsys, factor, code):
    name = f"rules_case_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(CLI_SOURCE.format(factor=factor)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["rules", f"{name}:loss", "--params", f"{name}:make_params", "--args",
                     f"{name}:make_args", "--json"]) == code
    out = json.loads(capsys.readouterr().out)
    assert out["rules"][0]["name"] == "cube"
    assert out["rules"][0]["status"] == ("ok" if code == 0 else "mismatch")
    assert out["rules"][0]["primal_at"] == f"{name}.py:4"
    assert cli.main(["rules", f"{name}:nothing", "--params", f"{name}:make_params"]) == 2
    assert capsys.readouterr().err.startswith("jgc rules: ")


def test_optax_ctc_loss_has_no_wrong_rule_in_float64():
    # ctc's logaddexp runs inside a scan (some calls with equal operands: its kink) and
    # once more after it. Their sites are checked together, and the kinks widen the
    # shared step until Richardson misjudges the smooth call; the step ladder settles it.
    def loss(p, lab):
        return jnp.mean(optax.ctc_loss(p, jnp.zeros((2, 6)), lab, jnp.zeros((2, 3))))

    with jax.enable_x64(True):
        logits = jax.random.normal(jax.random.key(12), (2, 6, 5))
        labels = jnp.array([[1, 2, 3], [2, 2, 4]])
        rep = jgc.check_rules(loss, logits, labels)
    assert rep.ok and [r.name for r in rep.rules] == ["logaddexp"], str(rep)


# -- only what reaches the gradient is compared ---------------------------------------------------
def make_scaled_pow(factor_in_k):
    """x**k with a custom_jvp; the derivative in k is right when ``factor_in_k`` is 1."""

    @jax.custom_jvp
    def scaled_pow(x, k):
        return x ** k

    @scaled_pow.defjvp
    def scaled_pow_jvp(p, t):
        (x, k), (tx, tk) = p, t
        return x ** k, k * x ** (k - 1) * tx + factor_in_k * jnp.log(x) * x ** k * tk

    return scaled_pow


def test_a_constant_operand_is_held_fixed_and_all_operands_compares_it():
    pw = make_scaled_pow(2.0)  # wrong in k, right in x
    x = jnp.array([0.5, 1.5])

    def loss(x):
        return jnp.sum(pw(x, jnp.full(2, 3.0)))  # k is a constant: its derivative never reaches the gradient

    rep = jgc.check_rules(loss, x)
    site = rep.rule("scaled_pow").sites[0]
    assert rep.ok and site.status == "ok" and "k (not on the differentiated path)" in site.held, str(rep)
    full = jgc.check_rules(loss, x, all_operands=True)
    assert not full.ok and full.rule("scaled_pow").worst.operand == "k", str(full)
    # The same rule fed a parameter-dependent k is compared in k, and caught.
    assert not jgc.check_rules(lambda x: jnp.sum(pw(x, 2 * x)), x).ok


def test_an_output_whose_cotangent_never_reaches_the_cost_is_not_compared():
    @jax.custom_jvp
    def value_and_residual(x):
        return jnp.sin(x), x ** 2

    @value_and_residual.defjvp
    def value_and_residual_jvp(p, t):
        (x,), (tx,) = p, t
        return value_and_residual(x), (jnp.cos(x) * tx, jnp.zeros_like(x))  # residual: a zero tangent on purpose

    def loss(x):
        y, r = value_and_residual(x)
        return jnp.sum(y) + jnp.sum(jax.lax.stop_gradient(r))

    x = jnp.array([0.3, -0.8])
    rep = jgc.check_rules(loss, x)
    site = rep.rule("value_and_residual").sites[0]
    assert rep.ok and "1 output not compared" in site.held, str(rep)
    assert not jgc.check_rules(loss, x, all_operands=True).ok
    # Used in the cost, the residual's zero tangent is wrong and named.
    assert not jgc.check_rules(lambda x: jnp.sum(value_and_residual(x)[1]), x).ok


def test_a_rule_used_only_off_the_path_is_listed_not_checked():
    pw = make_scaled_pow(2.0)
    rep = jgc.check_rules(lambda x, d: jnp.sum(x) + jnp.sum(pw(d, d)), jnp.array([1.0]), jnp.array([0.5, 2.0]))
    r = rep.rule("scaled_pow")
    assert rep.ok and r.status == "not on the differentiated path", str(rep)
    assert "not on the differentiated path" in str(rep)


def make_masked_lse(factor):
    @jax.custom_jvp
    def masked_lse(x):
        return jax.scipy.special.logsumexp(x)

    @masked_lse.defjvp
    def masked_lse_jvp(p, t):
        (x,), (tx,) = p, t
        return masked_lse(x), factor * jnp.sum(jax.nn.softmax(x) * jnp.where(jnp.isfinite(x), tx, 0.0))

    return masked_lse


@pytest.mark.parametrize("factor", [1.0, 1.01], ids=["correct", "planted 1%"])
def test_infinite_entries_are_held_fixed_and_the_finite_ones_checked(factor):
    lse = make_masked_lse(factor)
    mask = jnp.array([True, False, True, True])

    def loss(x):
        return lse(jnp.where(mask, x, -jnp.inf))  # -inf entries: constants of the check

    rep = jgc.check_rules(loss, jnp.array([0.3, 0.1, -1.2, 2.0]))
    site = rep.rule("masked_lse").sites[0]
    assert "non-finite entries of x (-inf)" in site.held, str(rep)
    if factor == 1.0:
        assert rep.ok and site.status == "ok", str(rep)
    else:
        assert not rep.ok and site.worst.operand == "x" and site.worst.index[0] != 1, str(rep)


def test_non_finite_output_entries_are_left_out_per_entry():
    @jax.custom_jvp
    def safe_log(x):
        return jnp.log(x)

    safe_log.defjvp(lambda p, t: (safe_log(p[0]), 1.01 * t[0] / p[0]))  # planted 1%

    rep = jgc.check_rules(lambda x: jnp.sum(jnp.where(x > 0, safe_log(x), 0.0)), jnp.array([0.0, 0.5, 2.0]))
    site = rep.rule("safe_log").sites[0]
    assert "1 non-finite output entry" in site.held and site.status == "mismatch", str(rep)


def test_a_runtime_check_with_a_host_callback_is_checked_not_an_error():
    # eqx.error_if is a custom_jvp whose primal holds a pure_callback without a batching
    # rule; it runs one point at a time and its (identity) rule is checked.
    def loss(x):
        return jnp.sum(eqx.error_if(x, x < -10.0, "too small") ** 2)

    rep = jgc.check_rules(loss, jnp.array([0.5, -1.5]))
    assert rep.ok and rep.rules and all(r.status in ("ok", "intended") for r in rep.rules), str(rep)
    assert any(r.status == "ok" for r in rep.rules), str(rep)
    # Named by Equinox's primal, not by its wrapper (fn_wrapper in equinox/_ad.py).
    assert "_error" in [r.name for r in rep.rules] and "fn_wrapper" not in str(rep), str(rep)


def make_damped_tanh(rel_error):
    @jax.custom_jvp
    def damped_tanh(x):
        return jnp.tanh(x)

    damped_tanh.defjvp(lambda p, t: (damped_tanh(p[0]), (1 - jnp.tanh(p[0]) ** 2) * (1 + rel_error) * t[0]))
    return damped_tanh


@pytest.mark.parametrize("rel_error", [1e-6, 1e-2], ids=["within its tolerance", "planted 1%"])
def test_an_approximate_rule_is_approximate_within_its_tolerance_and_wrong_beyond(rel_error):
    rule = jgc.approximate(make_damped_tanh(rel_error), tol=1e-5, reason="a truncated series")
    # In float64: a float32 rule is judged at float32, whose rounding hides an error of 1e-6.
    with jax.enable_x64(True):
        rep = jgc.check_rules(lambda p: jnp.sum(rule(p)), jnp.array([0.3, 1.7], dtype=jnp.float64))
    site = rep.rule("damped_tanh").sites[0]
    assert site.error == pytest.approx(rel_error, rel=0.1), str(rep)
    if rel_error < 1e-5:
        assert rep.ok and site.status == "approximate" and "tolerance 1e-05" in site.reason, str(rep)
        # jgc.check fails on it (the gradient is off by 1e-6), and says it is approximate by design.
        with jax.enable_x64(True):
            full = jgc.check(lambda p: jnp.sum(rule(p)), jnp.array([0.3, 1.7], dtype=jnp.float64), rules=True)
        assert not full.ok
        assert any("approximate by construction" in n for n in full.notes), full.notes
    else:
        assert not rep.ok and site.status == "mismatch" and "beyond what the approximation" in site.reason


def test_approximate_refuses_a_missing_tolerance_or_reason():
    with pytest.raises(TypeError, match="tol must be a positive"):
        jgc.approximate(make_damped_tanh(0.0), tol=0.0, reason="x")
    with pytest.raises(TypeError, match="reason must be"):
        jgc.approximate(make_damped_tanh(0.0), tol=1e-3, reason="")


def test_a_rule_fed_only_by_a_constant_output_of_another_rule_is_off_the_path():
    @jax.custom_jvp
    def split(x, c):
        return x ** 2, 3.0 * c

    split.defjvp(lambda p, t: (split(*p), (2 * p[0] * t[0], 3.0 * t[1])))
    bad = make_scaled_pow(2.0)  # wrong in its exponent

    def loss(x):
        y, k = split(x, jnp.full(2, 0.5))  # k depends on the constant only (the primal's data flow)
        return jnp.sum(y) + jnp.sum(bad(jnp.full(2, 1.5), k))

    rep = jgc.check_rules(loss, jnp.array([0.3, -0.7]))
    assert rep.ok and rep.rule("scaled_pow").status == "not on the differentiated path", str(rep)
    assert rep.rule("split").status == "ok", str(rep)


def make_write_tail(factor_on_head):
    """out = buf with its tail overwritten by x; the backward pass hands buf the whole cotangent.

    That is wrong for the overwritten entries (their true derivative is 0) but harmless
    when they are constants, as in a library's write-once buffer.
    """

    @jax.custom_vjp
    def write_tail(buf, x):
        return buf.at[1:].set(x)

    write_tail.defvjp(lambda buf, x: (write_tail(buf, x), None),
                      lambda _, g: (g.at[0].multiply(factor_on_head), g[1:]))
    return write_tail


@pytest.mark.parametrize("factor", [1.0, 1.01], ids=["correct where it matters", "planted 1% on the head"])
def test_buffer_entries_the_parameters_never_reach_are_held_fixed(factor):
    write_tail = make_write_tail(factor)

    def loss(p):
        buf = jnp.zeros(3).at[0].set(p[0] ** 2)  # entry 0 carries the params, entries 1 and 2 are constants
        return jnp.sum(write_tail(buf, p[1:]) ** 2)

    p = jnp.array([0.7, -0.4, 1.1])
    rep = jgc.check_rules(loss, p)
    site = rep.rule("write_tail").sites[0]
    assert "2 entries of buf that do not move with the parameters" in site.held, str(rep)
    if factor == 1.0:
        assert rep.ok, str(rep)
        assert not jgc.check_rules(loss, p, all_operands=True).ok  # the overwritten entries, compared
    else:
        assert not rep.ok and site.worst.operand == "buf" and site.worst.index == (0,), str(rep)


def test_a_right_rule_with_an_infinite_output_entry_is_not_called_wrong():
    # xlogy(x, 0) = -inf for x > 0: that entry is left out, and the others are compared
    # without the NaN that reverse mode would make of 0 · (-inf).
    y = jnp.array([0.0, 0.5, 2.0])

    def loss(x, y):
        return jnp.sum(jnp.where(y > 0, jax.scipy.special.xlogy(x, y), 0.0))

    rep = jgc.check_rules(loss, jnp.array([1.5, 0.7, 0.2]), y)
    site = rep.rule("xlogy").sites[0]
    assert rep.ok and site.status == "ok" and "1 non-finite output entry" in site.held, str(rep)


def _library_or_skip(name):
    return pytest.importorskip(name, reason=f"{name} is an optional library (bench_real_rules.py runs it)")


def test_jax_md_transform_and_quaternion_rotation_are_intended_at_the_checked_version():
    # Both rules differ from their primal's derivative on purpose (see their source);
    # without the recognition each is a mismatch (rule 0 vs 0.3 for transform).
    from jgc._src.rules.surrogates import CHECKED_WITH

    jax_md = pytest.importorskip("jax_md", reason="jax-md is optional and not in the test extra: it needs "
                                 "jraph and e3nn-jax to import (checked in a venv with them, at the version pinned)")
    from jax_md import rigid_body, space

    box = jnp.array([[2.0, 0.3, 0.0], [0.0, 1.8, 0.2], [0.0, 0.0, 2.2]])
    q = jnp.array([0.9, 0.1, -0.3, 0.2])
    q, v = q / jnp.linalg.norm(q), jnp.array([0.3, -0.5, 0.8])
    with jax.enable_x64(True):
        moved = jgc.check_rules(lambda r: jnp.sum(jnp.sin(space.transform(box, r))),
                                jnp.array([[0.1, 0.2, 0.3], [0.5, 0.4, 0.9]], jnp.float64))
        turned = jgc.check_rules(lambda q: jnp.sum(rigid_body._quaternion_rotate(q, v) ** 3), q.astype(jnp.float64))
    version = getattr(jax_md, "__version__", "?"), CHECKED_WITH["jax_md"]
    for rep in (moved, turned):
        assert rep.ok and [r.status for r in rep.rules] == ["intended"], (version, str(rep))
        assert "jax_md source" in rep.rules[0].reason


def test_known_library_surrogates_are_intended_at_the_checked_versions():
    from jgc._src.rules.surrogates import CHECKED_WITH

    jaxopt = _library_or_skip("jaxopt")
    from jaxopt import perturbations

    with jax.enable_x64(True):
        pert = perturbations.make_perturbed_argmax(lambda x: jax.nn.one_hot(jnp.argmax(x), 3), num_samples=8,
                                                   sigma=0.5)
        rep = jgc.check_rules(lambda x: jnp.sum(pert(x, jax.random.PRNGKey(0)) * jnp.arange(3.0)),
                              jnp.array([0.3, -0.2, 0.1]))
    assert rep.ok and [r.status for r in rep.rules] == ["intended"], (jaxopt.__version__, CHECKED_WITH["jaxopt"],
                                                                      str(rep))
