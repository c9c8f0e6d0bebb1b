"""Question: does each check catch the errors its `detect` column says it can?

The problem is the smooth cost J(w) = Σ sin(w_i)·c_i + ½‖w‖² (w ~ N(0, 1), c ~ U(0.5, 1.5)),
whose gradient elements spread over [0, 3]. For every mode (full, sampled, directional)
and dtype (float64; float32 evaluated in float64 as by default, with the analytic gradient in float64 as
jax.grad gives it there; float32 native) the clean
gradient is checked first, and the report's stated power in the typical element (median
|g|) is read. Then that one element is corrupted by a relative error of k times the
stated power for k in LADDER, and each run records whether the check failed and named
that element. "observed" is the smallest error caught; it should lie within a factor of
1.5 above the stated figure (caught at 1.5x), and errors of 0.1x pass. Full mode at 10^6
elements needs 2·10^6 evaluations: there the full-mode figure is the one sampled mode
states for its largest-|g| element and the typical element's, judged exactly as full
mode judges it (per-element bound at the sampled element nearest the median |g|).

The 10^6 case also plants the 10^-3 error of an element with |g| ≈ 0.5 and times the
directional check that finds it.

Run: python benchmarks/bench_power.py  (writes benchmarks/results/power.md)
     python benchmarks/bench_power.py --quick  (10^4 elements only)
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax
import numpy as np

import jgc

# Multiples of the stated power planted in the typical element.
LADDER = (0.1, 0.3, 0.7, 1.5, 3.0)
DTYPES = (("float64", np.float64, "auto"), ("float32", np.float32, "auto"),
          ("float32 native", np.float32, "native"))


def problem(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n).astype(dtype)
    c = rng.uniform(0.5, 1.5, size=n).astype(dtype)

    def cost(w, c):
        import jax.numpy as jnp

        return jnp.sum(jnp.sin(w) * c) + 0.5 * jnp.sum(w * w)

    w64, c64 = w.astype(np.float64), c.astype(np.float64)
    return cost, w, c, np.cos(w64) * c64 + w64


def gradient(g, precision):
    """The analytic side as jgc.check(grad=None) has it: in float64 unless native."""
    return g if precision != "native" else g.astype(np.float32)


def typical(g):
    mag = np.abs(g)
    order = np.argsort(mag, kind="stable")
    return int(order[(order.size - 1) // 2])


def planted(g, i, rel):
    bad = g.copy()
    bad[i] = bad[i] * (1 + rel)
    return bad


def check(cost, w, c, g, mode, precision):
    opts = {"samples": 1.0} if mode == "sampled" else {}  # every element: its power is full mode's
    t = time.perf_counter()
    rep = jgc.check(cost, w, c, grad=g, mode=mode, precision=precision, **opts)
    return rep, time.perf_counter() - t


def ladder(cost, w, c, g, mode, precision, stated, i, steps=LADDER):
    caught = {}
    for k in steps:
        rep, _ = check(cost, w, c, planted(g, i, k * stated), mode, precision)
        caught[k] = (not rep.ok) and rep.leaves[0].elements("mismatch") == [(i,)]
    smallest = min((k for k in steps if caught[k]), default=None)
    return caught, smallest


def row(n, mode, label, dtype, precision, lines, steps=LADDER):
    cost, w, c, g = problem(n, dtype)
    g = gradient(g, precision)
    i = typical(g)
    clean, secs = check(cost, w, c, g, mode, precision)
    lf = clean.leaves[0]
    stated = lf.detectable_rel
    caught, smallest = ladder(cost, w, c, g, mode, precision, stated, i, steps)
    ok = caught[1.5] and caught.get(3.0, True) and not caught[0.1]
    obs = "none caught" if smallest is None else f"{smallest * stated:.2g} ({smallest}x)"
    marks = " ".join(("✗" if caught[k] else "✓") if k in caught else "·" for k in LADDER)
    lines.append(f"| {n:.0e} | {mode} | {label} | {clean.ok} | {stated:.2g} | {lf.detectable_rel_largest:.2g} "
                 f"| {obs} | {marks} | {'yes' if ok else 'NO'} | {clean.evaluations} | {secs:.1f} |")
    print(lines[-1], flush=True)
    return ok, stated


def full_figure_from_sample(n, dtype, precision, samples=256):
    """Full mode's power at the typical element of a huge leaf, from elements judged as full mode judges."""
    cost, w, c, g = problem(n, dtype)
    g = gradient(g, precision)
    rep, _ = check_sampled(cost, w, c, g, precision, samples)
    lf = rep.leaves[0]
    a, num, b = lf.analytic, lf.numeric, lf.bound
    per = (b + np.abs(a - num)) / np.abs(a)
    j = int(np.argmin(np.abs(np.abs(a) - np.median(np.abs(g)))))
    return float(per[j])


def check_sampled(cost, w, c, g, precision, samples):
    t = time.perf_counter()
    rep = jgc.check(cost, w, c, grad=g, mode="sampled", samples=samples, precision=precision)
    return rep, time.perf_counter() - t


def big_case(n, lines):
    cost, w, c, g = problem(n, np.float64)
    i = int(np.flatnonzero(np.abs(np.abs(g) - 0.5) < 0.01)[0])
    rep, secs = check(cost, w, c, planted(g, i, 1e-3), "directional", "auto")
    found = rep.leaves[0].elements("mismatch")
    lines.append(f"A relative error of 1e-3 in element {i} (|g| = {abs(g[i]):.3f}, median |g| = "
                 f"{np.median(np.abs(g)):.3f}) of {n:.0e}: directional check {'FAILS' if not rep.ok else 'passes'}, "
                 f"elements found {found}, {rep.evaluations} evaluations, {secs:.1f} s.")
    return (not rep.ok) and found == [(i,)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10^4 elements only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "power.md"))
    ns = ap.parse_args(argv)
    t0 = time.perf_counter()
    lines = [("| n | mode | dtype | clean passes | stated (typical) | stated (largest) | observed smallest "
              "caught | 0.1x 0.3x 0.7x 1.5x 3x (✗ = caught) | holds | evals (clean) | s (clean) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    good = True
    for mode in ("full", "sampled", "directional"):
        for label, dtype, precision in DTYPES:
            good &= row(10**4, mode, label, dtype, precision, lines)[0]
    ratios = []
    extra = []
    if not ns.quick:
        for label, dtype, precision in DTYPES[:1]:
            # Each run at 10^6 takes tens of seconds: the two rungs that test the claim.
            ok, stated = row(10**6, "directional", label, dtype, precision, lines, steps=(0.1, 1.5))
            good &= ok
            full = full_figure_from_sample(10**6, dtype, precision)
            ratios.append(f"- {label}, 10^6 elements: directional states {stated:.2g} for the typical "
                          f"element, full mode's judgement of that element {full:.2g} "
                          f"(ratio {stated / full:.1f}; target ≤ 10).")
            good &= stated / full <= 10
        good &= big_case(10**6, extra)
        # The slow test that holds the same 10^6 case in the test suite.
        slow = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "slow",
                               str(ROOT / "tests" / "test_power.py")], cwd=ROOT, capture_output=True,
                              text=True, check=False)
        extra.append(f"Slow test (`pytest -m slow tests/test_power.py`): "
                     f"{slow.stdout.strip().splitlines()[-1] if slow.stdout.strip() else slow.returncode}.")
    secs = time.perf_counter() - t0
    cmd = "python benchmarks/bench_power.py" + (" --quick" if ns.quick else "")
    head = [
        "# Power: stated against observed",
        "",
        (f"Command: `{cmd}` — {secs:.0f} s. Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
         f"{platform.python_version()}, jax {jax.__version__}, backend {jax.default_backend()}."),
        "",
        ("Cost Σ sin(w)·c + ½‖w‖²; one error planted in the typical element (median |g|) at multiples "
        "of the power the clean check states for it (`detect`, the `detectable_rel` of the leaf). "
        "`holds`: caught at 1.5x and 3x, passed at 0.1x (· = not run). Sampled mode here checks every element "
        "(samples=1.0); with fewer it states inf for the typical element, which it most likely "
        "did not check."),
        "",
    ]
    text = "\n".join(head + lines + [""] + ratios + [""] + extra) + "\n"
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(text)
    print(text)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
