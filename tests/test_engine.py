"""The perturbation engine: batching layouts, exact values, counts, memory bound, progress."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgc._src import engine, progress, sparse
from jgc._src.vector import VectorProblem


def _quartic(x, ops):
    return jnp.sum(ops * x**4) + jnp.sum(x) ** 2


def _explicit(x0, ops, i, d):
    x = np.array(x0, dtype=np.float64)
    x[i] += d
    return float(np.sum(np.asarray(ops) * x**4) + np.sum(x) ** 2)


@pytest.mark.parametrize("m,chunk_size", [(7, None), (40_000, None), (600, 5)], ids=["small", "grouped", "fixed"])
@pytest.mark.parametrize("jit_cost", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("sparse_path", [False, True], ids=["dense", "sparse"])
def test_leaf_evaluator_values_and_counts(m, chunk_size, jit_cost, sparse_path, rng, monkeypatch):
    monkeypatch.setattr(sparse, "ENABLED", sparse_path)
    monkeypatch.setattr(engine, "SPARSE_LEAF", 1)
    with jax.enable_x64(True):
        x0 = jnp.asarray(rng.normal(size=m))
        ops = jnp.asarray(rng.uniform(0.5, 1.5, size=m))
        cost = jax.jit(_quartic) if jit_cost else _quartic
        counter = engine.Counter()
        ev = engine.LeafEvaluator(cost, x0, ops, chunk_size=chunk_size, counter=counter)
        assert ev.sparse == sparse_path, engine.SPARSE_FALLBACKS
        if (m, chunk_size) == (40_000, None) and not sparse_path:
            assert ev.groups > 1  # big enough for lax.map over several batches
        idx = rng.permutation(m)[: min(m, 37)]
        deltas = np.stack([np.full(idx.size, 1e-3), np.full(idx.size, -2e-3), rng.normal(size=idx.size)], 1)
        got = ev(idx, deltas)
    assert got.shape == deltas.shape
    want = [[_explicit(x0, ops, i, d) for d in row] for i, row in zip(idx, deltas)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert counter.evaluations == deltas.size  # padding rows are not counted


def test_leaf_evaluator_with_lines_also_walks_them(rng):
    # One program for element offsets and for points on lines (a check's noise probe):
    # element rows give the values of an evaluator without lines, line rows the cost at
    # x0 + t·line, and t = 0 is x0 itself.
    with jax.enable_x64(True):
        m = 9
        x0 = jnp.asarray(rng.normal(size=m))
        ops = jnp.asarray(rng.uniform(0.5, 1.5, size=m))
        bank = rng.normal(size=(3, m))
        counter = engine.Counter()
        ev = engine.LeafEvaluator(_quartic, x0, ops, counter=counter, lines=jnp.asarray(bank))
        plain = engine.LeafEvaluator(_quartic, x0, ops)
        idx = np.array([0, 4, 8])
        deltas = np.array([[1e-3, -1e-3], [2e-2, 0.5], [-0.25, 3e-4]])
        np.testing.assert_array_equal(ev(idx, deltas), plain(idx, deltas))
        line, t = np.array([0, 2, 1, 2, 0]), np.array([0.0, 0.1, -0.3, 1e-6, 2.0])
        got = ev.along(line, t)
        want = [float(_quartic(np.asarray(x0) + tk * bank[lk], np.asarray(ops))) for lk, tk in zip(line, t)]
        np.testing.assert_allclose(got, want, rtol=1e-13)
        assert counter.evaluations == idx.size * 2 + t.size


def test_short_request_on_huge_leaf_uses_plain_batch(monkeypatch, rng):
    # The dense path's layout (the sparse path never groups).
    monkeypatch.setattr(sparse, "ENABLED", False)
    monkeypatch.setattr(engine, "SINGLE_BATCH_LEAF", 64)
    with jax.enable_x64(True):
        x0, ops = jnp.asarray(rng.normal(size=40_000)), jnp.ones(40_000)
        ev = engine.LeafEvaluator(_quartic, x0, ops)
        assert ev.groups > 1
        idx = np.array([3, 250])
        d = np.array([[1e-2, -1e-2], [5e-3, 0.1]])
        got = ev(idx, d)
    np.testing.assert_allclose(got, [[_explicit(x0, ops, i, v) for v in r] for i, r in zip(idx, d)], rtol=1e-12)
    assert ev.counter.evaluations == 4


def test_array_valued_cost_keeps_output_shape(rng):
    with jax.enable_x64(True):
        x0 = jnp.asarray(rng.normal(size=600))
        ev = engine.LeafEvaluator(lambda x, ops: jnp.stack([x.sum(), (x**2).sum(), ops]), x0, 1.0)
        out = ev(np.arange(5), np.full((5, 2), 0.5))
    assert out.shape == (5, 2, 3)
    np.testing.assert_allclose(out[:, :, 0], np.sum(np.asarray(x0)) + 0.5, rtol=1e-12)


def test_layout_bounds_memory_whatever_n():
    for m in [1, 10, 1_000, 100_000, 10_000_000, 50_000_000]:
        rows, groups = engine.choose_layout(m, None)
        # One vmapped batch holds `rows` perturbed copies of the leaf: capped by the budget
        # (a single row is the minimum, for leaves larger than the budget itself).
        assert rows == 1 or rows * m <= engine.BATCH_ELEMENT_BUDGET
        assert rows <= engine.DEFAULT_BATCH_EVALS and groups in (1, engine.GROUPS)
    assert engine.choose_layout(300, 5) == (5, 1)
    assert engine.choose_layout(300, None, devices=4)[0] % 4 == 0


def test_direction_evaluator_matches_explicit_directions(rng):
    with jax.enable_x64(True):
        a = jnp.asarray(rng.normal(size=(3, 4)))
        b = jnp.asarray(rng.normal(size=5))
        z = jnp.asarray([1.0 + 1.0j])  # complex leaf: never moved
        leaves = [a, z, b]

        def cost(dyn, argarr):
            return jnp.sum(jnp.sin(dyn[0])) * jnp.sum(dyn[2] ** 2) + jnp.abs(dyn[1][0]) * argarr[0]

        scales = [np.full(12, 2.0), np.ones(1), np.full(5, 0.5)]
        grads = [np.asarray(rng.normal(size=(3, 4))), np.zeros(1), np.asarray(rng.normal(size=5))]
        ev = engine.DirectionEvaluator(cost, leaves, [jnp.asarray(3.0)], scales, grads=grads,
                                       movable=[True, False, True], key=5, rows=4)
        assert list(ev.offsets) == [0, 12, 13, 18]
        seed, lo, hi = np.array([0, 1, 2]), np.array([0, 2, 13]), np.array([18, 7, 16])
        t = np.array([1e-3, -2e-3, 1e-2])
        J, gdot = ev(seed, lo, hi, t)
        flat_g = np.concatenate([grads[0].ravel(), [0.0], grads[2]])
        flat_s = np.concatenate([scales[0], [0.0], scales[2]])
        for r in range(3):
            i = np.arange(18)
            sign = np.asarray(engine.signs(jnp.asarray(i, jnp.uint32), jnp.uint32(seed[r] ^ 5), jnp.float64))
            v = np.where((i >= lo[r]) & (i < hi[r]), sign * flat_s, 0.0)
            v[12] = 0.0
            dyn = [a + t[r] * v[:12].reshape(3, 4), z, b + t[r] * v[13:]]
            assert J[r] == pytest.approx(float(cost(dyn, [3.0])), rel=1e-13)
            assert gdot[r] == pytest.approx(t[r] * float(flat_g @ v), rel=1e-9)
        assert ev.counter.evaluations == 3


def test_signs_are_balanced_and_independent_across_seeds():
    i = jnp.arange(20_000, dtype=jnp.uint32)
    s = [np.asarray(engine.signs(i, jnp.uint32(k), jnp.float32)) for k in range(4)]
    assert set(np.unique(s[0])) == {-1.0, 1.0}
    for k in range(4):
        assert abs(s[k].mean()) < 0.03  # 4 standard deviations of a fair coin
    assert abs(np.mean(s[0] * s[1])) < 0.03
    assert abs(np.mean(s[0][:-1] * s[0][1:])) < 0.03


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_only_on_a_terminal_after_the_delay(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("JGC_PROGRESS", raising=False)
    monkeypatch.setattr(progress, "_tqdm", lambda: None)  # the built-in bar (no tqdm installed)
    now = [0.0]
    out = _TTY()
    bar = progress.Progress(100, "jgc.check", stream=out, clock=lambda: now[0])
    bar(10)
    assert out.getvalue() == ""  # a short check never shows a bar
    now[0] = 3.0
    bar(50)
    assert "jgc.check [" in out.getvalue() and "50%" in out.getvalue() and "50/100" in out.getvalue()
    bar.close()
    assert out.getvalue().endswith("\r")
    monkeypatch.setenv("CI", "true")
    quiet = _TTY()
    bar = progress.Progress(100, stream=quiet, delay=0.0)
    bar(50)
    assert quiet.getvalue() == ""
    monkeypatch.delenv("CI")
    pipe = io.StringIO()  # not a terminal
    bar = progress.Progress(100, stream=pipe, delay=0.0)
    bar(50)
    assert pipe.getvalue() == ""
    monkeypatch.setenv("JGC_PROGRESS", "0")
    assert not progress.enabled(_TTY())


def test_progress_attaches_to_the_counter(monkeypatch):
    monkeypatch.setenv("JGC_PROGRESS", "1")
    counter = engine.Counter(evaluations=5)
    with progress.attached(counter, 10) as bar:
        bar.delay = 0.0
        bar.stream = io.StringIO()
        counter.add(10)
        assert "100%" in bar.stream.getvalue()
    assert counter.progress is None and counter.evaluations == 15


def test_every_evaluator_runs_through_the_one_dispatch_loop(rng, monkeypatch):
    """Coordinate rows, line rows and directions (the line layout included) are dispatched
    and counted by engine._dispatch, and by nothing else."""
    seen = []
    dispatch = engine._dispatch

    def spy(ev, program, calls, lead):
        seen.append((type(ev).__name__, sum(rows for _, rows in calls)))
        return dispatch(ev, program, calls, lead)

    monkeypatch.setattr(engine, "_dispatch", spy)
    x = jnp.asarray(rng.normal(size=6))

    def cost(dyn, argarr):
        return jnp.sum(jnp.sin(dyn[0]) * argarr[0])

    leaf = engine.LeafEvaluator(lambda v, ops: cost([v], ops), x, [jnp.asarray(2.0)])
    leaf(np.arange(3), np.full((3, 2), 1e-3))
    line = engine.LineEvaluator(cost, [x], [jnp.asarray(2.0)], [x[None]], rows=4)
    line(0, np.array([0.0, 1e-3, 2e-3]))
    monkeypatch.setattr(engine, "BATCH_ELEMENT_BUDGET", 2 * x.size)  # one row a batch: the line layout
    direction = engine.DirectionEvaluator(cost, [x], [jnp.asarray(2.0)], [np.ones(6)], grads=[np.ones(6)],
                                          movable=[True], rows=4)
    assert direction.lines
    direction(np.zeros(5, np.int64), np.zeros(5, np.int64), np.full(5, 6), np.linspace(1e-3, 5e-3, 5))
    assert seen == [("LeafEvaluator", 6), ("LineEvaluator", 3), ("DirectionEvaluator", 5)]
    assert (leaf.counter.evaluations, line.counter.evaluations, direction.counter.evaluations) == (6, 3, 5)


def test_vector_steps_need_no_call_order():
    """A vector problem's step may be asked before its noise is measured: the same step,
    the same σ, either way."""
    def f(x):
        return jnp.tanh(x) * jnp.array([1.0, 2.0, 3.0])

    x = (jnp.array([0.3, -0.7, 1.2], jnp.float32),)
    with VectorProblem(f, x, api="test") as early:
        h_early = early.relative_step("central", None)
        sigma_early = np.array(early.sigma)
    with VectorProblem(f, x, api="test") as late:
        late.measure_noise()
        h_late = late.relative_step("central", None)
    assert h_early == h_late
    np.testing.assert_array_equal(sigma_early, late.sigma)
