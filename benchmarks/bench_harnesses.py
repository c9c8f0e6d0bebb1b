"""Question: on a corpus nobody here wrote — JAX's own primitive test harnesses — does
``jgc.check_grads`` run wherever ``jax.test_util.check_grads`` runs, and where the two
disagree, which one is right?

Corpus: ``jax._src.internal_test_util.test_harnesses.all_harnesses`` (every primitive
JAX tests, ~5,600 harnesses). A harness is kept when it is implemented on this device,
has at least one floating (or complex) dynamic argument and at least one floating
output, and its primitive is differentiable (``jax.linearize`` of it does not raise
"Differentiation rule ... not implemented"). The floating dynamic arguments are the
checked primals; integer and boolean ones (indices, masks) are closed over, as JAX's
own autodiff tests do.

Both checkers run with their defaults (JAX's harnesses carry no gradient tolerances),
order=1, modes ("fwd", "rev"), as ``jax/tests/lax_autodiff_test.py`` calls
``check_grads``, under JAX's test configuration: ``jax.numpy_dtype_promotion("strict")``,
once with x64 on and once with x64 off (one worker process per setting, x64 set before
any argument is built; 64-bit harnesses are skipped with x64 off, as JAX's tests skip
them). Each checker gets a per-harness time limit.

Outcomes per checker: ``pass``, ``fail`` (AssertionError: derivatives disagree),
``error`` (any other exception), ``timeout``. A disagreement (one passes, the other
fails) is settled by an arbiter that neither checker is: the exact JVP and VJP of the
function evaluated in float64 (x64 on) against a five-point central difference along
the same random direction at three steps; the derivative is called wrong when no step
brings the two within 1e-6 relative (float64), which no rounding or truncation of a
smooth function at these steps explains. Each disagreement is then one of:

* "bug JAX misses": JAX passes, jgc fails, the arbiter says the derivative is wrong;
* "jgc false alarm": jgc fails, the arbiter says the derivative is right;
* "JAX false alarm": JAX fails, the arbiter says the derivative is right (typically
  its fixed step 1e-4 in float32, or tolerance × size rules);
* "bug jgc misses": jgc passes, the arbiter says the derivative is wrong;
* "undecided": the arbiter cannot evaluate (non-finite point, kink at the point).

Run from the repository root (the whole corpus takes long on 2 cores; nice it):

    nice -n 19 python benchmarks/bench_harnesses.py                 # all, both x64 settings
    python benchmarks/bench_harnesses.py --only sin cholesky --x64 on
    python benchmarks/bench_harnesses.py --limit 40                  # first 40 kept per setting

Writes benchmarks/results/harnesses.md (and harnesses.jsonl, one line per harness and
setting, which ``--resume`` reuses).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
JSONL = RESULTS / "harnesses.jsonl"
MD = RESULTS / "harnesses.md"

# CPU seconds (this process, every thread: ITIMER_PROF) each checker may take on one
# harness, compile included; a harness over it is recorded as "timeout" for that
# checker. CPU time, not wall time, so a loaded machine does not turn into timeouts.
DEFAULT_TIME_LIMIT = 60.0


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def handler(signum, frame):
        raise Timeout(f"over {seconds:.0f} CPU s")

    old = signal.signal(signal.SIGPROF, handler)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


# -- corpus ------------------------------------------------------------------------------
def harness_case(h):
    """(function of the floating dynamic args, tuple of those args): tests/test_harnesses.py."""
    from tests.test_harnesses import harness_case as case

    return case(h)


def selected(ns, x64: bool):
    """Harnesses kept for this setting, with the reason for every one left out."""
    import jax
    import numpy as np
    from jax._src.internal_test_util import test_harnesses as th

    kept, dropped = [], {}
    for h in th.all_harnesses:
        if ns.only and not any(o == h.group_name or o in h.fullname for o in ns.only):
            continue
        if not h.filter(jax.default_backend()):
            dropped["not implemented on this device"] = dropped.get("not implemented on this device", 0) + 1
            continue
        if not x64 and np.dtype(h.dtype).itemsize * (1 if np.dtype(h.dtype).kind != "c" else 0.5) >= 8:
            dropped["64-bit dtype (needs x64)"] = dropped.get("64-bit dtype (needs x64)", 0) + 1
            continue
        kept.append(h)
    # Round-robin over primitive groups: a run cut short by --budget or --limit still
    # covers every primitive.
    groups: dict = {}
    for h in kept:
        groups.setdefault(h.group_name, []).append(h)
    order = []
    while any(groups.values()):
        for g in list(groups):
            if groups[g]:
                order.append(groups[g].pop(0))
    return order, dropped


def differentiable(g, args) -> tuple[bool, str]:
    import jax
    import jax.numpy as jnp

    try:
        out = jax.eval_shape(g, *args)
    except Exception as e:  # noqa: BLE001
        return False, f"f raises: {type(e).__name__}"
    if not any(jnp.issubdtype(o.dtype, jnp.inexact) for o in jax.tree_util.tree_leaves(out)):
        return False, "no floating output"
    try:
        jax.eval_shape(lambda *a: jax.linearize(g, *a)[0], *args)
    except NotImplementedError as e:
        return False, "no differentiation rule" if "ifferentiation" in str(e) else f"linearize: {e}"[:80]
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        if "ifferentiation rule" in msg or "not implemented" in msg:
            return False, "no differentiation rule"
        return True, ""
    return True, ""


# -- checkers ----------------------------------------------------------------------------
def run_checker(which, g, args, limit, modes=("fwd", "rev")):
    import jax

    if which == "jax":
        from jax.test_util import check_grads
    else:
        from jgc import check_grads
    t = time.perf_counter()
    msg = ""
    try:
        with time_limit(limit), jax.numpy_dtype_promotion("strict"):
            check_grads(g, args, 1, modes=modes)
        outcome = "pass"
    except Timeout as e:
        outcome, msg = "timeout", str(e)
    except AssertionError as e:
        outcome, msg = "fail", (str(e).strip() or "AssertionError").splitlines()[0][:300]
        if which == "jgc" and not msg.startswith("jgc."):
            outcome = "error"  # an assert inside JAX or the harness, not jgc's verdict
    except Exception as e:  # noqa: BLE001
        outcome = "error"
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{Path(fr.filename).name}:{fr.lineno}" for fr in reversed(tb) if "jgc" in fr.filename), "")
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:240] if str(e).strip() else ''} {where}"
    return outcome, msg, time.perf_counter() - t


def arbiter(g, args) -> tuple[str, str]:
    """'right', 'wrong' or 'undecided': float64 JVP/VJP against a five-point stencil at three steps."""
    import jax

    try:
        with jax.enable_x64(True):
            return _arbiter(g, args)
    except Exception as e:  # noqa: BLE001
        return "undecided", f"arbiter raised {type(e).__name__}"


def _arbiter(g, args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    if True:
        rng = np.random.default_rng(1)

        def wide(a):
            a = np.asarray(a)
            return a.astype(np.complex128 if a.dtype.kind == "c" else np.float64)

        x = [wide(a) for a in args]
        t = []
        for a in x:
            z = rng.standard_normal(a.shape)
            if a.dtype.kind == "c":
                z = z + 1j * rng.standard_normal(a.shape)
            t.append(z.astype(a.dtype))

        def G(*a):
            # Every argument in float64/complex128: the derivative rule is judged
            # mathematically, not in the harness's (maybe 16-bit) precision.
            out = g(*a)
            leaves = [o for o in jax.tree_util.tree_leaves(out) if jnp.issubdtype(o.dtype, jnp.inexact)]
            return [jnp.asarray(o, jnp.complex128 if jnp.iscomplexobj(o) else jnp.float64) for o in leaves]

        native = [tuple(o.shape) for o in jax.tree_util.tree_leaves(jax.eval_shape(g, *args))]
        wide = [tuple(o.shape) for o in jax.tree_util.tree_leaves(jax.eval_shape(g, *x))]
        if native != wide:
            return "undecided", "f computes something else in float64 (its output shapes change)"
        y0, jt = jax.jvp(G, tuple(x), tuple(t))
        y0 = [np.asarray(v) for v in y0]
        jt = np.concatenate([np.asarray(v).ravel() for v in jt])
        if not all(np.all(np.isfinite(v)) for v in y0) or not np.all(np.isfinite(jt)):
            return "undecided", "non-finite value or derivative at the point"
        scale = max(1.0, max(float(np.max(np.abs(a), initial=0)) for a in x))
        best = np.inf
        for h in (1e-3 * scale, 1e-4 * scale, 1e-5 * scale):
            def at(s):
                return np.concatenate([np.asarray(v).ravel() for v in G(*[a + s * ti for a, ti in zip(x, t)])])
            fd = (-at(2 * h) + 8 * at(h) - 8 * at(-h) + at(-2 * h)) / (12 * h)
            err = np.max(np.abs(fd - jt)) / max(1e-300, np.max(np.abs(jt)), np.max(np.abs(fd)))
            best = min(best, float(err))
        # VJP against the JVP (transpose identity), same direction, random cotangent.
        out, vjp = jax.vjp(G, *x)
        u = [rng.standard_normal(np.shape(o)).astype(np.asarray(o).dtype) for o in out]
        try:
            w = vjp(u)
        except (TypeError, ValueError):  # no reverse rule (reduce_window's init, custom_linear_solve)
            if best > 1e-6:
                return "wrong", f"JVP vs 5-point differences: relative error {best:.1e}"
            return "right", f"JVP agrees to {best:.0e}; f has no VJP"
        lhs = sum(float(np.real(np.vdot(np.conj(np.asarray(wi)), ti))) for wi, ti in zip(w, t))
        jts = jax.jvp(G, tuple(x), tuple(t))[1]
        rhs = sum(float(np.real(np.vdot(np.conj(ui), np.asarray(ji)))) for ui, ji in zip(u, jts))
        terr = abs(lhs - rhs) / max(1e-300, abs(lhs) + abs(rhs))
        if best > 1e-6:
            return "wrong", f"JVP vs 5-point differences: relative error {best:.1e}"
        if terr > 1e-9:
            return "wrong", f"VJP is not the transpose of the JVP: relative error {terr:.1e}"
        return "right", f"JVP agrees to {best:.0e}, transpose to {terr:.0e}"


def classify(jax_out, jgc_out, arb):
    if jax_out == "pass" and jgc_out == "fail":
        return {"wrong": "bug JAX misses", "right": "jgc false alarm"}.get(arb, "undecided")
    if jax_out == "fail" and jgc_out == "pass":
        return {"wrong": "bug jgc misses", "right": "JAX false alarm"}.get(arb, "undecided")
    return ""


# -- one setting in one process -------------------------------------------------------------
def worker(ns):
    import jax
    import numpy as np

    x64 = ns.x64 == "on"
    jax.config.update("jax_enable_x64", x64)
    done, prior = set(), {}
    if (ns.resume or ns.rerun_jgc) and JSONL.exists():
        for line in JSONL.read_text().splitlines():
            r = json.loads(line)
            if r["x64"] != x64 or "name" not in r:
                continue
            prior[r["name"]] = r
            if not ns.rerun_jgc or r.get("rerun") == ns.rerun_jgc:
                done.add(r["name"])
    kept, dropped = selected(ns, x64)
    n = 0
    t0 = time.monotonic()
    t_end = t0 + ns.budget if ns.budget else None
    with open(JSONL, "a") as out:
        for h in kept:
            if ns.limit and n >= ns.limit:
                break
            if t_end is not None and time.monotonic() > t_end:
                print(f"[x64={ns.x64}] budget of {ns.budget:.0f} s spent after {n} harnesses", flush=True)
                break
            if h.fullname in done:
                n += 1
                continue
            rec = {"name": h.fullname, "group": h.group_name, "dtype": np.dtype(h.dtype).name, "x64": x64}
            try:
                g, args = harness_case(h)
            except Exception as e:  # noqa: BLE001
                rec.update(kept=False, reason=f"arguments: {type(e).__name__}")
                out.write(json.dumps(rec) + "\n")
                continue
            if not args:
                continue
            ok, why = differentiable(g, args)
            if not ok:
                rec.update(kept=False, reason=why)
                out.write(json.dumps(rec) + "\n")
                out.flush()
                continue
            n += 1
            rec["kept"] = True
            old = prior.get(h.fullname, {})
            reuse = ns.rerun_jgc and old.get("kept") and "jax" in old
            for which in ("jax", "jgc"):
                if which == "jax" and reuse:
                    rec.update({k: old[k] for k in ("jax", "jax_msg", "jax_s")})
                    continue
                o, m, s = run_checker(which, g, args, ns.time_limit)
                rec[which], rec[which + "_msg"], rec[which + "_s"] = o, m, round(s, 3)
            if ns.rerun_jgc:
                rec["rerun"] = ns.rerun_jgc
            if {rec["jax"], rec["jgc"]} == {"pass", "fail"}:
                rec["arbiter"], rec["arbiter_msg"] = arbiter(g, args)
            if rec["jgc"] in ("error", "timeout") and rec["jax"] == "fail":
                # JAX's checker stops at its first failure; does it raise too in the mode
                # it did not reach?
                for mode in ("fwd", "rev"):
                    o, m, _ = run_checker("jax", g, args, ns.time_limit, modes=(mode,))
                    rec[f"jax_{mode}_alone"], rec[f"jax_{mode}_alone_msg"] = o, m
            print(f"[x64={ns.x64}] {n:4d} {h.fullname[:70]:70s} jax={rec['jax']:7s} jgc={rec['jgc']:7s}"
                  f" {rec['jax_s']:6.2f}s {rec['jgc_s']:6.2f}s", flush=True)
            out.write(json.dumps(rec) + "\n")
            out.flush()
            jax.clear_caches()
        out.write(json.dumps({"meta": True, "x64": x64, "candidates": len(kept), "dropped": dropped,
                              "visited": n, "seconds": round(time.monotonic() - t0, 1)}) + "\n")


# -- report ------------------------------------------------------------------------------------
def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def corpus_size(x64: bool) -> int:
    """Harnesses after the device and x64 filters (a fresh process: x64 decides the corpus)."""
    code = ("import sys, jax; jax.config.update('jax_enable_x64', sys.argv[1] == 'on'); "
            "sys.path.insert(0, sys.argv[2]); import argparse, bench_harnesses as b; "
            "print(len(b.selected(argparse.Namespace(only=None), sys.argv[1] == 'on')[0]))")
    out = subprocess.run([sys.executable, "-c", code, "on" if x64 else "off", str(ROOT / "benchmarks")],
                         capture_output=True, text=True, check=False)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else -1


def write_report(cmd: str, seconds: float):
    import jax

    recs, meta = {}, {}
    for line in JSONL.read_text().splitlines():
        r = json.loads(line)
        if r.get("meta"):
            meta.setdefault(r["x64"], []).append(r)
            continue
        if r.get("jgc") == "fail" and not r["jgc_msg"].startswith("jgc."):
            r["jgc"] = "error"  # an assert inside JAX or the harness, not jgc's verdict
        recs[(r["name"], r["x64"])] = r  # the last line for a harness wins
    lines = [
        "# JAX's test harnesses: jgc.check_grads next to jax.test_util.check_grads",
        "",
        (f"Command: `{cmd}` · {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · "
        f"jax {jax.__version__} · device {jax.default_backend()} · {os.cpu_count()} CPU cores · "
        f"Python {platform.python_version()}"
        + (f" · wall time {seconds / 60:.1f} min (this invocation)." if seconds else ".")),
        "",
        "Corpus: `jax._src.internal_test_util.test_harnesses.all_harnesses`, kept when it has a",
        "floating argument and output and a differentiable primitive; both checkers with their",
        "defaults, order=1, modes (\"fwd\", \"rev\"), under `jax.numpy_dtype_promotion(\"strict\")`.",
        "Read benchmarks/bench_harnesses.py's header for the method and the arbiter.",
        "",
        ("| x64 | harnesses kept | left out | JAX pass | JAX fail | JAX error | JAX timeout "
        "| jgc pass | jgc fail | jgc error | jgc timeout | jgc errors where JAX runs | disagree | JAX s | jgc s |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dis = []
    for x64 in (True, False):
        rs = [r for (n, x), r in recs.items() if x == x64]
        if not rs:
            continue
        kept = [r for r in rs if r.get("kept")]
        c = {(w, o): sum(r[w] == o for r in kept) for w in ("jax", "jgc") for o in ("pass", "fail", "error", "timeout")}
        jgc_err_where_jax_runs = sum(r["jgc"] in ("error", "timeout") and r["jax"] in ("pass", "fail") for r in kept)
        d = [r for r in kept if {r["jax"], r["jgc"]} == {"pass", "fail"}]
        dis += d
        lines.append(
            f"| {'on' if x64 else 'off'} | {len(kept)} | {len(rs) - len(kept)} | "
            + " | ".join(str(c[(w, o)]) for w in ("jax", "jgc") for o in ("pass", "fail", "error", "timeout"))
            + f" | {jgc_err_where_jax_runs} | {len(d)} | {sum(r['jax_s'] for r in kept):.0f} | {sum(r['jgc_s'] for r in kept):.0f} |")
    lines += ["", ("Coverage: harnesses after the device and x64 filters, and how many of them were visited "
              "(in round-robin order over primitives, so a run cut short covers every primitive):"), ""]
    for x64 in sorted({x for (_, x) in recs}, reverse=True):
        visited = sum(1 for (n, x) in recs if x == x64)
        rerun = {r.get("rerun") for (n, x), r in recs.items() if x == x64 and r.get("kept")}
        lines.append(f"- x64 {'on' if x64 else 'off'}: {corpus_size(x64)} candidates, {visited} visited "
                     "(kept or left out below)"
                     + (f"; jgc's outcomes from the run tagged {', '.join(sorted(t for t in rerun if t))}"
                        if rerun - {None} else ""))
        if None in rerun and rerun - {None}:
            lines.append(f"  (and {sum(1 for (n, x), r in recs.items() if x == x64 and r.get('kept') and not r.get('rerun'))} "
                         "kept harnesses from an earlier untagged run)")
    lines += ["", "Left out (not counted above), by reason:", ""]
    why = {}
    for r in recs.values():
        if not r.get("kept"):
            k = ("on" if r["x64"] else "off", r.get("reason", "?"))
            why[k] = why.get(k, 0) + 1
    for (x, reason), k in sorted(why.items()):
        lines.append(f"- x64 {x}: {reason}: {k}")
    lines += ["", "## Disagreements", ""]
    if dis:
        kinds = {}
        for r in dis:
            r["kind"] = classify(r["jax"], r["jgc"], r.get("arbiter", "undecided"))
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        lines.append("By kind (the arbiter's call): " + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + ".")
        settled = {}
        for r in dis:
            ex = explain(r)
            k = ("not a bug (the arbiter's limit, or JAX's convention for the op)" if ex.startswith("not a bug")
                 else "jgc right" if ex.startswith("jgc right") or r["kind"] == "bug JAX misses"
                 else "JAX false alarm" if "false alarm" in ex or r["kind"] == "JAX false alarm"
                 else "not yet explained" if ex.startswith("not yet") else "undecided, explained")
            settled[k] = settled.get(k, 0) + 1
        lines.append("After reading the cases (the explanation column): "
                     + ", ".join(f"{k}: {v}" for k, v in sorted(settled.items())) + ".")
        lines += ["", "| harness | x64 | JAX | jgc | kind | arbiter | explanation |", "|---|---|---|---|---|---|---|"]
        for r in sorted(dis, key=lambda r: (r["kind"], r["group"], r["name"])):
            ex = explain(r)
            lines.append(f"| {_md_escape(r['name'][:90])} | {'on' if r['x64'] else 'off'} | {r['jax']} | {r['jgc']} | "
                         f"{r['kind']} | {_md_escape(r.get('arbiter_msg', ''))} | {_md_escape(ex)} |")
    else:
        lines.append("None.")
    runs = [r for r in recs.values() if r.get("kept") and r["jgc"] in ("error", "timeout")
            and r["jax"] in ("pass", "fail")]
    lines += ["", "## jgc errors where JAX's checker gives a verdict", ""]
    if runs:
        lines += ["| harness | x64 | JAX | jgc's error | JAX's checker, one mode at a time | explanation |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(runs, key=lambda r: (r["group"], r["name"])):
            alone = ", ".join(f"{m}: {r[f'jax_{m}_alone']}" for m in ("fwd", "rev") if f"jax_{m}_alone" in r)
            same = any(r.get(f"jax_{m}_alone") == "error" and r[f"jax_{m}_alone_msg"].split(":")[0]
                       == r["jgc_msg"].split(":")[0] for m in ("fwd", "rev"))
            ex = ("JAX's checker raises the same error in the mode it did not reach: it stopped at "
                  "its own failure of the other mode first" if same else "not yet explained: read the case")
            lines.append(f"| {_md_escape(r['name'][:90])} | {'on' if r['x64'] else 'off'} | {r['jax']} | "
                         f"{_md_escape(r['jgc_msg'][:160])} | {alone or 'not probed'} | {ex} |")
    else:
        lines.append("None.")
    errs = [r for r in recs.values() if r.get("kept") and (r["jgc"] in ("error", "timeout") or r["jax"] in ("error", "timeout"))]
    lines += ["", "## Errors and timeouts", ""]
    if errs:
        lines += ["| harness | x64 | JAX | jgc | message |", "|---|---|---|---|---|"]
        for r in sorted(errs, key=lambda r: (r["group"], r["name"])):
            m = r["jgc_msg"] if r["jgc"] in ("error", "timeout") else r["jax_msg"]
            lines.append(f"| {_md_escape(r['name'][:90])} | {'on' if r['x64'] else 'off'} | {r['jax']} | {r['jgc']} | {_md_escape(m[:200])} |")
    else:
        lines.append("None.")
    MD.write_text("\n".join(lines) + "\n")
    print("wrote", MD)


# Explanations of disagreements, written after reading the cases: (group or None for
# any, kind or None for any, extra condition, text). The first rule that applies wins.
CASE_RULES = [
    ("stop_gradient", None, None,
     ("stop_gradient's derivative is zero by definition, not f's: jgc reports that as a mismatch, as it "
     "should for code that did not mean it; JAX's float16 tolerance (1e-2 × size = 4 here) passes anything")),
    ("tan", "bug jgc misses", None,
     ("not a bug: the arbiter's own five-point difference (relative error 5e-5) is limited next to tan's "
     "poles, where |f⁽⁵⁾| is huge; jax.jvp's sec² is exact there. JAX's failure is float16 rounding "
     "(see the float16 rows)")),
    ("bitcast_convert_type", None, lambda r: r["jgc"] == "fail",
     ("jgc right: JAX defines bitcast's derivative as zero, but reading float16 bits as another 16-bit "
     "float is piecewise linear with a non-zero slope (float16 to float16 is the identity). f computes "
     "something else in float64 (the arbiter cannot widen it), so jgc checks at float16; JAX's float16 "
     "tolerance (× size) passes it")),
    ("sign", "bug JAX misses", None,
     ("jgc right: for complex z, sign(z) = z/|z| moves along the unit circle, but JAX's rule for sign is "
     "zero; JAX's checker passes it in complex128, and fails it in complex64 (both fail there)")),
    ("svd", "bug jgc misses", None,
     ("not a bug: LAPACK picks each singular vector's sign afresh, and at the arbiter's step 1e-4 one of "
     "them flips (29×29: raw differences off by 2.5e3; with signs aligned they agree with jax.jvp to "
     "3e-7, and to 4e-9 at step 1e-6). jgc's steps are smaller; JAX's failure is its float32 step")),
    ("lgamma", "bug jgc misses", None,
     ("not a bug: JAX's derivative equals scipy's digamma to 6e-14 at every input; one input lies 6.5e-4 "
     "from a pole of Γ, inside the arbiter's steps (≥ 1e-5·max|x|, five-point), not inside jgc's "
     "per-element steps")),
    (None, "undecided", lambda r: "arbiter raised TypeError" in r.get("arbiter_msg", "") and "float16" in r["dtype"],
     ("f accepts float16 only (a float16 init value or preferred type of its own), so no float64 arbiter "
     "exists; JAX's failure is its eps below float16's resolution; jgc checks at float16 with a step "
     "sized for it (a note says so)")),
    (("reduce_precision", "convert_element_type"), "bug jgc misses", None,
     ("not a bug: a rounding op is a staircase (slope 0 between its steps); JAX defines its derivative as "
     "the identity (straight-through, as mixed-precision training wants). The arbiter's small steps in "
     "float64 resolve the stairs; jgc's step, sized by the measured noise of the stairs, spans many and "
     "sees their slope, 1, as JAX defines it. JAX's fixed step resolves some stairs and fails")),
    (None, "JAX false alarm", lambda r: r["jax_msg"] == "AssertionError",
     ("JAX's checker raised a bare AssertionError: its dtype check fails on integer outputs (their "
     "tangents are float0); jgc lists integer outputs as skipped")),
    (None, "JAX false alarm", lambda r: "float16" in r["dtype"], "F16_STEP"),  # float16 and bfloat16
    (None, "JAX false alarm", lambda r: "float32" in r["dtype"] or "complex64" in r["dtype"], "F32_STEP"),
    (None, "JAX false alarm", None,
     ("JAX false alarm: its fixed eps=1e-4 leaves O(eps²·|f⁽³⁾|) truncation error, beyond its float64 "
     "tolerance where third derivatives are large; jgc extrapolates (Richardson)")),
    (None, "undecided", lambda r: "non-finite" in r.get("arbiter_msg", ""),
     ("f or its derivative is not finite at the point (a pole, or inf/NaN inputs): jgc reports those "
     "elements as non-finite, failing only with strict=True; JAX compares them against its differences "
     "(inf − inf = 0, NaN == NaN)")),
    (None, "bug JAX misses", None,
     "the float64 arbiter confirms the derivative is wrong here; JAX's tolerance (× size) lets it pass"),
]


def explain(r: dict) -> str:
    """Why the two checkers disagree on record r: the first of CASE_RULES that applies."""
    from tests import test_harnesses as th

    for group, kind, cond, text in CASE_RULES:
        groups = (group,) if isinstance(group, str) else group
        if ((groups is None or r["group"] in groups) and (kind is None or r["kind"] == kind)
                and (cond is None or cond(r))):
            return {"F16_STEP": th.F16_STEP, "F32_STEP": th.F32_STEP}.get(text, text)
    return "not yet explained: read the case"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="primitive groups or name substrings")
    ap.add_argument("--limit", type=int, default=0, help="at most this many kept harnesses per setting")
    ap.add_argument("--x64", choices=("on", "off", "both"), default="both")
    ap.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT, help="seconds per checker and harness")
    ap.add_argument("--resume", action="store_true", help="keep earlier lines of harnesses.jsonl")
    ap.add_argument("--rerun-jgc", metavar="TAG", default=None,
                    help="run jgc again on every harness (JAX's outcomes are kept from harnesses.jsonl); "
                         "records carry TAG, and a run with the same TAG resumes")
    ap.add_argument("--budget", type=float, default=0.0,
                    help="wall seconds per x64 setting; stop starting harnesses after it (0: no limit)")
    ap.add_argument("--quick", action="store_true", help="20 harnesses per x64 setting (run_all --quick)")
    ap.add_argument("--report-only", metavar="COMMAND", default=None,
                    help="rewrite harnesses.md from harnesses.jsonl, naming COMMAND as the one that made it")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.quick:
        ns.limit = ns.limit or 20
    if ns.worker:
        worker(ns)
        return 0
    if ns.report_only:
        write_report(ns.report_only, 0.0)
        return 0
    RESULTS.mkdir(exist_ok=True)
    if not (ns.resume or ns.rerun_jgc) and JSONL.exists():
        JSONL.unlink()
    t = time.perf_counter()
    for x in (("on", "off") if ns.x64 == "both" else (ns.x64,)):
        cmd = [sys.executable, __file__, "--worker", "--x64", x, "--time-limit", str(ns.time_limit), "--resume",
               "--budget", str(ns.budget)]
        cmd += ["--limit", str(ns.limit)] if ns.limit else []
        cmd += ["--rerun-jgc", ns.rerun_jgc] if ns.rerun_jgc else []
        cmd += ["--only", *ns.only] if ns.only else []
        subprocess.run(cmd, check=False)
    argv_s = " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    write_report(f"python benchmarks/bench_harnesses.py {argv_s}".strip(), time.perf_counter() - t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
