"""Jacobians, JVPs, VJPs and HVPs as the program runs: the analytic side at the dtypes
given, the finite-difference reference at float64.

Each bug here lives only at float32 (a rule that branches on the dtype), so the float64
twin of the program is right and a check that evaluates both sides in float64 passes
it. The controls are correct float32 functions whose products carry ordinary rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc

RNG = np.random.default_rng(11)
W = jnp.asarray(RNG.normal(size=(6, 6)) / 2, jnp.float32)
X = jnp.asarray(RNG.normal(size=(5, 6)), jnp.float32)


@jax.custom_jvp
def _softplus(x):
    return jnp.logaddexp(x, 0.0)


@_softplus.defjvp
def _softplus_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    coef = 1.0 if x.dtype == jnp.float64 else 1.01  # a per-dtype coefficient, wrong for float32
    return _softplus(x), jax.nn.sigmoid(x) * coef * t


@jax.custom_jvp
def _softplus_once(x):
    return jnp.logaddexp(x, 0.0)


@_softplus_once.defjvp
def _softplus_once_jvp(primals, tangents):
    # The float32 path takes the slope through stop_gradient (a kernel whose backward is
    # not differentiable again): its gradient is right, its second derivative is 0.
    (x,), (t,) = primals, tangents
    s = jax.nn.sigmoid(x)
    if x.dtype == jnp.float32:
        s = jax.lax.stop_gradient(s)
    return _softplus_once(x), s * t


def _layer(w):
    """A float32 layer with a normalisation: sums that cancel, ordinary rounding."""
    h = X @ w
    z = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)
    return {"y": jnp.tanh(z), "s": jnp.sum(h**2, axis=0)}


def _dtype_bug(w):
    return _softplus(X @ w)


CHECKS = {
    "jacobian": jgc.check_jacobian,
    "jvp": jgc.check_jvp,
    "vjp": jgc.check_vjp,
}


@pytest.mark.parametrize("which", list(CHECKS))
def test_a_float32_only_rule_bug_is_a_mismatch(which):
    rep = CHECKS[which](_dtype_bug, W)
    assert not rep.ok, rep
    assert any(lf.status == "mismatch" for lf in rep.leaves), rep
    assert any("at the dtypes given (float32)" in n for n in rep.notes), rep.notes
    # Both sides at float64 (the former behaviour) run the float64 branch: blind to it.
    assert CHECKS[which](_dtype_bug, W, analytic="reference").ok


@pytest.mark.parametrize("which", list(CHECKS))
def test_a_correct_float32_function_passes_without_flags(which):
    rep = CHECKS[which](_layer, W)
    assert rep.ok, rep
    assert not {lf.status for lf in rep.leaves} & {"mismatch", "imprecise"}, rep


def test_hessian_vector_products_at_the_dtypes_given():
    def f(w):
        return jnp.sum(_softplus_once(X @ w))

    rep = jgc.check_hvp(f, W)
    assert not rep.ok and rep.leaves[0].status == "mismatch", rep
    assert jgc.check_hvp(f, W, analytic="reference").ok
    # The same function without the rule, and a float32 control with cancellations.
    assert jgc.check_hvp(lambda w: jnp.sum(jnp.logaddexp(X @ w, 0.0)), W).ok
    ctrl = jgc.check_hvp(lambda w: jnp.sum(_layer(w)["y"] ** 2), W)
    assert ctrl.ok and not {lf.status for lf in ctrl.leaves} & {"mismatch", "imprecise"}, ctrl


def test_user_rules_are_called_at_the_dtypes_given():
    seen = []

    def vjp(w):
        out, pull = jax.vjp(_layer, w)
        seen.append(np.dtype(w.dtype))
        return out, pull

    assert jgc.check_vjp(_layer, W, vjp=vjp, against="numerical").ok
    assert set(seen) == {np.dtype(np.float32)}
    seen.clear()
    assert jgc.check_vjp(_layer, W, vjp=vjp, against="numerical", analytic="reference").ok
    assert set(seen) == {np.dtype(np.float64)}


def test_a_function_whose_float64_twin_differs_falls_back_to_the_reference():
    # A mask drawn at the default float dtype: another mask with x64 on, another f.
    key = jax.random.key(3)

    def f(w):
        keep = jax.random.bernoulli(key, 0.7, (5, 6))
        return jnp.where(keep, jnp.tanh(X @ w), 0.0)

    rep = jgc.check_jvp(f, W)
    assert rep.ok, rep
    assert any("evaluated at the reference's precision too" in n for n in rep.notes), rep.notes


def test_float64_inputs_have_one_side_only():
    w = np.asarray(W, np.float64)
    with jax.enable_x64(True):
        rep = jgc.check_jacobian(lambda v: jnp.tanh(jnp.asarray(X, jnp.float64) @ v), jnp.asarray(w))
    assert rep.ok
    assert not any("at the dtypes given" in n for n in rep.notes), rep.notes


@pytest.mark.parametrize("which", ["jacobian", "jvp", "vjp"])
def test_analytic_option_is_validated(which):
    with pytest.raises(ValueError, match="analytic must be one of"):
        CHECKS[which](_layer, W, analytic="float16")


@pytest.mark.parametrize("which", ["jacobian", "vjp"])
def test_vector_reports_give_element_lines_and_accuracy_at_the_dtypes_given(which):
    # The same per-element lines and accuracy figures as jgc.check: the native value,
    # the float64 twin's, the reference, the error in ulps of the native dtype; f(x)'s correct bits and
    # each block's (median/worst against the bits float32 holds).
    bad = CHECKS[which](_dtype_bug, W)
    text = str(bad)
    assert bad.cost_bits == {"bits": pytest.approx(24, abs=2), "dtype": 24}, bad.cost_bits
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("mismatch ") and "native" in ln)
    assert "(float32), float64 twin" in line and "reference" in line and "ulps of float32" in line, line
    assert "twin agrees with the reference" in line, line  # the bug lives at float32 only
    bits = [lf.accurate_bits() for lf in bad.leaves if lf.status == "mismatch"]
    assert bits and all(b["dtype"] == 24 and b["worst"] < 10 for b in bits), bits  # 1 % off: ~7 bits
    assert "accuracy at the dtypes given: f(x) holds" in text and "bits per block" in text, text
    good = CHECKS[which](_layer, W)
    assert good.cost_bits["bits"] >= 20, good.cost_bits
    assert all(lf.accurate_bits()["median"] >= 18 for lf in good.leaves
               if not np.isnan(lf.accurate_bits()["median"])), [lf.accurate_bits() for lf in good.leaves]
    # The reference precision on both sides has no dtype-given figure.
    assert CHECKS[which](_layer, W, analytic="reference").cost_bits is None


def test_a_jvp_mismatch_shows_the_float64_twin_beside_native_and_reference():
    # The rule's coefficient is wrong for float32 only (1.01): the float64 twin of the
    # program takes the float64 branch and agrees with the reference; the native JVP is
    # 1 % off. Each printed element gives all three values.
    rep = jgc.check_jvp(_dtype_bug, W)
    bad = [lf for lf in rep.leaves if lf.status == "mismatch"]
    assert bad and all(lf.twin is not None for lf in bad), rep
    lf = bad[0]
    at = lf.codes == 5  # the mismatched entries: their twin values were evaluated
    assert np.all(np.isfinite(lf.twin[at]))
    assert np.allclose(lf.twin[at], lf.numeric[at], rtol=1e-6, atol=1e-9)
    assert not np.allclose(lf.analytic[at], lf.numeric[at], rtol=1e-3)
    line = next(ln for ln in str(rep).splitlines() if ln.strip().startswith("mismatch ") and "native" in ln)
    assert "(float32), float64 twin" in line and "reference" in line and "ulps of float32" in line, line
    assert "twin agrees with the reference" in line, line
    flagged = lf.to_dict()["flagged"]
    assert flagged and all(e["twin"] is not None for e in flagged)
    assert all(abs(e["twin"] - e["reference"]) <= 1e-6 * abs(e["reference"]) + 1e-9 for e in flagged)
    # A passing check evaluates no twin.
    assert all(lf.twin is None for lf in jgc.check_jvp(_layer, W).leaves)
