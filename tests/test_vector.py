"""The one problem class (jgc._src.vector.Prepared): a scalar cost is a vector function with one output.

The scalar problem (``problem.Problem``) and the vector problem (``vector.VectorProblem``)
differ only in how the output is laid out and measured; the estimate on coordinates,
the evaluator of a leaf and the determinism bound are the same code. So a scalar cost
checked as a vector function of one output must give the same finite differences at
the same step, and ``jax.grad`` within their error.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import jgc
from jgc._src.problem import Problem
from jgc._src.vector import VectorProblem


def cost(w, x):
    return jnp.sum(jnp.tanh(w * x) ** 2) + jnp.sum(w**3) / 3


W = np.array([0.3, -1.2, 0.8, 2.0])
X = np.array([1.5, 0.4, -0.7, 0.2])


def grad(w, x):
    """dJ/dw by hand, in float64: 2·tanh(wx)·(1 − tanh²(wx))·x + w²."""
    t = np.tanh(w * x)
    return 2 * t * (1 - t**2) * x + w**2


def test_a_scalar_cost_estimates_as_a_vector_function_of_one_output():
    stencil = "richardson"  # six offsets a coordinate: every row of the estimate's layout
    coords = np.arange(W.size)
    with Problem(cost, W, (X,)) as scalar:
        a = scalar.estimate(0, coords, stencil, scalar.relative_step(stencil, 1e-4))
    with VectorProblem(cost, (W, X), argnums=0, api="test") as vector:
        assert vector.n_out == 1
        b = vector.estimate(0, coords, stencil, vector.relative_step(stencil, 1e-4))
    assert a.value.shape == b.value.shape == (W.size,)
    # The same rows at the same steps, from two compiled programs of the same cost.
    np.testing.assert_allclose(a.value, b.value, rtol=1e-12)
    np.testing.assert_allclose(a.value, grad(W, X), rtol=1e-6)


def test_an_output_of_size_zero_estimates_no_rows():
    # The rows of an estimate are counted from the coordinates asked for; with no output
    # element there are none (a reshape that inferred the coordinates had nothing to infer from).
    with VectorProblem(lambda w: w[:0] * 2.0, (W,), argnums=0, api="test") as vector:
        assert vector.n_out == 0
        est = vector.estimate(0, np.arange(W.size), "central", vector.relative_step("central", 1e-4))
    assert est.value.shape == (0,)
    rep = jgc.check_jacobian(lambda w: w[:0] * 2.0, jnp.asarray(W), mode="fwd")
    assert rep.ok and [leaf.checked for leaf in rep.leaves] == [0]


def test_the_determinism_bound_takes_nan_against_a_finite_value_as_a_difference():
    # Both layouts compare f from two compilations alike: NaN against NaN is the same value,
    # NaN against a finite J is a different one (the scalar check then says "not deterministic";
    # a J that is NaN at the point is refused before, as not finite).
    with Problem(cost, W, (X,)) as scalar:
        j = np.array([scalar.j0])
        assert not scalar._differs(j.copy(), j).any()
        assert scalar._differs(np.array([np.nan]), j).all()
        assert not scalar._differs(np.array([np.nan]), np.array([np.nan])).any()
        assert scalar._differs(j * (1 + 1e-9), j).all()  # beyond max(1e3·u·|J|, 8σ)
        assert not scalar._differs(j * (1 + 1e-14), j).any()
