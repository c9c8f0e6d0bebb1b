"""Does a training step cost the same after ``jgc.with_grad_check`` has run its check?

Question: the optax helper checks the gradient at step 0 (and optionally after a
burn-in) and must then get out of the way. We time, in the same process, a plain
jitted optax step and the same step called through the ``with_grad_check`` wrapper
after its check has run, and report median(checked) / median(plain). The target is
≤ 1.02.

Method: three loops train their own copy of the parameters with the same jitted
step function (so all run the same compiled executable, as the helper promises): the
plain step, the plain step again (an A/A control whose ratio shows the noise floor of
the measurement) and the wrapper after its check. Each round runs one step of each
loop in a fresh random order, so that load from other processes hits all alike;
every step is synchronised with ``block_until_ready``. Compile time and the one-off
check are timed apart and reported, not mixed into step times. The verdict uses the
median, over 10 blocks of consecutive rounds, of median(checked) / median(plain) in
the block (drift in the machine's load moves it least); the ratio of medians over
all rounds and the median of per-round ratios are reported beside it. Cases: a small
and a medium MLP; the wrapper's own per-call cost around a do-nothing step is
reported too.

Run:  python benchmarks/bench_optax.py            (writes benchmarks/results/optax.md)
      python benchmarks/bench_optax.py --quick    (fewer steps, for a smoke test)
Exit code 1 when a verdict ratio is above the target.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jgc  # noqa: E402

TARGET = 1.02
ROUNDS = 10  # blocks of consecutive rounds
RESULTS = Path(__file__).resolve().parent / "results" / "optax.md"


def make_problem(hidden: int, batch: int, depth: int = 2, seed: int = 0):
    key = jax.random.key(seed)
    sizes = [16] + [hidden] * depth + [4]
    params = []
    for m, n in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        params.append({"w": jax.random.normal(sub, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)})
    key, kx, ky = jax.random.split(key, 3)
    x = jax.random.normal(kx, (batch, sizes[0]))
    y = jax.random.randint(ky, (batch,), 0, sizes[-1])

    def loss(params, x, y):
        h = x
        for layer in params[:-1]:
            h = jax.nn.gelu(h @ layer["w"] + layer["b"])
        logits = h @ params[-1]["w"] + params[-1]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    opt = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return params, opt.init(params), x, y, loss, step


def verdict_ratio(r: dict) -> float:
    """The ratio judged against the target: the median over blocks of the ratio of
    medians (the plain ratio of medians over all pairs is reported beside it)."""
    return r["block_ratio"]


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - t0, out


def run_case(name: str, hidden: int, batch: int, pairs: int, check_mode: str, seed: int = 0) -> dict:
    params, opt_state, x, y, loss, step = make_problem(hidden, batch)
    n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
    # Compile the plain step once (both loops share it: the helper calls this very function).
    t_compile, _ = timed(step, params, opt_state, x, y)
    options = {"samples": 16} if check_mode == "sampled" else {}
    checked = jgc.with_grad_check(step, loss, at_steps=(0,), mode=check_mode, **options)
    t_first, (cp, cs, _) = timed(checked, params, opt_state, x, y)  # runs the check once
    report = checked.reports[0][1]
    assert checked.done and report.ok, report
    # Three loops, each training its own copy of the parameters: the plain step, the
    # plain step again (an A/A control: how far apart two identical loops land, i.e.
    # the noise floor of the ratio) and the wrapper after its check.
    fns = {"plain": step, "control": step, "checked": checked}
    state = {"plain": (params, opt_state), "control": (params, opt_state), "checked": (cp, cs)}
    for _ in range(50):  # warm-up: caches, allocator, CPU frequency
        for k, f in fns.items():
            state[k] = f(*state[k], x, y)[:2]
    jax.block_until_ready(state)
    times = {k: np.empty(pairs) for k in fns}
    order = np.random.default_rng(seed)
    for i in range(pairs):
        # A fresh random order every round, so that no loop always runs first or
        # right after another: load from other processes and cache state hit all alike.
        for k in order.permutation(list(fns)):
            times[k][i], out = timed(fns[k], *state[k], x, y)
            state[k] = out[:2]
    plain_t, checked_t, control_t = times["plain"], times["checked"], times["control"]

    def ratios(t):
        # Load drifts over a run; the ratio of medians per block of consecutive rounds,
        # then the median over blocks, is the estimate it moves least.
        blocks = [float(np.median(c) / np.median(p))
                  for c, p in zip(np.array_split(t, ROUNDS), np.array_split(plain_t, ROUNDS))]
        return float(np.median(t) / np.median(plain_t)), float(np.median(blocks)), blocks

    ratio, block_ratio, blocks = ratios(checked_t)
    _, control_ratio, control_blocks = ratios(control_t)
    return {
        "name": name, "hidden": hidden, "batch": batch, "params": int(n_params), "pairs": pairs,
        "plain_us": float(np.median(plain_t) * 1e6), "checked_us": float(np.median(checked_t) * 1e6),
        "plain_p90_us": float(np.percentile(plain_t, 90) * 1e6),
        "checked_p90_us": float(np.percentile(checked_t, 90) * 1e6),
        "ratio": ratio, "pair_ratio": float(np.median(checked_t / plain_t)),
        "block_ratio": block_ratio, "blocks": blocks,
        "control_ratio": control_ratio, "control_spread": float(np.max(np.abs(np.array(control_blocks) - 1))),
        "compile_s": t_compile, "check_s": t_first, "check_evals": report.evaluations,
        "check_mode": check_mode,
    }


def wrapper_overhead_ns(calls: int = 200_000) -> float:
    """Extra time per call of the wrapper after its checks, around a do-nothing step (ns).

    After its last check the wrapper's class ``__call__`` is the step itself, so what
    is left is CPython's call through the instance's type; timing it around a step
    that does nothing isolates it from the step's own run-to-run noise.
    """

    def noop(params, opt_state, x, y):
        return params

    checked = jgc.with_grad_check(noop, lambda p, x, y: jnp.sum(p * x * y), at_steps=())
    args = (1.0, None, 2.0, 3.0)
    best = []
    for f in (noop, checked, noop, checked, noop, checked):
        t0 = time.perf_counter()
        for _ in range(calls):
            f(*args)
        best.append((time.perf_counter() - t0) / calls)
    return (min(best[1::2]) - min(best[0::2])) * 1e9


def machine() -> str:
    dev = jax.devices()[0]
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"jax {jax.__version__}, device {dev.platform}:{dev.device_kind}, load average "
            f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")


def write_results(rows: list, command: str, path: Path, overhead_ns: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# optax helper overhead: a step after `jgc.with_grad_check` vs a plain step",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "Median wall time of one synchronised Adam step (three loops interleaved in a random "
        "order each round: plain, plain again as an A/A control, and after the check); "
        f"target ratio ≤ {TARGET}, judged on the median over {ROUNDS} blocks of consecutive rounds "
        "of the ratio of medians. The control's ratio is computed the same way: its distance "
        "from 1 is the noise floor of this measurement. The check runs once, at step 0, "
        "and is timed apart.",
        "",
        "| case | params | batch | rounds | plain µs (p90) | after check µs (p90) | ratio of medians "
        f"| median round ratio | median of {ROUNDS} block ratios | A/A control (largest block "
        "deviation) | one-off check s (evals) | compile s | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "ok" if verdict_ratio(r) <= TARGET else "OVER"
        lines.append(
            f"| {r['name']} (hidden {r['hidden']}) | {r['params']} | {r['batch']} | {r['pairs']} | "
            f"{r['plain_us']:.1f} ({r['plain_p90_us']:.1f}) | {r['checked_us']:.1f} "
            f"({r['checked_p90_us']:.1f}) | {r['ratio']:.4f} | {r['pair_ratio']:.4f} | "
            f"{r['block_ratio']:.4f} | {r['control_ratio']:.4f} (±{r['control_spread']:.3f}) | "
            f"{r['check_s']:.2f} ({r['check_evals']}, mode {r['check_mode']}) | "
            f"{r['compile_s']:.2f} | {verdict} |"
        )
    lines += [
        "",
        "What the wrapper itself adds per call after its checks, timed around a do-nothing "
        f"step: {overhead_ns:.0f} ns. After the last check its class's `__call__` is the "
        "user's own jitted step (same compiled executable, no host callback, no Python frame "
        "of jgc's).",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3000,
                        help="timed rounds (plain, control, checked) per case")
    parser.add_argument("--quick", action="store_true", help="200 pairs, small case only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    ns = parser.parse_args(argv)
    # The medium model's one-off check is sampled: its cost is reported, not measured here.
    cases = [("small", 32, 32, "full"), ("medium", 256, 256, "sampled")]
    pairs = ns.pairs
    if ns.quick:
        cases, pairs = cases[:1], 200
    print(machine())
    overhead = wrapper_overhead_ns()
    print(f"wrapper overhead per call: {overhead:.0f} ns")
    rows = []
    for name, hidden, batch, mode in cases:
        r = run_case(name, hidden, batch, pairs, mode)
        rows.append(r)
        print(f"{name:>6}: plain {r['plain_us']:.1f} µs, after check {r['checked_us']:.1f} µs, "
              f"ratio {r['ratio']:.4f} (round median {r['pair_ratio']:.4f}, block median "
              f"{r['block_ratio']:.4f}, blocks {', '.join(f'{b:.3f}' for b in r['blocks'])}; A/A "
              f"control {r['control_ratio']:.4f}); one-off check "
              f"{r['check_s']:.2f} s")
    args = sys.argv[1:] if argv is None else list(argv)
    write_results(rows, " ".join(["python benchmarks/bench_optax.py", *args]), ns.out, overhead)
    print(f"wrote {ns.out}")
    return 0 if all(verdict_ratio(r) <= TARGET for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
