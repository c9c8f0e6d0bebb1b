"""Question: are deliberately wrong derivative rules caught and located, what does each
check cost (cost-function evaluations, seconds), and does jax.test_util.check_grads catch
the same plants?

Runs the plant table of tests/test_custom_rules.py (custom_vjp / custom_jvp / HVP
mutations and their correct twins) and the wrong op rules of tests/test_check_grads.py,
each once (every plant is a new function, so its time includes tracing and compiling:
that is what a user pays), and writes benchmarks/results/rules.md.

Run from the repository root:  python benchmarks/bench_rules.py
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.test_util import check_grads as jax_check_grads  # noqa: E402

import jgc  # noqa: E402
from tests import test_check_grads as cg  # noqa: E402
from tests import test_custom_rules as cr  # noqa: E402


def _located(plant, rep) -> str:
    if not plant.bad:
        return "—"
    ok = True
    if plant.failing:
        ok &= {(lf.output_path, lf.path) for lf in rep.failing()} == plant.failing
    for label, idx in plant.elements.items():
        (lf,) = [lf for lf in rep.leaves if lf.name == label]
        ok &= sorted(lf.elements("mismatch")) == sorted(idx)
    where = "; ".join(f"{lf.name} {list(lf.worst_index)}" for lf in rep.failing()[:2])
    return ("yes: " if ok else "NO: ") + where


def run_plants():
    rows = []
    for p in cr.PLANTS:
        t = time.perf_counter()
        rep = p.run()
        dt = time.perf_counter() - t
        verdict = "caught" if not rep.ok else "passed"
        right = (not rep.ok) == p.bad
        rows.append((p.name, p.check, "bug" if p.bad else "correct", verdict + ("" if right else " (WRONG)"),
                     _located(p, rep), rep.evaluations, dt))
    return rows


def _jax_verdict(f, args, order):
    try:
        with jax.enable_x64(True):
            jax_check_grads(f, args, order)
        return "missed"
    except TypeError:
        return "TypeError (custom_vjp)"
    except AssertionError:
        return "caught (no location)"


def run_ops():
    rows = []
    for name, make, order in cg.PLANTED:
        f, args = make()
        t = time.perf_counter()
        with jax.enable_x64(True):
            try:
                rep = jgc.check_grads(f, args, order)
                ours, where = "missed", ""
            except jgc.GradCheckError as e:
                rep, ours = e.report, "caught"
                where = str(e).splitlines()[0].split(" in ", 1)[1].split(":")[0]
        dt = time.perf_counter() - t
        rows.append((name, order, ours, where, rep.evaluations, dt, _jax_verdict(f, args, order)))
    # The size-scaled tolerance plant: a 1% wrong custom_jvp on 10⁴ elements.
    f = jax.custom_jvp(lambda x: jax.numpy.sin(x))
    f.defjvp(lambda p, t: (jax.numpy.sin(p[0]), jax.numpy.cos(p[0]) * t[0] * 1.01))
    x = np.linspace(0.1, 1.0, 10_000)
    t = time.perf_counter()
    with jax.enable_x64(True):
        try:
            rep = jgc.check_grads(f, (x,), 1, modes=("fwd",), atol=1e-5, rtol=1e-5)
            ours = "missed"
        except jgc.GradCheckError as e:
            rep, ours = e.report, "caught"
        dt = time.perf_counter() - t
        try:
            jax_check_grads(f, (x,), 1, modes=("fwd",), atol=1e-5, rtol=1e-5)
            theirs = "missed (tolerance × size)"
        except AssertionError:
            theirs = "caught"
    rows.append(("sin custom_jvp 1% wrong, 10⁴ elements, rtol=1e-5", 1, ours, "JVP", rep.evaluations, dt, theirs))
    return rows


def run_suite():
    t = time.perf_counter()
    n = 0
    for name, f, build, order in cg.OPS:
        args = tuple(np.asarray(a, np.float64) for a in cg.ARGS[name])
        with jax.enable_x64(True):
            rep = jgc.check_grads(f, args, order)
        assert rep.ok, rep
        n += 1
    return n, time.perf_counter() - t


def main(path=ROOT / "benchmarks" / "results" / "rules.md"):
    plants = run_plants()
    ops = run_ops()
    n_ops, t_ops = run_suite()
    lines = [
        "# Planted derivative bugs: caught, located, cost",
        "",
        (f"Command: `python benchmarks/bench_rules.py` · jax {jax.__version__} · device "
         f"{jax.devices()[0].device_kind} ({jax.default_backend()}) · {os.cpu_count()} CPU cores · "
         f"Python {platform.python_version()} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"),
        "",
        "Each row is one check of a new function: seconds include tracing and XLA compilation",
        "(what a user pays once); evaluations count calls of f in the finite-difference batches.",
        "",
        "## custom_vjp / custom_jvp / HVP mutations (tests/test_custom_rules.py)",
        "",
        "| rule | check | planted | verdict | located (expected block and entries) | evaluations | seconds |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for r in plants:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]:.2f} |")
    lines += [
        "",
        "## Wrong rules planted into ops, through the drop-in (tests/test_check_grads.py)",
        "",
        "| planted bug | order | jgc.check_grads | first failing check | evaluations | seconds | jax.test_util.check_grads |",
        "|---|---:|---|---|---:|---:|---|",
    ]
    for r in ops:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.2f} | {r[6]} |")
    lines += [
        "",
        (f"Op suite with correct rules (float64, {n_ops} ops, orders 1–2): no false alarm, "
         f"{t_ops:.1f} s in total."),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
