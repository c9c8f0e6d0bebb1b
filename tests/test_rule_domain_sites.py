"""Rules at generated points as reported, in jgc.check_rule and jgc.check_rules, and order 2 through jit.

With ``explore=True`` a point outside the primal's domain (or on its edge) is a "not
executed" row with its reason, never a mismatch, and correct rules raise no flag at
the others; jgc.check_rules checks a call site's rule at the generated points too, its
first derivative included. A rule inside a ``jax.jit`` that the loss itself
differentiates (a gradient penalty) is checked at order 2.
"""

import jax
import jax.numpy as jnp
import pytest
from test_rule_domains import POSITIVES, _failing_rows, elu, elu_wrong, log, log1p, softplus_thresholded, sqrt

import jgc


def test_check_rules_explore_checks_the_first_derivative_at_generated_points():
    def loss(p):
        return jnp.sum(elu_wrong(p * p + 0.1))  # elu only ever sees positive inputs here

    assert jgc.check_rules(loss, POSITIVES).ok
    rep = jgc.check_rules(loss, POSITIVES, explore=True)
    assert not rep.ok and rep.failed_checks() == ("jvp",)
    bad = _failing_rows(rep)
    assert any("(point x ∈ {-30," in s.at for s in bad), [s.at for s in bad]
    # The call site itself (the operands the loss fed) is right.
    assert rep.rules[0].sites[0].status == "ok"


@pytest.mark.parametrize("f", [elu, softplus_thresholded, log1p, sqrt, log], ids=lambda f: f.__name__)
def test_correct_rules_raise_no_flag_at_the_generated_points(f):
    rep = jgc.check_rule(f, POSITIVES, checks=("jvp",), explore=True)
    assert rep.ok and rep.rules[0].status == "ok", str(rep)
    ran = {s.at for s in rep.rules[0].sites if s.status == "ok"}
    assert "point x ∈ {0.001, 0.01, 0.1, 0.3, 1, 3, 10, 30}" in ran
    skipped = {s.at: s.reason for s in rep.rules[0].sites if s.status == "not executed"}
    negatives = "point x ∈ {-30, -10, -3, -1, -0.3, -0.1, -0.01, -0.001}"
    if f in (sqrt, log, log1p):  # domains x > 0 and x > -1: points beyond them are skipped, with the reason
        assert negatives in skipped and "not finite here (outside its domain)" in skipped["point x → −x"]
    else:
        assert negatives in ran
    assert ("point x = 0" in skipped) == (f in (sqrt, log))
    if f is sqrt:  # √0 is finite, its derivative is not: the edge of the domain
        assert "edge of its domain" in skipped["point x = 0"]


# -- order 2 for a rule inside a jit that the loss differentiates ---------------------------------
def square_rule(wrong: bool):
    @jax.custom_jvp
    def square(x):
        return x * x

    @square.defjvp
    def square_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        # 2x is the right derivative; behind stop_gradient it is right at order 1 and its own
        # derivative is lost: d/dx of the rule's 2x·t is 0 where it is 2t.
        slope = jax.lax.stop_gradient(2 * x) if wrong else 2 * x
        return square(x), slope * t

    return square


@pytest.mark.parametrize("wrong", [True, False], ids=["wrong", "right"])
def test_order_2_of_a_rule_inside_a_jit_under_the_losss_own_grad(wrong):
    square = square_rule(wrong)
    energy = jax.jit(lambda q: jnp.sum(square(q)))

    def loss(p):  # a gradient penalty: the loss differentiates the jitted energy itself
        return jnp.sum(jax.grad(energy)(p) ** 2)

    x = jnp.array([0.5, 1.5, -2.0])
    loss(x)  # the jit's program is traced and cached before the check, as in a training loop
    rep = jgc.check_rules(loss, x)
    checked = [s for r in rep.rules for s in r.sites + r.checks if s.check == "order 2"]
    assert checked, str(rep)  # the order-2 check ran although the rule sits inside jax.jit
    if wrong:
        assert not rep.ok and rep.failed_checks() == ("order 2",), str(rep)
        assert any(r.name == "square" and r.status == "mismatch" for r in rep.rules)
    else:
        assert rep.ok, str(rep)
