"""Chunks sharded across devices: 4 fake CPU devices in a subprocess (no leak into other tests)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import jgc
    from jgc._src import engine

    assert len(jax.devices()) == 4, jax.devices()

    def loss(p, x, y):
        h = jnp.tanh(x @ p["W1"] + p["b1"])
        return jnp.mean((h @ p["W2"] - y) ** 2)

    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(0), 3)
        p = {"W1": jax.random.normal(k[0], (12, 10)) / 4, "b1": jnp.full(10, 0.1),
             "W2": jax.random.normal(k[1], (10, 3)) / 3}
        x, y = jax.random.normal(k[2], (8, 12)), jnp.ones((8, 3))

        # The engine spreads each batch's rows over the 4 devices, and its values are
        # those of a single-device evaluation.
        def cost(flat, ops):
            return loss(dict(ops[0], W1=flat.reshape(12, 10)), *ops[1])
        ops = ({"b1": p["b1"], "W2": p["W2"]}, (x, y))
        sharded = engine.LeafEvaluator(cost, p["W1"].ravel(), ops)
        single = engine.LeafEvaluator(cost, p["W1"].ravel(), ops, devices=False)
        assert sharded.shard is not None and sharded.shard.size == 4 and single.shard is None
        assert sharded.rows % 4 == 0
        idx = np.arange(120)
        d = np.stack([np.full(120, 1e-4), np.full(120, -1e-4)], 1)
        np.testing.assert_allclose(sharded(idx, d), single(idx, d), rtol=1e-14)
        rows = sharded.shard.split_rows([np.arange(sharded.rows, dtype=np.int32)])[0]
        out = sharded._call(sharded.x0, rows, jnp.zeros(sharded.rows), sharded.operands)
        assert len(out.sharding.device_set) == 4  # computed on every device

        # The sparse single-entry evaluator (normally for leaves of 4096+ elements)
        # gives the same values when its rows are sharded.
        engine.SPARSE_LEAF = 1
        sp = engine.LeafEvaluator(cost, p["W1"].ravel(), ops)
        assert sp.sparse and sp.shard is not None, engine.SPARSE_FALLBACKS
        np.testing.assert_allclose(sp(idx, d), single(idx, d), rtol=1e-12)
        engine.SPARSE_LEAF = 2**12

        # Directional screens: rows sharded, same values as on one device.
        from jgc._src import engine as E
        args = (lambda leaves, a: loss(dict(zip(["W1", "b1", "W2"], leaves)), *a),
                [p["W1"], p["b1"], p["W2"]], (x, y),
                [np.ones(120), np.ones(10), np.ones(30)])
        kw = dict(grads=[np.ones((12, 10)), np.ones(10), np.ones((10, 3))], movable=[True, True, True])
        dsh = E.DirectionEvaluator(*args, rows=6, **kw)
        d1 = E.DirectionEvaluator(*args, rows=6, devices=False, **kw)
        assert dsh.shard is not None and dsh.rows == 24 and d1.shard is None
        seeds, lo, hi = np.arange(24), np.zeros(24), np.full(24, 160)
        t = np.full(24, 1e-3)
        for a, b in zip(dsh(seeds, lo, hi, t), d1(seeds, lo, hi, t)):
            np.testing.assert_allclose(a, b, rtol=1e-13)

        g = jax.grad(loss)(p, x, y)
        bad = dict(g, W1=g["W1"].at[3, 7].multiply(1 + 1e-6))
        worse = dict(g, W1=g["W1"].at[3, 7].multiply(1 + 1e-3))  # within directional reach
    rep = jgc.check(loss, p, x, y, grad=bad)
    assert not rep.ok and rep.leaf("['W1']").elements("mismatch") == [(3, 7)], rep
    assert jgc.check(loss, p, x, y).ok
    rep = jgc.check(loss, p, x, y, grad=worse, mode="directional")
    assert rep.leaf("['W1']").elements("mismatch") == [(3, 7)], rep
    print("MULTIDEVICE OK")
    """
)


def test_check_runs_sharded_over_four_cpu_devices(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    script = tmp_path / "multidevice.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MULTIDEVICE OK" in proc.stdout
