"""A user's process: run each public entry point of jgc, then the user's own next lines.

Run as ``python tests/state_worker.py on|off`` (x64 on or off for the whole process).
It runs a battery of ordinary user-side operations once before any check (the fresh
process's answers), then, after each entry point, the same battery again, and prints
one JSON object: per entry point, whether it raised and every battery line whose value,
dtype or error differs from the fresh answers. Everything the battery touches is also
what the checked functions touch (a module-level NumPy float64 constant under
``jnp.matmul``, ``jax.jit`` and ``jax.vmap``), so a cache entry made inside a check and
reused outside it (or the reverse) shows up here. Used by tests/test_jax_state.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
import time

import jax

jax.config.update("jax_enable_x64", sys.argv[1:2] == ["on"])

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jgc  # noqa: E402
from jgc._src import cli  # noqa: E402

# Module-level NumPy constants, as many codebases keep them (quadrature weights, tables).
C = np.linspace(0.0, 1.0, 13)
W = np.arange(26.0).reshape(13, 2) / 26.0


@jax.jit
def user_step(v):
    return jnp.tanh(v) @ C


def cost(p):
    return jnp.tanh(p["x"]) @ C + jnp.sum(jnp.matmul(p["x"], W) ** 2)


def params():
    return {"x": jnp.linspace(-1.0, 1.0, 13, dtype=jnp.float32)}


def vector_fn(x):
    return jnp.tanh(x) * C + jnp.matmul(x, W).sum()


def _battery() -> dict:
    x = jnp.ones(13, jnp.float32) * 0.3
    lines = {
        "eager matmul with a NumPy float64 constant": lambda: jnp.tanh(x * 2) @ C,
        "eager jnp.matmul with a NumPy matrix": lambda: jnp.matmul(x, W),
        "a new jitted closure over the constant": lambda: jax.jit(lambda v: jnp.sin(v) @ C)(x),
        "the user's jitted step": lambda: user_step(x),
        "vmap over the constant": lambda: jax.vmap(lambda v: v @ C)(jnp.stack([x, 2 * x])),
        "grad through the constant": lambda: jax.grad(lambda v: jnp.tanh(v) @ C)(x),
        "jit of grad": lambda: jax.jit(jax.grad(lambda v: jnp.sum(jnp.matmul(v, W) ** 2)))(x),
        "random normal (typed key)": lambda: jax.random.normal(jax.random.key(0), (3,)),
        "random uniform (raw key)": lambda: jax.random.uniform(jax.random.PRNGKey(1), (2,)),
        "jnp.asarray of the constant": lambda: jnp.asarray(C),
        "a Python float with float32": lambda: x[:2] + 1.5,
        "a NumPy float64 scalar with float32": lambda: x[:2] + np.float64(0.25),
        "the cost itself": lambda: cost(params()),
    }
    out = {}
    for name, line in lines.items():
        try:
            v = line()
            out[name] = [str(v.dtype), np.asarray(v, np.float64).round(12).tolist()]
        except Exception as e:  # noqa: BLE001 - the error is the answer recorded
            out[name] = ["raised", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"]
    for flag in ("jax_enable_x64", "jax_numpy_dtype_promotion", "jax_debug_nans", "jax_debug_infs",
                 "jax_enable_checks", "jax_default_matmul_precision", "jax_disable_jit"):
        out["config " + flag] = ["config", repr(getattr(jax.config, flag))]
    return out


def _entries() -> dict:
    p = params()
    x = jnp.linspace(-1.0, 1.0, 13, dtype=jnp.float32)

    def step(p, lr):
        return jax.tree_util.tree_map(lambda a, g: a - lr * g, p, jax.grad(cost)(p))

    def cli_check():
        with contextlib.redirect_stdout(io.StringIO()):
            return cli.main(["check", "state_worker:cost", "--params", "state_worker:params"])

    return {
        "check (full)": lambda: jgc.check(cost, p),
        "check (full, precision=float64)": lambda: jgc.check(cost, p, precision="float64"),
        "check (full, precision=native)": lambda: jgc.check(cost, p, precision="native"),
        "check (sampled)": lambda: jgc.check(cost, p, mode="sampled", samples=4),
        "check (directional)": lambda: jgc.check(cost, p, mode="directional"),
        "check (auto)": lambda: jgc.check(cost, p, mode="auto"),
        "check (complex step)": lambda: jgc.check(cost, p, stencil="complex"),
        "numerical_grad": lambda: jgc.numerical_grad(cost, p),
        "assert_grads_close": lambda: jgc.assert_grads_close(cost, p),
        "check_rules": lambda: jgc.check_rules(lambda q: jax.nn.softplus(q["x"]) @ C, p),
        "check_grads (order 2)": lambda: jgc.check_grads(vector_fn, (x,), 2),
        "check_jacobian": lambda: jgc.check_jacobian(vector_fn, x),
        "check_jvp": lambda: jgc.check_jvp(vector_fn, x),
        "check_vjp": lambda: jgc.check_vjp(vector_fn, x),
        "check_hvp": lambda: jgc.check_hvp(cost, p),
        "check_taylor": lambda: jgc.check_taylor(cost, p),
        "with_grad_check": lambda: jgc.with_grad_check(step, cost)(p, 0.1),
        "the CLI, in process": cli_check,
    }


def _jgc_threads() -> list[str]:
    deadline = time.monotonic() + 60  # background compilations finish on their own
    while True:
        names = sorted(t.name for t in threading.enumerate() if t.name.startswith("jgc"))
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.05)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for the CLI's module:function
    env = dict(os.environ)
    fresh = _battery()
    result = {"fresh": fresh, "entries": {}}
    for name, entry in _entries().items():
        try:
            entry()
            raised = None
        except Exception as e:  # noqa: BLE001 - recorded; the test fails on it
            raised = f"{type(e).__name__}: {str(e)[:300]}"
        after = _battery()
        result["entries"][name] = {
            "raised": raised,
            "differs": {k: [fresh[k], after[k]] for k in fresh if after.get(k) != fresh[k]},
            "threads": _jgc_threads(),
            "environment": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
