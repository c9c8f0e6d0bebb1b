"""Big models: batches sized from a memory budget, the same verdicts when memory is short."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src import engine, memory, noise
from jgc._src.problem import Problem


def test_budget_follows_available_memory(monkeypatch):
    cap = engine.BATCH_ELEMENT_BUDGET
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 64 * 2**30)
    assert memory.budget_elements(cap) == cap  # plenty: the fixed cap
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 80 * 2**20)
    # An eighth of 80 MiB, in 8-byte elements.
    assert memory.budget_elements(cap) == int(memory.MEMORY_FRACTION * 80 * 2**20) // 8 == 1_310_720
    assert engine.rows_in_budget(100_000) == 13
    assert engine.rows_in_budget(10**8) == 1  # never fewer than one row
    assert engine.choose_chunk(100_000, None) == 13  # full mode's batches too
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: None)
    assert memory.budget_elements(cap) == cap


def test_available_bytes_reads_the_machine():
    free = memory.available_bytes()
    assert free is None or free > 0


def _mlp(seed=0, din=12, hid=10, dout=3):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"W1": jax.random.normal(k[0], (din, hid)) / 3, "b1": jnp.full(hid, 0.1),
              "W2": jax.random.normal(k[1], (hid, dout)) / 3}
    x, y = jax.random.normal(k[2], (8, din)), jax.random.normal(k[3], (8, dout))

    def loss(p, x, y):
        return jnp.mean((jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] - y) ** 2)

    return loss, params, x, y


def test_direction_line_layout_matches_rows(monkeypatch):
    loss, p, x, y = _mlp()
    names = ["W1", "b1", "W2"]
    with jax.enable_x64(True):
        leaves = [jnp.asarray(p[k], jnp.float64) for k in names]
        n = sum(v.size for v in leaves)
        cost = lambda ls, a: loss(dict(zip(names, ls)), *a)  # noqa: E731
        kw = dict(grads=[np.ones(v.shape) for v in leaves], movable=[True] * 3, key=3, rows=16)
        args = (cost, leaves, (x.astype(jnp.float64), y.astype(jnp.float64)), [np.ones(v.size) for v in leaves])
        rows = engine.DirectionEvaluator(*args, **kw)
        monkeypatch.setattr(engine, "BATCH_ELEMENT_BUDGET", 2 * n)  # one row per batch
        monkeypatch.setattr(engine, "LINE_DIRS", 2)  # 5 directions: 3 calls, the last one short
        lines = engine.DirectionEvaluator(*args, **kw)
        assert not rows.lines and rows.rows == 16 and lines.lines and lines.rows == 1
        # A screen's 6 steps along each of 3 directions, then a localisation's 4 and 2
        # short steps: runs of one direction, each one call in the line layout.
        seed = np.repeat([0, 1, 2, 3, 4], [6, 6, 6, 4, 2])
        lo = np.repeat([0, 120, 0, 5, 130], [6, 6, 6, 4, 2])
        hi = np.repeat([120, 130, n, 60, 160], [6, 6, 6, 4, 2])
        t = np.tile([1e-3, -1e-3, 2e-3, -2e-3, 4e-3, -4e-3], 5)[: seed.size]
        (j1, d1), (j2, d2) = rows(seed, lo, hi, t), lines(seed, lo, hi, t)
        # One dot per direction: t·⟨g, v⟩ in place of ⟨g, Δ⟩, the same points of J.
        cheap = engine.DirectionEvaluator(*args, exact_dots=False, **kw)
        j3, d3 = cheap(seed, lo, hi, t)
    np.testing.assert_allclose(j2, j1, rtol=1e-14)
    np.testing.assert_allclose(d2, d1, rtol=1e-10, atol=1e-18)
    assert rows.counter.evaluations == lines.counter.evaluations == seed.size
    assert rows.exact_dots and lines.exact_dots and not cheap.exact_dots
    np.testing.assert_array_equal(j3, j2)
    # Δ − t·v is a rounding of θ + t·v: at most u·|θ + t·v| per element, |θ| ≤ 1 here.
    assert np.all(np.abs(d3 - d1) <= 2 * 2.0**-53 * (hi - lo))
    assert not np.array_equal(d3, d1)  # the two really differ: the rounding is there
    ratios = d3 / t
    assert np.all(ratios.reshape(-1)[:6] == ratios[0])  # one ⟨g, v⟩ for a direction's six steps


def test_direction_scales_rebuilt_on_the_device_are_the_given_ones():
    from jgc._src.preparation import step_scales

    loss, p, x, y = _mlp()
    p = dict(p, b1=jnp.zeros(10))  # an all-zero leaf takes the global scale
    names = ["W1", "b1", "W2"]
    with jax.enable_x64(True):
        leaves = [jnp.asarray(p[k], jnp.float64) for k in names]
        _, scales = step_scales(leaves)
        cost = lambda ls, a: loss(dict(zip(names, ls)), *a)  # noqa: E731
        kw = dict(grads=[np.linspace(-1, 1, v.size).reshape(v.shape) for v in leaves], movable=[True] * 3,
                  key=5, rows=16)
        data = (x.astype(jnp.float64), y.astype(jnp.float64))
        given = engine.DirectionEvaluator(cost, leaves, data, scales, **kw)
        floors = engine.DirectionEvaluator(cost, leaves, data, [np.float64(s.min()) for s in scales], **kw)
        n = sum(v.size for v in leaves)
        seed, lo, hi = np.arange(4), np.array([0, 0, 120, 125]), np.array([n, 120, 130, 140])
        t = np.array([1e-3, -2e-3, 1e-3, 4e-3])
        (j1, d1), (j2, d2) = given(seed, lo, hi, t), floors(seed, lo, hi, t)
    assert len({float(s.min()) for s in scales}) == 3 and np.any(scales[0] > scales[0].min())
    np.testing.assert_array_equal(j2, j1)
    np.testing.assert_array_equal(d2, d1)


@pytest.mark.parametrize("x64", [False, True])
def test_screen_reads_one_dot_per_direction_only_for_low_precision_gradients(x64, monkeypatch):
    loss, p, x, y = _mlp(seed=1)
    made = []
    real = engine.DirectionEvaluator.__init__
    monkeypatch.setattr(engine.DirectionEvaluator, "__init__",
                        lambda self, *a, **k: made.append(self) or real(self, *a, **k))
    n = sum(v.size for v in p.values())
    monkeypatch.setattr(engine, "BATCH_ELEMENT_BUDGET", 2 * n)  # the line layout
    with jax.enable_x64(x64):
        if x64:
            p, x, y = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), (p, x, y))
        g = jax.grad(loss)(p, x, y)
        i = np.unravel_index(int(np.argmax(np.abs(g["W1"]))), g["W1"].shape)
        bad = dict(g, W1=g["W1"].at[i].multiply(1.01))
        rep = jgc.check(loss, p, x, y, grad=bad, mode="directional")
        good = jgc.check(loss, p, x, y, mode="directional")
    assert [ev.lines for ev in made] == [True, True]
    # A float64 gradient's allowance is far below what the rounding of θ + t·v could
    # move; a float32 gradient's is not.
    assert [ev.exact_dots for ev in made] == [x64, x64]
    assert good.ok and not rep.ok
    assert rep.leaf("['W1']").elements("mismatch") == [tuple(int(v) for v in i)]


def test_noise_probe_line_by_line_evaluates_the_same_points(monkeypatch):
    loss, p, x, y = _mlp()
    t = np.arange(noise.POINTS) * 1e-4
    with Problem(loss, p, (x, y)) as problem:
        n = sum(v.size for v in problem.dyn)
        together = problem._probe_lines(noise.LINES * noise.POINTS)(t)
        for fit in (1, 2, 5):
            apart = problem._probe_lines(fit)(t)
            np.testing.assert_allclose(apart, together, rtol=1e-14)
    assert together.shape == (noise.LINES, noise.POINTS)
    # The check picks the line-by-line probe when the budget holds fewer than all points.
    calls = []
    probe = Problem._probe_lines
    monkeypatch.setattr(Problem, "_probe_lines", lambda self, fit: calls.append(fit) or probe(self, fit))
    monkeypatch.setattr(engine, "BATCH_ELEMENT_BUDGET", 3 * n)
    with Problem(loss, p, (x, y)):
        pass
    assert calls == [3]


@pytest.mark.parametrize("mode,wrong", [("directional", "W1"), ("directional", "W2"), ("full", "W1")])
def test_short_memory_gives_the_same_verdict(mode, wrong, monkeypatch):
    loss, p, x, y = _mlp(seed=1)
    g = jax.grad(loss)(p, x, y)
    i = np.unravel_index(int(np.argmax(np.abs(g[wrong]))), g[wrong].shape)
    bad = dict(g, **{wrong: g[wrong].at[i].multiply(1.01)})  # a 1% error in one element
    before = jgc.check(loss, p, x, y, grad=bad, mode=mode)
    n = sum(v.size for v in p.values())
    monkeypatch.setattr(engine, "BATCH_ELEMENT_BUDGET", 2 * n)  # a batch holds one copy
    probe, fits = Problem._probe_lines, []
    monkeypatch.setattr(Problem, "_probe_lines", lambda self, fit: fits.append(fit) or probe(self, fit))
    after = jgc.check(loss, p, x, y, grad=bad, mode=mode)
    assert fits == [2]  # the noise probe went line by line, two points per batch
    assert not before.ok and not after.ok
    for a, b in zip(before.leaves, after.leaves):
        assert (a.path, a.status, a.checked) == (b.path, b.status, b.checked)
        assert a.elements("mismatch") == b.elements("mismatch")
    assert after.leaf(f"['{wrong}']").elements("mismatch") == [tuple(int(v) for v in i)]
    if mode == "directional":  # W2 (30) and b1 (10) were screened together
        assert "in 2 groups of consecutive leaves" in after.notes[-1]
    # Directional mode also leaves out the step pilots of leaves with nothing to judge.
    assert after.evaluations == before.evaluations if mode == "full" else after.evaluations < before.evaluations


def test_default_mode_is_full_for_test_sized_models():
    loss, p, x, y = _mlp()
    rep = jgc.check(loss, p, x, y)
    assert rep.mode == "full" and rep.checked == rep.size
    assert "mode='full'" not in str(rep).splitlines()[0]


def test_default_mode_screens_when_full_mode_would_take_too_long(monkeypatch):
    from jgc._src import policy, strategies

    loss, p, x, y = _mlp(seed=1)
    g = jax.grad(loss)(p, x, y)
    i = np.unravel_index(int(np.argmax(np.abs(g["W1"]))), g["W1"].shape)
    bad = dict(g, W1=g["W1"].at[i].multiply(1.01))
    # Models too big for the evaluation budget: the measured time decides.
    monkeypatch.setattr(strategies, "DEFAULT_BUDGET", 10)
    monkeypatch.setattr(Problem, "_measure_noise", _slow(Problem._measure_noise, 0.5))
    rep = jgc.check(loss, p, x, y, grad=bad)
    assert rep.mode.startswith("default (directional") and rep.checked < rep.size
    head = str(rep).splitlines()[0]
    assert "screened along 8 random directions" in head and "mode='full' checks every element" in head
    assert any(n.startswith("checked by default along random directions") and "60 s default budget" in n
               for n in rep.notes), rep.notes
    assert not rep.ok and rep.leaf("['W1']").elements("mismatch") == [tuple(int(v) for v in i)]
    # ...and a budget that holds the estimate gives full mode.
    monkeypatch.setattr(policy, "DEFAULT_TIME_BUDGET", 1e9)
    assert jgc.check(loss, p, x, y).mode == "full"


def _slow(measure, seconds):
    """_measure_noise that reports ``seconds`` per evaluation."""

    def wrapped(self):
        sigma = measure(self)
        self.eval_seconds = seconds
        return sigma

    return wrapped


def test_full_cost_is_evaluations_times_measured_time():
    from jgc._src import strategies

    loss, p, x, y = _mlp()
    with Problem(loss, p, (x, y)) as problem:
        assert problem.eval_seconds > 0 and problem.compile_seconds > 0
        need, seconds = strategies.full_cost(problem, "central")
    n = sum(v.size for v in p.values())
    assert need == 2 * n + strategies.PILOT_EVALS * 3
    assert seconds == pytest.approx(need * problem.eval_seconds)


def test_directional_report_states_what_was_compared():
    loss, p, x, y = _mlp()
    rep = jgc.check(loss, p, x, y, mode="directional")
    text = str(rep)
    first, second = text.splitlines()[:2]
    assert "3/3 leaves screened along 8 random directions each" in first
    assert "0/" + str(rep.size) + " elements checked individually" in first
    assert "elements checked, 0 ok" not in first
    assert "normwise" not in second and "no element compared individually" in second
    assert np.isnan(rep.normwise)
    for lf in rep.leaves:
        assert lf.directions == 8 and 0 <= lf.directional_rel < 1e-3 and lf.directional_ratio <= 1
        assert lf.to_dict()["directions"] == 8
    assert " dirs " in text.splitlines()[2]


def test_progress_writes_a_line_now_and_then_to_a_log(monkeypatch):
    import io

    from jgc._src import progress

    monkeypatch.delenv("JGC_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    now = [0.0]
    log = io.StringIO()  # a pipe or a log file: no terminal
    bar = progress.Progress(400, "jgc.check", stream=log, clock=lambda: now[0])
    bar(40)
    now[0] = 5.0
    bar(100)
    assert log.getvalue() == ""  # short checks stay silent
    now[0] = 10.5
    bar(150)
    assert log.getvalue() == "jgc.check: 38% (150/400 evaluations), 10 s, about 18 s left\n"
    now[0] = 12.0
    bar(200)
    assert log.getvalue().count("\n") == 1  # one line per LOG_EVERY seconds
    now[0] = 21.0
    bar(300)
    assert log.getvalue().count("\n") == 2 and "\r" not in log.getvalue()
    bar.close()
    monkeypatch.setenv("JGC_PROGRESS", "0")
    quiet = io.StringIO()
    bar = progress.Progress(400, stream=quiet, clock=lambda: now[0])
    now[0] = 100.0
    bar(200)
    assert quiet.getvalue() == ""


def test_progress_bar_uses_tqdm_on_a_terminal(monkeypatch):
    import io

    pytest.importorskip("tqdm")
    from jgc._src import progress

    class TTY(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("JGC_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    now = [0.0]
    out = TTY()
    bar = progress.Progress(100, "jgc.check", stream=out, clock=lambda: now[0])
    now[0] = 3.0
    bar(50)
    assert bar._bar is not None and bar._bar.n == 50
    assert "jgc.check" in out.getvalue() and "50/100" in out.getvalue()
    bar.close()


def test_noise_probe_reports_progress(monkeypatch):
    from jgc._src import progress

    seen = []
    real = progress.Progress.__call__
    monkeypatch.setattr(progress.Progress, "__call__", lambda self, done: seen.append((self.label, done))
                        or real(self, done))
    monkeypatch.setenv("JGC_PROGRESS", "1")
    loss, p, x, y = _mlp()
    n = sum(v.size for v in p.values())
    monkeypatch.setattr(engine, "BATCH_ELEMENT_BUDGET", 2 * n)
    with Problem(loss, p, (x, y)):
        pass
    assert [d for label, d in seen if label == "jgc: noise probe"][:3] == [10, 20, 30]


def test_a_wrong_leaf_is_named_without_searching_its_elements():
    loss, p, x, y = _mlp(seed=2)
    g = jax.grad(loss)(p, x, y)
    bad = dict(g, W2=g["W2"] * 1.01)  # a custom rule's cotangent 1% too large: every element
    rep = jgc.check(loss, p, x, y, grad=bad, mode="directional", locate=0)
    assert not rep.ok and [lf.path for lf in rep.failing()] == ["['W2']"]
    assert rep.checked == 0
    assert any("['W2']: the directional check fails" in n and "locate=0" in n for n in rep.notes), rep.notes
    assert not any("spread over many elements" in n for n in rep.notes)
    searched = jgc.check(loss, p, x, y, grad=bad, mode="directional", locate=1)
    assert [lf.path for lf in searched.failing()] == ["['W2']"] and searched.leaf("['W2']").counts["mismatch"] == 1
    assert searched.evaluations > rep.evaluations
