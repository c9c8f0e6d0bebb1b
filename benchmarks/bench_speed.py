"""Question: how fast is a full per-coordinate gradient check, against the arithmetic floor and peers?

The same tanh MLP (one hidden layer of width w, 10 outputs, batch 64; n = w² + 11w + 10
parameters ≈ 1e3, 1e4, 1e5) is checked in one run by:

* jgc full mode (``jgc.check``: every coordinate, central differences);
* jgc directional mode, localising one corrupted element of W1 (off by 1%);
* the course's loop: one jitted cost J(θ), a Python loop over coordinates, θ ± ε in NumPy;
* a NumPy loop (the same MLP in NumPy);
* ``torch.autograd.gradcheck`` slow (default) and fast mode, float64;
* ``jax.test_util.check_grads`` (order 1, reverse mode).

Every method runs in its own fresh process (so peak memory is its own and compilation
is paid as a user would pay it), and JAX's caches are cleared before every repeat, so
each repeat compiles what it uses (the loops' jitted J, check_grads' op-by-op
programs) as the first one did. Times are medians over repeats and include
compilation; for jgc the compile part (the wall time during which lowering or XLA
compilation ran on any thread, from ``jax.monitoring``) is also reported apart, and
"warm" is total minus compile. Loops
over coordinates that would take minutes are timed on a random subset of coordinates
and scaled to n (marked "extrapolated" with the subset size).

The floor is 2n × (FLOPs of one cost evaluation: the two matmuls, 2·64·(w² + 10w)) ÷
this machine's matmul peak, measured in the same run (jitted square matmuls, best of
sizes 512–2048). A 1e6-parameter model (W1 1000×1000) with one corrupted element
shows directional mode finding and locating it.

Run:  python benchmarks/bench_speed.py            (full, ~15 min on 2 quiet cores)
      python benchmarks/bench_speed.py --quick    (n ≈ 1e3 and 1e4, a few minutes)
      add --peer-threads 1 on a shared, loaded machine (torch and NumPy thread pools
      spin there), --skip-1e6 to leave out the 1e6 demo.
Writes benchmarks/results/speed.md and speed.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Benchmark the working tree, not a copy installed in site-packages.
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BATCH, N_OUT = 64, 10
WIDTHS = {1_000: 27, 10_000: 95, 100_000: 311}
QUICK_WIDTHS = {1_000: 27, 10_000: 95}
METHODS = ["jgc_full", "jgc_full_dense", "jgc_directional", "loop_jax", "loop_numpy", "torch_slow", "torch_fast", "check_grads"]
LABELS = {
    "jgc_full": "jgc full",
    "jgc_full_native": "jgc full (native f32)",
    "jgc_full_dense": "jgc full, dense vmap (JGC_SPARSE=0)",
    "jgc_directional": "jgc directional+localise",
    "loop_jax": "course loop (jitted J)",
    "loop_numpy": "NumPy loop",
    "torch_slow": "torch gradcheck (slow)",
    "torch_fast": "torch gradcheck (fast)",
    "check_grads": "jax check_grads",
}


def n_params(w: int) -> int:
    return w * w + w + w * N_OUT + N_OUT


def flops_per_eval(w: int) -> float:
    return 2.0 * BATCH * (w * w + w * N_OUT)


# ----------------------------------------------------------------------------- worker
def _model(w, dtype, seed=0):
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    p = {
        "W1": rng.normal(size=(w, w)) / math.sqrt(w),
        "b1": np.full(w, 0.1),
        "W2": rng.normal(size=(w, N_OUT)) / math.sqrt(w),
        "b2": np.zeros(N_OUT),
    }
    x = rng.normal(size=(BATCH, w))
    y = rng.normal(size=(BATCH, N_OUT))
    cast = lambda a: a.astype(dtype)
    return jax.tree_util.tree_map(cast, p), cast(x), cast(y)


def _loss(params, x, y):
    import jax.numpy as jnp

    h = jnp.tanh(x @ params["W1"] + params["b1"])
    out = h @ params["W2"] + params["b2"]
    return jnp.mean((out - y) ** 2)


class _CompileClock:
    """Wall time during which JAX was lowering or XLA compiling, from jax.monitoring.

    jgc compiles on worker threads while its main thread lowers or evaluates, so the
    durations of compile events overlap; summing them would count the same second
    twice. Each event is kept as the interval [end − duration, end], and ``busy(t0)``
    is the length of the union of those intervals after t0: the wall time in which at
    least one program was being lowered or compiled. Tracing is left out (its events
    nest: a jit traced inside another is timed twice) and counts as warm time.
    """

    NAMES = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        import jax

        self.intervals = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event in self.NAMES:
            end = time.perf_counter()
            self.intervals.append((end - duration, end))

    def busy(self, t0: float) -> float:
        total, reach = 0.0, t0
        for a, b in sorted(self.intervals):
            a = max(a, reach)
            if b > a:
                total += b - a
                reach = b
        return total


def _subset(n, cap, seed=1):
    import numpy as np

    if n <= cap:
        return np.arange(n), False
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False)), True


def worker(method: str, w: int, dtype: str, reps: int, cap: int) -> dict:
    import numpy as np

    n = n_params(w)
    out = {"method": method, "n": n, "w": w, "dtype": dtype}
    if method.startswith("jgc") or method in ("loop_jax", "check_grads", "locate_1e6"):
        import jax

        ctx = jax.enable_x64(True) if dtype == "float64" else None
        if ctx:
            ctx.__enter__()
        clock = _CompileClock()
    params, x, y = _model(w, np.float64 if dtype == "float64" else np.float32)
    totals, compiles = [], []

    if method in ("jgc_full", "jgc_full_native", "jgc_full_dense", "jgc_directional"):
        import jax.numpy as jnp

        import jgc
        from jgc._src import compiling, sparse

        # The A/B of the sparse evaluator: same check, every leaf on plain vmap.
        sparse.ENABLED = method != "jgc_full_dense"

        p = {k: jnp.asarray(v) for k, v in params.items()}
        kw = {"precision": "native"} if method == "jgc_full_native" else {}
        grad = None
        if method == "jgc_directional":
            g = jax.grad(_loss)(p, x, y)
            flat = np.abs(np.asarray(g["W1"])).ravel()
            where = np.unravel_index(int(np.argsort(flat)[flat.size // 2]), g["W1"].shape)
            grad = dict(g, W1=g["W1"].at[where].multiply(1.01))
            kw["mode"] = "directional"
        for _ in range(reps):
            jax.clear_caches()  # cold, as in a fresh process (see the header)
            compiling.clear_cache()  # and jgc's own programs
            c0 = time.perf_counter()
            t = time.perf_counter()
            rep = jgc.check(_loss, p, x, y, grad=grad, **kw)
            totals.append(time.perf_counter() - t)
            compiles.append(clock.busy(c0))
        out["evaluations"] = rep.evaluations
        if method == "jgc_directional":
            out["ok"] = rep.leaf("['W1']").elements("mismatch") == [tuple(int(i) for i in where)]
        else:
            out["ok"] = bool(rep.ok)
    elif method == "loop_jax":
        import jax.numpy as jnp
        from jax.flatten_util import ravel_pytree

        flat0, unravel = ravel_pytree({k: jnp.asarray(v) for k, v in params.items()})
        cost = jax.jit(lambda f: _loss(unravel(f), x, y))
        idx, extrap = _subset(n, cap)
        eps = 1e-4  # the lecture's EPSILON
        for _ in range(reps):
            jax.clear_caches()  # cold, as in a fresh process (see the header)
            theta = np.asarray(flat0).copy()
            c0 = time.perf_counter()
            t = time.perf_counter()
            float(cost(theta))  # first call compiles (counted, as a user would pay it)
            comp = time.perf_counter() - t
            approx = np.zeros(idx.size)
            for j, i in enumerate(idx):
                tp = theta.copy()
                tp[i] += eps
                tm = theta.copy()
                tm[i] -= eps
                approx[j] = (float(cost(tp)) - float(cost(tm))) / (2 * eps)
            loop = time.perf_counter() - t - comp
            totals.append(comp + loop * n / idx.size)
            compiles.append(max(comp, clock.busy(c0)))
        out["evaluations"] = 2 * n
        out["extrapolated_from"] = int(idx.size) if extrap else None
        out["ok"] = bool(np.all(np.isfinite(approx)))
    elif method == "loop_numpy":
        flat0 = np.concatenate([v.ravel() for v in params.values()])
        shapes = [(k, v.shape, v.size) for k, v in params.items()]

        def cost(f):
            d, o = {}, 0
            for k, s, m in shapes:
                d[k] = f[o:o + m].reshape(s)
                o += m
            h = np.tanh(x @ d["W1"] + d["b1"])
            return float(np.mean((h @ d["W2"] + d["b2"] - y) ** 2))

        idx, extrap = _subset(n, cap)
        eps = 1e-4
        for _ in range(reps):
            t = time.perf_counter()
            for i in idx:
                tp = flat0.copy()
                tp[i] += eps
                tm = flat0.copy()
                tm[i] -= eps
                (cost(tp) - cost(tm)) / (2 * eps)
            totals.append((time.perf_counter() - t) * n / idx.size)
            compiles.append(0.0)
        out["evaluations"] = 2 * n
        out["extrapolated_from"] = int(idx.size) if extrap else None
        out["ok"] = True
    elif method in ("torch_slow", "torch_fast"):
        import torch

        if os.environ.get("BENCH_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["BENCH_TORCH_THREADS"]))
        out["torch_threads"] = torch.get_num_threads()

        tdt = torch.float64 if dtype == "float64" else torch.float32
        flat0 = torch.tensor(np.concatenate([v.ravel() for v in params.values()]), dtype=tdt)
        xt, yt = torch.tensor(x, dtype=tdt), torch.tensor(y, dtype=tdt)
        sizes = [v.size for v in params.values()]
        shapes = [v.shape for v in params.values()]
        idx, extrap = _subset(n, cap if method == "torch_slow" else n)
        idx_t = torch.tensor(idx)
        rest = flat0.clone()

        def fn(part):
            f = rest.index_put((idx_t,), part)
            d = {k: t.reshape(s) for k, t, s in zip(params, torch.split(f, sizes), shapes)}
            h = torch.tanh(xt @ d["W1"] + d["b1"])
            return torch.mean((h @ d["W2"] + d["b2"] - yt) ** 2)

        part = flat0[idx_t].clone().requires_grad_(True)
        for _ in range(reps):
            t = time.perf_counter()
            ok = torch.autograd.gradcheck(fn, (part,), fast_mode=method == "torch_fast", raise_exception=False)
            totals.append((time.perf_counter() - t) * n / idx.size)
            compiles.append(0.0)
        out["evaluations"] = 2 * n if method == "torch_slow" else 2
        out["extrapolated_from"] = int(idx.size) if extrap else None
        out["ok"] = bool(ok)
    elif method == "check_grads":
        import jax.numpy as jnp
        import jax.test_util

        p = {k: jnp.asarray(v) for k, v in params.items()}
        for _ in range(reps):
            jax.clear_caches()  # cold, as in a fresh process (see the header)
            c0 = time.perf_counter()
            t = time.perf_counter()
            jax.test_util.check_grads(lambda q: _loss(q, x, y), (p,), order=1, modes=("rev",))
            totals.append(time.perf_counter() - t)
            compiles.append(clock.busy(c0))
        out["evaluations"] = 2
        out["ok"] = True
    elif method == "locate_1e6":
        import jax.numpy as jnp
        import jax.test_util

        import jgc

        rng = np.random.default_rng(0)
        wi = wh = 1000
        p = {"W1": jnp.asarray(rng.normal(size=(wi, wh)) / math.sqrt(wi)), "b1": jnp.full(wh, 0.1),
             "W2": jnp.asarray(rng.normal(size=(wh, N_OUT)) / math.sqrt(wh)), "b2": jnp.zeros(N_OUT)}
        x1, y1 = jnp.asarray(rng.normal(size=(BATCH, wi))), jnp.asarray(rng.normal(size=(BATCH, N_OUT)))
        out["n"] = sum(v.size for v in p.values())
        g = jax.grad(_loss)(p, x1, y1)
        flat = np.abs(np.asarray(g["W1"])).ravel()
        where = tuple(int(i) for i in np.unravel_index(int(np.argsort(flat)[flat.size // 2]), (wi, wh)))
        bad = dict(g, W1=g["W1"].at[where].multiply(1.01))

        @jax.custom_vjp
        def wrong(q):
            return _loss(q, x1, y1)

        wrong.defvjp(lambda q: (_loss(q, x1, y1), None),
                     lambda _, ct: (jax.tree_util.tree_map(lambda a: ct * a, bad),))
        try:
            jax.test_util.check_grads(wrong, (p,), order=1, modes=("rev",))
            out["check_grads_caught"] = False
        except AssertionError:
            out["check_grads_caught"] = True
        c0 = time.perf_counter()
        t = time.perf_counter()
        rep = jgc.check(wrong, p, mode="directional")
        totals.append(time.perf_counter() - t)
        compiles.append(clock.busy(c0))
        lf = rep.leaf("['W1']")
        out.update(evaluations=rep.evaluations, where=list(where), found=[list(e) for e in lf.elements("mismatch")],
                   ok=lf.elements("mismatch") == [where], report=str(rep))
    elif method == "noop":
        totals, compiles = [0.0], [0.0]
        out["ok"] = True
    else:
        raise ValueError(method)
    out["total"] = statistics.median(totals)
    out["compile"] = statistics.median(compiles)
    out["warm"] = out["total"] - out["compile"]
    out["reps"] = len(totals)
    return out


def run_worker(args: list[str], timeout: float) -> dict:
    """Run one measurement in a fresh process; return its JSON and its own peak RSS."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JGC_PROGRESS="0")
    if args[0] == "loop_numpy" and os.environ.get("BENCH_TORCH_THREADS"):
        for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
            env[var] = os.environ["BENCH_TORCH_THREADS"]
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        return {"method": args[0], "error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"method": args[0], "error": (stderr or stdout)[-800:]}
    res = json.loads(lines[-1])
    return res


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: reset by exec, unlike ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_main(argv):
    method, w, dtype, reps, cap = argv[0], int(argv[1]), argv[2], int(argv[3]), int(argv[4])
    res = worker(method, w, dtype, reps, cap)
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res))


# ----------------------------------------------------------------------------- main
def matmul_peak() -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    with jax.enable_x64(True):
        for name, dt in (("float64", jnp.float64), ("float32", jnp.float32)):
            best = 0.0
            for s in (512, 1024, 2048):
                a = jnp.asarray(jax.random.normal(jax.random.key(0), (s, s)), dt)
                f = jax.jit(lambda a, b: a @ b)
                f(a, a).block_until_ready()
                ts = []
                for _ in range(5):
                    t = time.perf_counter()
                    f(a, a).block_until_ready()
                    ts.append(time.perf_counter() - t)
                best = max(best, 2 * s**3 / min(ts))
            out[name] = best
    return out


def machine_facts() -> dict:
    import jax

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    facts = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
             "device": str(jax.devices()[0]), "platform": platform.platform()}
    try:
        import torch

        facts["torch"] = torch.__version__
    except ImportError:
        facts["torch"] = "not installed"
    return facts


def fmt_s(x):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes 1e3 and 1e4 only, one repeat, small subsets")
    ap.add_argument("--skip-1e6", action="store_true", help="skip the 1e6-parameter localisation demo")
    ap.add_argument("--peer-threads", type=int, default=None,
                    help="threads for torch (set_num_threads) and the NumPy loop's BLAS (default: their "
                         "own, all cores). On a shared, loaded machine their thread pools were up to 50x "
                         "slower than 1 thread.")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    if args.peer_threads:
        os.environ["BENCH_TORCH_THREADS"] = str(args.peer_threads)
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    cap = 2_000 if args.quick else 10_000  # coordinates timed by the slow loops before scaling to n
    have_torch = True
    try:
        import torch  # noqa: F401
    except ImportError:
        have_torch = False
        print("torch is not installed: skipping gradcheck (pip install torch==2.13.0)", file=sys.stderr)

    t_start = time.time()
    facts = machine_facts()
    peak = matmul_peak()
    print(f"matmul peak: float64 {peak['float64'] / 1e9:.1f} GFLOP/s, float32 {peak['float32'] / 1e9:.1f} GFLOP/s",
          flush=True)
    rows = []
    base = run_worker(["noop", "27", "float64", "1", "1"], 300)
    plan = []
    for target, w in widths.items():
        reps = 1 if args.quick or target >= 100_000 else 3
        for m in METHODS:
            if m.startswith("torch") and not have_torch:
                continue
            plan.append((m, w, "float64", reps))
    for target, w in widths.items():
        reps = 1 if args.quick or target >= 100_000 else 3
        plan += [("jgc_full_native", w, "float32", reps), ("loop_jax", w, "float32", reps)]
        if target < 100_000:  # auto precision evaluates float32 in float64: same work as the f64 row
            plan.append(("jgc_full", w, "float32", reps))
    for m, w, dt, reps in plan:
        res = run_worker([m, str(w), dt, str(reps), str(cap)], 900)
        res.setdefault("n", n_params(w))
        res.setdefault("dtype", dt)
        res["floor"] = 2 * n_params(w) * flops_per_eval(w) / peak[dt]
        rows.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "report"}), flush=True)
    demo = None
    if not args.skip_1e6:
        demo = run_worker(["locate_1e6", "1000", "float64", "1", "1"], 900)
        print(json.dumps({k: v for k, v in demo.items() if k != "report"}), flush=True)
    elapsed = time.time() - t_start
    cmd = "python benchmarks/bench_speed.py" + (" --quick" if args.quick else "") + (
        " --skip-1e6" if args.skip_1e6 else "") + (f" --peer-threads {args.peer_threads}" if args.peer_threads else "")
    os.makedirs(args.out, exist_ok=True)
    write_markdown(os.path.join(args.out, "speed.md"), rows, demo, facts, peak, base, cmd, elapsed, cap)
    plot(os.path.join(args.out, "speed.png"), rows, peak)
    print(f"wrote {args.out}/speed.md and speed.png in {elapsed:.0f}s")


def write_markdown(path, rows, demo, facts, peak, base, cmd, elapsed, cap):
    L = []
    L.append("# Speed: full gradient checks against the floor and peers\n")
    L.append(f"Command: `{cmd}` (total {elapsed:.0f} s). Generated by benchmarks/bench_speed.py; "
             "read its header for the method.\n")
    L.append(f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['platform']}; Python {facts['python']}, "
             f"jax {facts['jax']} on {facts['device']}, torch {facts['torch']} "
             f"({next((r['torch_threads'] for r in rows if 'torch_threads' in r), '-')} threads; NumPy BLAS "
             f"threads {os.environ.get('BENCH_TORCH_THREADS', 'default')}). "
             f"Load average at the end of the run: {os.getloadavg()[0]:.1f} (timings are only "
             "comparable within a run).\n")
    L.append(f"Matmul peak measured in this run: float64 {peak['float64'] / 1e9:.1f} GFLOP/s, "
             f"float32 {peak['float32'] / 1e9:.1f} GFLOP/s. Floor = 2n × 2·{BATCH}·(w² + 10w) FLOPs ÷ peak. "
             f"An idle worker process (Python + NumPy + JAX imported) peaks at "
             f"{base.get('peak_rss_mb', float('nan')):.0f} MB RSS.\n")
    L.append("Times in seconds, medians over repeats, **compile included** in 'total'. 'jgc warm' = total − "
             "compile (wall time in which lowering or XLA compilation ran on any thread, from jax.monitoring; "
             "tracing counts as warm). 'vs jgc' = the method's total ÷ "
             "jgc full's total (>1: jgc is faster). 'extrap.' = timed on that many random coordinates and "
             "scaled to n.\n")
    for dt in ("float64", "float32"):
        sel = [r for r in rows if r.get("dtype") == dt]
        if not sel:
            continue
        L.append(f"\n## {dt}\n")
        L.append("| n | method | total s | compile s | warm s | floor s | warm/floor | vs jgc | evals | peak MB | "
                 "ok | extrap. |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n in sorted({r["n"] for r in sel}):
            ref = next((r for r in sel if r["n"] == n and r["method"] == "jgc_full" and "error" not in r), None)
            for r in [r for r in sel if r["n"] == n]:
                if "error" in r:
                    L.append(f"| {n} | {LABELS.get(r['method'], r['method'])} | error: "
                             f"{r['error'].splitlines()[-1][:80] if r['error'] else ''} |||||||||")
                    continue
                vs = r["total"] / ref["total"] if ref else float("nan")
                wf = r["warm"] / r["floor"] if r["method"].startswith("jgc_full") else float("nan")
                L.append(
                    f"| {n} | {LABELS.get(r['method'], r['method'])} | {fmt_s(r['total'])} | {fmt_s(r['compile'])} | "
                    f"{fmt_s(r['warm'])} | {fmt_s(r['floor'])} | {'' if math.isnan(wf) else f'{wf:.2f}'} | "
                    f"{'' if math.isnan(vs) else f'{vs:.2f}'} | {r.get('evaluations', '')} | "
                    f"{r.get('peak_rss_mb', 0):.0f} | {'yes' if r.get('ok') else 'NO'} | "
                    f"{r.get('extrapolated_from') or ''} |")
    L.append("\nwarm/floor below 1 is not a measurement error. The floor assumes every evaluation is a "
             "full forward pass (what a black-box checker must do). jgc perturbs one leaf at a time "
             "and evaluates each single-entry perturbation sparsely (jgc/_src/sparse.py): moving "
             "W1[i, j] changes one column of x @ W1, so only that column goes through tanh and the "
             "output layer. The 'dense vmap' row is the same check with that evaluator switched off.\n")
    L.append("\n'ok' means: the check passed on the correct gradient (full, loops: finite values), or for "
             "jgc directional that the corrupted element (W1, median |g|, off by 1%) was the one element "
             "reported as a mismatch. torch's slow gradcheck and the loops use the lecture's fixed step "
             "1e-4 (torch: 1e-6); jgc chooses its step per leaf.\n")
    if demo:
        L.append("\n## 1e6 parameters: locate one corrupted element with directional mode\n")
        if "error" in demo:
            L.append(f"error: {demo['error']}\n")
        else:
            L.append(f"Model: tanh MLP 1000 → 1000 → 10, batch {BATCH}, float64, n = {demo['n']}. One element of "
                     f"W1's gradient (at {tuple(demo['where'])}, median |g|) multiplied by 1.01 through a "
                     "custom_vjp rule.\n")
            L.append(f"- jgc directional: found {[tuple(e) for e in demo['found']]} "
                     f"({'correct' if demo['ok'] else 'WRONG'}) with {demo['evaluations']} cost evaluations "
                     f"(set-up included) in {demo['total']:.1f} s ({demo['compile']:.1f} s of it compiling); full "
                     f"mode would need ≈ {2 * demo['n']:,} evaluations.")
            L.append(f"- jax.test_util.check_grads on the same rule: "
                     f"{'caught it' if demo['check_grads_caught'] else 'passed it (missed the bug)'}.\n")
            L.append("```\n" + demo["report"] + "\n```\n")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def plot(path, rows, peak):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, dt in zip(axes, ("float64", "float32")):
        sel = [r for r in rows if r.get("dtype") == dt and "error" not in r]
        for m in sorted({r["method"] for r in sel}, key=lambda m: list(LABELS).index(m)):
            pts = sorted((r["n"], r["total"]) for r in sel if r["method"] == m)
            ax.plot(*zip(*pts), marker="o", label=LABELS[m] + " (total)")
            if m.startswith("jgc_full"):
                pts = sorted((r["n"], r["warm"]) for r in sel if r["method"] == m)
                ax.plot(*zip(*pts), marker=".", linestyle=":", label=LABELS[m] + " (warm)")
        ns = sorted({r["n"] for r in sel})
        if ns:
            fl = sorted((r["n"], r["floor"]) for r in sel if r["method"] in ("jgc_full", "jgc_full_native"))
            if fl:
                ax.plot(*zip(*fl), "k--", label=f"floor ({peak[dt] / 1e9:.0f} GFLOP/s)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters n")
        ax.set_ylabel("seconds (compile included)")
        ax.set_title(f"gradient check of a tanh MLP, {dt}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
    else:
        main()
