"""The sparse single-entry evaluator gives vmap's values, for every kind of cost.

Each case evaluates a leaf's cost at many single-element perturbations twice: through
the jaxpr interpreter of sparse.py and through plain ``jax.vmap`` over dense copies
(JGC_SPARSE's off switch). They must agree to rounding (float64), including the ops
that the interpreter handles by falling back to dense copies.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src import engine, sparse


def _mlp(rng):
    W = rng.normal(size=(7, 5))
    ops = (rng.normal(size=5), rng.normal(size=(5, 3)), rng.normal(size=(6, 7)), rng.normal(size=(6, 3)))

    def cost(flat, ops):
        b1, W2, x, y = ops
        h = jnp.tanh(x @ flat.reshape(7, 5) + b1)
        return jnp.mean((h @ W2 - y) ** 2)

    return cost, W.ravel(), ops


def _bias(rng):
    ops = (rng.normal(size=(6, 5)), rng.normal(size=(5, 2)))

    def cost(b, ops):
        x, W = ops
        return jnp.sum(jax.nn.softplus(x + b) @ W)

    return cost, rng.normal(size=5), ops


def _second_layer(rng):
    ops = (rng.normal(size=(6, 5)),)

    def cost(flat, ops):
        (h,) = ops
        return jax.scipy.special.logsumexp(h @ flat.reshape(5, 4))

    return cost, rng.normal(size=20), ops


def _weight_decay_and_transpose(rng):
    ops = (rng.normal(size=(4, 6)),)

    def cost(flat, ops):
        (x,) = ops
        W = flat.reshape(5, 6)
        return jnp.sum(jnp.sin(x @ W.T)) + 0.1 * jnp.sum(W**2) + jnp.max(W)

    return cost, rng.normal(size=30), ops


def _leaf_on_the_left(rng):
    ops = (rng.normal(size=(4, 3)),)

    def cost(flat, ops):
        (v,) = ops
        A = flat.reshape(5, 4)
        return jnp.sum(jax.nn.relu(A @ v) ** 3) + jnp.sum(jnp.where(A > 0, A, 0.5 * A))

    return cost, rng.normal(size=20), ops


def _batched_matmul(rng):
    ops = (rng.normal(size=(3, 2, 4)),)

    def cost(flat, ops):
        (x,) = ops
        W = flat.reshape(3, 4, 5)
        return jnp.sum(jnp.cos(jnp.einsum("bij,bjk->bik", x, W)))

    return cost, rng.normal(size=60), ops


def _slices_of_a_flat_vector(rng):
    ops = (rng.normal(size=(3, 4)),)

    def cost(flat, ops):
        (x,) = ops
        W, b = flat[:8].reshape(4, 2), flat[8:]
        return jnp.sum(jnp.tanh(x @ W + b) ** 2)

    return cost, rng.normal(size=10), ops


def _scan_rnn(rng):
    ops = (rng.normal(size=(5, 3)),)

    def cost(flat, ops):
        (xs,) = ops
        W = flat.reshape(3, 3)

        def step(h, x):
            h = jnp.tanh(h @ W + x)
            return h, h

        h, _ = jax.lax.scan(step, jnp.zeros(3), xs)
        return jnp.sum(h**2)

    return cost, rng.normal(size=9) * 0.5, ops


def _scan_everything(rng):
    # The leaf is the input matrix inside the body and also feeds xs (so xs are
    # perturbed too), the scan runs in reverse, carries an integer counter and a matrix
    # state, and its stacked outputs are used.
    ops = (rng.normal(size=(6, 2, 3)), rng.normal(size=(4, 4)) * 0.3)

    def cost(flat, ops):
        xs, Wh = ops
        Wx = flat.reshape(3, 4)

        def step(carry, x):
            i, h = carry
            h = jnp.tanh(x @ Wx + h @ Wh) * (1.0 + 0.1 * i.astype(h.dtype))
            return (i + 1, h), jnp.sum(h * h, axis=-1)

        (_, h), ys = jax.lax.scan(step, (jnp.int32(0), jnp.zeros((2, 4))), jnp.sin(xs @ Wx[:, :3]), reverse=True)
        return jnp.sum(h**2) + jnp.sum(ys)

    return cost, rng.normal(size=12) * 0.5, ops


def _conv(rng):
    ops = (rng.normal(size=(1, 2, 8, 8)),)

    def cost(flat, ops):
        (x,) = ops
        k = flat.reshape(3, 2, 3, 3)
        y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME")
        return jnp.mean(jax.nn.gelu(y))

    return cost, rng.normal(size=54), ops


def _conv_strided_nhwc(rng):
    # Channels last (as Flax writes it), strides, a dilated kernel, uneven padding.
    ops = (rng.normal(size=(2, 9, 9, 3)),)

    def cost(flat, ops):
        (x,) = ops
        k = flat.reshape(3, 3, 3, 4)
        y = jax.lax.conv_general_dilated(x, k, (2, 1), ((1, 0), (2, 1)), rhs_dilation=(1, 2),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y) ** 2)

    return cost, rng.normal(size=108) * 0.5, ops


def _array_output(rng):
    ops = (rng.normal(size=(4, 3)),)

    def cost(flat, ops):
        (x,) = ops
        return jnp.tanh(x @ flat.reshape(3, 2)).sum(axis=0)

    return cost, rng.normal(size=6), ops


CASES = [_mlp, _bias, _second_layer, _weight_decay_and_transpose, _leaf_on_the_left,
         _batched_matmul, _slices_of_a_flat_vector, _scan_rnn, _scan_everything, _conv, _conv_strided_nhwc, _array_output]


def _evaluate(cost, x0, ops, idx, d, enabled, monkeypatch):
    monkeypatch.setattr(sparse, "ENABLED", enabled)
    monkeypatch.setattr(engine, "SPARSE_LEAF", 1)
    # The interpreter itself, also where the evaluator would leave it for vmap.
    monkeypatch.setattr(engine, "WHOLE_LEAF_COPY", float("inf"))
    ev = engine.LeafEvaluator(cost, x0, ops, chunk_size=8)
    assert ev.sparse == enabled, engine.SPARSE_FALLBACKS
    return ev(idx, d)


# (dtype, offsets, tolerance): float64 agrees to rounding; float32 (x64 off) also checks
# that weakly typed literals (2.0 * x, x / 3) keep their float32 types.
PRECISIONS = {"f64": (np.float64, 1e-3, 1e-12), "f32": (np.float32, 1e-2, 2e-5)}


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_sparse_evaluator_matches_dense_vmap(case, precision, monkeypatch):
    dtype, step, tol = PRECISIONS[precision]
    with jax.enable_x64(dtype == np.float64):
        rng = np.random.default_rng(0)
        cost, x0, ops = case(rng)
        x0 = jnp.asarray(x0, dtype)
        ops = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), ops)
        idx = np.arange(x0.size)
        d = np.stack([np.full(x0.size, step), np.full(x0.size, -2 * step)], axis=1).astype(dtype)
        fast = _evaluate(cost, x0, ops, idx, d, True, monkeypatch)
        dense = _evaluate(cost, x0, ops, idx, d, False, monkeypatch)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(dense)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.max(np.abs(b)))


def test_single_entry_perturbation_through_a_matmul_stays_sparse():
    # The point of the interpreter: X @ (W + δ e_ij) changes one column, not the product.
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        cost, x0, ops = _mlp(rng)
        closed = jax.make_jaxpr(cost)(jnp.asarray(x0), jax.tree_util.tree_map(jnp.asarray, ops))
        c = 4
        args = [sparse.Sparse(jnp.asarray(x0), jnp.zeros((c, 1), jnp.int32), jnp.ones((c, 1)))]
        args += [sparse.Plain(jnp.asarray(a)) for a in ops]
        env_kinds = []
        original = sparse._rule

        def spy(eqn, vals):
            out = original(eqn, vals)
            if eqn.primitive.name in ("dot_general", "tanh"):
                env_kinds.append((eqn.primitive.name, type(out[0]).__name__ if out else "dense"))
            return out

        sparse._rule = spy
        try:
            sparse.evaluate(closed.jaxpr, [sparse.Plain(v) for v in closed.consts], args)
        finally:
            sparse._rule = original
    assert env_kinds[:2] == [("dot_general", "Sparse"), ("tanh", "Sparse")], env_kinds


def _grouped_conv(rng):
    ops = (rng.normal(size=(1, 4, 6, 6)),)

    def cost(flat, ops):
        (x,) = ops
        k = flat.reshape(4, 2, 3, 3)
        return jnp.sum(jnp.sin(jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", feature_group_count=2)))

    return cost, rng.normal(size=72), ops


@pytest.mark.parametrize("case, stays_sparse", [(_mlp, True), (_second_layer, True), (_scan_rnn, True),
                                                 (_conv, True), (_grouped_conv, False)])
def test_the_sparse_path_is_left_where_its_trace_copies_the_whole_leaf(case, stays_sparse, monkeypatch):
    # A leaf used by an op without a sparse rule (a grouped convolution) is copied
    # densely per row by the interpreter: no cheaper than vmap, and vmap's cache-sized
    # batches are faster. A scan's recurrent matrix and a plain convolution's kernel
    # stay sparse: shared base products plus per-row corrections.
    monkeypatch.setattr(engine, "SPARSE_LEAF", 1)
    with jax.enable_x64(True):
        cost, x0, ops = case(np.random.default_rng(0))
        x0, ops = jnp.asarray(x0), jax.tree_util.tree_map(jnp.asarray, ops)
        ev = engine.LeafEvaluator(cost, x0, ops)
        fast = sparse.batched_single_entry(cost, x0, ops)
        jax.eval_shape(fast, x0, jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2,), x0.dtype),
                       ops)
    assert ev.sparse == stays_sparse
    assert (fast.densified >= x0.size) == (not stays_sparse), fast.densified


def test_gradient_check_agrees_with_and_without_the_sparse_evaluator(monkeypatch):
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        p = {"W": jnp.asarray(rng.normal(size=(6, 4))), "b": jnp.asarray(rng.normal(size=4))}
        x = jnp.asarray(rng.normal(size=(5, 6)))
        f = lambda p, x: jnp.sum(jnp.tanh(x @ p["W"] + p["b"]) ** 2)  # noqa: E731
        g = jax.grad(f)(p, x)
        bad = {"W": g["W"].at[2, 1].multiply(1.001), "b": g["b"]}
        reps = []
        monkeypatch.setattr(engine, "SPARSE_LEAF", 1)
        for enabled in (True, False):
            monkeypatch.setattr(sparse, "ENABLED", enabled)
            reps.append(jgc.check(f, p, x, grad=bad))
    for rep in reps:
        assert not rep.ok
        leaf = next(lf for lf in rep.leaves if lf.path == "['W']")
        assert [tuple(i) for i in leaf.elements("mismatch")] == [(2, 1)]


def test_zoo_verdicts_hold_on_the_sparse_path(monkeypatch):
    # Every leaf of every zoo model through the interpreter (normally only leaves of
    # 4096+ elements take it): no false alarm, and every planted bug still caught.
    import zoo

    monkeypatch.setattr(engine, "SPARSE_LEAF", 1)
    monkeypatch.setattr(engine, "SPARSE_FALLBACKS", [])
    with jax.enable_x64(True):
        for case in zoo.cases("float64"):
            rep = jgc.check(case.cost, case.params, *case.args, grad=case.grad)
            assert rep.ok, f"{case.name}\n{rep}"
            for name, bug in case.bugs.items():
                rep = jgc.check(case.cost, case.params, *case.args, grad=bug.grad)
                assert not rep.ok, f"{case.name}: {name}\n{rep}"
                assert rep.leaf(bug.leaf).status == "mismatch", f"{case.name}: {name}\n{rep}"
    assert engine.SPARSE_FALLBACKS == []


def test_batches_are_smaller_where_rows_go_dense_downstream():
    # A one-layer MLP stays sparse to its scalar output: big batches share the base pass.
    # In a deep MLP the second layer mixes the perturbed entry into every unit: the rows
    # go dense, and batches are sized so that their dense values stay in cache.
    rng = np.random.default_rng(0)
    x, W = rng.normal(size=(64, 96)), rng.normal(size=(96, 96)) / 10

    def shallow(flat, ops):
        return jnp.sum(jnp.tanh(ops @ flat.reshape(96, 96)))

    def deep(flat, ops):
        h = jnp.tanh(ops @ flat.reshape(96, 96))
        for _ in range(3):
            h = jnp.tanh(h @ W)
        return jnp.sum(h)

    with jax.enable_x64(True):
        x, W = jnp.asarray(x), jnp.asarray(W)
        evs = {f.__name__: engine.LeafEvaluator(f, W.ravel(), x) for f in (shallow, deep)}
    assert evs["shallow"].sparse and evs["deep"].sparse
    dense_row = 64 * 96  # the deep model's hidden layer, per row
    assert evs["deep"].rows == max(16, engine.DENSE_ROWS_BYTES // (dense_row * 8)) < evs["shallow"].rows
