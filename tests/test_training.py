"""jgc.with_grad_check: check at step 0 (and after burn-in) on the real inputs, then nothing."""

import doctest
import sys
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jgc
from jgc._src import training

X = jnp.array([[1.0, 2.0], [0.5, -1.0], [-0.3, 0.8]])
Y = jnp.array([1.0, -1.0, 0.5])
W0 = {"w": jnp.array([0.2, -0.4]), "b": jnp.array(0.1, jnp.float32)}  # not weak-typed: one trace


def loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)


@jax.custom_vjp
def bad_tanh(z):
    return jnp.tanh(z)


bad_tanh.defvjp(lambda z: (jnp.tanh(z), z), lambda z, g: (g * (1 - jnp.tanh(z)),))  # wrong: 1 − tanh²


def bad_loss(p, x, y):
    return jnp.mean((bad_tanh(x @ p["w"] + p["b"]) - y) ** 2)


def make_step(loss_fn, traces=None, **jit_kwargs):
    opt = optax.sgd(0.1)

    def step(p, state, x, y):
        if traces is not None:
            traces.append(1)  # runs only while tracing
        value, g = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = opt.update(g, state)
        return optax.apply_updates(p, updates), state, value

    return jax.jit(step, **jit_kwargs), opt.init(W0)


def batches(n):
    return [(X + 0.1 * i, Y) for i in range(n)]


def test_docstring_example_runs():
    failed, attempted = doctest.testmod(training)
    assert attempted >= 1 and failed == 0


def test_checks_at_step_0_and_after_burn_in_on_the_real_inputs_then_calls_the_plain_step():
    traces = []
    step, state = make_step(loss, traces)
    checked = jgc.with_grad_check(step, loss, at_steps=(0, 3))
    assert checked.step is step
    p, seen = W0, []
    for x, y in batches(6):
        seen.append((p, x, y))
        p, state, _ = checked(p, state, x, y)
    # Calls 0..3 were counted; after the last check the step is called directly.
    assert checked.calls == 4 and checked.done
    assert [i for i, _ in checked.reports] == [0, 3]
    for i, rep in checked.reports:
        assert rep.ok
        # The check saw exactly the params and batch that step i received.
        assert rep.cost == pytest.approx(float(loss(*seen[i])), rel=1e-6)
    # The step was traced once: the check never retraced or wrapped it.
    assert len(traces) == 1


def test_after_the_checks_no_work_is_added(monkeypatch):
    calls = []
    monkeypatch.setattr(training, "check", lambda *a, **k: calls.append(1) or jgc.check(*a, **k))
    seen = []
    checked = jgc.with_grad_check(lambda *a: seen.append(a) or a[0], loss, at_steps=(1,))
    for i in range(5):
        assert checked(W0, None, X, Y) is W0
    assert len(calls) == 1 and len(seen) == 5


@pytest.mark.parametrize("at_steps", [(), (0,), (1, 2)])
def test_after_the_last_check_the_step_is_called_with_no_frame_of_the_wrapper(at_steps):
    callers = []

    def step(p, state, x, y, scale=1.0):
        callers.append(sys._getframe(1).f_code.co_filename)
        return p, state, scale

    checked = jgc.with_grad_check(step, loss, at_steps=at_steps)
    here = sys._getframe(0).f_code.co_filename
    for i in range(4):
        out = checked(W0, None, X, Y, scale=2.0)  # keyword arguments pass through too
        assert out[2] == 2.0
        assert checked.done == (i >= max(at_steps, default=-1))
    assert len(checked.reports) == len(at_steps)
    assert isinstance(checked, training.CheckedStep) and checked.step is step
    n_wrapped = max(at_steps, default=-1) + 1
    # Calls up to the last check went through the wrapper; every later one came
    # straight from this test function.
    assert callers[:n_wrapped] == [training.__file__] * n_wrapped
    assert callers[n_wrapped:] == [here] * (4 - n_wrapped)


def test_same_trajectory_as_the_plain_loop():
    step, state = make_step(loss)
    checked = jgc.with_grad_check(step, loss)
    p1, s1, p2, s2 = W0, state, W0, state
    for x, y in batches(4):
        p1, s1, _ = step(p1, s1, x, y)
        p2, s2, _ = checked(p2, s2, x, y)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)


def test_raise_names_the_step_and_the_leaf():
    step, state = make_step(bad_loss)
    checked = jgc.with_grad_check(step, bad_loss, at_steps=[0])
    with pytest.raises(jgc.GradCheckError, match=r"^jgc.with_grad_check: the gradient of the loss disagrees "
                                                 r"with finite differences at training step 0 at \['(w|b)'\]") as info:
        checked(W0, state, X, Y)
    assert not info.value.report.ok


def test_warn_keeps_training_and_records_the_report():
    step, state = make_step(bad_loss)
    checked = jgc.with_grad_check(step, bad_loss, at_steps=(0, 2), on_failure="warn")
    p = W0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches(3):
            p, state, _ = checked(p, state, x, y)
    assert len(caught) == 2 and all(issubclass(w.category, UserWarning) for w in caught)
    assert "training step 2" in str(caught[1].message)
    assert [rep.ok for _, rep in checked.reports] == [False, False]


def test_donated_params_are_checked_before_the_step_consumes_them():
    step, state = make_step(loss, donate_argnums=(0,))
    checked = jgc.with_grad_check(step, loss)
    p = jax.tree_util.tree_map(jnp.copy, W0)
    p, state, _ = checked(p, state, X, Y)
    assert checked.reports[0][1].ok


class TrainState(NamedTuple):
    params: dict
    opt_state: tuple


def test_select_and_has_aux_for_other_step_signatures():
    def aux_loss(p, batch):
        x, y = batch
        return loss(p, x, y), {"note": 1}

    def step(state, batch):
        return state

    checked = jgc.with_grad_check(step, aux_loss, has_aux=True,
                                  select=lambda state, batch: (state.params, (batch,)))
    checked(TrainState(W0, ()), (X, Y))
    assert checked.reports[0][1].ok


def test_bad_arguments_are_full_sentences():
    step, state = make_step(loss)
    with pytest.raises(ValueError, match=r"on_failure must be one of \('raise', 'warn'\), got 'log'"):
        jgc.with_grad_check(step, loss, on_failure="log")
    with pytest.raises(ValueError, match="at_steps must be non-negative call indices"):
        jgc.with_grad_check(step, loss, at_steps=(-1,))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        jgc.with_grad_check(step, "loss")
    with pytest.raises(TypeError, match="at_steps must be a sequence of step indices"):
        jgc.with_grad_check(step, loss, at_steps=[None])
    bad_select = jgc.with_grad_check(step, loss, select=lambda p, s, x, y: (p, x))
    with pytest.raises(TypeError, match="loss_args a tuple, got ArrayImpl. Wrap a single batch as"):
        bad_select(W0, state, X, Y)
    wrong_arity = jgc.with_grad_check(lambda state, batch: state, loss)
    with pytest.raises(TypeError, match="select=lambda state, batch"):
        wrong_arity()
    inside = jgc.with_grad_check(lambda p, s, x, y: p, loss)
    with pytest.raises(TypeError, match=r"inside jit.*jgc.with_grad_check\(jax.jit\(step\), loss_fn\)"):
        jax.jit(inside)(W0, state, X, Y)
