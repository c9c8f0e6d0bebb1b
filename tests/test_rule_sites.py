"""jgc.check_rules runs jgc.check_rule's checks at each call site, and finds the rules a trace hides.

Each wrong rule is planted inside a loss, where only one check can see it; the report must
fail, name the rule by its ``file:line`` (written by hand from this file, never read back
from the report) and say which check found it. Correct library rules in the same kinds of
losses must pass.
"""

from __future__ import annotations

import inspect
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.custom_batching import custom_vmap

import jgc

HERE = os.path.relpath(__file__)


def source_line(text: str) -> int:
    """The line of this file that starts with ``text``."""
    with open(__file__) as f:
        return next(i for i, ln in enumerate(f, 1) if ln.startswith(text))


def named(rep, name):
    """The rule and its line: JAX names a decorated function by its decorator's line (the code
    object's first line), one above its ``def``."""
    r = rep.rule(name)
    assert os.path.relpath(r.primal_at.rsplit(":", 1)[0]) == HERE, r.primal_at
    return r, int(r.primal_at.rsplit(":", 1)[1])


def failed(r) -> set:
    return {s.check or "first derivative" for s in r.sites + r.checks if s.status == "mismatch"}


X = jnp.array([0.3, -0.7, 1.2])


# -- wrong only under vmap: a custom_vmap whose batching rule is 1% off ------------------------------
@custom_vmap
def vm_sin(x):
    return jnp.sin(x)


@vm_sin.def_vmap
def vm_sin_rule(axis_size, in_batched, x):
    return jnp.sin(x) * 1.01, in_batched[0]  # the plant: 1% off, only when batched


def test_custom_vmap_wrong_only_under_vmap_is_found_and_named():
    rep = jgc.check_rules(lambda p: jnp.sum(jax.vmap(vm_sin)(p)), X)
    assert not rep.ok
    r, line = named(rep, "vm_sin")
    assert r.kind == "custom_vmap" and line == source_line("def vm_sin(") - 1
    assert failed(r) == {"batching"} and "batching" in rep.failed_checks()
    assert "under jax.vmap" in str(rep)


# -- wrong at order 2, in a loss that differentiates itself (a gradient penalty) ---------------------
@jax.custom_jvp
def sg_tanh(x):
    return jnp.tanh(x)


@sg_tanh.defjvp
def sg_tanh_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    # The plant: right first derivative, built from a value AD cannot see through.
    return jnp.tanh(x), (1 - jnp.tanh(jax.lax.stop_gradient(x)) ** 2) * t


def test_order_2_is_checked_where_the_loss_differentiates_twice():
    penalty = lambda p: jnp.sum(jax.grad(lambda q: jnp.sum(sg_tanh(q)))(p) ** 2)
    rep = jgc.check_rules(penalty, X)
    assert not rep.ok
    r, line = named(rep, "sg_tanh")
    assert line == source_line("def sg_tanh(") - 1
    assert failed(r) == {"order 2"} and rep.failed_checks() == ("order 2",)


# -- non-linear in the cotangent: the backward pass clips it -----------------------------------------
@jax.custom_vjp
def clip_bwd_sin(x):
    return jnp.sin(x)


def _clip_fwd(x):
    return jnp.sin(x), x


def _clip_bwd(x, g):
    return (jnp.cos(x) * jnp.clip(g, -2.0, 2.0),)  # the plant: clips the cotangent


clip_bwd_sin.defvjp(_clip_fwd, _clip_bwd)


def test_a_backward_pass_that_clips_its_cotangent_fails_linearity():
    # The loss feeds it unit cotangents, which the clip leaves alone: only linearity sees it.
    rep = jgc.check_rules(lambda p: jnp.sum(clip_bwd_sin(p)), X)
    assert not rep.ok
    r, line = named(rep, "clip_bwd_sin")
    assert line == source_line("def clip_bwd_sin(") - 1
    assert failed(r) == {"linearity"}
    assert "not linear in the cotangent" in r.reason


# -- a tangent-clipping JVP used only inside the loss's own jax.jvp (a forward-mode PINN loss) --------
@jax.custom_jvp
def tclip_sin(x):
    return jnp.sin(x)


@tclip_sin.defjvp
def tclip_sin_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.sin(x), jnp.clip(jnp.cos(x) * t, -0.1, 0.1)  # the plant: clips the tangent


def test_a_rule_run_only_in_the_losss_own_jvp_is_found():
    def pinn(p):
        _, du = jax.jvp(tclip_sin, (p,), (jnp.ones_like(p),))
        return jnp.sum((du - jnp.cos(p)) ** 2)

    rep = jgc.check_rules(pinn, X)
    assert not rep.ok
    r, line = named(rep, "tclip_sin")
    assert line == source_line("def tclip_sin(") - 1
    assert {"jvp", "linearity"} <= failed(r)
    assert "under the loss's own jax.jvp" in str(rep)


# -- a symbolic-zero fast path that is wrong --------------------------------------------------------------
@jax.custom_jvp
def sz_mul(x, y):
    return x * y


def _sz_mul_jvp(primals, tangents):
    x, y = primals
    tx, ty = tangents
    if isinstance(ty, jax.custom_derivatives.SymbolicZero):
        return x * y, tx  # the plant: drops the factor y when y is not differentiated
    if isinstance(tx, jax.custom_derivatives.SymbolicZero):
        return x * y, x * ty
    return x * y, tx * y + x * ty


sz_mul.defjvp(_sz_mul_jvp, symbolic_zeros=True)


def test_a_wrong_symbolic_zero_path_is_caught_at_the_call_site():
    # Both operands depend on the parameters: the loss's own gradient takes the dense path.
    rep = jgc.check_rules(lambda p: jnp.sum(sz_mul(p, 2.0 * p + 1.0)), X)
    assert not rep.ok
    r, line = named(rep, "sz_mul")
    assert line == source_line("def sz_mul(") - 1
    assert failed(r) == {"symbolic zeros"}


def test_check_rule_catches_the_symbolic_zero_path_with_that_check_only():
    rep = jgc.check_rule(sz_mul, X, 2.0 * X + 1.0)
    assert not rep.ok and rep.failed_checks() == ("symbolic zeros",)


# -- a wrong forward value, and a rule wrong only under vmap, at a call site -------------------------------
@jax.custom_jvp
def fwd_off_sin(x):
    return jnp.sin(x)


fwd_off_sin.defjvp(lambda p, t: (jnp.sin(p[0]) * 1.01, jnp.cos(p[0]) * t[0]))  # the plant: primal 1% off


def test_a_jvp_rule_with_a_wrong_primal_output_fails_the_primal_check():
    rep = jgc.check_rules(lambda p: jnp.sum(fwd_off_sin(p)), X)
    r, line = named(rep, "fwd_off_sin")
    assert line == source_line("def fwd_off_sin(") - 1
    assert "primal" in failed(r) and "linearity" not in failed(r) and "batching" not in failed(r)


@custom_vmap
def lane_cos(x):
    return jnp.cos(x)


@lane_cos.def_vmap
def lane_cos_rule(axis_size, in_batched, x):
    return jnp.cos(x) * 1.01, in_batched[0]  # the plant: 1% off, only when batched


@jax.custom_vjp
def vmap_bwd_sin(x):
    return jnp.sin(x)


vmap_bwd_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (lane_cos(x) * g,))


def test_a_backward_pass_wrong_only_under_vmap_fails_batching_at_its_call_site():
    rep = jgc.check_rules(lambda p: jnp.sum(vmap_bwd_sin(p)), X)
    r, line = named(rep, "vmap_bwd_sin")
    assert line == source_line("def vmap_bwd_sin(") - 1
    assert failed(r) == {"batching"}


# vmap and one call per lane round differently (vectorised and scalar kernels); where the
# rule's formula cancels, one rounding is all of the result: 1 − tanh² at |x| = 10 in
# float32 is 1.2e-7 or 0, depending on the last bit of tanh. That is rounding, measured
# against the same calls at float64, not a batching bug.
@jax.custom_jvp
def tanh_c(x):
    return jnp.tanh(x)


@tanh_c.defjvp
def tanh_c_jvp(p, t):
    y = jnp.tanh(p[0])
    return y, (1 - y**2) * t[0]


def test_a_cancelling_float32_rule_is_not_a_batching_mismatch():
    rep = jgc.check_rules(lambda p: jnp.sum(tanh_c(p)), jnp.array([-10.0, -3.0, 10.0], jnp.float32))
    assert rep.ok, str(rep)
    assert "batching" not in failed(rep.rule("tanh_c"))


@custom_vmap
def lane_cos_small(x):
    return jnp.cos(x)


@lane_cos_small.def_vmap
def lane_cos_small_rule(axis_size, in_batched, x):
    return jnp.cos(x) * 1.001, in_batched[0]  # the plant: 0.1% off, only when batched


@jax.custom_vjp
def vmap_bwd_tanh(x):
    return jnp.tanh(x)


vmap_bwd_tanh.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: ((1 - jnp.tanh(x) ** 2) * lane_cos_small(0 * x) * g,))


def test_a_small_batching_error_is_still_caught_beside_cancelling_rounding():
    # The same cancelling formula at |x| = 10 (rounding all of the value there), and 0.1%
    # off under vmap: the measured rounding allowance does not cover it at |x| = 3.
    rep = jgc.check_rules(lambda p: jnp.sum(vmap_bwd_tanh(p)), jnp.array([-10.0, -3.0, 10.0], jnp.float32))
    r, line = named(rep, "vmap_bwd_tanh")
    assert line == source_line("def vmap_bwd_tanh(") - 1
    assert "batching" in failed(r)


# -- controls: correct rules of every kind pass ---------------------------------------------------------
@eqx.filter_custom_jvp
def eqx_softsign(x):
    return x / (1 + jnp.abs(x))


@eqx_softsign.def_jvp
def eqx_softsign_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return eqx_softsign(x), t / (1 + jnp.abs(x)) ** 2


@jax.custom_jvp
def ste_round(x):
    return jnp.round(x)


ste_round.defjvp(lambda p, t: (ste_round(p[0]), t[0]))
jgc.intended(ste_round, reason="straight-through estimator")


@custom_vmap
def vm_cos(x):
    return jnp.cos(x)


@vm_cos.def_vmap
def vm_cos_rule(axis_size, in_batched, x):
    return jnp.cos(x), in_batched[0]


def test_correct_rules_pass_under_vmap_and_jvp():
    def loss(p):
        _, dq = jax.jvp(jax.nn.softplus, (p,), (jnp.ones_like(p),))
        ce = optax.safe_softmax_cross_entropy(p[None], jax.nn.one_hot(jnp.array([1]), 3))
        return (jnp.sum(jax.vmap(jax.nn.relu)(p)) + jnp.sum(dq) + jnp.sum(ce) + jnp.sum(eqx_softsign(p))
                + jnp.sum(ste_round(p)) + jnp.sum(jax.vmap(vm_cos)(p)))

    rep = jgc.check_rules(loss, X)
    assert rep.ok, str(rep)
    assert {"vm_cos", "eqx_softsign", "ste_round"} <= {r.name for r in rep.rules}
    assert rep.rule("ste_round").status == "intended"
    hidden = {s.under for r in rep.rules for s in r.sites if s.under.startswith(("under", "custom_vmap"))}
    assert len(hidden) == 2, "the rules under the loss's own vmap and jvp were not both checked"


@pytest.mark.slow  # about a minute: the loss's hessian is interpreted op by op to capture operands
def test_correct_rules_pass_under_the_losss_own_hessian():
    loss = lambda p: jnp.sum(jax.hessian(lambda q: jnp.sum(jax.nn.softplus(q) + jax.nn.relu(q)))(p))
    rep = jgc.check_rules(loss, X)
    assert rep.ok and rep.rules, str(rep)
    assert any(s.check == "order 2" for r in rep.rules for s in r.sites + r.checks)


def test_order_and_explore_options():
    rep = jgc.check_rules(lambda p: jnp.sum(sg_tanh(p)), X)
    assert rep.ok  # the loss differentiates sg_tanh once: order 2 is not asked
    rep = jgc.check_rules(lambda p: jnp.sum(sg_tanh(p)), X, order=2)
    assert not rep.ok and rep.failed_checks() == ("order 2",)
    rep = jgc.check_rules(lambda p: jnp.sum(jnp.sin(p)), X, explore=True)
    assert rep.ok and not rep.rules
    with pytest.raises(ValueError, match="order must be"):
        jgc.check_rules(lambda p: jnp.sum(p), X, order=3)


def test_every_call_site_row_says_its_check():
    rep = jgc.check_rules(lambda p: jnp.sum(sg_tanh(p)), X)
    r = rep.rule("sg_tanh")
    assert [s.check for s in r.sites] == [""]  # one call site, its first-derivative check
    assert {"primal", "linearity", "batching"} <= {s.check for s in r.checks}
    assert inspect.signature(jgc.check_rules).parameters["order"].default is None


# -- jgc.check_rule: complex rules in the dot-product check ---------------------------------------------
def make_complex_square(conjugated: bool):
    @jax.custom_vjp
    def csq(z):
        return z * z

    def fwd(z):
        return z * z, z

    def bwd(z, g):
        # JAX pairs cotangents without conjugation (Re Σ u·v): the VJP of z ↦ z² is g·2z.
        return (g * jnp.conj(2 * z),) if conjugated else (g * 2 * z,)  # the plant: a conjugate too many

    csq.defvjp(fwd, bwd)
    return csq


@pytest.mark.parametrize("conjugated", [False, True], ids=["right", "conjugated"])
def test_complex_dot_product_uses_jaxs_pairing(conjugated):
    z = jnp.array([0.3 + 0.4j, -0.7 + 0.1j, 1.2 - 0.5j], dtype=jnp.complex64)
    rep = jgc.check_rule(make_complex_square(conjugated), z, checks=("dot-product",))
    row = rep.rules[0].sites[0]
    assert row.check == "dot-product" and row.status == ("mismatch" if conjugated else "ok"), str(rep)
