"""Question: how much does the sparse evaluator save on a deeper network?

The speed benchmark's model has one hidden layer, where a perturbed W1 entry changes
one column that goes straight to the output layer. Here the tanh MLP has four hidden
layers of width 160 (n ≈ 1.04e5, float64, batch 64): after the next matrix product
every activation has changed, so each perturbation does dense work downstream. The
same full check runs with the sparse evaluator on and off (JGC_SPARSE's switch), in
one process, after a warm-up check on a small model; times include compilation.

Run:  python benchmarks/bench_deep.py      (about 3 minutes on 2 cores)
Writes benchmarks/results/deep.md.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jgc  # noqa: E402
from jgc._src import sparse  # noqa: E402

WIDTH, DEPTH, BATCH, OUT = 160, 4, 64, 10


def model(width):
    rng = np.random.default_rng(0)
    p = {f"W{k}": jnp.asarray(rng.normal(size=(width, width)) / math.sqrt(width)) for k in range(1, DEPTH + 1)}
    p["Wo"] = jnp.asarray(rng.normal(size=(width, OUT)) / math.sqrt(width))
    x = jnp.asarray(rng.normal(size=(BATCH, width)))
    y = jnp.asarray(rng.normal(size=(BATCH, OUT)))
    return p, x, y


def loss(p, x, y):
    h = x
    for k in range(1, DEPTH + 1):
        h = jnp.tanh(h @ p[f"W{k}"])
    return jnp.mean((h @ p["Wo"] - y) ** 2)


def main():
    rows = []
    with jax.enable_x64(True):
        jgc.check(loss, *model(8))  # warm-up: imports, first compilations
        p, x, y = model(WIDTH)
        n = sum(v.size for v in p.values())
        flops = 2 * BATCH * (DEPTH * WIDTH**2 + WIDTH * OUT)
        for enabled in (True, False):
            sparse.ENABLED = enabled
            t = time.perf_counter()
            rep = jgc.check(loss, p, x, y)
            rows.append((enabled, time.perf_counter() - t, rep.ok, rep.evaluations))
        sparse.ENABLED = True
    lines = [
        "# Sparse evaluator on a deeper network",
        "",
        f"Command: `python benchmarks/bench_deep.py`. Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()}).",
        "",
        f"tanh MLP, {DEPTH} hidden layers of width {WIDTH}, batch {BATCH}, float64, n = {n}; "
        f"one cost evaluation is {flops / 1e6:.1f} MFLOP of matmuls.",
        "",
        "| evaluator | full check s (compile included) | ok | evaluations |",
        "|---|---|---|---|",
    ]
    for enabled, seconds, ok, evals in rows:
        name = "sparse (default)" if enabled else "dense vmap (JGC_SPARSE=0)"
        lines.append(f"| {name} | {seconds:.1f} | {'yes' if ok else 'NO'} | {evals} |")
    lines += ["", f"Ratio dense / sparse: {rows[1][1] / rows[0][1]:.2f}.", ""]
    out = ROOT / "benchmarks" / "results" / "deep.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
