"""jgc.check_grads on a fixed subset of JAX's own primitive test harnesses.

``jax._src.internal_test_util.test_harnesses`` is a corpus nobody here wrote: every
primitive JAX tests, with the arguments JAX tests it on. This file runs a fixed
cross-section of it (elementwise, complex, NaN outputs, integer and boolean operands
closed over, reductions, linear algebra, empty arrays) under JAX's test configuration
(strict dtype promotion, x64 on and off) next to ``jax.test_util.check_grads``. jgc
must raise no error where JAX's checker runs, and pass wherever JAX's checker passes;
where JAX's checker fails and jgc passes, the reason is written next to the case.
``benchmarks/bench_harnesses.py`` runs the whole corpus.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.test_util import check_grads as jax_check_grads

import jgc


@functools.cache
def _harnesses() -> dict:
    from jax._src.internal_test_util import test_harnesses as th

    return {h.fullname: h for h in th.all_harnesses}


def harness_case(h):
    """(function of the floating dynamic arguments, tuple of those arguments) for harness h.

    Integer and boolean dynamic arguments (indices, masks) are closed over, as JAX's own
    autodiff tests do; arguments come from JAX's default RNG with seed 0.
    """
    rng = np.random.RandomState(0)
    dyn = h.dyn_args_maker(rng)
    idx = [i for i, a in enumerate(dyn) if np.asarray(a).dtype.kind in "fc"]

    def g(*fargs):
        full = list(dyn)
        for i, a in zip(idx, fargs):
            full[i] = a
        return h.dyn_fun(*full)

    g.__qualname__ = h.fullname
    return g, tuple(dyn[i] for i in idx)


# (harness full name, x64, reason JAX's checker fails where jgc passes, or None when
# the two must agree). Chosen to cover every path of the drop-in: real and complex
# dtypes, outputs that are NaN at the point, integer/boolean operands, empty arrays,
# several outputs, linear algebra.
JAX_FALSE_ALARM_F32 = ("JAX's fixed step eps=1e-4 in float32: its central difference has "
                       "round-off ~u·|f|/eps ≈ 1e-3 relative, beyond its 2e-3·size tolerance "
                       "for large |f|; jgc steps by the measured noise (and checks in float64)")
CASES = [
    ("sin_shape_float32_20_20_", False, None),
    ("asin_shape_float32_20_20_", False, None),  # NaN outputs outside [-1, 1]
    ("acos_shape_float32_20_20_", False, None),
    ("exp_shape_complex64_20_20_", False, None),
    ("log1p_shape_complex64_20_20_", False, None),
    ("tanh_shape_complex64_20_20_", False, None),
    ("atan2_dtypes_lhs_float32_20_20_rhs_float32_20_20_", False, None),
    ("complex_dtypes_lhs_float32_3_4_rhs_float32_3_4_", False, None),  # real -> complex
    ("real_dtypes_shape_complex64_2_3_", False, None),  # complex -> real
    ("conj_dtypes_operand_complex64_3_4_kwargs_", False, None),
    ("reduce_max_dtypes_shape_float32_2_3_", False, None),
    ("reduce_prod_dtypes_shape_float32_2_3_", False, None),
    ("gather_dtypes_shape_float32_10_axis_0_enable_xla_True", False, None),  # int indices
    ("select_n_dtypes_shapepred_bool_2_3_shapeargs_float32_2_3_", False, None),  # bool mask
    ("clamp_dtypes_min_float32_operand_float32_2_3_max_float32_", False, None),
    ("transpose_dtypes_shape_float32_2_3_permutation_1_0_", False, None),
    ("concatenate_dtypes_shapes_float32_2_3_float32_2_3_dimension_0", False, None),
    ("top_k_dtypes_inshape_float32_5_3_k_2", False, None),  # values and int indices out
    ("tridiagonal_solve_shape_float32_3_", False, None),
    ("cholesky_shape_float32_4_4_", False, None),
    ("eigh_shape_float32_0_0_lower_False", False, None),  # empty arrays
    ("sin_shape_float16_20_20_", False, ("JAX's eps=1e-4 is below float16's resolution "
     "(u ≈ 5e-4): its differences are rounding noise; jgc evaluates 16-bit inputs in float64")),
    ("asin_shape_complex128_20_20_", True, None),
    ("cos_shape_complex128_20_20_", True, None),
    ("sqrt_shape_float64_20_20_", True, None),
    (("triangular_solve_dtypes_a_float64_4_4_b_float64_4_1_leftside_True_lower_False_transpose_a_False_"
     "conjugate_a_False_unit_diagonal_False"), True, None),
]


@pytest.fixture
def x64_mode(request):
    """Set x64 for one test and restore it (conftest checks nothing leaks)."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", request.param)
    yield request.param
    jax.config.update("jax_enable_x64", old)


def _outcome(checker, g, args):
    try:
        with jax.numpy_dtype_promotion("strict"):
            checker(g, args, 1, modes=("fwd", "rev"))
        return "pass"
    except AssertionError:
        return "fail"


@pytest.mark.parametrize("name,x64_mode,known", CASES, indirect=["x64_mode"],
                         ids=[f"{c[0][:48]}-{'x64' if c[1] else 'x32'}" for c in CASES])
def test_harness_drop_in(name, x64_mode, known):
    h = _harnesses().get(name)
    assert h is not None, f"harness {name} is not in this jax's test_harnesses"
    g, args = harness_case(h)
    theirs = _outcome(jax_check_grads, g, args)
    ours = _outcome(jgc.check_grads, g, args)  # any exception other than a verdict fails the test
    if known is None:
        assert ours == theirs == "pass", (theirs, ours)
    else:
        assert (theirs, ours) == ("fail", "pass"), (theirs, ours, known)
