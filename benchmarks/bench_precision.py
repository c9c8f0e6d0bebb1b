"""Question: with default options, does jgc report the derivative bugs that live only at
the dtype a program trains in, and stay quiet on correct float32/float16/bfloat16 code?

Cases (the bugs and controls of tests/test_native_dtype.py, plus JAX's expm1 and
log_softmax float32 tails and a Flax bfloat16-compute attention block):

* bugs: JAX's float32 tails (σ' at 20, tanh' at 9.5, expm1' at −20, log_softmax of a
  confident logit), a custom_jvp with a per-dtype coefficient, a custom_vjp saving its
  residual in bfloat16, a custom_vjp whose backward scan accumulates in bfloat16;
* controls: a Flax attention block with ``dtype=bfloat16, param_dtype=float32``, a
  float32 LayerNorm, a float16 MLP, softmax cross-entropy with confident logits, a
  float32 RNN under ``lax.scan``, the correct float32 residual.

Per case: the verdict of ``jgc.check`` at default options (a bug is caught when some
leaf is ``mismatch`` or ``imprecise``; a control passes when the report is ok with
neither), the same with ``analytic="reference"`` (the former default: both sides in
float64), the native gradient's error against the truth in ulps of its dtype (median and
worst element), and the time of the default check against the reference one, measured
in the same run (ratio of medians of 3 runs each, after one warm-up).

The truth is ``jax.grad`` of the same program with the parameters and data in float64
(x64 on): every bug here is in float32/bfloat16 code paths only, so its float64 twin is
the correct derivative to far below a float32 ulp. The four tail elements take mpmath's
value (50 digits) instead: JAX's float64 formulas cancel there too, by 2^-53 of the
terms, a few 1e-8 relative (the table gives the figure). Where the twin cannot run (a
float32 scan carry against float64 parameters), the float64 Richardson differences of
a full check are the truth. The bfloat16-compute block's twin still computes in
bfloat16, so no truth is given there.

Run: python benchmarks/bench_precision.py  (writes benchmarks/results/precision.md)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jgc  # noqa: E402
import test_native_dtype as cases  # noqa: E402

# The four tails in closed form, for the mpmath cross-check of the float64 truth.
TAILS = {
    "σ' at 20 (float32)": ("sigmoid", 20.0),
    "tanh' at 9.5 (float32)": ("tanh", 9.5),
    "expm1' at −20 (float32)": ("expm1", -20.0),
    "log_softmax, confident logit (float32)": ("log_softmax", 20.0),
}


def _tail_cases():
    rest = jnp.array([1.0, -2.0, 0.5], jnp.float32)
    return {
        "σ' at 20 (float32)": (lambda p: jnp.sum(jax.nn.sigmoid(p)), jnp.concatenate([jnp.array([20.0]), rest])),
        "tanh' at 9.5 (float32)": (lambda p: jnp.sum(jnp.tanh(p)), jnp.concatenate([jnp.array([9.5]), rest])),
        "expm1' at −20 (float32)": (lambda p: jnp.sum(jnp.expm1(p)), jnp.concatenate([jnp.array([-20.0]), rest])),
        "log_softmax, confident logit (float32)": (lambda p: jax.nn.log_softmax(p)[0],
                                                   jnp.array([20.0, 0.0, 0.0, 0.0], jnp.float32)),
    }


def _flax_block():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.SelfAttention(num_heads=2, qkv_features=8, dtype=jnp.bfloat16, param_dtype=jnp.float32)(x)
            h = nn.LayerNorm(dtype=jnp.bfloat16, param_dtype=jnp.float32)(x + h)
            return nn.Dense(1, dtype=jnp.bfloat16, param_dtype=jnp.float32)(h)

    x = jax.random.normal(jax.random.key(1), (2, 5, 8), jnp.float32)
    block = Block()
    params = block.init(jax.random.key(0), x)["params"]
    return (lambda p: jnp.mean(block.apply({"params": p}, x).astype(jnp.float32) ** 2)), params


def all_cases():
    bugs = dict(_tail_cases())
    for name in ("dtype-branching rule", "bfloat16 residual", "bfloat16 scan accumulator"):
        bugs[name] = cases.BUGS[name]
    controls = {"Flax attention block, bfloat16 compute": _flax_block()}
    controls.update(cases.CONTROLS)
    return bugs, controls


def _mp_truth(kind: str, x: float) -> float:
    import mpmath as mp

    mp.mp.dps = 50
    x = mp.mpf(x)
    if kind == "sigmoid":
        s = 1 / (1 + mp.e ** (-x))
        return float(s * (1 - s))
    if kind == "tanh":
        return float(1 - mp.tanh(x) ** 2)
    if kind == "expm1":
        return float(mp.e**x)
    return float(1 - mp.e**x / (mp.e**x + 3))  # d/dx0 of log_softmax([x, 0, 0, 0])[0]


def truth(f, p):
    """jax.grad of the float64 twin (params widened, x64 on) as a flat float64 vector, and
    how it was had; where the twin cannot run (a float32 scan carry against float64
    params), the Richardson differences of a full check, in float64 (~1e-10 relative)."""
    flat = (lambda g: np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(g)]))
    try:
        with jax.enable_x64(True):
            wide = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x, np.float64)), p)
            return flat(jax.grad(f)(wide)), "float64 twin"
    except TypeError:
        rep = jgc.check(f, p, stencil="richardson", mode="full")
        return np.concatenate([np.asarray(lf.numeric, np.float64).ravel() for lf in rep.leaves]), "Richardson"


def ulps(f, p, t) -> tuple[float, float]:
    """(median, worst) |native − truth| in ulps of the native dtype at the truth (an ulp at
    |t| is 2^(⌊log2 |t|⌋ − mantissa bits), at least that of the dtype's smallest normal)."""
    g = jax.grad(f)(p)
    errs, start = [], 0
    for x in jax.tree_util.tree_leaves(g):
        x = np.asarray(x)
        tt = t[start:start + x.size]
        start += x.size
        fi = jnp.finfo(x.dtype)
        mag = np.maximum(np.abs(tt), float(fi.smallest_normal))
        ulp = np.exp2(np.floor(np.log2(mag)) - fi.nmant)
        errs.append(np.abs(x.astype(np.float64).ravel() - tt) / ulp)
    e = np.concatenate(errs)
    return float(np.median(e)), float(np.max(e))


def verdict(rep) -> str:
    st = sorted({lf.status for lf in rep.leaves} - {"ok"})
    return ("PASS" if rep.ok else "FAIL") + (f" ({', '.join(st)})" if st else "")


def timed(call, repeats: int) -> tuple[object, float]:
    call()  # warm-up: compilation caches, as a test suite that checks twice would see
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def run(repeats: int) -> list[dict]:
    bugs, controls = all_cases()
    rows = []
    for kind, group in (("bug", bugs), ("control", controls)):
        for name, (f, p) in group.items():
            rep, t_nat = timed(lambda f=f, p=p: jgc.check(f, p), repeats)
            old, t_ref = timed(lambda f=f, p=p: jgc.check(f, p, analytic="reference"), repeats)
            flagged = any(lf.status in ("mismatch", "imprecise") for lf in rep.leaves)
            old_flagged = any(lf.status in ("mismatch", "imprecise") for lf in old.leaves)
            row = {"kind": kind, "name": name, "verdict": verdict(rep), "reference": verdict(old),
                   "right": (flagged or not rep.ok) if kind == "bug" else (rep.ok and not flagged),
                   "right_before": (old_flagged or not old.ok) if kind == "bug" else (old.ok and not old_flagged),
                   "t_native": t_nat, "t_reference": t_ref, "ulps": None, "mp": None,
                   "bits": [lf.accurate_bits() for lf in rep.leaves]}
            if "bfloat16 compute" not in name:
                t, row["truth"] = truth(f, p)
                if name in TAILS:  # JAX's float64 formulas cancel too (2^-53 absolute): mpmath there
                    ref = _mp_truth(*TAILS[name])
                    row["mp"], t[0] = abs(t[0] - ref) / ref, ref
                row["ulps"] = ulps(f, p, t)
            rows.append(row)
            print(f"{kind:8s} {name:45s} {row['verdict']:28s} before: {row['reference']:28s} "
                  f"ulps={row['ulps']} time {t_nat:.2f}s / {t_ref:.2f}s", flush=True)
    return rows


def _fmt_ulps(u) -> str:
    if u is None:
        return "—"
    return " / ".join(f"{v:.3g}" for v in u)


def summarise(rows: list[dict], cmd: str, seconds: float, repeats: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        from run_all import cpu_name  # noqa: PLC0415 - the benchmarks' own helper

        cpu = cpu_name()
    except ImportError:
        pass
    bugs = [r for r in rows if r["kind"] == "bug"]
    ctrls = [r for r in rows if r["kind"] == "control"]
    ratios = [r["t_native"] / r["t_reference"] for r in rows]
    lines = [
        "## The derivative as it runs: dtype-only bugs and correct low-precision controls",
        "",
        f"Command: `{cmd}` ({seconds:.0f} s). Machine: {cpu}; {os.cpu_count()} cores; Python "
        f"{platform.python_version()}; jax {jax.__version__} ({jax.default_backend()}).",
        "",
        f"**Default options: {sum(r['right'] for r in bugs)}/{len(bugs)} bugs reported, "
        f"{sum(r['right'] for r in ctrls)}/{len(ctrls)} controls passed without a flag.** "
        f"With `analytic=\"reference\"` (both sides in float64, the former default): "
        f"{sum(r['right_before'] for r in bugs)}/{len(bugs)} bugs, "
        f"{sum(r['right_before'] for r in ctrls)}/{len(ctrls)} controls. "
        f"Time of the default check against `analytic=\"reference\"`, same run, median of {repeats} "
        f"after a warm-up: ratio {min(ratios):.2f}–{max(ratios):.2f} (median {float(np.median(ratios)):.2f}).",
        "",
        "A bug is reported when a leaf is `mismatch` or `imprecise`; a control passes when the report "
        "is ok with neither. Error: |native gradient − truth| in ulps of the native dtype at the "
        "truth, median / worst element (truth: `jax.grad` of the float64 twin, or float64 Richardson "
        "differences where the twin cannot run; mpmath at the four tail elements). Bits: "
        "`LeafReport.accurate_bits()` per leaf (median / worst / dtype; elements under 1e-3 of "
        "the leaf's largest are left out there).",
        "",
        "| kind | case | default | analytic=\"reference\" | error (ulps) median / worst | bits | time default / reference (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bits = "; ".join(f"{b['median'] + 0.0:.0f}/{b['worst'] + 0.0:.0f}/{b['dtype']}" if b and b.get("median") is not None
                         and not math.isnan(b["median"]) else "—" for b in r["bits"][:3])
        if len(r["bits"]) > 3:
            bits += f"; … ({len(r['bits'])} leaves)"
        mark = "✓" if r["right"] else "✗"
        lines.append(f"| {r['kind']} | {r['name']} | {mark} {r['verdict']} | {r['reference']} | "
                     f"{_fmt_ulps(r['ulps'])} | {bits} | {r['t_native']:.2f} / {r['t_reference']:.2f} |")
    rich = [r["name"] for r in rows if r.get("truth") == "Richardson"]
    if rich:
        lines += ["", "Truth from float64 Richardson differences (the float64 twin cannot run): "
                  + ", ".join(rich) + "."]
    mp_rows = [r for r in rows if r["mp"] is not None]
    if mp_rows:
        lines += ["", "JAX's float64 twin against mpmath at the tail element (relative difference): "
                  + ", ".join(f"{r['name']} {r['mp']:.1e}" for r in mp_rows) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one timed run per case")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision.md"))
    ns = ap.parse_args(argv)
    repeats = 1 if ns.quick else 3
    t0 = time.perf_counter()
    rows = run(repeats)
    cmd = "python benchmarks/bench_precision.py" + (" --quick" if ns.quick else "")
    text = summarise(rows, cmd, time.perf_counter() - t0, repeats)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(text)
    print(text)
    bugs_ok = all(r["right"] for r in rows)
    return 0 if bugs_ok else 1


if __name__ == "__main__":
    sys.exit(main())
