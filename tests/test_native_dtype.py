"""The derivative as it runs: the analytic side at the user's dtypes, a float64 reference.

Each bug here lives only at the dtype the user trains in (float32 or a narrower dtype
chosen from it), so the float64 twin of the program is right, and a check that
evaluates both sides in float64 passes it. The controls are correct float32 / float16 /
bfloat16-compute programs whose analytic side carries ordinary rounding: none may fail,
and none may be called imprecise for it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc

RNG = np.random.default_rng(7)
W = jnp.asarray(RNG.normal(size=(8, 8)) / 3, jnp.float32)
X = jnp.asarray(RNG.normal(size=(16, 8)), jnp.float32)


def _narrow_of(dtype):
    """A memory-saving table, as kernels keep one: float32 work saves bfloat16."""
    return jnp.bfloat16 if dtype == jnp.float32 else dtype


@jax.custom_jvp
def _softplus_branching(x):
    return jnp.logaddexp(x, 0.0)


@_softplus_branching.defjvp
def _softplus_branching_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    coef = 1.0 if x.dtype == jnp.float64 else 1.01  # a per-dtype coefficient, wrong for float32
    return _softplus_branching(x), jax.nn.sigmoid(x) * coef * t


@jax.custom_vjp
def _tanh_saving(x):
    return jnp.tanh(x)


def _tanh_saving_fwd(x):
    y = jnp.tanh(x)
    return y, y.astype(_narrow_of(y.dtype))  # the residual saved narrow to save memory


def _tanh_saving_bwd(y, g):
    return ((1 - y.astype(g.dtype) ** 2) * g,)


_tanh_saving.defvjp(_tanh_saving_fwd, _tanh_saving_bwd)


@jax.custom_vjp
def _sum_sq_scan(w, xs):
    return jax.lax.scan(lambda c, x: (c + jnp.sum(jnp.tanh(x @ w) ** 2), None), jnp.zeros((), w.dtype), xs)[0]


def _sum_sq_fwd(w, xs):
    return _sum_sq_scan(w, xs), (w, xs)


def _sum_sq_bwd(res, g):
    w, xs = res
    acc = _narrow_of(w.dtype)  # the backward accumulates in the narrow dtype

    def body(dw, x):
        y = jnp.tanh(x @ w)
        return dw + (jnp.outer(x, 2 * y * (1 - y**2)) * g).astype(acc), None

    dw, _ = jax.lax.scan(body, jnp.zeros(w.shape, acc), xs)
    return dw.astype(w.dtype), None


_sum_sq_scan.defvjp(_sum_sq_fwd, _sum_sq_bwd)

BUGS = {
    # JAX's own float32 tails: σ' = σ(1 − σ) and tanh' = 1 − t² round to 0 (truth 2.1e-9, 2.4e-8).
    "sigmoid tail": (lambda p: jnp.sum(jax.nn.sigmoid(p)), jnp.array([20.0, 1.0, -2.0, 0.5], jnp.float32)),
    "tanh tail": (lambda p: jnp.sum(jnp.tanh(p)), jnp.array([9.5, 1.0, -2.0, 0.5], jnp.float32)),
    # expm1' = expm1 + 1 rounds to 0 at −20 (truth 2.1e-9).
    "expm1 tail": (lambda p: jnp.sum(jnp.expm1(p)), jnp.array([-20.0, 1.0, -2.0, 0.5], jnp.float32)),
    # log_softmax's gradient 1 − exp(log_softmax) is 0 at a confident logit (truth 6.2e-9);
    # J itself is 6e-9, a difference of terms of 20 that float32 rounds to 0: not another cost.
    "log_softmax tail": (lambda p: jax.nn.log_softmax(p)[0],
                         jnp.array([20.0, 0.0, 0.0, 0.0], jnp.float32)),
    "dtype-branching rule": (lambda p: jnp.sum(_softplus_branching(X @ p)), W),
    "bfloat16 residual": (lambda p: jnp.sum(_tanh_saving(X @ p) ** 2), W),
    "bfloat16 scan accumulator": (lambda p: _sum_sq_scan(p, X), W),
}


def _layernorm(p):
    h = X @ p
    z = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)
    return jnp.sum(jnp.tanh(z) * jnp.arange(8.0, dtype=jnp.float32))


def _rnn(p):
    h, _ = jax.lax.scan(lambda h, x: (jnp.tanh(h @ p + x), None), jnp.zeros(8, jnp.float32), X)
    return jnp.sum(h**2)


CONTROLS = {
    "float32 LayerNorm": (_layernorm, W),
    "softmax cross-entropy, confident logits": (lambda p: -jnp.sum(jax.nn.log_softmax(10 * X @ p)[:, 0]), W),
    "float32 RNN under scan": (_rnn, W),
    "float16 MLP": (lambda p: jnp.sum(jnp.tanh(X.astype(jnp.float16) @ p) ** 2).astype(jnp.float32),
                    W.astype(jnp.float16)),
    "the correct residual, float32": (lambda p: jnp.sum(jnp.tanh(X @ p) ** 2), W),
}


@pytest.mark.parametrize("name", list(BUGS))
def test_a_bug_at_the_users_dtype_is_reported(name):
    f, p = BUGS[name]
    rep = jgc.check(f, p)
    statuses = {lf.status for lf in rep.leaves}
    assert statuses & {"mismatch", "imprecise"}, rep
    if name.endswith("tail"):  # precision lost within the dtype's absolute scale
        assert rep.leaves[0].elements("imprecise") == [(0,)], rep
    else:
        assert not rep.ok, rep
    assert any("analytic side at the dtypes given" in n for n in rep.notes)
    # The same program evaluated in float64 on both sides (the former default) is blind to it.
    old = jgc.check(f, p, analytic="reference")
    assert old.ok and not {lf.status for lf in old.leaves} & {"mismatch", "imprecise"}, old


@pytest.mark.parametrize("name", list(CONTROLS))
def test_a_correct_program_at_its_dtype_passes_without_flags(name):
    f, p = CONTROLS[name]
    rep = jgc.check(f, p)
    assert rep.ok, rep
    assert not {lf.status for lf in rep.leaves} & {"mismatch", "imprecise"}, rep


def test_a_cost_whose_float64_twin_differs_falls_back_to_the_reference_precision():
    # Dropout draws its mask at the default float dtype: with x64 on (the reference) the
    # mask is another one, so the twin is another cost. Its gradient is not the user's.
    key = jax.random.key(3)

    def f(p):
        keep = jax.random.bernoulli(key, 0.7, (16, 8))
        return jnp.sum(jnp.where(keep, jnp.tanh(X @ p), 0.0) ** 2)

    rep = jgc.check(f, W)
    assert rep.ok, rep
    assert any("the cost differs between the dtypes given" in n for n in rep.notes), rep.notes


def test_analytic_option_is_validated():
    with pytest.raises(ValueError, match="analytic must be one of"):
        jgc.check(lambda p: jnp.sum(p**2), W, analytic="float16")


def test_a_flax_block_computing_in_bfloat16_is_no_false_alarm():
    # float32 parameters, bfloat16 compute (dtype=bfloat16): the reference's steps move
    # no bfloat16 value, so its differences are 0 with error bars; never a mismatch.
    nn = pytest.importorskip("flax.linen", reason="flax is in the test extra")

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.SelfAttention(num_heads=2, qkv_features=8, dtype=jnp.bfloat16, param_dtype=jnp.float32)(x)
            h = nn.LayerNorm(dtype=jnp.bfloat16, param_dtype=jnp.float32)(x + h)
            return nn.Dense(1, dtype=jnp.bfloat16, param_dtype=jnp.float32)(h)

    x = jax.random.normal(jax.random.key(1), (2, 5, 8), jnp.float32)
    block = Block()
    params = block.init(jax.random.key(0), x)["params"]
    rep = jgc.check(lambda p: jnp.mean(block.apply({"params": p}, x).astype(jnp.float32) ** 2), params)
    assert rep.ok, rep
    assert not any(lf.status == "mismatch" for lf in rep.leaves)
    # The noise probe sees the staircase (equal values at fine spacings, steps far above
    # float64's rounding): the steps span it, so derivatives are resolved, not all
    # undecided (with steps sized below the quantum, 2 of 313 elements were).
    assert rep.step > 1e-2, rep
    codes = np.concatenate([np.ravel(lf.codes) for lf in rep.leaves])
    # Inconclusive elements get a second look over a wider span, fitted on many points:
    # most are then resolved (85 of 313 were without it). Those that stay undecided are
    # said to sit on the staircase of the cost's low-precision compute.
    assert np.mean(codes == 0) > 0.5, rep
    still = int(np.sum(codes == 1))
    said = [n for n in rep.notes if "staircase" in n and "low precision inside" in n]
    assert said and str(rep).count("of 64.") + str(rep).count("of 8.") >= 1, rep.notes
    assert sum(int(n.rsplit(": ", 1)[1].split(" of ")[0]) for n in rep.notes if "on the staircase" in n
               or n.startswith("inconclusive elements on a staircase")) == still, rep.notes


def test_each_leaf_reports_the_bits_its_gradient_holds():
    # A float32 gradient as float32 holds (about 24 bits); one computed from a residual
    # saved in bfloat16 holds about bfloat16's 8, and the report says so per leaf.
    good = jgc.check(*CONTROLS["the correct residual, float32"]).leaves[0].accurate_bits()
    bad = jgc.check(*BUGS["bfloat16 residual"]).leaves[0].accurate_bits()
    assert good["dtype"] == bad["dtype"] == 24
    assert good["median"] >= 20 and good["worst"] >= 16, good
    assert bad["median"] < 12, bad
    rep = jgc.check(*BUGS["bfloat16 residual"])
    assert rep.to_dict()["leaves"][0]["accurate_bits"]["median"] == bad["median"]


def test_a_float64_tail_is_resolved_by_the_complex_step_or_said_unresolved():
    # σ' at 40 is 4.2e-18 (mpmath), σ(1 − σ) rounds it to 0 in float64, and float64
    # central differences resolve nothing that small.
    with jax.enable_x64(True):
        p = jnp.array([40.0, 1.0, -2.0, 0.5])
        safe = jgc.check(lambda q: jnp.sum(jax.nn.sigmoid(q)), p)
        unsafe = jgc.check(lambda q: jnp.sum(jax.nn.sigmoid(jnp.abs(q))), p)  # abs: not complex-safe
    assert safe.leaves[0].elements("imprecise") == [(0,)], safe
    assert abs(safe.leaves[0].numeric[0] - 4.248354255291589e-18) < 1e-3 * 4.25e-18
    # An analytic 0 that nothing resolves is no evidence either way (a dead unit looks the
    # same): it stays ok, and a note names it.
    assert unsafe.ok and not unsafe.leaves[0].elements("imprecise"), unsafe
    assert not unsafe.leaves[0].elements("inconclusive"), unsafe
    said = [n for n in unsafe.notes if "float64 central differences cannot check" in n]
    assert said and "not complex-safe" in said[0], unsafe.notes
    assert "<root>[0] (analytic 0, error bar" in said[0], said  # the element, by name


@jax.custom_jvp
def _sigmoid_by_input(x):
    return jax.nn.sigmoid(x)


@_sigmoid_by_input.defjvp
def _sigmoid_by_input_jvp(primals, tangents):
    # σ' written in terms of the input keeps its digits in the tail: 4.2e-18 at 40.
    (x,), (t,) = primals, tangents
    e = jnp.exp(-jnp.abs(x))
    return _sigmoid_by_input(x), e / (1 + e) ** 2 * t


TAIL_POINT = [40.0, 1.0, -2.0, 38.0, 0.5, -41.0, 3.0]
TAIL_AT = [(0,), (3,), (5,)]  # |x| ≥ 38: σ' ≤ 3.1e-17, below float64 differences' ≈1e-11


def test_a_float64_tail_nothing_resolves_is_inconclusive_with_its_reason():
    with jax.enable_x64(True):
        p = jnp.array(TAIL_POINT)
        cost = lambda q: jnp.sum(_sigmoid_by_input(jnp.abs(q)) * jnp.arange(1.0, 8.0))  # noqa: E731
        rep = jgc.check(cost, p)
        strict = jgc.check(cost, p, strict=True)
        single = jgc.check(lambda q: _sigmoid_by_input(jnp.abs(q[0])), jnp.array([40.0, 1.0]))
    lf = rep.leaves[0]
    assert lf.elements("inconclusive") == TAIL_AT, rep
    assert lf.counts["ok"] == len(TAIL_POINT) - len(TAIL_AT)  # the others are checked for real
    assert rep.ok and not strict.ok  # inconclusive fails only under strict
    assert single.leaves[0].elements("inconclusive") == [(0,)], single
    line = next(s for s in str(rep).splitlines() if s.strip().startswith("inconclusive <root>[0]"))
    assert "analytic 4.25e-18" in line and "smaller than float64 central differences resolve" in line
    assert "not complex-safe" in line, line
    why = rep.to_dict()["leaves"][0]["reasons"]
    assert [w["index"] for w in why] == [list(i) for i in TAIL_AT]
    assert all(w["status"] == "inconclusive" and "not complex-safe" in w["reason"] for w in why)
    # The assertions follow the report: a default check passes, strict fails.
    with jax.enable_x64(True):
        jgc.assert_grads_close(cost, p)
        with pytest.raises(jgc.GradCheckError):
            jgc.assert_grads_close(cost, p, strict=True)


def test_a_float64_tail_is_resolved_by_the_complex_step_where_the_cost_allows():
    with jax.enable_x64(True):
        rep = jgc.check(lambda q: jnp.sum(_sigmoid_by_input(q) * jnp.arange(1.0, 8.0)), jnp.array(TAIL_POINT))
    lf = rep.leaves[0]
    assert lf.counts["ok"] == len(TAIL_POINT) and rep.ok, rep
    assert not lf.reasons
    # The complex step's value is the one shown: σ'(40) = 4.248354255291589e-18 (mpmath).
    assert abs(lf.numeric[0] - 4.248354255291589e-18) < 1e-6 * 4.25e-18


@jax.custom_jvp
def _sigmoid_tail_doubled(x):
    return jax.nn.sigmoid(x)


@_sigmoid_tail_doubled.defjvp
def _sigmoid_tail_doubled_jvp(primals, tangents):
    # Wrong only in the tail (|x| > 30): twice σ', 8.5e-18 at 40, far under atol.
    (x,), (t,) = primals, tangents
    e = jnp.exp(-jnp.abs(x))
    return _sigmoid_tail_doubled(x), jnp.where(jnp.abs(x) > 30, 2.0, 1.0) * e / (1 + e) ** 2 * t


VECTOR_TAIL_POINT = [40.0, 1.0, -2.0, 38.0]
SIGMOID_40 = 4.248354255291589e-18  # σ'(40), mpmath


def _tail_entries(lf):
    """The entries of a vector check's block whose analytic value is a float64 tail (< 1e-12, not 0)."""
    a = np.asarray(lf.analytic).reshape(lf.shape)
    return sorted(tuple(int(i) for i in w) for w in zip(*np.nonzero((np.abs(a) < 1e-12) & (a != 0))))


@pytest.mark.parametrize("check", ["jacobian", "jvp"])
def test_a_vector_float64_tail_is_resolved_by_the_complex_step(check):
    run = {"jacobian": jgc.check_jacobian, "jvp": jgc.check_jvp}[check]
    with jax.enable_x64(True):
        p = jnp.array(VECTOR_TAIL_POINT)
        rep = run(_sigmoid_by_input, p)
        wrong, strict = run(_sigmoid_tail_doubled, p), run(_sigmoid_tail_doubled, p, strict=True)
    lf = rep.leaves[0]
    tails = _tail_entries(lf)
    assert tails, lf.analytic  # the fixture has float64 tails (central differences see 0 there)
    assert rep.ok and lf.counts["ok"] == lf.checked and not lf.reasons, rep
    # The complex step's value is the one shown, to its own precision, not 0 ± 1e-11.
    num, a = (np.asarray(v).reshape(lf.shape) for v in (lf.numeric, lf.analytic))
    for w in tails:
        assert abs(num[w] - a[w]) <= 1e-6 * abs(a[w]), (w, num[w], a[w])
    if check == "jacobian":
        assert abs(num[0, 0] - SIGMOID_40) < 1e-6 * SIGMOID_40
    # A rule wrong only there (twice σ') is flagged: it passes by atol alone, so it is
    # imprecise (fails under strict), never silently ok.
    flagged = wrong.leaves[0].elements("imprecise")
    assert sorted(flagged) == _tail_entries(wrong.leaves[0]) and flagged, wrong
    assert not strict.ok


@pytest.mark.parametrize("check", ["jacobian", "jvp"])
def test_a_vector_float64_tail_nothing_resolves_is_inconclusive_with_its_reason(check):
    run = {"jacobian": jgc.check_jacobian, "jvp": jgc.check_jvp}[check]
    with jax.enable_x64(True):
        rep = run(lambda q: _sigmoid_by_input(jnp.abs(q)), jnp.array(VECTOR_TAIL_POINT))  # abs: not complex-safe
    lf = rep.leaves[0]
    assert lf.elements("inconclusive") == _tail_entries(lf) and lf.elements("inconclusive"), rep
    assert rep.ok and lf.counts["mismatch"] == 0  # inconclusive fails only under strict
    why = rep.to_dict()["leaves"][0]["reasons"]
    assert sorted(tuple(w["index"]) for w in why) == _tail_entries(lf)
    assert all("smaller than float64 central differences resolve" in w["reason"]
               and "not complex-safe" in w["reason"] for w in why), why


def _layernorm(x):
    m = jnp.mean(x)
    return (x - m) / jnp.sqrt(jnp.mean((x - m) ** 2) + 1e-5)


def test_a_float64_rounding_residue_of_a_true_zero_is_ok_not_inconclusive():
    # Σ w·LayerNorm(x), with w chosen so that the gradient's element 7 is 0 in exact
    # arithmetic: float64 computes it from terms ≈ 1 as ≈ 1e-16, a residue, not a tail.
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=50), rng.normal(size=50)
    with jax.enable_x64(True):
        xh = np.asarray(_layernorm(jnp.asarray(x)))
        n, rest = x.size, np.arange(50) != 7
        w[7] = (w[rest].sum() / n + xh[7] * (w[rest] * xh[rest]).sum() / n) / (1 - 1 / n - xh[7] ** 2 / n)
        rep = jgc.check(lambda q: jnp.sum(jnp.asarray(w) * _layernorm(q)), jnp.asarray(x))
    g7 = rep.leaves[0].analytic[7]
    assert g7 != 0 and abs(g7) < 1e-15, g7  # the fixture: a nonzero residue
    assert rep.ok and rep.counts()["inconclusive"] == 0 and not rep.leaves[0].reasons, rep


def test_a_block_of_nothing_but_float64_rounding_residues_is_ok():
    # Σ LayerNorm(x) is identically 0: every J·t is a residue of ≈ 1e-16 from terms ≈ 1,
    # and the block's largest value, which sets its floor, is one too. The complex step's
    # own rounding (steps h, 3h, 5h) covers them: ok, not inconclusive.
    x = np.random.default_rng(0).normal(size=12)
    with jax.enable_x64(True):
        rep = jgc.check_jvp(lambda q: jnp.sum(_layernorm(q)), jnp.asarray(x))
    a = np.asarray(rep.leaves[0].analytic)
    assert np.all(np.abs(a) < 1e-14) and np.any(a != 0), a  # the fixture: residues
    assert rep.ok and rep.counts()["inconclusive"] == 0, rep


def test_float64_rounding_residues_in_a_jacobian_are_ok_without_the_complex_step():
    # J = A·B with entry (0, 1) = 0 in exact arithmetic, computed from terms ≈ 1 (≈ 1e-16);
    # jnp.real makes f not complex-safe, so only the residue floor (16u times the smaller
    # of the entry's row and column scales) keeps it from being called a tail.
    rng = np.random.default_rng(3)
    A, B = rng.normal(size=(5, 6)), rng.normal(size=(6, 4))
    B[5, 1] = -(A[0, :5] @ B[:5, 1]) / A[0, 5]
    with jax.enable_x64(True):
        f = lambda x: jnp.asarray(A) @ (jnp.asarray(B) @ jnp.real(x))
        rep = jgc.check_jacobian(f, jnp.asarray(rng.normal(size=4)))
        # A real tail beside it is still no residue: its row and column are tails too.
        both = jgc.check_jacobian(lambda x: (f(x), _sigmoid_by_input(jnp.abs(x))), jnp.array(VECTOR_TAIL_POINT))
    lf = rep.leaves[0]
    j01 = np.asarray(lf.analytic).reshape(lf.shape)[0, 1]
    assert j01 != 0 and abs(j01) < 1e-14, j01  # the fixture: a nonzero residue
    assert rep.ok and rep.counts()["inconclusive"] == 0, rep
    assert both.leaves[0].counts["inconclusive"] == 0, both
    assert both.leaves[1].elements("inconclusive") == [(0, 0), (3, 3)], both


@pytest.mark.parametrize("loss", ["l2", "l1"])  # l1: |·| is not complex-safe, no complex step
def test_dead_relu_units_in_float64_are_not_called_inconclusive(loss):
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        params = {"w1": jnp.asarray(rng.normal(size=(6, 16))), "b1": jnp.asarray(rng.normal(size=16) - 1.0),
                  "w2": jnp.asarray(rng.normal(size=(16, 1)))}
        x = jnp.asarray(rng.normal(size=(12, 6)))

        def cost(p, x):
            h = jax.nn.relu(x @ p["w1"] + p["b1"] - 2.0 * (jnp.arange(16) < 8))  # 8 units shifted down
            r = h @ p["w2"] - 0.1
            return jnp.mean(r ** 2 if loss == "l2" else jnp.abs(r))

        rep = jgc.check(cost, params, x)
    dead = int(np.sum(np.asarray(rep.leaf("['w1']").analytic) == 0))
    assert dead >= 6, dead  # the fixture has dead units: their derivatives are exactly 0
    assert rep.ok and rep.counts()["inconclusive"] == 0, rep
    if loss == "l1":  # the zeros central differences cannot check are named in a note instead
        assert any("float64 central differences cannot check" in n for n in rep.notes), rep.notes


def test_each_flagged_element_says_what_fired_with_native_twin_and_reference_values():
    f, p = BUGS["dtype-branching rule"]
    rep = jgc.check(f, p)
    lf = rep.leaves[0]
    assert lf.twin is not None and lf.twin.shape == lf.analytic.shape
    # The float64 twin runs the float64 branch (coefficient 1): it agrees with the
    # reference, the native float32 values (coefficient 1.01) do not.
    assert np.allclose(lf.twin, lf.numeric, rtol=1e-6, atol=1e-9)
    assert not np.allclose(lf.analytic, lf.numeric, rtol=1e-3)
    text = str(rep)
    line = next(s for s in text.splitlines() if s.strip().startswith("mismatch <root>[0, 0]"))
    assert "native" in line and "float64 twin" in line and "reference" in line and "ulps of float32" in line
    tail = jgc.check(*BUGS["sigmoid tail"])
    line = next(s for s in str(tail).splitlines() if s.strip().startswith("imprecise <root>[0]"))
    assert "native 0 (float32)" in line and "ulps of float32" in line and "within the absolute" in line
    assert tail.leaves[0].twin[0] > 1e-9  # the twin holds σ'(20) = 2.1e-9


def test_the_report_gives_the_cost_s_own_accurate_bits_next_to_the_gradient_s():
    good = jgc.check(*CONTROLS["float32 LayerNorm"])
    assert good.cost_bits["dtype"] == 24 and good.cost_bits["bits"] >= 20, good.cost_bits
    assert "the cost J holds" in str(good)
    assert good.to_dict()["cost_bits"]["bits"] == good.cost_bits["bits"]
    # J = log_softmax at a confident logit is 6e-9: float32 rounds it to 0, no bit is right.
    bad = jgc.check(*BUGS["log_softmax tail"])
    assert bad.cost_bits["bits"] < 4, bad.cost_bits
    # At the reference's precision there is no second side to measure.
    assert jgc.check(*CONTROLS["float32 LayerNorm"], analytic="reference").cost_bits is None


def test_a_confident_cross_entropy_in_float32_is_imprecise_and_its_twin_tells_a_bug():
    # The hand-written float32 backward pr − onehot loses every digit of gradients of 1e-8
    # (terms of 1): imprecise, not a failure. A bug that the float64 twin carries too (one
    # element 1% off, a sign error) is still a mismatch: the program is wrong at every
    # precision, whatever float32 keeps of it.
    import zoo

    case = zoo.make_confident_softmax("float32")
    good = jgc.check(case.cost, case.params, *case.args, grad=case.grad)
    assert good.ok and good.leaves[0].status == "imprecise", good

    def one_off(p, *a):
        g = case.grad(p, *a)
        return {"W": g["W"].at[0, 1].multiply(1.01)}

    bad = jgc.check(case.cost, case.params, *case.args, grad=one_off)
    assert not bad.ok and bad.leaves[0].elements() == [(0, 1)], bad
    assert "the float64 twin is off from the reference too" in str(bad)
    sign = jgc.check(case.cost, case.params, *case.args, grad=case.bugs["sign error"].grad)
    assert not sign.ok, sign


def test_a_small_element_of_a_cost_summing_many_terms_is_judged_at_its_own_scale():
    # J sums 20000 float32 terms, so it rounds far above its own size. A 10 % error, in
    # float32 only, in the one element whose derivative is 1e-3 must still fail: the
    # dtype's allowance follows each element's own value, not the magnitude of the
    # whole cost's terms.
    n = 20000
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=n), jnp.float32)
    c = rng.uniform(0.5, 1.5, size=n)
    c[7] = 1e-3
    c = jnp.asarray(c, jnp.float32)

    @jax.custom_vjp
    def cost(w):
        return jnp.sum(jnp.sin(w) * c)

    def fwd(w):
        return cost(w), w

    def bwd(w, ct):  # cos(w)·c, with element 7 off by 10 % in float32 only
        wrong = 1.1 if w.dtype == jnp.float32 else 1.0
        return (ct * (jnp.cos(w) * c).at[7].multiply(wrong),)

    cost.defvjp(fwd, bwd)
    leaf = jgc.check(cost, w, mode="full").leaves[0]
    assert leaf.status == "mismatch"
    assert leaf.worst_index == (7,)


# -- check_rules: each rule's derivative at the dtypes its call site receives ----------------
@jax.custom_vjp
def _tanh_kept(x):
    return jnp.tanh(x)


def _tanh_kept_fwd(x):
    y = jnp.tanh(x)
    return y, y


def _tanh_kept_bwd(y, g):
    return ((1 - y**2) * g,)


_tanh_kept.defvjp(_tanh_kept_fwd, _tanh_kept_bwd)


def test_check_rules_judges_a_rule_at_the_dtypes_its_call_site_receives():
    # The rule is right in float64 and wrong only for float32 work (its residual saved
    # in bfloat16): captured at the dtypes the loss runs, the rule is judged there,
    # against float64 differences of its primal.
    f, p = BUGS["bfloat16 residual"]
    rep = jgc.check_rules(f, p)
    rule = rep.rules[0]
    assert not rep.ok and rule.status == "mismatch" and rule.name == "_tanh_saving", rep
    site = rule.sites[0]
    assert site.report.precision == "float64", site.report  # the reference widened
    assert any("at the dtypes given (float32)" in n for n in site.report.notes), site.report


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_check_rules_passes_a_correct_rule_at_a_narrow_dtype(dtype):
    x = X.astype(dtype)
    rep = jgc.check_rules(lambda p: jnp.sum(_tanh_kept(x @ p) ** 2).astype(jnp.float32), W.astype(dtype))
    assert rep.ok and [r.status for r in rep.rules] == ["ok"], rep
    notes = rep.rules[0].sites[0].report.notes
    assert any(f"at the dtypes given ({jnp.dtype(dtype).name})" in n for n in notes), notes


def test_a_fit_over_a_staircase_recovers_the_slope_within_its_bar():
    # J = 2 + 0.3·t rounded to steps of 1e-2 (a cost computed in low precision): a
    # two-point difference over 0.05 sees 0 or one quantum; the 64-point fit over the
    # whole span sees the slope, and its bar covers its error without being vacuous.
    from jgc._src import staircase

    t = np.linspace(-0.5, 0.5, 64)[None, :]
    v = np.round((2.0 + 0.3 * t) / 1e-2) * 1e-2
    slope, bar = staircase.slope_fit(t, v, 3e-3)
    assert abs(slope[0] - 0.3) <= bar[0] < 0.15, (slope, bar)
