"""Every integration example runs with small settings and shows what it claims."""

import numpy as np
import pytest


def failing_paths(report):
    return sorted(lf.path for lf in report.failing())


def test_optax_training_checks_at_step_0_and_catches_the_buggy_rule():
    from examples import optax_training

    out = optax_training.main(steps=40, burn_in=100, hidden=4, depth=1, verbose=False)
    good, bad = out["good"], out["bad"]
    assert [(i, r.ok) for i, r in good["reports"]] == [(0, True)]
    assert np.mean(good["losses"][-5:]) < np.mean(good["losses"][:5])  # it trains
    # The buggy softplus rule is reported (a warning), in the hidden layers only.
    assert [(i, r.ok) for i, r in bad["reports"]] == [(0, False)]
    assert len(out["warnings"]) == 1 and "training step 0" in out["warnings"][0]
    assert failing_paths(bad["reports"][0][1]) == ["['layer0']['b']", "['layer0']['w']"]


def test_flax_nnx_example():
    pytest.importorskip("flax", reason="Flax is in the test extra (pip install flax)")
    from examples import flax_nnx

    out = flax_nnx.main(hidden=4, verbose=False)
    assert out["good"].ok and out["good"].checked == out["bad"].checked == 3 * 4 + 4 + 4 + 1
    # The stop_gradient on the skip connection only corrupts the first layer's gradient.
    assert [p for p in failing_paths(out["bad"])] == [
        "['inp']['bias'].value", "['inp']['kernel'].value"]


def test_flax_linen_example():
    pytest.importorskip("flax", reason="Flax is in the test extra (pip install flax)")
    from examples import flax_linen

    out = flax_linen.main(hidden=4, verbose=False)
    assert out["good"].ok
    assert failing_paths(out["bad"]) == ["['Dense_0']['bias']", "['Dense_0']['kernel']"]


def test_equinox_example():
    pytest.importorskip("equinox", reason="Equinox is in the test extra (pip install equinox)")
    from examples import equinox_mlp

    out = equinox_mlp.main(hidden=4, verbose=False)
    assert out["good"].ok
    assert {p for p, _ in out["good"].skipped} == {
        ".mlp.activation", ".mlp.final_activation", ".squash", ".n_outputs"}
    assert not out["bad"].ok and ".temperature" in failing_paths(out["bad"])


def test_haiku_example():
    pytest.importorskip("haiku", reason="dm-haiku is in the test extra (pip install dm-haiku)")
    from examples import haiku_mlp

    out = haiku_mlp.main(hidden=4, verbose=False)
    assert out["good"].ok
    assert failing_paths(out["bad"]) == ["['mlp/~/linear_1']['b']", "['mlp/~/linear_1']['w']"]
