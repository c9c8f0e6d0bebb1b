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
import jax.numpy as jnp
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


# Why JAX's checker fails where jgc passes (each case was settled by a float64 check
# of the same derivative: the derivative is right).
F32_STEP = ("JAX false alarm: its fixed step eps=1e-4 in float32 leaves round-off of "
            "~u·|f|/eps ≈ 1e-3 relative in every difference, and its VJP check sums them over "
            "every output into one inner product held to 2e-3; jgc steps by the measured noise "
            "and evaluates float32 in float64")
INT_OUTPUT = ("JAX false alarm: top_k also returns integer indices, and JAX's checker asserts "
              "that their float0 tangents have the primal's dtype; jgc lists integer outputs "
              "as skipped")
F16_STEP = ("JAX false alarm: eps=1e-4 is below float16's resolution (u ≈ 5e-4), so its "
            "differences are rounding noise; jgc evaluates 16-bit inputs in float64")
F16_GIVEN = ("JAX false alarm: eps=1e-4 is below float16's resolution; jgc, refused wider inputs by "
             "f's float16 constant, checks at float16 with a step sized for it, and skips the "
             "reverse mode JAX has no rule for")
NONFINITE = ("inf and NaN inputs: JAX's differences there are NaN or inf − inf; jgc reports those "
             "elements as non-finite (a failure only with strict=True)")
CHOLESKY = ("both fail, rightly: on a non-symmetric input lax.linalg.cholesky's primal output "
            "keeps the upper triangle, its JVP rule's does not (and it differentiates the "
            "symmetrized input)")

PASS, FAIL = "pass", "fail"
# (harness full name, x64, (JAX's outcome, jgc's outcome), reason when not both pass).
# Chosen to cover every path of the drop-in: real and complex dtypes, outputs that are
# NaN at the point, integer/boolean operands closed over, integer outputs, empty
# arrays, linear algebra. (Float64 harnesses exist only when x64 is on at import, so
# x64 runs use float32/complex64 harnesses, which jgc then checks in float64.)
CASES = [
    ("sin_shape_float32_20_20_", False, (PASS, PASS), None),
    ("asin_shape_float32_20_20_", False, (PASS, PASS), None),  # NaN outputs outside [-1, 1]
    ("acos_shape_float32_20_20_", False, (PASS, PASS), None),
    ("exp_shape_complex64_20_20_", False, (PASS, PASS), None),
    ("log1p_shape_complex64_20_20_", False, (PASS, PASS), None),
    ("tanh_shape_complex64_20_20_", False, (PASS, PASS), None),
    ("real_dtypes_shape_complex64_2_3_", False, (PASS, PASS), None),  # complex -> real
    ("reduce_max_dtypes_shape_float32_2_3_", False, (PASS, PASS), None),
    ("reduce_prod_dtypes_shape_float32_2_3_", False, (PASS, PASS), None),
    ("gather_dtypes_shape_float32_10_axis_0_enable_xla_True", False, (PASS, PASS), None),  # int indices
    ("select_n_dtypes_shapepred_bool_2_3_shapeargs_float32_2_3_", False, (PASS, PASS), None),  # bool mask
    ("transpose_dtypes_shape_float32_2_3_permutation_1_0_", False, (PASS, PASS), None),
    ("tridiagonal_solve_shape_float32_3_", False, (PASS, PASS), None),
    ("eigh_shape_float32_0_0_lower_False", False, (PASS, PASS), None),  # empty arrays
    ("complex_dtypes_lhs_float32_3_4_rhs_float32_3_4_", False, (FAIL, PASS), F32_STEP),  # real -> complex
    ("sub_dtypes_lhs_float32_20_20_rhs_float32_20_20_", False, (FAIL, PASS), F32_STEP),
    ("top_k_dtypes_inshape_float32_5_3_k_2", False, (FAIL, PASS), INT_OUTPUT),
    ("sin_shape_float16_20_20_", False, (FAIL, PASS), F16_STEP),
    ("cholesky_shape_float32_4_4_", False, (FAIL, FAIL), CHOLESKY),
    # NaN and inf inputs: max's output at the point is NaN in one compilation of f and
    # not in another (NaN propagation is not fixed by XLA); compared as NaN.
    ("max_inf_nan_float16", False, (FAIL, PASS), F16_STEP),
    # rem jumps wherever x/y crosses an integer, and the noise probe crosses a few jumps:
    # finer probes tell them from noise, so the step stays small.
    ("rem_broadcast_lhs_float32_2_4_3_rhs_float32_2_1_3_", False, (PASS, PASS), None),
    # Two singular values 1% apart: the singular vectors vary on a short scale, and
    # Richardson's larger step is unreliable there; the step ladder settles it.
    ("svd_shape_float32_2_3_53_fullmatrices_False_computeuv_True", False, (PASS, PASS), None),
    # inf and NaN inputs: their scale stays finite, so the point itself is evaluated as given.
    ("sort_edge_cases_num_arrays_1_shape_float32_5_axis_0_isstable_False_num_keys_1", False, (FAIL, PASS),
     NONFINITE),
    # A float16 init value: jgc checks at float16; no transpose for a non-identity init.
    (("reduce_window_add_dtypes_shape_float16_4_6_initvalue_1_windowdimensions_2_2_windowstrides_1_1_"
      "padding_0_0_0_0_basedilation_1_1_windowdilation_1_1_enablexla_True"), False, (FAIL, PASS), F16_GIVEN),
    ("asin_shape_complex64_20_20_", True, (PASS, PASS), None),
    ("qr_multi_array_shape_float32_1_1_fullmatrices_False", True, (PASS, PASS), None),
    (("triangular_solve_dtypes_a_float32_4_4_b_float32_4_1_leftside_True_lower_False_transposea_False_"
     "conjugatea_False_unitdiagonal_False"), True, (FAIL, PASS), F32_STEP),
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


@pytest.mark.parametrize("name,x64_mode,expected,reason", CASES, indirect=["x64_mode"],
                         ids=[f"{c[0][:48]}-{'x64' if c[1] else 'x32'}" for c in CASES])
def test_harness_drop_in(name, x64_mode, expected, reason):
    h = _harnesses().get(name)
    assert h is not None, f"harness {name} is not in this jax's test_harnesses"
    g, args = harness_case(h)
    theirs = _outcome(jax_check_grads, g, args)
    ours = _outcome(jgc.check_grads, g, args)  # any exception other than a verdict fails the test
    assert (theirs, ours) == expected, reason


def test_a_wrong_rule_next_to_jumps_is_still_caught():
    g, args = harness_case(_harnesses()["rem_broadcast_lhs_float32_2_4_3_rhs_float32_2_1_3_"])

    @jax.custom_jvp
    def wrong_rem(x, y):
        return jax.lax.rem(x, y)

    wrong_rem.defjvp(lambda p, t: (wrong_rem(*p), t[0] - 0.9 * jnp.trunc(p[0] / p[1]) * t[1]))
    with pytest.raises(jgc.GradCheckError):
        jgc.check_grads(wrong_rem, args, 1, modes=("fwd",))
