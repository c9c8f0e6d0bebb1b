"""has_aux=True: fn returns (cost, aux) as for jax.grad; only the cost is checked."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc import testing
from jgc._src import cli

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.1, -0.2])}
X = jnp.linspace(0.0, 1.0, 12).reshape(4, 3)
Y = jnp.array([0, 1, 1, 0])


def loss_and_metrics(params, x, y):
    """Softmax cross-entropy, with metrics as aux (arrays, an int, a string, a PRNG key)."""
    logits = x @ params["w"].T + params["b"]
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[jnp.arange(y.size), y])
    acc = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return loss, {"acc": acc, "logits": logits, "count": 4, "name": "xent", "key": jax.random.key(0)}


def cost_only(params, x, y):
    return loss_and_metrics(params, x, y)[0]


def true_grad(params, x, y):
    return jax.grad(cost_only)(params, x, y)


def wrong_grad(params, x, y):
    """The true gradient, except element [0, 1] of w is 50% too large."""
    g = true_grad(params, x, y)
    return {"w": g["w"].at[0, 1].multiply(1.5), "b": g["b"]}


def wrong_grad_and_aux(params, x, y):
    return wrong_grad(params, x, y), {"acc": jnp.float32(0.5)}


def assert_names_w01(report):
    assert not report.ok
    assert [lf.path for lf in report.failing()] == ["['w']"]
    assert report.leaf("['w']").worst_index == (0, 1)


# -- the front doors ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "sampled", "directional", "auto"])
def test_check_passes_on_the_cost_and_ignores_aux(mode):
    report = jgc.check(loss_and_metrics, PARAMS, X, Y, has_aux=True, mode=mode)
    assert report.ok, report
    assert report.function.endswith("loss_and_metrics")


@pytest.mark.parametrize("mode", ["full", "sampled", "directional", "auto"])
def test_a_planted_wrong_hand_gradient_still_fails(mode):
    report = jgc.check(loss_and_metrics, PARAMS, X, Y, has_aux=True, grad=wrong_grad, mode=mode)
    assert not report.ok
    if mode == "full":
        assert_names_w01(report)


def test_numerical_grad_differences_the_cost_only():
    num = jgc.numerical_grad(loss_and_metrics, PARAMS, X, Y, has_aux=True)
    ref = true_grad(PARAMS, X, Y)
    for k in ("w", "b"):
        np.testing.assert_allclose(num[k], ref[k], rtol=1e-5, atol=1e-7)


def test_assert_grads_close_passes_and_fails_with_has_aux():
    jgc.assert_grads_close(loss_and_metrics, PARAMS, X, Y, has_aux=True)
    with pytest.raises(jgc.GradCheckError, match=r"gradients disagree at \['w'\]\[0, 1\]"):
        jgc.assert_grads_close(loss_and_metrics, PARAMS, X, Y, has_aux=True, grad=wrong_grad)


def test_check_taylor_with_has_aux():
    assert jgc.check_taylor(loss_and_metrics, PARAMS, X, Y, has_aux=True).ok
    assert not jgc.check_taylor(loss_and_metrics, PARAMS, X, Y, has_aux=True, grad=wrong_grad).ok


# -- a grad callable: the gradient, or (gradient, aux) -------------------------------------
def test_grad_callable_may_return_gradient_and_aux_as_jax_grad_does():
    report = jgc.check(loss_and_metrics, PARAMS, X, Y, has_aux=True,
                       grad=jax.grad(loss_and_metrics, has_aux=True))
    assert report.ok, report
    assert jgc.check(loss_and_metrics, PARAMS, X, Y, has_aux=True, grad=true_grad).ok
    assert_names_w01(jgc.check(loss_and_metrics, PARAMS, X, Y, has_aux=True, grad=wrong_grad_and_aux))


def test_grad_and_aux_is_told_apart_from_a_gradient_of_tuple_params():
    # params is itself a pair: a plain gradient (gw, gb) and a pair ((gw, gb), aux) both
    # have two elements; the structure of params tells them apart.
    params = (PARAMS["w"], PARAMS["b"])

    def loss(p, x, y):
        return loss_and_metrics({"w": p[0], "b": p[1]}, x, y)

    def plain(p, x, y):
        g = wrong_grad({"w": p[0], "b": p[1]}, x, y)
        return g["w"], g["b"]

    for grad in (plain, lambda p, x, y: (plain(p, x, y), jnp.zeros(2))):
        report = jgc.check(loss, params, X, Y, has_aux=True, grad=grad)
        assert [lf.path for lf in report.failing()] == ["[0]"]
        assert report.leaf("[0]").worst_index == (0, 1)


def test_grad_with_the_wrong_structure_names_both_forms():
    with pytest.raises(ValueError, match=r"or a pair \(gradient, aux\) with has_aux=True\."):
        jgc.check(loss_and_metrics, PARAMS, X, Y, has_aux=True, grad=lambda p, x, y: ([p["w"]], None))


# -- errors -----------------------------------------------------------------------------
def test_a_pair_without_has_aux_suggests_has_aux():
    with pytest.raises(TypeError) as info:
        jgc.check(loss_and_metrics, PARAMS, X, Y)
    assert str(info.value) == (
        "jgc.check: fn must return a scalar cost J, but loss_and_metrics returned a tuple of 2 "
        "elements, the first a scalar: a (cost, aux) pair. Pass has_aux=True to check the cost "
        "and ignore aux, as jax.grad(fn, has_aux=True) does, or return the cost alone."
    )
    with pytest.raises(TypeError, match="jgc.numerical_grad: fn must return a scalar cost J.*has_aux=True"):
        jgc.numerical_grad(lambda p: (jnp.sum(p ** 2), [p]), jnp.ones(2))


def test_has_aux_on_a_function_that_returns_no_pair():
    with pytest.raises(TypeError) as info:
        jgc.check(cost_only, PARAMS, X, Y, has_aux=True)
    assert str(info.value) == (
        "jgc.check: has_aux=True expects fn to return a pair (cost, aux), as "
        "jax.grad(..., has_aux=True) does, but cost_only returned an array of shape (). "
        "Return (cost, aux), or pass has_aux=False."
    )
    with pytest.raises(TypeError, match="lambda> returned a tuple of 3 elements"):
        jgc.check_taylor(lambda p: (jnp.sum(p), 1, 2), jnp.ones(2), has_aux=True)


def test_has_aux_must_be_a_bool():
    with pytest.raises(TypeError, match="jgc.check: has_aux must be True or False, got 'yes'."):
        jgc.check(loss_and_metrics, PARAMS, X, Y, has_aux="yes")


# -- jgc.testing -------------------------------------------------------------------------
def test_testing_assertions_take_has_aux():
    testing.assert_grads_close(loss_and_metrics, PARAMS, X, Y, has_aux=True)
    report = testing.assert_grads_differ(loss_and_metrics, PARAMS, X, Y, has_aux=True,
                                         grad=wrong_grad_and_aux, leaves="['w']")
    testing.assert_report_ok(jgc.check(loss_and_metrics, PARAMS, X, Y, has_aux=True))
    assert_names_w01(report)
    with pytest.raises(jgc.GradCheckError, match=r"\[jgc\] Assertion assert_grads_close failed"):
        testing.assert_grads_close(loss_and_metrics, PARAMS, X, Y, has_aux=True, grad=wrong_grad)


# -- with_grad_check ----------------------------------------------------------------------
def _sgd_step(params, opt_state, x, y):
    g, _ = jax.grad(loss_and_metrics, has_aux=True)(params, x, y)
    return jax.tree_util.tree_map(lambda p, d: p - 0.1 * d, params, g), opt_state


def test_with_grad_check_has_aux_is_the_core_one():
    # A grad callable returning (gradient, aux) is read as jgc.check reads it.
    step = jgc.with_grad_check(jax.jit(_sgd_step), loss_and_metrics, has_aux=True,
                               grad=jax.grad(loss_and_metrics, has_aux=True))
    params, state = PARAMS, ()
    for _ in range(2):
        params, state = step(params, state, X, Y)
    ((index, report),) = step.reports
    assert index == 0 and report.ok, report
    assert report.function.endswith("loss_and_metrics")
    wrong = jgc.with_grad_check(_sgd_step, loss_and_metrics, has_aux=True, grad=wrong_grad_and_aux)
    with pytest.raises(jgc.GradCheckError, match=r"at training step 0 at \['w'\]\[0, 1\]"):
        wrong(PARAMS, (), X, Y)


def test_with_grad_check_has_aux_errors_are_the_core_ones():
    with pytest.raises(TypeError, match="jgc.with_grad_check: has_aux must be True or False, got 1."):
        jgc.with_grad_check(_sgd_step, loss_and_metrics, has_aux=1)
    step = jgc.with_grad_check(_sgd_step, cost_only, has_aux=True)
    with pytest.raises(TypeError, match=r"has_aux=True expects fn to return a pair \(cost, aux\)"):
        step(PARAMS, (), X, Y)


# -- a Flax-style (loss, new_state) aux -----------------------------------------------------
def test_flax_linen_loss_returning_updated_batch_stats():
    nn = pytest.importorskip("flax.linen", reason="flax is an optional integration")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.BatchNorm(use_running_average=False)(nn.Dense(4)(x))
            return nn.Dense(1)(jnp.tanh(h))[..., 0]

    net = Net()
    x, y = jnp.linspace(-1.0, 1.0, 15).reshape(5, 3), jnp.arange(5.0) / 5
    variables = net.init(jax.random.key(0), x)

    def loss(params, batch_stats, x, y):
        pred, updates = net.apply({"params": params, "batch_stats": batch_stats}, x,
                                  mutable=["batch_stats"])
        return jnp.mean((pred - y) ** 2), (updates["batch_stats"],)

    report = jgc.check(loss, variables["params"], variables["batch_stats"], x, y, has_aux=True)
    assert report.ok, report
    assert {lf.path for lf in report.leaves} >= {"['Dense_0']['kernel']", "['BatchNorm_0']['scale']"}


# -- the command line ----------------------------------------------------------------------
SOURCE = """
import jax.numpy as jnp

def loss(params, x):
    cost = jnp.sum(jnp.sin(params["w"] * x))
    return cost, {"pred": params["w"] * x, "note": "aux"}

def grad_bad(params, x):  # element 2 is doubled; returned with aux, as jax.grad(has_aux) does
    g = x * jnp.cos(params["w"] * x)
    return {"w": g.at[2].multiply(2.0)}, None

def make_params():
    return {"w": jnp.linspace(0.1, 1.0, 4)}

def make_args():
    return jnp.arange(1.0, 5.0)
"""


@pytest.fixture
def aux_module(tmp_path, monkeypatch):
    name = f"aux_case_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return name


def test_cli_has_aux(aux_module, capsys):
    m = aux_module
    base = ["check", f"{m}:loss", "--params", f"{m}:make_params", "--args", f"{m}:make_args"]
    assert cli.main(base + ["--has-aux"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("jgc.check PASS") and err == ""
    assert cli.main(base + ["--has-aux", "--grad", f"{m}:grad_bad"]) == 1
    out, _ = capsys.readouterr()
    assert "['w']  mismatch" in out and "[2]:" in out
    assert cli.main(base) == 2
    _, err = capsys.readouterr()
    assert "a (cost, aux) pair. Pass has_aux=True" in err and "--has-aux" in err
