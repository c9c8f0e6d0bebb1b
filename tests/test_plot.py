"""report.plot(path): the per-leaf panels and the step-size curve of the worst element."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc

pytest.importorskip("matplotlib", reason="matplotlib is the optional plot extra (pip install 'jgc[plot]')")

from jgc._src.plot import StepCurve, plot_report, step_curve  # noqa: E402

P = {"w": jnp.array([[0.5, -1.0, 2.0], [0.1, 0.3, -0.7]]), "b": jnp.array([0.0, 0.2])}
X = jnp.array([0.3, -0.2, 0.9])


def loss(p, x):
    return jnp.sum(jnp.exp(0.5 * (p["w"] @ x + p["b"])))


def wrong(p, x):
    g = jax.grad(loss)(p, x)
    return {"w": g["w"].at[1, 2].multiply(1.5), "b": g["b"]}


@pytest.fixture(scope="module")
def bad_report():
    return jgc.check(loss, P, X, grad=wrong)


def test_plot_writes_png_with_leaf_panels_and_the_step_curve(tmp_path, bad_report):
    path = tmp_path / "bad.png"
    fig = bad_report.plot(path, fn=loss, params=P, args=(X,))
    assert path.stat().st_size > 20_000
    # two leaves x (scatter, ratio) + the step-curve panel
    assert len(fig.axes) == 5
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "['w']  MISMATCH"  # failing leaf first
    assert titles[-1] == "step size vs error at ['w'][1, 2]"  # the worst element
    assert fig.axes[0].get_xscale() == "symlog" and fig.axes[-1].get_xscale() == "log"


def test_plot_without_fn_draws_leaves_only_and_other_formats(tmp_path, bad_report):
    for name in ("r.svg", "r.pdf"):
        fig = plot_report(bad_report, tmp_path / name, max_leaves=1)
        assert (tmp_path / name).stat().st_size > 1000
        assert len(fig.axes) == 2
        assert "+1 more leaves not drawn" in fig._suptitle.get_text()
    assert plot_report(bad_report).axes  # no path: only the figure


def test_step_curve_is_v_shaped_with_order_two_truncation():
    curve = step_curve(loss, P, X, path="['w']", index=(0, 2))
    assert isinstance(curve, StepCurve) and curve.index == (0, 2)
    assert set(curve.numeric) == {"float64", "float32"}
    w, b, x = (np.asarray(v, np.float64) for v in (P["w"], P["b"], X))
    exact = 0.5 * x[2] * np.exp(0.5 * (w[0] @ x + b[0]))  # d/dw[0,2] in float64
    assert curve.reference() == pytest.approx(exact, rel=1e-9)
    h = curve.steps
    e64 = np.abs(curve.numeric["float64"] - exact)
    e32 = np.abs(curve.numeric["float32"] - exact)
    best = int(np.nanargmin(e64))
    # the bottom of the V: far below both ends (round-off left, truncation right)
    assert e64[best] < 1e-9 * abs(exact)
    assert e64[0] > 100 * e64[best] and e64[-1] > 100 * e64[best]
    # right arm: truncation error ∝ h² (central difference), so slope 2 on log-log axes
    right = (h > 1e-3 * curve.scale) & (h < 0.3 * curve.scale)
    slope = np.polyfit(np.log(h[right]), np.log(e64[right]), 1)[0]
    assert 1.8 < slope < 2.2
    # float32 evaluation cannot get as close as float64: why jgc widens by default
    assert np.nanmin(e32) > 100 * e64[best]


def test_bad_input_is_named():
    rep = jgc.check(lambda p: jnp.sum(p**2), jnp.ones(2))
    with pytest.raises(ValueError, match=r"path \"\['v'\]\" is not a leaf of params; its leaves are"):
        step_curve(loss, P, X, path="['v']", index=0)
    with pytest.raises(TypeError, match="pass both fn and params"):
        rep.plot(None, fn=loss)
    with pytest.raises(ValueError, match="max_leaves must be a positive int"):
        rep.plot(None, max_leaves=0)
    with pytest.raises(TypeError, match=r"args must be a tuple of the extra arguments of fn.*args=\(x, y\)"):
        rep.plot(None, fn=loss, params=P, args=X)
