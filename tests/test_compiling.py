"""Programs compiled ahead on worker threads, and cheaply where they run little."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc
from jgc._src import compiling, engine, noise
from jgc._src.problem import Problem


def _mlp(p, x, y):
    h = jnp.tanh(x @ p["W1"] + p["b1"])
    return jnp.mean((h @ p["W2"] - y) ** 2)


def _model(rng, dtype=np.float64, width=12):
    p = {"W1": rng.normal(size=(5, width)), "b1": rng.normal(size=width), "W2": rng.normal(size=(width, 3))}
    p = {k: jnp.asarray(v.astype(dtype)) for k, v in p.items()}
    return p, jnp.asarray(rng.normal(size=(8, 5)).astype(dtype)), jnp.asarray(rng.normal(size=(8, 3)).astype(dtype))


def test_ahead_runs_the_compiled_program_and_falls_back_on_another_signature():
    f = jax.jit(lambda x, y: jnp.sin(x) * y)
    ahead = compiling.Ahead(f, jax.ShapeDtypeStruct((3,), jnp.float32), jnp.float32(2.0))
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(ahead(x, jnp.float32(2.0)), f(x, jnp.float32(2.0)))
    assert ahead.fallbacks == 0
    # Another shape: not the compiled program, the jitted function (retraces).
    np.testing.assert_array_equal(ahead(np.ones(4, np.float32), jnp.float32(2.0)), jnp.sin(np.ones(4, np.float32)) * 2)
    assert ahead.fallbacks == 1


def test_a_failed_background_compilation_leaves_the_error_to_the_call(monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("compiler crashed")

    f = jax.jit(lambda x: x + 1)
    compiling.clear_cache()  # compiled here, not served from an earlier test
    with monkeypatch.context() as m:
        m.setattr(jax.stages.Lowered, "compile", broken)
        ahead = compiling.Ahead(f, jax.ShapeDtypeStruct((2,), jnp.float32))
        assert ahead._compiled.result() is None  # waited for: the failure is in
    np.testing.assert_array_equal(ahead(np.zeros(2, np.float32)), np.ones(2))  # served by jit
    assert ahead.fallbacks == 1


def test_fast_compile_gives_the_values_of_the_optimised_program(rng):
    with jax.enable_x64(True):
        p, x, y = _model(rng)
        x0 = jnp.ravel(p["W1"])

        def cost(w, ops):
            q = dict(ops[0], W1=w.reshape(5, -1))
            return _mlp(q, *ops[1])

        idx = np.arange(x0.size)
        deltas = np.stack([np.full(idx.size, 1e-4), np.full(idx.size, -1e-4)], 1)
        fast = engine.LeafEvaluator(cost, x0, (p, (x, y)), fast_compile=True)
        slow = engine.LeafEvaluator(cost, x0, (p, (x, y)), fast_compile=False)
        got, want = fast(idx, deltas), slow(idx, deltas)
        assert isinstance(fast._call, compiling.Ahead) and fast._call.fallbacks == 0
        assert not isinstance(slow._call, compiling.Ahead)
        # Rounding may differ (the LLVM passes reorder nothing XLA fixed, but may fuse
        # multiply-adds): a few units of round-off of J, no more.
        np.testing.assert_allclose(got, want, rtol=0, atol=64 * 2.0**-52 * float(np.max(np.abs(want))))


def test_fast_compile_is_chosen_for_few_calls_only(rng):
    with jax.enable_x64(True):
        cost = lambda w, ops: jnp.sum(jnp.tanh(w) * ops)
        small = engine.LeafEvaluator(cost, jnp.ones(100), jnp.ones(100))
        large = engine.LeafEvaluator(cost, jnp.ones(3000), jnp.ones(3000))
    assert small._options == compiling.FAST  # 2·100 rows: 2 calls
    assert 2 * 3000 / large.per_call > engine.FAST_CALLS and large._options is None


@pytest.mark.parametrize("dtype,precision", [(np.float64, "auto"), (np.float32, "auto"), (np.float32, "native")])
def test_check_compiles_grad_and_evaluators_ahead_and_uses_them(rng, monkeypatch, dtype, precision):
    made = []

    class Recording(compiling.Ahead):
        def __init__(self, jitted, *args, **kwargs):
            super().__init__(jitted, *args, **kwargs)
            made.append((self, kwargs.get("background", True), kwargs.get("options")))

    monkeypatch.setattr(compiling, "Ahead", Recording)
    p, x, y = _model(rng, dtype)
    rep = jgc.check(_mlp, p, x, y, precision=precision)
    assert rep.ok, rep
    # jax.grad and the merged evaluator, both on workers; the noise probe walks its
    # lines through the evaluator's own program. On a CPU both run a few times only, so
    # both compile without LLVM optimisation.
    assert len(made) == 2
    assert [bg for _, bg, _ in made].count(True) == 2
    assert all(o == compiling.FAST for _, _, o in made)
    # Lowered under the check's own x64 scope, compiled on a thread, called with the
    # same signature: no call fell back to a fresh compilation.
    assert all(a.fallbacks == 0 for a, _, _ in made)


def test_fast_options_only_on_the_cpu_backend(monkeypatch):
    assert compiling.fast() == compiling.FAST  # these tests run on a CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compiling.fast() is None
    with jax.enable_x64(True):
        ev = engine.LeafEvaluator(lambda w, ops: jnp.sum(w * ops), jnp.ones(10), jnp.ones(10))
    assert ev._options is None


def test_compilation_threads_end_with_their_work(rng):
    # Background compilations run on threads of their own, not a pool: once the
    # programs are compiled no jgc thread is left in the user's process (a pool's idle
    # workers would outlive every check, and a forked child would inherit them dead).
    assert compiling._submit(lambda: 7).result(timeout=10) == 7
    p, x, y = _model(rng, width=5)
    assert jgc.check(_mlp, p, x, y).ok
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(t.name == "jgc-compile" for t in threading.enumerate()):
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name == "jgc-compile"]


def test_a_second_check_of_the_same_model_reuses_every_program(rng):
    p, x, y = _model(rng, width=7)
    compiling.clear_cache()
    first = jgc.check(_mlp, p, x, y)
    before = dict(compiling.stats)
    second = jgc.check(_mlp, p, x, y)
    # jax.grad and the merged evaluator (which also walks the noise probe's lines): both
    # served from the cache.
    assert compiling.stats["compiled"] == before["compiled"]
    assert compiling.stats["reused"] == before["reused"] + 2
    # The reports say so: the first check compiled those two programs (and whatever JAX
    # compiles on its own), the second none.
    assert first.programs >= 2 and second.programs == 0
    assert 0 < first.compile_seconds <= first.seconds
    a, b = first.to_dict(), second.to_dict()
    for r in (a, b):
        r.pop("seconds"), r.pop("compile_seconds"), r.pop("programs")
    assert a == b  # the same executables: the same values, bit for bit


def test_a_second_directional_check_reuses_the_screening_program(rng):
    p, x, y = _model(rng, width=7)
    first = jgc.check(_mlp, p, x, y, mode="directional")
    before = dict(compiling.stats)
    second = jgc.check(_mlp, p, x, y, mode="directional")
    # All three programs from the cache: jax.grad, the directional screen and the merged
    # evaluator of this small model (its step pilots and the noise probe's lines).
    assert compiling.stats["compiled"] == before["compiled"]
    assert compiling.stats["reused"] - before["reused"] == 3
    a, b = first.to_dict(), second.to_dict()
    for r in (a, b):
        r.pop("seconds"), r.pop("compile_seconds"), r.pop("programs")
    assert a == b


def test_the_clock_counts_programs_compiled_after_it_started_on_any_thread():
    before = jax.jit(lambda v: v * 3.0)
    before(np.ones(5, np.float32))  # compiled before the clock: not counted
    clock = compiling.Clock()
    assert clock.programs() == 0 and clock.seconds() == 0.0
    # One program compiled on this thread, one on a worker thread (as jgc compiles ahead).
    jax.jit(lambda v: jnp.cos(v) + 1.0)(np.ones(6, np.float32))
    lowered = jax.jit(lambda v: jnp.sin(v) * 2.0).lower(jax.ShapeDtypeStruct((7,), np.float32))
    assert compiling._submit(lowered.compile).result(timeout=60) is not None
    assert clock.programs() == 2
    later = compiling.Clock()
    assert later.programs() == 0
    assert 0 < clock.seconds() <= time.perf_counter() - clock.t0


@pytest.mark.parametrize("leaves", ["several", "one"])
def test_the_noise_probe_walks_its_lines_through_the_evaluator(rng, leaves):
    p, x, y = _model(rng, width=6)
    if leaves == "one":
        p = p["W1"]
        fn = (lambda w, x, y: _mlp({"W1": w, "b1": jnp.zeros(6, w.dtype), "W2": jnp.ones((6, 3), w.dtype)}, x, y))
    else:
        fn = _mlp
    with Problem(fn, p, (x, y), ahead=("evaluators",)) as prob:
        whole = prob._whole_evaluator()
        assert whole is not None and whole.lines
        t = np.arange(noise.POINTS) * 1e-3
        # The same lines as the line evaluator's (kept for models too big to merge).
        np.testing.assert_allclose(prob._probe_whole(whole)(t), prob._probe_lines(noise.LINES * noise.POINTS)(t),
                                   rtol=1e-13)


def test_a_program_is_reused_only_for_the_same_computation():
    def run(c, n=3):
        f = jax.jit(lambda v: v * c)
        ahead = compiling.Ahead(f, jax.ShapeDtypeStruct((n,), jnp.float32), background=False)
        return np.asarray(ahead(np.ones(n, np.float32)))

    before = dict(compiling.stats)
    np.testing.assert_array_equal(run(np.float32(2.5)), np.full(3, 2.5))
    np.testing.assert_array_equal(run(np.float32(2.5)), np.full(3, 2.5))  # same program
    np.testing.assert_array_equal(run(np.float32(3.5)), np.full(3, 3.5))  # another constant
    np.testing.assert_array_equal(run(np.float32(2.5), n=4), np.full(4, 2.5))  # another shape
    assert compiling.stats["compiled"] - before["compiled"] == 3
    assert compiling.stats["reused"] - before["reused"] == 1


def test_small_leaves_of_a_larger_model_share_one_evaluator(rng):
    with jax.enable_x64(True):
        p = {"W": rng.normal(size=(70, 64)) / 8, "b": rng.normal(size=64) / 4,
             "V": rng.normal(size=(64, 3)) / 8, "c": np.zeros(3)}
        x, y = rng.normal(size=(8, 70)), rng.normal(size=(8, 3))

        def loss(p, x, y):
            h = jnp.tanh(x @ p["W"] + p["b"])
            return jnp.mean((h @ p["V"] + p["c"] - y) ** 2)

        g = jax.tree_util.tree_map(np.array, jax.grad(loss)(p, x, y))
    g["V"][5, 1] *= 1 + 1e-6
    compiling.clear_cache()
    before = compiling.stats["compiled"]
    rep = jgc.check(loss, p, x, y, grad=g)
    # The gradient is given, so no jax.grad: the noise probe, W's evaluator and one
    # evaluator for b, V and c together (the model has 4480 + 64 + 192 + 3 elements).
    assert compiling.stats["compiled"] - before == 3
    assert [lf.path for lf in rep.failing()] == ["['V']"]
    assert rep.leaf("['V']").elements("mismatch") == [(5, 1)]
    assert all(lf.status == "ok" for lf in rep.leaves if lf.path != "['V']"), rep


def test_compiled_for_reuses_the_same_computation_only():
    def run(c, n=3, weak=False):
        x = jnp.ones(n, jnp.float32) if not weak else 1.0
        return np.asarray(compiling.Reused(lambda v: v * c)(x))  # a new function every call

    before = dict(compiling.stats)
    np.testing.assert_array_equal(run(np.float32(2.5)), np.full(3, 2.5))
    np.testing.assert_array_equal(run(np.float32(2.5)), np.full(3, 2.5))  # same program
    np.testing.assert_array_equal(run(np.float32(3.5)), np.full(3, 3.5))  # another constant
    np.testing.assert_array_equal(run(np.float32(2.5), n=4), np.full(4, 2.5))  # another shape
    np.testing.assert_array_equal(run(np.float32(2.5), weak=True), 2.5)  # a weakly typed scalar
    assert compiling.stats["compiled_now"] - before["compiled_now"] == 4
    assert compiling.stats["reused_now"] - before["reused_now"] == 1


def test_a_program_with_a_host_callback_is_never_shared():
    seen = []

    def run(tag):
        def f(v):
            jax.debug.callback(lambda x: seen.append(tag), v)
            return v + 1

        return compiling.Reused(f)(jnp.ones(2, jnp.float32))

    before = dict(compiling.stats)
    run("first")
    run("second")
    jax.effects_barrier()
    assert seen == ["first", "second"]
    assert compiling.stats["reused_now"] == before["reused_now"]


def test_a_second_check_rules_of_the_same_loss_reuses_the_capture_programs():
    @jax.custom_jvp
    def cube(x):
        return x ** 3

    cube.defjvp(lambda p, t: (cube(p[0]), 3 * p[0] ** 2 * t[0]))

    def loss(x):
        return jnp.sum(jnp.tanh(cube(jnp.sin(x) * 2.0)) ** 2)

    x = jnp.linspace(0.1, 0.9, 4, dtype=jnp.float32)
    assert jgc.check_rules(loss, x).ok
    before = dict(compiling.stats)
    assert jgc.check_rules(loss, x).ok
    assert compiling.stats["reused_now"] > before["reused_now"]
