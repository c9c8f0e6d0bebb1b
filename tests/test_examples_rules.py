"""The custom-rule examples run with small settings and show what they claim."""

import numpy as np

from examples import custom_vjp_softplus, find_the_wrong_rule, implicit_layer


def test_custom_vjp_softplus_example():
    out = custom_vjp_softplus.main(n=6, verbose=False)
    assert out["good_vjp"].ok and out["good_grads"].ok and out["good_jacobian"].ok
    # The bug is planted where x > 0 only: exactly those diagonal entries are named.
    x = np.asarray(out["x"])
    expected = sorted((i, i) for i in np.flatnonzero(x > 0))
    (bad,) = out["bad_jacobian"].failing()
    assert sorted(bad.elements("mismatch")) == expected
    assert not out["bad_vjp"].ok
    assert out["bad_error"] is not None and isinstance(out["bad_error"], AssertionError)


def test_implicit_layer_example():
    out = implicit_layer.main(n=4, verbose=False)
    assert out["good"].ok and out["good_loss"].ok
    assert not out["bad"].ok
    # The missing transpose in the adjoint solve corrupts the VJP with respect to both
    # W and x; the Jacobian check names blocks for both inputs.
    assert {lf.path for lf in out["bad_jacobian"].failing()} == {"args[0]", "args[1]"}


def test_find_the_wrong_rule_example():
    out = find_the_wrong_rule.main(verbose=False)
    # jgc.check names the leaf whose gradient passes through the wrong rule, not W2 ...
    assert [lf.path for lf in out["check"].failing()] == ["['W1']"]
    # ... and check_rules names the rule (the planted rms_norm), passing the Pallas kernel.
    rules = out["rules"]
    assert [r.name for r in rules.failing()] == ["rms_norm"]
    assert rules.rule("rms_norm").rule_name == "_rms_norm_bwd"
    assert rules.rule("fused_swish").status == "ok" and rules.rule("logistic_loss").status == "ok"
