"""Rules checked across their domain (``explore=True``): the generated points and what they catch.

A rule wrong only where the caller never feeds it (``elu`` for negative inputs when the
loss feeds it positives, a switch point the data never reaches) is found at the
generated points and named by them; the points fit the argument's dtype; a rule wrong
only outside its primal's domain is not flagged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src.rules.points import generated, sweep_cap
from jgc._src.rules.subject import make_subject

# Positive inputs only: every planted bug below lives at negative inputs. Eight elements,
# so each decade sweep fits in one point (a shorter argument is swept over two).
POSITIVES = jnp.array([0.5, 1.5, 3.0, 0.7, 2.2, 1.1, 0.9, 4.0])


def elementwise(fun, der, name):
    """A custom_jvp of ``fun`` whose rule multiplies the tangent by ``der(x)``."""
    f = jax.custom_jvp(fun)
    f.__name__ = f.__qualname__ = name

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), der(x) * t

    return f


def _elu(x):
    return jnp.where(x > 0, x, jnp.expm1(jnp.minimum(x, 0.0)))


# The negative branch's derivative is eˣ; this rule says 1 there (right for x > 0).
elu_wrong = elementwise(_elu, lambda x: jnp.where(x > 0, 1.0, 1.0), "elu_wrong")
elu = elementwise(_elu, lambda x: jnp.where(x > 0, 1.0, jnp.exp(jnp.minimum(x, 0.0))), "elu")
log1p = elementwise(jnp.log1p, lambda x: 1.0 / (1.0 + x), "log1p")
sqrt = elementwise(jnp.sqrt, lambda x: 0.5 / jnp.sqrt(x), "sqrt")
log = elementwise(jnp.log, lambda x: 1.0 / x, "log")
# A switch at 20 in the primal and in its rule (where common softplus implementations
# turn linear), so the sweep near switch points has both sides of it.
softplus_thresholded = elementwise(
    lambda x: jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0)))),
    lambda x: jnp.where(x > 20.0, 1.0, jax.nn.sigmoid(x)), "softplus_thresholded")
# The same primal whose rule also switches at 6 (a clip copied from relu6): derivative 0
# for 6 < x ≤ 20 where it is ≈ 1. The given point (below 6) and its 10²-fold (above 20)
# never reach that band; the sweeps do (10, and 6.3 and 19 either side of switch points).
softplus_switch_wrong = elementwise(
    lambda x: jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0)))),
    lambda x: jnp.where(x > 20.0, 1.0, jnp.where(x > 6.0, 0.0, jax.nn.sigmoid(x))), "softplus_switch_wrong")


def _failing_rows(rep):
    return [s for s in rep.rules[0].sites + rep.rules[0].checks if s.status == "mismatch"]


def test_check_rule_explore_names_the_sweep_point_where_elu_is_wrong():
    assert jgc.check_rule(elu_wrong, POSITIVES, checks=("jvp",)).ok
    rep = jgc.check_rule(elu_wrong, POSITIVES, checks=("jvp",), explore=True)
    assert not rep.ok
    bad = _failing_rows(rep)
    assert all(s.check == "jvp" for s in bad)
    sweep = [s for s in bad if s.at.startswith("point x ∈ {-30,")]
    assert len(sweep) == 1, [s.at for s in bad]
    # The worst element is one of the negative values swept, named with its value.
    assert sweep[0].worst.input < 0 and sweep[0].worst.rule == pytest.approx(1.0)
    assert sweep[0].worst.numeric == pytest.approx(np.exp(sweep[0].worst.input), abs=1e-4)
    # No row at a positive point fails.
    assert not [s for s in bad if s.at in ("the given args", "point x → 10⁻²·x", "point x → 10²·x", "point x = 1")]


def test_a_rule_wrong_outside_its_primals_domain_is_not_flagged():
    # The rule is garbage for x ≤ 0, where log has no derivative: no point there is checked.
    log_garbage = elementwise(jnp.log, lambda x: jnp.where(x > 0, 1.0 / x, 123.0), "log_garbage")
    rep = jgc.check_rule(log_garbage, POSITIVES, checks=("jvp",), explore=True)
    assert rep.ok, str(rep)


def test_a_switch_point_only_the_sweep_reaches_is_caught():
    assert jgc.check_rule(softplus_switch_wrong, POSITIVES, checks=("jvp",)).ok
    rep = jgc.check_rule(softplus_switch_wrong, POSITIVES, checks=("jvp",), explore=True)
    bad = _failing_rows(rep)
    assert bad and all(6.0 < s.worst.input <= 20.0 for s in bad), [(s.at, s.worst) for s in bad]


def _subject(x):
    return make_subject(lambda v: jnp.tanh(v), (x,), set(), "test")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32], ids=["f16", "bf16", "f32"])
def test_sweep_values_fit_the_dtype(dtype):
    pts = generated(_subject(jnp.linspace(0.1, 1.0, 8).astype(dtype)))
    cap = sweep_cap(dtype)
    swept = [x for label, x, _ in pts if x is not None and "∈" in label]
    assert swept
    for x in swept:
        v = np.asarray(x[0], np.float64)
        assert x[0].dtype == dtype and np.all(np.abs(v) <= cap) and np.all(np.isfinite(v))
        # exp of every value swept, and its square, is finite in the dtype.
        assert np.all(np.isfinite(np.asarray(jnp.exp(2 * x[0].astype(jnp.float32)).astype(dtype), np.float64)))
    widest = max(float(np.max(np.abs(np.asarray(x[0], np.float64)))) for x in swept)
    # float16 holds eˣ up to x ≈ 11: its sweeps stop at 5.5 (3.15, the largest value below it).
    assert widest == pytest.approx(30.0 if dtype != jnp.float16 else 3.15, rel=1e-2)


def test_a_scaled_point_beyond_the_dtype_is_left_out():
    pts = {label: (x, why) for label, x, why in generated(_subject(jnp.full(3, 1e11, jnp.float32)))}
    x, why = pts["point x → 10²·x"]
    assert x is None and "float32" in why
    assert pts["point x → 10⁻²·x"][0] is not None


def test_a_scalar_is_swept_over_two_points():
    labels = [label for label, x, _ in generated(_subject(jnp.float32(0.5))) if x is not None]
    assert "point x = 0.001" in labels and "point x = 30" in labels
    assert "point x = -0.001" in labels and "point x = -30" in labels


# -- rules inside a jit under the loss's own AD: the second trace, and when it is not taken -------
def test_a_rule_inside_a_jit_under_the_losss_grad_is_seen_by_a_trace_without_jit():
    from jgc._src.rules.hidden import UNDER_AD, through_calls

    energy = jax.jit(lambda q: jnp.sum(elu(q)))
    traced = []

    def tracer_of(loss):
        def trace():
            traced.append(loss)
            return jax.make_jaxpr(loss)(POSITIVES)
        return trace

    def penalty(p):
        return jnp.sum(jax.grad(energy)(p) ** 2)

    calls = through_calls(tracer_of(penalty), jax.make_jaxpr(penalty)(POSITIVES).jaxpr)
    assert [c.why for c in calls] == [UNDER_AD] and calls[0].obj is elu

    # JAX's own rules inside jax.nn's jitted functions take no second trace.
    def jax_only(p):
        return jnp.sum(jax.grad(lambda q: jnp.sum(jax.nn.softplus(q)))(p) ** 2)

    assert through_calls(tracer_of(jax_only), jax.make_jaxpr(jax_only)(POSITIVES).jaxpr) == []

    # Nor does a loss whose scan would run 1000 steps in Python with jit disabled.
    def looped(p):
        return jax.lax.scan(lambda c, _: (c + penalty(p), None), 0.0, None, length=1000)[0]

    assert through_calls(tracer_of(looped), jax.make_jaxpr(looped)(POSITIVES).jaxpr) == []
    assert traced == [penalty]
