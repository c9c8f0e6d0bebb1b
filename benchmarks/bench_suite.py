"""Question: what does a test suite of many small gradient checks cost with jgc, next to
JAX's own checker and the course's loop?

A test suite runs many small checks in one process: a library checks every op, a model
checks every layer. What matters there is the wall time of the whole run, compilation
included, and whether each check's verdict is right. Three parts, each method in a
fresh process of its own, one after another in the same run:

(a) **Harness suite.** The harnesses of ``jax._src.internal_test_util.test_harnesses``
    that ``bench_harnesses.py`` keeps (same selection, same arguments, order=1, modes
    ("fwd", "rev"), under ``jax.numpy_dtype_promotion("strict")``), the first
    ``--harnesses`` of them in its round-robin order over primitives, checked back to
    back with ``jax.test_util.check_grads`` and then, in another process, with
    ``jgc.check_grads``. Unlike bench_harnesses.py, JAX's caches are never cleared
    between harnesses: a test suite shares them.
(b) **Small checks.** 128 distinct small scalar losses (dense layers, a two-layer MLP,
    layer norm, a residual block, softmax attention, a 1-D convolution, a short scan;
    12 activations; 4 losses; 6 to 2,376 parameters, median ~200; float32, x64 off as a user's test
    suite runs), 8 of them with a planted derivative bug (a ``jax.custom_jvp``
    activation whose derivative is 3% off), checked by ``jgc.testing.assert_grads_close``,
    by ``jax.test_util.check_grads(f, (params,), order=1)`` and by the course's loop
    (one jitted J of the raveled parameters, a Python loop over coordinates with
    ε = 1e-4, compared with ``jax.grad``: it passes when
    ‖a − n‖ / (‖a‖ + ‖n‖) < 1e-3, the lecture's "a few decimal places").
(c) **One check at n ≈ 10³, cold.** The tanh MLP of bench_speed.py (n = 1036, float64),
    in a fresh process each time (median of ``--reps``): ``jgc.check`` against the
    course's loop, compilation included, as a user meets it.

For every method: total wall time, the ratio to JAX's checker (to the course loop in
(c)), the XLA compilations and the evaluations per check (jgc: ``report.evaluations``;
JAX's checker and the loop: the calls of f, each one evaluation, since they run op by
op), and the verdicts (pass / fail / error) against what is known to be right.

Run:  python benchmarks/bench_suite.py                  (33-38 min on 2 cores shared at load 7-12)
      python benchmarks/bench_suite.py --harnesses 40 --reps 1   (a quick look)
Writes benchmarks/results/suite.md (and suite.json with every check's record).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
MD = RESULTS / "suite.md"
JSON = RESULTS / "suite.json"

# Harnesses in part (a): the first ones of bench_harnesses.py's round-robin order, which
# visits every primitive group before any group's second harness (~60 groups with x64 on).
DEFAULT_HARNESSES = 200
# Small checks in part (b), and how many of them carry a planted bug.
SMALL_CHECKS = 128
PLANTED = 8
# Fresh processes per method in part (c): the median is reported.
DEFAULT_REPS = 3
# Relative error of the planted bugs: far above float32 finite-difference noise with
# JAX's eps = 1e-4 (~1e-3), so every checker can see it.
BUG = 0.03
# The course loop's pass rule: ‖a − n‖ / (‖a‖ + ‖n‖) below this ("a few decimal places").
LOOP_TOL = 1e-3


# -- counting ----------------------------------------------------------------------------
class Compiles:
    """XLA compilations (``jax.monitoring``'s backend-compile event) in this process."""

    def __init__(self):
        import jax
        from jax._src import dispatch

        self.count, self.seconds = 0, 0.0
        self._event = dispatch.BACKEND_COMPILE_EVENT
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == self._event:
            self.count += 1
            self.seconds += duration


def counted(f):
    """f, counting its calls (JAX's checker and the loop call f once per evaluation)."""
    def g(*a, **k):
        g.calls += 1
        return f(*a, **k)

    g.calls = 0
    g.__qualname__ = getattr(f, "__qualname__", "f")
    return g


def outcome_of(e: BaseException | None, which: str) -> tuple[str, str]:
    if e is None:
        return "pass", ""
    msg = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
    if isinstance(e, AssertionError) and (which != "jgc" or msg.startswith(("jgc.", "[jgc]"))):
        return "fail", msg
    return "error", f"{type(e).__name__}: {msg}"


# -- (a) harnesses ---------------------------------------------------------------------------
def harness_worker(which: str, count: int, x64: bool) -> dict:
    import jax

    jax.config.update("jax_enable_x64", x64)
    import bench_harnesses as bh

    ns = argparse.Namespace(only=None)
    kept, _ = bh.selected(ns, x64)
    cases = []
    for h in kept:
        if len(cases) >= count:
            break
        try:
            g, args = bh.harness_case(h)
        except Exception:  # noqa: BLE001, S112 - bench_harnesses leaves these out too
            continue
        if args and bh.differentiable(g, args)[0]:
            cases.append((h.fullname, g, args))
    if which == "jax":
        from jax.test_util import check_grads
    else:
        import functools

        import jgc

        # "jgc1": one random direction per input (and cotangent per output), as JAX's
        # checker takes, instead of jgc's default of two.
        check_grads = functools.partial(jgc.check_grads, num_directions=1) if which == "jgc1" else jgc.check_grads
    comp = Compiles()
    records = []
    start = time.perf_counter()
    for name, g, args in cases:
        f = counted(g)
        c0, t0 = comp.count, time.perf_counter()
        err, evals = None, None
        try:
            with bh.time_limit(bh.DEFAULT_TIME_LIMIT), jax.numpy_dtype_promotion("strict"):
                rep = check_grads(f, args, 1, modes=("fwd", "rev"))
            evals = f.calls if which == "jax" else rep.evaluations
        except bh.Timeout as e:
            err = e
        except Exception as e:  # noqa: BLE001 - recorded as the check's outcome
            err = e
            report = getattr(e, "report", None)
            evals = report.evaluations if report is not None else (f.calls if which == "jax" else None)
        out, msg = outcome_of(err, "jax" if which == "jax" else "jgc")
        if isinstance(err, bh.Timeout):
            out = "timeout"
        records.append({"name": name, "outcome": out, "msg": msg, "s": round(time.perf_counter() - t0, 4),
                        "compiles": comp.count - c0, "evaluations": evals})
    return {"total": time.perf_counter() - start, "compiles": comp.count, "compile_s": comp.seconds,
            "records": records}


# -- (b) small checks --------------------------------------------------------------------------
def _activations():
    import jax
    import jax.numpy as jnp

    return [("tanh", jnp.tanh), ("sigmoid", jax.nn.sigmoid), ("softplus", jax.nn.softplus),
            ("gelu", jax.nn.gelu), ("elu", jax.nn.elu), ("silu", jax.nn.silu), ("sin", jnp.sin),
            ("arctan", jnp.arctan), ("softsign", jax.nn.soft_sign), ("celu", jax.nn.celu),
            ("selu", jax.nn.selu), ("log_sigmoid", jax.nn.log_sigmoid)]


def _buggy(act):
    """act with a custom_jvp whose derivative is off by BUG (a planted bug)."""
    import jax

    f = jax.custom_jvp(lambda x: act(x))

    @f.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        y, dy = jax.jvp(act, (x,), (t,))
        return y, dy * (1 + BUG)

    return f


def small_cases():
    """[(name, loss, params, x, y, wrong)]: distinct small losses, float32 NumPy data."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    acts = _activations()
    losses = [("mse", lambda o, y: jnp.mean((o - y) ** 2)),
              ("xent", lambda o, y: -jnp.mean(jnp.sum(jax.nn.softmax(y) * jax.nn.log_softmax(o), axis=-1))),
              ("huber", lambda o, y: jnp.mean(jnp.sqrt(1 + (o - y) ** 2) - 1)),
              ("logcosh", lambda o, y: jnp.mean(jnp.log(jnp.cosh(o - y))))]
    widths = [2, 3, 4, 6, 8, 12, 16, 24]
    rng = np.random.default_rng(0)
    f32 = np.float32

    def dense(w, a):
        p = {"W": rng.normal(size=(w, w)) / np.sqrt(w), "b": rng.normal(size=w) * 0.1}
        return p, lambda p, x: a(x @ p["W"] + p["b"])

    def mlp(w, a):
        p = {"W1": rng.normal(size=(w, 2 * w)) / np.sqrt(w), "b1": np.zeros(2 * w),
             "W2": rng.normal(size=(2 * w, w)) / np.sqrt(2 * w), "b2": np.full(w, 0.1)}
        return p, lambda p, x: a(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

    def norm(w, a):
        p = {"g": 1 + 0.1 * rng.normal(size=w), "beta": 0.1 * rng.normal(size=w),
             "W": rng.normal(size=(w, w)) / np.sqrt(w)}

        def f(p, x):
            mu = jnp.mean(x, -1, keepdims=True)
            h = (x - mu) / jnp.sqrt(jnp.var(x, -1, keepdims=True) + 1e-3) * p["g"] + p["beta"]
            return a(h @ p["W"])
        return p, f

    def residual(w, a):
        p = {"W": rng.normal(size=(w, w)) / np.sqrt(w) * 0.5, "b": np.zeros(w)}
        return p, lambda p, x: x + a(x @ p["W"] + p["b"])

    def attention(w, a):
        p = {"Wq": rng.normal(size=(w, w)) / np.sqrt(w), "Wk": rng.normal(size=(w, w)) / np.sqrt(w),
             "Wv": rng.normal(size=(w, w)) / np.sqrt(w)}

        def f(p, x):
            s = (x @ p["Wq"]) @ (x @ p["Wk"]).T / np.sqrt(w)
            return a(jax.nn.softmax(s, axis=-1) @ (x @ p["Wv"]))
        return p, f

    def conv(w, a):
        p = {"k": rng.normal(size=(w, w, 3)) / np.sqrt(3 * w), "b": np.zeros(w)}

        def f(p, x):
            y = jax.lax.conv_general_dilated(x.T[None], p["k"], (1,), "SAME")[0].T
            return a(y + p["b"])
        return p, f

    def scan(w, a):
        p = {"U": rng.normal(size=(w, w)) / np.sqrt(w), "V": rng.normal(size=(w, w)) / np.sqrt(w) * 0.5}

        def f(p, x):
            def step(h, xt):
                h = a(xt @ p["U"] + h @ p["V"])
                return h, h
            return jax.lax.scan(step, jnp.zeros(w, x.dtype), x)[1]
        return p, f

    layers = [("dense", dense), ("mlp", mlp), ("norm", norm), ("residual", residual),
              ("attention", attention), ("conv", conv), ("scan", scan)]
    planted = set(range(0, SMALL_CHECKS, SMALL_CHECKS // PLANTED))
    cases = []
    for i in range(SMALL_CHECKS):
        (an, a), (ln, layer), (lo, loss) = acts[i % 12], layers[i % 7], losses[(i // 7) % 4]
        w = widths[(i // 3) % len(widths)]
        wrong = i in planted
        a = _buggy(a) if wrong else a
        p, model = layer(w, a)
        p = {k: v.astype(f32) for k, v in p.items()}
        x = rng.normal(size=(4, w)).astype(f32)
        y = rng.normal(size=(4, w)).astype(f32)

        def fn(p, x, y, model=model, loss=loss):
            return loss(model(p, x), y)

        fn.__qualname__ = f"{ln}_{an}_{lo}_w{w}" + ("_bug" if wrong else "")
        cases.append((fn.__qualname__, fn, p, x, y, wrong))
    return cases


def small_worker(which: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree

    cases = small_cases()
    comp = Compiles()
    records = []
    start = time.perf_counter()
    for name, fn, p, x, y, wrong in cases:
        c0, t0 = comp.count, time.perf_counter()
        err, evals, extra = None, None, {}
        try:
            if which == "jgc":
                from jgc import testing

                rep = testing.assert_grads_close(fn, p, x, y)
                evals = rep.evaluations
            elif which == "jax":
                from jax.test_util import check_grads

                f = counted(lambda q, fn=fn, x=x, y=y: fn(q, x, y))
                try:
                    check_grads(f, (p,), 1)
                finally:
                    evals = f.calls
            else:  # the course's loop
                flat, unravel = ravel_pytree(p)
                cost = jax.jit(lambda t, fn=fn, u=unravel, x=x, y=y: fn(u(t), x, y))
                dvec = np.asarray(ravel_pytree(jax.grad(fn)(p, x, y))[0], np.float64)
                theta = np.asarray(flat)
                approx = np.zeros(theta.size)
                eps = 1e-4
                for i in range(theta.size):
                    tp, tm = theta.copy(), theta.copy()
                    tp[i] += eps
                    tm[i] -= eps
                    approx[i] = (float(cost(tp)) - float(cost(tm))) / (2 * eps)
                evals = 2 * theta.size
                rel = float(np.linalg.norm(approx - dvec) / max(1e-30, np.linalg.norm(approx) + np.linalg.norm(dvec)))
                extra["relative_difference"] = rel
                if not rel < LOOP_TOL:
                    raise AssertionError(f"course loop: relative difference {rel:.1e}")
        except Exception as e:  # noqa: BLE001 - recorded as the check's outcome
            err = e
            report = getattr(e, "report", None)
            if report is not None:
                evals = report.evaluations
        out, msg = outcome_of(err, "jgc" if which == "jgc" else "peer")
        n = int(sum(np.size(v) for v in p.values()))
        records.append({"name": name, "n": n, "wrong": wrong, "outcome": out, "msg": msg,
                        "s": round(time.perf_counter() - t0, 4), "compiles": comp.count - c0,
                        "evaluations": evals, **extra})
    del jnp
    return {"total": time.perf_counter() - start, "compiles": comp.count, "compile_s": comp.seconds,
            "records": records}


# -- (c) one cold check at n ≈ 10³ ---------------------------------------------------------------
def cold_worker(which: str) -> dict:
    t_start = time.perf_counter()
    import jax

    jax.config.update("jax_enable_x64", True)
    import bench_speed as bs
    import numpy as np
    from jax.flatten_util import ravel_pytree

    comp = Compiles()
    p, x, y = bs._model(bs.WIDTHS[1_000], "float64")
    t0 = time.perf_counter()
    if which == "jgc":
        import jgc

        rep = jgc.check(bs._loss, p, x, y)
        ok, evals = bool(rep.ok), rep.evaluations
    else:
        flat, unravel = ravel_pytree(p)
        cost = jax.jit(lambda t: bs._loss(unravel(t), x, y))
        dvec = np.asarray(ravel_pytree(jax.grad(bs._loss)(p, x, y))[0])
        theta = np.asarray(flat)
        approx = np.zeros(theta.size)
        for i in range(theta.size):
            tp, tm = theta.copy(), theta.copy()
            tp[i] += 1e-4
            tm[i] -= 1e-4
            approx[i] = (float(cost(tp)) - float(cost(tm))) / 2e-4
        rel = np.linalg.norm(approx - dvec) / (np.linalg.norm(approx) + np.linalg.norm(dvec))
        ok, evals = bool(rel < 1e-7), 2 * theta.size
    return {"s": time.perf_counter() - t0, "import_s": t0 - t_start, "ok": ok, "evaluations": evals,
            "compiles": comp.count, "n": int(sum(v.size for v in p.values()))}


# -- driver ------------------------------------------------------------------------------------
def run_worker(args: list[str], timeout: float = 3600) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"worker {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def worker_main(argv):
    part, which, *rest = argv
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if part == "harness":
        res = harness_worker(which, int(rest[0]), rest[1] == "on")
    elif part == "small":
        res = small_worker(which)
    else:
        res = cold_worker(which)
    print(json.dumps(res))


def summarize(res: dict, truth=None) -> dict:
    recs = res["records"]
    counts = {}
    for r in recs:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    ev = [r["evaluations"] for r in recs if r["evaluations"] is not None]
    out = {"checks": len(recs), "total": res["total"], "compiles": res["compiles"],
           "compile_s": res["compile_s"], "per_check_compiles": res["compiles"] / max(1, len(recs)),
           "median_evals": statistics.median(ev) if ev else None, "outcomes": counts}
    if truth is not None:
        missed = [r["name"] for r in recs if truth(r) and r["outcome"] != "fail"]
        alarms = [r["name"] for r in recs if not truth(r) and r["outcome"] != "pass"]
        out.update(missed=missed, alarms=alarms)
    return out


def fmt_outcomes(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harnesses", type=int, default=DEFAULT_HARNESSES)
    ap.add_argument("--x64", choices=("on", "off"), default="on")
    ap.add_argument("--reps", type=int, default=DEFAULT_REPS)
    ap.add_argument("--parts", nargs="*", choices=("harness", "small", "cold"), default=["harness", "small", "cold"])
    ap.add_argument("--quick", action="store_true", help="40 harnesses, 1 repeat")
    ap.add_argument("--one-direction", action="store_true",
                    help="part (a) also with jgc.check_grads(num_directions=1), JAX's one direction")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a suite.json of an earlier run (another version of jgc): its ratios are shown next to these")
    ap.add_argument("--baseline-label", default="earlier run")
    ap.add_argument("--render", action="store_true", help="run nothing; rewrite suite.md from suite.json")
    ap.add_argument("--worker", nargs=argparse.REMAINDER)
    ns = ap.parse_args(argv)
    if ns.worker:
        return worker_main(ns.worker)
    if ns.quick:
        ns.harnesses, ns.reps = 40, 1
    if ns.render:
        data = json.loads(JSON.read_text())
        if ns.baseline:
            data["baseline"] = {"label": ns.baseline_label, **_ratios(json.loads(ns.baseline.read_text()))}
            JSON.write_text(json.dumps(data, indent=1))
        write_markdown(data)
        print(MD.read_text())
        return None
    import jax

    t_run = time.time()
    load = os.getloadavg()[0]
    data = json.loads(JSON.read_text()) if JSON.exists() else {}
    if "harness" in ns.parts:
        which = ("jax", "jgc") + (("jgc1",) if ns.one_direction else ())
        h = {w: run_worker(["harness", w, str(ns.harnesses), ns.x64]) for w in which}
        jx = {r["name"]: r["outcome"] for r in h["jax"]["records"]}
        data["harness"] = {"x64": ns.x64, "count": ns.harnesses, "raw": h,
                           **{w: summarize(h[w]) for w in which},
                           "jgc_error_where_jax_runs": [r["name"] for r in h["jgc"]["records"]
                                                        if r["outcome"] in ("error", "timeout")
                                                        and jx.get(r["name"]) in ("pass", "fail")]}
    if "small" in ns.parts:
        s = {w: run_worker(["small", w]) for w in ("jax", "jgc", "loop")}
        data["small"] = {"raw": s, **{w: summarize(s[w], truth=lambda r: r["wrong"]) for w in s}}
    if "cold" in ns.parts:
        reps = {w: [run_worker(["cold", w]) for _ in range(ns.reps)] for w in ("jgc", "loop")}
        data["cold"] = {w: {"s": statistics.median(r["s"] for r in v), "all_s": [round(r["s"], 3) for r in v],
                            "ok": all(r["ok"] for r in v), "evaluations": v[0]["evaluations"],
                            "compiles": v[0]["compiles"], "n": v[0]["n"]} for w, v in reps.items()}
    data["meta"] = {"date": datetime.datetime.fromtimestamp(t_run, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "load": load, "jax": jax.__version__, "python": platform.python_version(),
                    "cores": os.cpu_count(), "cmd": " ".join(["python", "benchmarks/bench_suite.py", *(argv or sys.argv[1:])])}
    JSON.write_text(json.dumps(data, indent=1))
    write_markdown(data)
    print(MD.read_text())


def _ratios(d: dict) -> dict:
    """The headline figures of a run: jgc's total over its peer's in each part."""
    out = {"date": d["meta"]["date"], "load": d["meta"]["load"]}
    if "harness" in d:
        out["harness"] = d["harness"]["jgc"]["total"] / d["harness"]["jax"]["total"]
    if "small" in d:
        out["small"] = d["small"]["jgc"]["total"] / d["small"]["jax"]["total"]
    if "cold" in d:
        out["cold"] = d["cold"]["jgc"]["s"] / d["cold"]["loop"]["s"]
    return out


def write_markdown(d: dict) -> None:
    m = d["meta"]
    lines = ["# A suite of small checks: jgc next to JAX's checker and the course's loop", "",
             (f"Command: `{m['cmd']}` · {m['date']} · jax {m['jax']} · Python {m['python']} · "
              f"{m['cores']} CPU cores · load average at the start {m['load']:.1f}. "
              "Generated by benchmarks/bench_suite.py; read its header for the method. Each method ran "
              "in a fresh process, one after another in this run; ratios are within the run."), ""]
    if "harness" in d:
        h = d["harness"]
        jt = h["jax"]["total"]
        lines += [f"## (a) JAX's test harnesses, back to back (x64 {h['x64']}, the first {h['count']} kept)", "",
                  "| checker | checks | total s | ratio to JAX | XLA compilations (per check) | median evaluations per check | outcomes |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for w, label in (("jax", "jax.test_util.check_grads"), ("jgc", "jgc.check_grads"),
                         ("jgc1", "jgc.check_grads(num_directions=1)")):
            if w not in h:
                continue
            s = h[w]
            lines.append(f"| {label} | {s['checks']} | {s['total']:.1f} | {s['total'] / jt:.2f} | "
                         f"{s['compiles']} ({s['per_check_compiles']:.1f}) | {s['median_evals']} | "
                         f"{fmt_outcomes(s['outcomes'])} |")
        if "jgc1" in h["raw"]:
            two = {r["name"]: r["outcome"] for r in h["raw"]["jgc"]["records"]}
            diff = [f"{r['name']} ({two.get(r['name'])} with 2, {r['outcome']} with 1)"
                    for r in h["raw"]["jgc1"]["records"] if two.get(r["name"]) != r["outcome"]]
            ratio = statistics.median(r["s"] / max(1e-9, t) for r in h["raw"]["jgc1"]["records"]
                                      if (t := next(q["s"] for q in h["raw"]["jgc"]["records"]
                                                    if q["name"] == r["name"])))
            lines += ["", f"Outcomes that differ between two directions and one: {len(diff)}"
                      + (f" ({'; '.join(diff[:10])})" if diff else "") + ". The one-direction row ran last, "
                      "in a process of its own: both compile the same programs per check, and on a shared "
                      "machine the time of a later process moves with the load (here the median harness took "
                      f"{ratio:.2f}× its two-direction time, alike for cheap and costly harnesses)."]
        recorded = {}
        jsonl = RESULTS / "harnesses.jsonl"
        if jsonl.exists():
            for line in jsonl.read_text().splitlines():
                r = json.loads(line)
                if r.get("kept") and r.get("x64") == (h["x64"] == "on") and "jgc" in r:
                    recorded[r["name"]] = r["jgc"]  # the last record of a harness wins
            moved = [f"{r['name']} ({recorded[r['name']]} there, {r['outcome']} here)"
                     for r in h["raw"]["jgc"]["records"]
                     if r["name"] in recorded and recorded[r["name"]] != r["outcome"]]
            seen = sum(r["name"] in recorded for r in h["raw"]["jgc"]["records"])
            lines += ["", f"jgc's outcomes against those recorded in benchmarks/results/harnesses.jsonl "
                      f"(one harness per process there, caches cleared): {seen - len(moved)} of {seen} the same"
                      + (f"; differing: {'; '.join(moved[:10])}" if moved else "") + "."]
        bad = h["jgc_error_where_jax_runs"]
        lines += ["", f"jgc errors or timeouts where JAX's checker gives a verdict: {len(bad)}"
                  + (f" ({', '.join(bad[:10])})" if bad else "") + ". Where the two verdicts differ, "
                  "benchmarks/results/harnesses.md says which is right (mostly JAX's fixed step in "
                  "float32 and 16-bit types).", ""]
    if "small" in d:
        s = d["small"]
        jt = s["jax"]["total"]
        lines += ["## (b) 128 small checks, back to back (float32, 6 to 2,376 parameters, 8 planted bugs)", "",
                  ("| method | checks | total s | ratio to JAX | XLA compilations (per check) | "
                   "median evaluations per check | outcomes | planted bugs missed | false alarms |"),
                  "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for w, label in (("jax", "jax.test_util.check_grads"), ("jgc", "jgc.testing.assert_grads_close"),
                         ("loop", "course loop (jitted J)")):
            r = s[w]
            lines.append(f"| {label} | {r['checks']} | {r['total']:.1f} | {r['total'] / jt:.2f} | "
                         f"{r['compiles']} ({r['per_check_compiles']:.1f}) | {r['median_evals']} | "
                         f"{fmt_outcomes(r['outcomes'])} | {len(r['missed'])} | {len(r['alarms'])} |")
        for w in ("jax", "jgc", "loop"):
            if s[w]["alarms"]:
                lines.append(f"\n{w} false alarms: {', '.join(s[w]['alarms'][:12])}")
            if s[w]["missed"]:
                lines.append(f"\n{w} missed: {', '.join(s[w]['missed'][:12])}")
        lines.append("")
    if "cold" in d:
        c = d["cold"]
        lt = c["loop"]["s"]
        lines += [f"## (c) One check at n = {c['jgc']['n']}, cold (tanh MLP, float64, fresh process each)", "",
                  "| method | median s (each run) | ratio to the loop | XLA compilations | evaluations | verdict |",
                  "|---|---:|---:|---:|---:|---|"]
        for w, label in (("jgc", "jgc.check"), ("loop", "course loop (jitted J)")):
            r = c[w]
            lines.append(f"| {label} | {r['s']:.2f} ({', '.join(str(v) for v in r['all_s'])}) | {r['s'] / lt:.2f} | "
                         f"{r['compiles']} | {r['evaluations']} | {'pass' if r['ok'] else 'fail'} |")
        lines.append("")
    if "baseline" in d:
        b, now = d["baseline"], _ratios(d)
        lines += [f"## Against the {b['label']} ({b['date']}, load {b['load']:.1f})", "",
                  "| part | jgc's ratio then | jgc's ratio now |", "|---|---:|---:|"]
        for key, label in (("harness", "(a) harnesses, to JAX's checker"), ("small", "(b) small checks, to JAX's checker"),
                           ("cold", "(c) cold n = 1036, to the course loop")):
            if key in b and key in now:
                lines.append(f"| {label} | {b[key]:.2f} | {now[key]:.2f} |")
        lines.append("")
    MD.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
