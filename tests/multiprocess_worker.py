"""One process of the multi-process check (tests/test_multiprocess.py).

``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json`` joins
``NUM_PROCESSES`` processes on 127.0.0.1:PORT with ``jax.distributed`` (CPU collectives
over gloo), runs the checks of :func:`run_checks` and writes their reports as JSON.
With ``NUM_PROCESSES`` 1 it runs alone, without ``jax.distributed``; the test calls
:func:`run_checks` in its own process for the single-process reference.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

# What the checks run on (small, so that the whole test stays well under a minute on
# 2 cores): a tanh MLP with 160 parameters.
SHAPES = {"W1": (12, 10), "b1": (10,), "W2": (10, 3)}
BUG_AT = ("['W1']", (3, 7))


def loss(p, x, y):
    h = jnp.tanh(x @ p["W1"] + p["b1"])
    return jnp.mean((h @ p["W2"] - y) ** 2)


def problem():
    """Parameters, data and the exact gradient, built with NumPy (identical in every process)."""
    r = np.random.default_rng(0)
    p = {k: r.normal(size=s) / 3 for k, s in SHAPES.items()}
    x, y = r.normal(size=(8, 12)), np.ones((8, 3))
    h = np.tanh(x @ p["W1"] + p["b1"])
    do = 2 * (h @ p["W2"] - y) / y.size
    dz = (do @ p["W2"].T) * (1 - h**2)
    g = {"W1": x.T @ dz, "b1": dz.sum(0), "W2": h.T @ do}
    return p, x, y, g


def planted(g, rel):
    """The gradient with element BUG_AT of W1 off by a relative ``rel``."""
    bad = {k: v.copy() for k, v in g.items()}
    bad["W1"][BUG_AT[1]] *= 1 + rel
    return bad


def run_checks() -> dict:
    """Run every check of the test; return {name: report.to_dict() without timing}."""
    import jgc
    from jgc._src import engine

    p, x, y, g = problem()
    reports = {
        "full": jgc.check(loss, p, x, y, grad=g),
        "full_bug": jgc.check(loss, p, x, y, grad=planted(g, 1e-6)),
        # 1e-3 relative in one of 160 elements is within the directional screen's reach.
        "directional_bug": jgc.check(loss, p, x, y, grad=planted(g, 1e-3), mode="directional"),
    }
    # The sparse single-entry evaluator (normally for leaves of 4096+ elements), with its
    # rows sharded like the dense one's.
    saved = engine.SPARSE_LEAF
    engine.SPARSE_LEAF = 1
    try:
        reports["sparse_bug"] = jgc.check(loss, p, x, y, grad=planted(g, 1e-6))
    finally:
        engine.SPARSE_LEAF = saved
    out = {}
    for name, rep in reports.items():
        d = rep.to_dict()
        # Time taken (and building programs, which each process may or may not reuse), and
        # the function's name (its module differs when run as a script).
        d.pop("seconds"), d.pop("compile_seconds"), d.pop("programs")
        d.pop("function")
        out[name] = d
    return out


def differing_data_error(pid: int) -> str | None:
    """The error of a check whose data differ between processes (None if it passed)."""
    import jgc

    p, x, y, _ = problem()
    try:
        jgc.check(loss, p, x + pid, y)
    except ValueError as e:
        return str(e)
    return None


def layout() -> dict:
    """How a check's batches are laid out here: devices of the row mesh and their processes."""
    from jgc._src import sharding

    shard = sharding.RowSharding.create()
    devices = list(shard.mesh.devices.flat) if shard else jax.devices()[:1]
    return {"processes": jax.process_count(), "mesh_devices": len(devices),
            "mesh_processes": sorted({d.process_index for d in devices})}


def main(argv):
    pid, nproc, port, out = int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
            coordinator_bind_address=f"127.0.0.1:{port}",
            # Bounded: a peer that never comes (or dies) ends the run instead of hanging.
            initialization_timeout=60, heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)
    try:
        result = {"layout": layout(), "reports": run_checks()}
        if nproc > 1:
            result["differing_data"] = differing_data_error(pid)
    finally:
        if nproc > 1:
            jax.distributed.shutdown()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv)
