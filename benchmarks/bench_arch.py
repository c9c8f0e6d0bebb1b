"""Question: how fast is a full gradient check off the one-hidden-layer MLP, cold and warm?

Five models, each at ~1e4 and ~1e5 parameters, in float64 and in native float32:

* transformer: one pre-norm block (layer norm, 4-head self-attention, layer norm, GELU
  MLP of width 4d, residuals), tokens mean-pooled into a linear head; batch 4 × 16 tokens;
* cnn: 3×3 conv → tanh → 2×2 average pool → 3×3 conv → tanh → pool → dense; 8 images 16×16×3;
* rnn: a tanh RNN under ``lax.scan`` (16 steps, batch 8, 16 inputs), linear head on the
  last state;
* deep_mlp: tanh MLP with 4 hidden layers (32 inputs, batch 64);
* mlp: the speed benchmark's tanh MLP (one hidden layer, benchmarks/bench_speed.py).

Methods, each in its own fresh process (peak RSS is its own):

* jgc cold: ``jgc.check`` in full mode after clearing JAX's and jgc's caches (compile
  included, as a fresh process pays it); "compile" is the wall time in which lowering
  or XLA compilation ran on any thread (jax.monitoring), with the number of programs
  XLA compiled;
* jgc warm: the same check again in the same process (what a test suite's second call
  costs: jgc reuses the programs it compiled);
* the course's loop: one jitted J(θ) over the raveled parameters, a Python loop over
  coordinates, θ ± 1e-4 in NumPy; timed for a budget on random coordinates, then
  scaled to n ("extrap." gives how many were timed);
* torch's ``gradcheck`` (slow mode, float64) on the same model written in torch, on a
  random subset of coordinates within a budget, scaled to n (torch is optional);
* the black-box floor: 2n forward passes at this machine's peak, i.e. 2n × (FLOPs of
  one evaluation from XLA's cost analysis of the jitted cost) ÷ the matmul peak
  measured in this run.

"µs/eval" compares one evaluation of the warm check (its time ÷ its evaluations) with
one evaluation of the loop. Targets (checked in the table): cold ahead of the loop by
1.5× at ~1e4 and 3× at ~1e5; warm at most 1.5× the floor at ~1e5; a batched evaluation
no dearer than the loop's single one.

Run:  python benchmarks/bench_arch.py --sizes small   (~1e4 only; ~10 min on 2 cores)
      python benchmarks/bench_arch.py                 (both sizes; the ~1e5 loops and
                                                       checks take several minutes each)
Writes benchmarks/results/arch.md (sizes not run keep their rows from arch.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

# Model sizes: (hyper-parameters) per model and size; n is printed in the table.
SIZES = {
    "small": {"transformer": 28, "cnn": (16, 32), "rnn": 88, "deep_mlp": 50, "mlp": 95},
    "large": {"transformer": 88, "cnn": (48, 160), "rnn": 300, "deep_mlp": 176, "mlp": 311},
}
MODELS = ["transformer", "cnn", "rnn", "deep_mlp", "mlp"]
EPS = 1e-4  # the lecture's EPSILON, for the loop
# Seconds of timed coordinates for the loop and torch before scaling to n.
BUDGET = {"small": 8.0, "large": 20.0}


# ----------------------------------------------------------------------------- models
def make(model: str, size, dtype):
    """(params, x, y) as NumPy arrays of ``dtype`` (identical for JAX and torch)."""
    import numpy as np

    r = np.random.default_rng(0)

    def nrm(*shape, scale=None):
        return r.normal(size=shape) / math.sqrt(scale or shape[0])

    if model == "transformer":
        d = size
        p = {"ln1_g": np.ones(d), "ln1_b": np.zeros(d), "Wq": nrm(d, d), "Wk": nrm(d, d), "Wv": nrm(d, d),
             "Wo": nrm(d, d), "bo": np.zeros(d), "ln2_g": np.ones(d), "ln2_b": np.zeros(d),
             "W1": nrm(d, 4 * d), "b1": np.full(4 * d, 0.1), "W2": nrm(4 * d, d), "b2": np.zeros(d),
             "Wh": nrm(d, 10), "bh": np.zeros(10)}
        x, y = r.normal(size=(4, 16, d)), r.normal(size=(4, 10))
    elif model == "cnn":
        c1, c2 = size
        p = {"K1": nrm(3, 3, 3, c1, scale=27), "c1": np.zeros(c1), "K2": nrm(3, 3, c1, c2, scale=9 * c1),
             "c2": np.zeros(c2), "Wd": nrm(16 * c2, 10), "bd": np.zeros(10)}
        x, y = r.normal(size=(8, 16, 16, 3)), r.normal(size=(8, 10))
    elif model == "rnn":
        h = size
        p = {"Wx": nrm(16, h), "Wh": nrm(h, h), "b": np.zeros(h), "Wo": nrm(h, 10), "bo": np.zeros(10)}
        x, y = r.normal(size=(16, 8, 16)), r.normal(size=(8, 10))
    elif model == "deep_mlp":
        w = size
        p = {"W1": nrm(32, w), "b1": np.full(w, 0.1)}
        for k in (2, 3, 4):
            p[f"W{k}"], p[f"b{k}"] = nrm(w, w), np.full(w, 0.1)
        p["Wo"], p["bo"] = nrm(w, 10), np.zeros(10)
        x, y = r.normal(size=(64, 32)), r.normal(size=(64, 10))
    elif model == "mlp":
        w = size
        p = {"W1": nrm(w, w), "b1": np.full(w, 0.1), "W2": nrm(w, 10), "b2": np.zeros(10)}
        x, y = r.normal(size=(64, w)), r.normal(size=(64, 10))
    else:
        raise ValueError(model)
    cast = lambda a: np.asarray(a, dtype)
    return {k: cast(v) for k, v in p.items()}, cast(x), cast(y)


def jax_loss(model: str, unroll: bool = False):
    import jax
    import jax.numpy as jnp

    def ln(h, g, b):
        mu = jnp.mean(h, -1, keepdims=True)
        var = jnp.mean((h - mu) ** 2, -1, keepdims=True)
        return (h - mu) / jnp.sqrt(var + 1e-5) * g + b

    def transformer(p, x, y):
        B, T, d = x.shape
        heads = 4
        a = ln(x, p["ln1_g"], p["ln1_b"])
        q, k, v = ((a @ p[w]).reshape(B, T, heads, d // heads) for w in ("Wq", "Wk", "Wv"))
        s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d // heads)
        att = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, -1), v).reshape(B, T, d)
        h = x + att @ p["Wo"] + p["bo"]
        m = ln(h, p["ln2_g"], p["ln2_b"])
        h = h + jax.nn.gelu(m @ p["W1"] + p["b1"], approximate=True) @ p["W2"] + p["b2"]
        o = jnp.mean(h, 1) @ p["Wh"] + p["bh"]
        return jnp.mean((o - y) ** 2)

    def pool(h):
        B, H, W, C = h.shape
        return h.reshape(B, H // 2, 2, W // 2, 2, C).mean((2, 4))

    def cnn(p, x, y):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.lax.conv_general_dilated(x, p["K1"], (1, 1), "SAME", dimension_numbers=dn)
        h = pool(jnp.tanh(h + p["c1"]))
        h = jax.lax.conv_general_dilated(h, p["K2"], (1, 1), "SAME", dimension_numbers=dn)
        h = pool(jnp.tanh(h + p["c2"]))
        o = h.reshape(h.shape[0], -1) @ p["Wd"] + p["bd"]
        return jnp.mean((o - y) ** 2)

    def rnn(p, x, y):
        def step(h, xt):
            return jnp.tanh(xt @ p["Wx"] + h @ p["Wh"] + p["b"]), None

        h, _ = jax.lax.scan(step, jnp.zeros((x.shape[1], p["Wh"].shape[0]), x.dtype), x, unroll=unroll)
        return jnp.mean((h @ p["Wo"] + p["bo"] - y) ** 2)

    def deep_mlp(p, x, y):
        h = x
        for k in (1, 2, 3, 4):
            h = jnp.tanh(h @ p[f"W{k}"] + p[f"b{k}"])
        return jnp.mean((h @ p["Wo"] + p["bo"] - y) ** 2)

    def mlp(p, x, y):
        h = jnp.tanh(x @ p["W1"] + p["b1"])
        return jnp.mean((h @ p["W2"] + p["b2"] - y) ** 2)

    return {"transformer": transformer, "cnn": cnn, "rnn": rnn, "deep_mlp": deep_mlp, "mlp": mlp}[model]


def torch_loss(model: str):
    import torch
    import torch.nn.functional as F

    def transformer(p, x, y):
        B, T, d = x.shape
        heads = 4
        a = F.layer_norm(x, (d,), p["ln1_g"], p["ln1_b"], 1e-5)
        q, k, v = ((a @ p[w]).reshape(B, T, heads, d // heads) for w in ("Wq", "Wk", "Wv"))
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d // heads)
        att = torch.einsum("bhts,bshd->bthd", torch.softmax(s, -1), v).reshape(B, T, d)
        h = x + att @ p["Wo"] + p["bo"]
        m = F.layer_norm(h, (d,), p["ln2_g"], p["ln2_b"], 1e-5)
        h = h + F.gelu(m @ p["W1"] + p["b1"], approximate="tanh") @ p["W2"] + p["b2"]
        o = h.mean(1) @ p["Wh"] + p["bh"]
        return torch.mean((o - y) ** 2)

    def cnn(p, x, y):
        xc = x.permute(0, 3, 1, 2)
        h = F.conv2d(xc, p["K1"].permute(3, 2, 0, 1), padding=1)
        h = F.avg_pool2d(torch.tanh(h + p["c1"][:, None, None]), 2)
        h = F.conv2d(h, p["K2"].permute(3, 2, 0, 1), padding=1)
        h = F.avg_pool2d(torch.tanh(h + p["c2"][:, None, None]), 2)
        o = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1) @ p["Wd"] + p["bd"]
        return torch.mean((o - y) ** 2)

    def rnn(p, x, y):
        h = torch.zeros(x.shape[1], p["Wh"].shape[0], dtype=x.dtype)
        for t in range(x.shape[0]):
            h = torch.tanh(x[t] @ p["Wx"] + h @ p["Wh"] + p["b"])
        return torch.mean((h @ p["Wo"] + p["bo"] - y) ** 2)

    def deep_mlp(p, x, y):
        h = x
        for k in (1, 2, 3, 4):
            h = torch.tanh(h @ p[f"W{k}"] + p[f"b{k}"])
        return torch.mean((h @ p["Wo"] + p["bo"] - y) ** 2)

    def mlp(p, x, y):
        h = torch.tanh(x @ p["W1"] + p["b1"])
        return torch.mean((h @ p["W2"] + p["b2"] - y) ** 2)

    return {"transformer": transformer, "cnn": cnn, "rnn": rnn, "deep_mlp": deep_mlp, "mlp": mlp}[model]


# ----------------------------------------------------------------------------- worker
def _budgeted(run_one, n: int, budget: float, seed: int = 1):
    """Run ``run_one(i)`` on random coordinates until ``budget`` s; return (s per coordinate, count)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    t0 = time.perf_counter()
    done = 0
    for i in order:
        run_one(i)
        done += 1
        if time.perf_counter() - t0 > budget:
            break
    return (time.perf_counter() - t0) / done, done


def worker(method: str, model: str, size_name: str, dtype: str) -> dict:
    import numpy as np

    size = SIZES[size_name][model]
    npdt = np.float64 if dtype == "float64" else np.float32
    p, x, y = make(model, size, npdt)
    n = sum(v.size for v in p.values())
    out = {"method": method, "model": model, "size": size_name, "dtype": dtype, "n": n}
    budget = BUDGET[size_name]
    if method in ("jgc", "loop", "flops"):
        import jax

        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        loss = jax_loss(model)
    if method == "jgc":
        import bench_speed

        import jgc
        from jgc._src import compiling

        clock = bench_speed._CompileClock()
        compiled = []
        jax.monitoring.register_event_duration_secs_listener(
            lambda ev, d, **k: compiled.append(d) if ev == "/jax/core/compile/backend_compile_duration" else None)
        kw = {"precision": "native"} if dtype == "float32" else {}
        jax.clear_caches()
        compiling.clear_cache()
        for label in ("cold", "warm"):
            compiled.clear()
            c0 = t = time.perf_counter()
            rep = jgc.check(loss, p, x, y, **kw)
            out[label] = time.perf_counter() - t
            out[label + "_compile"] = clock.busy(c0)
            out[label + "_programs"] = len(compiled)
            out[label + "_program_s"] = sum(compiled)
        out["evaluations"] = rep.evaluations
        out["ok"] = bool(rep.ok)
        out["statuses"] = {k: v for k, v in rep.counts().items() if v}
    elif method == "loop":
        from jax.flatten_util import ravel_pytree

        flat0, unravel = ravel_pytree({k: jax.numpy.asarray(v) for k, v in p.items()})
        cost = jax.jit(lambda f: loss(unravel(f), x, y))
        theta = np.asarray(flat0).copy()
        t = time.perf_counter()
        float(cost(theta))  # compiles (counted, as a user pays it)
        comp = time.perf_counter() - t

        def one(i):
            tp, tm = theta.copy(), theta.copy()
            tp[i] += EPS
            tm[i] -= EPS
            return (float(cost(tp)) - float(cost(tm))) / (2 * EPS)

        per, done = _budgeted(one, n, budget)
        out.update(total=comp + per * n, compile=comp, per_eval=per / 2, timed=done, evaluations=2 * n)
    elif method == "flops":
        # XLA's cost analysis counts a loop body once: the scan is unrolled here so that
        # every step is counted.
        ca = jax.jit(jax_loss(model, unroll=True)).lower(p, x, y).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out["flops"] = float(ca.get("flops", float("nan")))
    elif method == "torch":
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))
        f = torch_loss(model)
        flat0 = torch.tensor(np.concatenate([v.ravel() for v in p.values()]), dtype=torch.float64)
        sizes, shapes = [v.size for v in p.values()], [v.shape for v in p.values()]
        xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)

        def timed(k):
            idx = torch.tensor(np.sort(np.random.default_rng(1).choice(n, k, replace=False)))

            def fn(part):
                full = flat0.index_put((idx,), part)
                d = {name: t.reshape(s) for name, t, s in zip(p, torch.split(full, sizes), shapes)}
                return f(d, xt, yt)

            part = flat0[idx].clone().requires_grad_(True)
            t = time.perf_counter()
            ok = torch.autograd.gradcheck(fn, (part,), raise_exception=False)
            return time.perf_counter() - t, ok

        pilot, _ = timed(min(n, 16))
        k = int(min(n, max(16, 16 * budget / max(pilot, 1e-9))))
        secs, ok = timed(k)
        out.update(total=secs * n / k, timed=k, ok=bool(ok), threads=torch.get_num_threads(), evaluations=2 * n)
    else:
        raise ValueError(method)
    return out


def worker_main(argv):
    import bench_speed

    res = worker(*argv)
    res["peak_rss_mb"] = bench_speed.peak_rss_mb()
    print(json.dumps(res))


def run_worker(args, timeout, nice=False):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JGC_PROGRESS="0")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = (["nice", "-n", "19"] if nice else []) + [sys.executable, os.path.abspath(__file__), "--worker", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"method": args[0], "error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"method": args[0], "error": (stderr or stdout)[-600:]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- main
def fmt(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if x < 100 else f"{x:.0f}"


def table(rows) -> list[str]:
    L = [("| model | n | dtype | jgc cold s | compile s (programs) | jgc warm s (programs) | loop s | "
          "torch s | floor s | loop ÷ cold | warm ÷ floor | µs/eval warm · loop | evals | peak MB jgc · loop | "
          "ok | targets |"),
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["model"], r["size"], r["dtype"]), {})[r["method"]] = r
    for size in ("small", "large"):
        for model in MODELS:
            for dtype in ("float64", "float32"):
                g = keyed.get((model, size, dtype))
                if not g or "jgc" not in g:
                    continue
                j, lp, tc, fl = g.get("jgc", {}), g.get("loop", {}), g.get("torch", {}), g.get("flops", {})
                if "error" in j:
                    L.append(f"| {model} | | {dtype} | error: {j['error'].splitlines()[-1][:90]} |" + " |" * 12)
                    continue
                n = j["n"]
                floor = fl.get("floor", float("nan"))
                loop_total = lp.get("total", float("nan"))
                ahead = loop_total / j["cold"]
                wf = j["warm"] / floor
                us_j = 1e6 * j["warm"] / j["evaluations"]
                us_l = 1e6 * lp.get("per_eval", float("nan"))
                need = 1.5 if size == "small" else 3.0
                marks = [f"cold {'✓' if ahead >= need else '✗'}", f"row {'✓' if us_j <= us_l else '✗'}"]
                if size == "large":
                    marks.insert(1, f"floor {'✓' if wf <= 1.5 else '✗'}")
                extrap = lp.get("timed")
                loop_s = fmt(loop_total) + (f" ({extrap} timed)" if extrap and extrap < n else "")
                t_s = fmt(tc.get("total")) + (f" ({tc['timed']} timed)" if tc.get("timed", n) < n else "") \
                    if tc and "error" not in tc else "-"
                L.append(
                    f"| {model} | {n} | {dtype} | {fmt(j['cold'])} | {fmt(j['cold_compile'])} ({j['cold_programs']}) | "
                    f"{fmt(j['warm'])} ({j['warm_programs']}) | {loop_s} | {t_s} | {fmt(floor)} | "
                    f"{ahead:.2f}× | {wf:.2f} | {fmt(us_j)} · {fmt(us_l)} | {j['evaluations']} | "
                    f"{j['peak_rss_mb']:.0f} · {lp.get('peak_rss_mb', float('nan')):.0f} | "
                    f"{'yes' if j['ok'] else 'NO'} | {', '.join(marks)} |")
    return L


def main():
    import bench_speed

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", choices=["small", "large", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="the same as --sizes small")
    ap.add_argument("--models", nargs="*", choices=MODELS, default=MODELS)
    ap.add_argument("--dtypes", nargs="*", choices=["float64", "float32"], default=["float64", "float32"])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--nice", action="store_true", help="run the measured processes at nice 19")
    args = ap.parse_args()
    if args.quick:
        args.sizes = "small"
    sizes = ["small", "large"] if args.sizes == "all" else [args.sizes]
    try:
        import torch  # noqa: F401

        have_torch = not args.no_torch
    except ImportError:
        have_torch = False
        print("torch is not installed: skipping gradcheck (pip install torch==2.13.0)", file=sys.stderr)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    store = os.path.join(HERE, "results", "arch.json")
    old = {"rows": []}
    if os.path.exists(store):
        with open(store) as f:
            old = json.load(f)
    # Rows of the (size, model, dtype) combinations run now are replaced; the rest are kept.
    rows = [r for r in old["rows"] if not (r.get("size") in sizes and r.get("model") in args.models
                                           and r.get("dtype") in args.dtypes)]
    partial = args.models != MODELS or len(args.dtypes) < 2
    t_start = time.time()
    facts = bench_speed.machine_facts()
    peak = bench_speed.matmul_peak()
    print(f"matmul peak: float64 {peak['float64'] / 1e9:.1f}, float32 {peak['float32'] / 1e9:.1f} GFLOP/s", flush=True)
    cmd = "python benchmarks/bench_arch.py" + (f" --sizes {args.sizes}" if args.sizes != "all" else "") + (
        " --nice" if args.nice else "") + (f" --models {' '.join(args.models)}" if args.models != MODELS else "") + (
        f" --dtypes {' '.join(args.dtypes)}" if len(args.dtypes) < 2 else "") + (" --no-torch" if args.no_torch else "")
    runs = dict(old.get("runs", {}))
    before = dict(runs)

    def save(done):
        # Written after every model, so a long run that is stopped keeps what it measured.
        for s in sizes:
            text = (f"`{cmd}` ({time.time() - t_start:.0f} s{'' if done else ', stopped early'}; load "
                    f"average {os.getloadavg()[0]:.1f}; matmul peak float64 {peak['float64'] / 1e9:.1f}, "
                    f"float32 {peak['float32'] / 1e9:.1f} GFLOP/s)")
            # A run of some models or dtypes only: its rows replace theirs, the rest stay.
            runs[s] = f"{before[s]}; then {text}" if partial and s in before else text
        with open(store, "w") as f:
            json.dump({"rows": rows, "runs": runs, "facts": facts}, f, indent=1)
        write_markdown(os.path.join(HERE, "results", "arch.md"), rows, runs, facts)

    for size in sizes:
        for dtype in args.dtypes:
            for model in args.models:
                methods = ["flops", "jgc", "loop"] + (["torch"] if have_torch and dtype == "float64" else [])
                for m in methods:
                    res = run_worker([m, model, size, dtype], 3600, nice=args.nice)
                    res.update(model=model, size=size, dtype=dtype, method=m)
                    if m == "flops" and "flops" in res:
                        res["floor"] = 2 * res["n"] * res["flops"] / peak[dtype]
                    rows.append(res)
                    print(json.dumps(res), flush=True)
                save(done=False)
    save(done=True)
    print("wrote benchmarks/results/arch.md")


def write_markdown(path, rows, runs, facts):
    L = ["# Architectures: full checks cold and warm, against the loop, torch and the floor\n",
         "Generated by benchmarks/bench_arch.py; read its header for the method. Runs:\n"]
    L += [f"- {size}: {text}" for size, text in sorted(runs.items(), reverse=True)]
    L.append(f"\nMachine: {facts['cpu']}, {facts['cores']} cores; Python {facts['python']}, jax {facts['jax']}, "
             f"torch {facts['torch']} (1 thread). The CPU was shared with other work: timings are only "
             "comparable within a run.\n")
    L.append("Seconds; 'jgc cold' includes compilation (JAX's and jgc's caches cleared), 'compile' is the wall "
             "time in which lowering or XLA compilation ran (programs: how many XLA compiled); 'jgc warm' is "
             "a second check in the same process. Loop and torch times are scaled to n from the coordinates "
             "timed in a budget. Floor = 2n × FLOPs of one evaluation (XLA cost analysis) ÷ matmul peak. "
             "Targets: cold ≥ 1.5× ahead of the loop at ~1e4 and 3× at ~1e5; warm ≤ 1.5× the floor at ~1e5; "
             "µs per evaluation of the warm check ≤ the loop's.\n")
    L += table(rows)
    if not any(r.get("size") == "large" for r in rows):
        L.append("\nThe ~1e5 size is not in this file yet: on a shared 2-core machine its checks and loops take "
                 "tens of minutes (`python benchmarks/bench_arch.py --sizes large`).")
    if any(r.get("method") == "loop" and r.get("timed", 0) < r.get("n", 0) for r in rows):
        L.append("\nA loop or torch time with '(k timed)' was measured on k random coordinates and scaled to n.")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    else:
        main()
