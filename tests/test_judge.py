"""The one judge and the options parsed once: the driver runs each look only where a
side supplies its evidence, and the shared validators name the front door."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgc._src import judge, validate
from jgc._src.statuses import MISMATCH, OK

A = np.array([1.0, 2.0, 3.0])
LIM = judge.Limits(rtol=1e-7, atol=0.0, floor=0.0)


def _cheap():
    # Element 1 disagrees with its analytic value 2.0 far beyond its error bar.
    return np.array([1.0, 2.5, 3.0]), np.full(3, 1e-12), np.ones(3, bool)


def test_cheap_pass_alone_is_the_classification():
    v = judge.judge(A, LIM, judge.Evidence(_cheap))
    assert list(v.judged.codes) == [OK, MISMATCH, OK]
    assert v.refined is None and v.refined_at.size == 0


@pytest.mark.parametrize("ladder_value, status", [(2.0, OK), (2.5, MISMATCH)], ids=["rescued", "stands"])
def test_richardson_then_ladder_on_the_suspects_only(ladder_value, status):
    calls = {"richardson": [], "central": []}

    def richardson(cand):
        calls["richardson"].append(cand.tolist())
        return judge.Refined(np.array([2.5]), np.array([1e-12]), np.array([True]))

    def central(bad, h):
        calls["central"].append(bad.tolist())
        return np.full(bad.size, ladder_value), np.zeros(bad.size), np.ones(bad.size, bool)

    ev = judge.Evidence(_cheap, richardson=richardson, central=central, h_rel=1e-5, u=1.1e-16)
    v = judge.judge(A, LIM, ev)
    assert calls["richardson"] == [[1]]
    assert calls["central"] and all(c == [1] for c in calls["central"])
    assert list(v.judged.codes) == [OK, status, OK]
    assert v.judged.num[1] == ladder_value
    assert v.refined_at.tolist() == [1]


def test_lines_refine_whole_columns_in_row_major_order():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    num = a.copy()
    num[1, 1] = 5.0  # column 1 holds the only suspect

    def richardson(cols):
        assert cols.tolist() == [1]
        return judge.Refined(np.array([2.0, 4.0]), np.zeros(2), np.ones(2, bool))  # (0, 1) then (1, 1)

    ev = judge.Evidence(lambda: (num, np.zeros_like(a), np.ones(a.shape, bool)), richardson=richardson, lines=0)
    v = judge.judge(a, LIM, ev)
    assert v.refined_at.tolist() == [1, 3]
    assert (v.judged.codes == OK).all() and v.judged.num[1, 1] == 4.0


def test_options_are_validated_once_and_frozen():
    opts = validate.options("jgc.check_jvp", rtol=1e-3, step=np.float32(0.01))
    assert (opts.api, opts.rtol, opts.step, opts.analytic) == ("jgc.check_jvp", 1e-3, pytest.approx(0.01), "native")
    assert type(opts.step) is float
    with pytest.raises(AttributeError):
        opts.rtol = 1.0
    with pytest.raises(ValueError, match=r"jgc.check_jvp: rtol must be a non-negative number"):
        validate.options("jgc.check_jvp", rtol=-1.0)
    with pytest.raises(ValueError, match=r"jgc.check_jvp: step must be a positive relative step"):
        validate.options("jgc.check_jvp", step=0.0)
    with pytest.raises(ValueError, match=r"jgc.check: stencil must be one of"):
        validate.options("jgc.check", stencil="five")


def test_traced_values_and_functions_are_refused_with_the_front_door_named():
    seen = []

    @jax.jit
    def inside(x):
        with pytest.raises(TypeError, match=r"^jgc.check_hvp got traced values .*Call it outside"):
            validate.concrete("jgc.check_hvp", {"x": x}, "Call it outside.")
        seen.append(True)
        return x

    inside(jnp.ones(2))
    assert seen
    validate.concrete("jgc.check_hvp", {"x": jnp.ones(2)}, "")  # concrete values pass
    with pytest.raises(TypeError, match=r"jgc.check_grads: f must be callable as f\(\*args\), got int\."):
        validate.function("jgc.check_grads", "f", 3, "callable as f(*args)")
    validate.function("jgc.check_jacobian", "jac", None, "None or a callable jac(*primals)", optional=True)
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'float64', 'native'\)"):
        validate.precision("jgc.check", "float128")
