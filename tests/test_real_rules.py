"""jgc.check_rules on rules written by others: primitives with registered rules, lineax, diffrax,
optimistix, TensorFlow Probability, softmax over -inf entries.

Correct rules must pass; each planted 1 % error must be named by the file:line of the
function that holds it (written here by hand from the plant, not read back from a report).
A planted library rule is patched inside a ``try`` and restored after its check.
Libraries are optional: a test whose library is not installed is skipped with the reason.
"""

from __future__ import annotations

import inspect
import os

import jax
import jax.numpy as jnp
import pytest
from jax.extend.core import Primitive
from jax.interpreters import ad, mlir

import jgc

HERE = os.path.relpath(__file__)  # as check_rules shows a file under the working directory


def _line(fn) -> str:
    """``file:line`` of a function defined in this file, as check_rules shows it."""
    return f"{HERE}:{inspect.getsourcelines(fn)[1]}"


def _only(rep, kind: str):
    rules = [r for r in rep.rules if r.kind == kind]
    assert len(rules) == 1, str(rep)
    return rules[0]


# -- a primitive made by hand ------------------------------------------------------------------
def _cube_primitive(factor: float):
    """y = x³ as a new primitive; its JVP rule multiplies by ``factor`` (1.01 plants a 1 % error)."""
    p = Primitive(f"jgc_test_cube_{factor}")
    p.def_impl(lambda x: x ** 3)
    p.def_abstract_eval(lambda x: x)
    mlir.register_lowering(p, mlir.lower_fun(lambda x: x ** 3, multiple_results=False))

    def cube_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return p.bind(x), factor * 3 * x ** 2 * t

    ad.primitive_jvps[p] = cube_jvp
    return p, cube_jvp


def test_user_primitive_jvp_right_and_planted():
    x = jnp.array([0.5, -1.2, 2.0])
    p, _ = _cube_primitive(1.0)
    rep = jgc.check_rules(lambda v: jnp.sum(jnp.sin(p.bind(v))), x)
    assert rep.ok, str(rep)
    assert _only(rep, "primitive jvp").status == "ok"
    bad, bad_jvp = _cube_primitive(1.01)
    rep = jgc.check_rules(lambda v: jnp.sum(jnp.sin(bad.bind(v))), x)
    assert not rep.ok
    r = _only(rep, "primitive jvp")
    assert r.status == "mismatch" and r.name == bad.name
    assert r.rule_name == "_cube_primitive.<locals>.cube_jvp" and r.rule_at == _line(bad_jvp)
    # Without primitive checks the wrong rule goes unseen: there is no custom_jvp/custom_vjp.
    assert jgc.check_rules(lambda v: jnp.sum(jnp.sin(bad.bind(v))), x, primitives="none").rules == ()


def _scale_primitive(transpose_factor: float):
    """y = 2 x, linear: its JVP applies it to the tangent, its transpose rule is 2·ct × factor."""
    p = Primitive(f"jgc_test_double_{transpose_factor}")
    p.def_impl(lambda x: 2 * x)
    p.def_abstract_eval(lambda x: x)
    mlir.register_lowering(p, mlir.lower_fun(lambda x: 2 * x, multiple_results=False))
    ad.primitive_jvps[p] = lambda primals, tangents: (p.bind(*primals), p.bind(*tangents))

    def double_transpose(ct, x):
        assert ad.is_undefined_primal(x)
        return [transpose_factor * 2 * ct]

    ad.primitive_transposes[p] = double_transpose
    return p, double_transpose


def test_user_primitive_planted_transpose_is_named():
    x = jnp.array([0.5, -1.2, 2.0])
    p, transpose = _scale_primitive(1.01)
    rep = jgc.check_rules(lambda v: jnp.sum(jnp.tanh(p.bind(v))), x)
    assert not rep.ok
    tr = _only(rep, "primitive transpose")
    assert tr.status == "mismatch" and tr.rule_at == _line(transpose)
    assert _only(rep, "primitive jvp").status == "ok", str(rep)  # the JVP itself is right


def test_builtin_primitives_only_when_asked():
    f = lambda v: jnp.sum(jnp.sin(v))  # noqa: E731
    x = jnp.array([0.5, -1.2])
    assert jgc.check_rules(f, x).rules == ()
    rep = jgc.check_rules(f, x, primitives="all")
    assert rep.ok and {r.name for r in rep.rules} == {"sin", "reduce_sum"}, str(rep)
    assert all(r.rule_at.startswith("jax/") for r in rep.rules), str(rep)
    with pytest.raises(ValueError, match="primitives"):
        jgc.check_rules(f, x, primitives="builtin")


# -- lineax: linear_solve is a primitive with JVP and transpose rules ----------------------------
A3 = [[3.0, 0.4, 0.1], [0.4, 2.5, -0.3], [0.1, -0.3, 1.8]]


def _lineax_loss():
    lx = pytest.importorskip("lineax", reason="lineax is an optional test dependency")
    b = [1.0, -0.5, 0.25]
    return lambda a: jnp.sum(lx.linear_solve(lx.MatrixLinearOperator(a), jnp.array(b, a.dtype), lx.LU()).value ** 2)


def test_lineax_linear_solve_rules_are_found_and_right():
    rep = jgc.check_rules(_lineax_loss(), jnp.array(A3))
    assert rep.ok, str(rep)
    jvp, tr = _only(rep, "primitive jvp"), _only(rep, "primitive transpose")
    assert jvp.name == "linear_solve" and jvp.status == "ok" and jvp.rule_name == "_linear_solve_jvp"
    assert jvp.rule_at.startswith("lineax/_solve.py:") and tr.rule_name == "_linear_solve_transpose"
    assert tr.status == "ok", str(rep)


def test_lineax_iterative_solve_is_approximate_with_the_solvers_tolerance():
    # CG stops at a residual tolerance, and so does the second solve its JVP rule makes:
    # at rtol=3e-5 on this matrix (condition number about 1e3) the JVP differs from the
    # finite differences by about 3.5e-4 relative, far beyond what float64 differences
    # resolve. That is the solver's approximation, not a wrong rule.
    lx = pytest.importorskip("lineax", reason="lineax is an optional test dependency")
    with jax.enable_x64(True):
        a = jax.random.normal(jax.random.key(0), (6, 6), jnp.float64)
        a = a @ a.T + 0.05 * jnp.eye(6)
        b = jnp.arange(1.0, 7.0)

        def loss(m):
            op = lx.MatrixLinearOperator(m, lx.positive_semidefinite_tag)
            return jnp.sum(lx.linear_solve(op, b, lx.CG(rtol=3e-5, atol=3e-5, max_steps=1000),
                                           throw=False).value ** 2)

        rep = jgc.check_rules(loss, a)
    jvp = _only(rep, "primitive jvp")
    assert jvp.status == "approximate", str(rep)
    assert "CG rtol=3e-05" in jvp.reason and "relative error" in jvp.reason
    assert rep.ok


def planted_linear_solve_jvp(primals, tangents, **params):
    """lineax's JVP rule with every tangent 1 % too large."""
    out, t_out = _RIGHT_JVP[0](primals, tangents, **params)
    return out, jax.tree_util.tree_map(lambda t: 1.01 * t if isinstance(t, jax.Array) else t, t_out)


_RIGHT_JVP = []


def test_lineax_planted_jvp_error_is_named():
    loss = _lineax_loss()
    import lineax._solve as solve

    prim = solve.linear_solve_p
    _RIGHT_JVP[:] = [ad.primitive_jvps[prim]]
    ad.primitive_jvps[prim] = planted_linear_solve_jvp
    try:
        rep = jgc.check_rules(loss, jnp.array(A3))
    finally:
        ad.primitive_jvps[prim] = _RIGHT_JVP[0]
    assert not rep.ok
    jvp = _only(rep, "primitive jvp")
    assert jvp.status == "mismatch" and jvp.rule_at == _line(planted_linear_solve_jvp)
    assert _only(rep, "primitive transpose").status == "ok"  # the transpose of the wrong JVP is exact


# -- softmax and a custom_jvp at -inf -------------------------------------------------------------
def test_softmax_over_minus_inf_entries_is_right():
    mask = jnp.array([True, False, True, True])
    rep = jgc.check_rules(lambda x: jnp.sum(jax.nn.softmax(jnp.where(mask, x, -jnp.inf)) * jnp.arange(4.0)),
                          jnp.array([0.3, -1.2, 2.0, 0.7]))
    assert rep.ok, str(rep)


@jax.custom_jvp
def soft_clip_bad(x, lo):
    return jnp.where(x > lo, jnp.tanh(x), lo)


@soft_clip_bad.defjvp
def soft_clip_bad_jvp(p, t):  # 1 % too large
    return soft_clip_bad(*p), 1.01 * jnp.where(p[0] > p[1], 1 - jnp.tanh(p[0]) ** 2, 0.0) * t[0]


def test_planted_custom_jvp_with_minus_inf_bound_is_named():
    rep = jgc.check_rules(lambda x: jnp.sum(soft_clip_bad(x, -jnp.inf)), jnp.array([0.3, -1.2, 2.0]))
    r = rep.rule("soft_clip_bad")
    assert r.status == "mismatch" and r.rule_at == _line(soft_clip_bad_jvp), str(rep)


# -- diffrax, optimistix, TFP (slower: compiled solvers) -------------------------------------------
def _ode_loss(adjoint, controller=None, dt=0.1):
    diffrax = pytest.importorskip("diffrax", reason="diffrax is an optional test dependency")
    controller = controller or diffrax.ConstantStepSize()  # 10 steps of 0.1: a few seconds per check

    def loss(k):
        term = diffrax.ODETerm(lambda t, y, k: -k * y + jnp.sin(t))
        sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, 1.0, dt, jnp.array([1.0, 0.5], k.dtype), args=k,
                                  adjoint=adjoint, stepsize_controller=controller)
        return jnp.sum(sol.ys[-1] ** 2)

    return loss


def test_diffrax_backsolve_tolerance_is_read_from_its_controller():
    diffrax = pytest.importorskip("diffrax", reason="diffrax is an optional test dependency")
    from jgc._src.rules.surrogates import solver_tolerance

    loss = _ode_loss(diffrax.BacksolveAdjoint(), diffrax.PIDController(rtol=1e-4, atol=1e-6))
    closed = jax.make_jaxpr(loss)(jnp.array([0.7, 1.3]))
    found = [solver_tolerance(e.params) for e in _equations(closed.jaxpr) if e.primitive.name == "custom_vjp_call"]
    assert (1e-4, 1e-6, "PIDController") in found, found


def _equations(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for x in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(x, "jaxpr", x)
                if hasattr(sub, "eqns"):
                    yield from _equations(sub)


@pytest.mark.slow
def test_diffrax_recursive_checkpoint_adjoint_is_right():
    diffrax = pytest.importorskip("diffrax", reason="diffrax is an optional test dependency")
    rep = jgc.check_rules(_ode_loss(diffrax.RecursiveCheckpointAdjoint()), jnp.array([0.7, 1.3]))
    assert rep.ok and not [r for r in rep.rules if r.status in ("error", "approximate")], str(rep)


@pytest.mark.slow
def test_diffrax_backsolve_adjoint_is_right_or_approximate():
    diffrax = pytest.importorskip("diffrax", reason="diffrax is an optional test dependency")
    rep = jgc.check_rules(_ode_loss(diffrax.BacksolveAdjoint()), jnp.array([0.7, 1.3]))
    assert rep.ok, str(rep)
    r = rep.rule("_loop_backsolve")
    assert r.status in ("ok", "approximate"), str(rep)


@pytest.mark.slow
def test_diffrax_backsolve_adjoint_at_a_coarse_step_is_approximate_not_wrong():
    # BacksolveAdjoint differentiates the continuous ODE, not the discrete solve: at
    # dt = 0.5 its gradient differs from the discrete one by about 1.6e-4 relative,
    # beyond what float64 differences resolve and within the allowance for such rules.
    diffrax = pytest.importorskip("diffrax", reason="diffrax is an optional test dependency")
    with jax.enable_x64(True):
        rep = jgc.check_rules(_ode_loss(diffrax.BacksolveAdjoint(), dt=0.5), jnp.array([0.7, 1.3], jnp.float64))
    (r,) = [r for r in rep.rules if r.name == "_loop_backsolve"]
    assert r.status == "approximate" and "relative error" in r.reason, str(rep)
    assert rep.ok


@pytest.mark.slow
def test_diffrax_backsolve_planted_backward_error_is_named():
    diffrax = pytest.importorskip("diffrax", reason="diffrax is an optional test dependency")
    import diffrax._adjoint as adjoint

    rule = adjoint._loop_backsolve
    right = rule.fn_bwd

    def planted_bwd(*a, **k):  # every cotangent 1 % too large
        return jax.tree_util.tree_map(lambda g: None if g is None else 1.01 * g, right(*a, **k))

    rule.fn_bwd = planted_bwd
    try:
        rep = jgc.check_rules(_ode_loss(diffrax.BacksolveAdjoint()), jnp.array([0.7, 1.3]))
    finally:
        rule.fn_bwd = right
    r = rep.rule("_loop_backsolve")
    assert r.status == "mismatch" and r.rule_at == _line(planted_bwd), str(rep)


@pytest.mark.slow
def test_optimistix_root_find_is_right():
    optx = pytest.importorskip("optimistix", reason="optimistix is an optional test dependency")

    def loss(theta):
        sol = optx.root_find(lambda y, th: jnp.tanh(y) + y - th, optx.Newton(rtol=1e-10, atol=1e-10),
                             jnp.zeros(3), args=theta)
        return jnp.sum(sol.value ** 2)

    rep = jgc.check_rules(loss, jnp.array([0.5, -0.2, 1.0]))
    assert rep.ok and any(r.status in ("ok", "approximate") for r in rep.rules), str(rep)


@pytest.mark.slow
def test_tfp_bessel_with_a_constant_order_is_right():
    pytest.importorskip("tensorflow_probability", reason="TensorFlow Probability is an optional test dependency")
    from tensorflow_probability.substrates import jax as tfp

    rep = jgc.check_rules(lambda x: jnp.sum(tfp.math.bessel_ive(1.5, x)), jnp.array([0.3, 1.2, 2.0, 0.7]))
    assert rep.ok and rep.rules, str(rep)
