"""Question: are deliberately wrong derivative rules caught and located, what does each
check cost (cost-function evaluations, seconds), and does jax.test_util.check_grads catch
the same plants?

Runs the plant table of tests/test_custom_rules.py (custom_vjp / custom_jvp / HVP
mutations and their correct twins) and the wrong op rules of tests/test_check_grads.py,
each once (every plant is a new function, so its time includes tracing and compiling:
that is what a user pays), and writes benchmarks/results/rules.md.

Run from the repository root:  python benchmarks/bench_rules.py

With ``--found`` it answers a second question instead and writes
benchmarks/results/rules_found.md: inside a whole loss, which custom rule is wrong?
Per example it gives the rules jgc.check_rules found, the calls it saw and checked, its
time, and what jgc.check alone says (the leaf) next to what check_rules says (the rule).
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


# -- which rule inside a loss is wrong (python benchmarks/bench_rules.py --found) ----------------
def found_examples():
    """(name, loss, params, args): planted and correct rules inside whole losses."""
    import jax.numpy as jnp

    from examples import find_the_wrong_rule as fw
    from tests import test_rules as tr

    p, x, y = fw.make_problem()
    out = [("examples/find_the_wrong_rule.py (rms_norm bwd drops 1/n; Pallas swish; logistic jvp)",
            fw.loss, p, (x, y))]
    out.append(("cube jvp 2x² for 3x², under jit/vmap/scan/fori/while/cond/checkpoint/nested",
                tr.everywhere(tr.make_cube(True)), jnp.array([0.5, 1.5]), ()))
    soft = tr.make_wrong_above_20()

    def scan_loss(q):
        def body(c, _):
            c = c + q
            return c, soft(c)
        return jnp.sum(jax.lax.scan(body, jnp.zeros(2), None, length=10)[1])

    out.append(("softplus jvp wrong only above 20, in a 10-step scan reaching 30", scan_loss,
                jnp.array([3.0, 2.7]), ()))
    out.append(("softplus jvp wrong only above 20, same scan staying below 10", scan_loss,
                jnp.array([1.0, 0.9]), ()))
    mul, cube = tr.make_mul(True), tr.make_cube(False)
    out.append(("two rules, custom_vjp mul wrong, custom_jvp cube right",
                lambda q: jnp.sum(cube(q)) + jnp.sum(mul(q, 2 * q)), jnp.array([0.5, 1.5]), ()))
    out.append(("Equinox filter_custom_jvp with a wrong factor, filter_custom_vjp right",
                lambda q: jnp.sum(tr.eqx_scale(q, q) + tr.eqx_tanh(q, 2.0)), jnp.array([0.5, 1.5]), ()))
    import optax

    def library(q):
        acts = jax.nn.relu(q) + jax.nn.relu6(q) + jax.nn.silu(q) + jax.nn.gelu(q) + jax.nn.softplus(q)
        ce = optax.safe_softmax_cross_entropy(q[None], jax.nn.one_hot(jnp.array([1]), 3))
        return (jnp.sum(acts) + jnp.sum(ce) + jnp.sum(optax.projections.projection_simplex(q) ** 2)
                + jnp.sum(optax.scale_gradient(q, 0.5)))

    out.append(("correct library rules: jax.nn, optax losses, projections; scale_gradient (on purpose)", library,
                jnp.array([0.5, -1.5, 2.0]), ()))
    return out


def run_found():
    rows = []
    for name, loss, params, args in found_examples():
        t = time.perf_counter()
        try:
            rep = jgc.check(loss, params, *args)
            leaves = ", ".join(lf.path for lf in rep.failing()) or "ok"
        except ValueError as e:  # jax.grad itself fails, e.g. through a while_loop
            why = "no reverse mode through while_loop" if "while_loop" in str(e) else str(e)[:60]
            leaves = f"cannot run: {type(e).__name__}, {why}"
        t_check = time.perf_counter() - t
        t = time.perf_counter()
        rr = jgc.check_rules(loss, params, *args)
        t_rules = time.perf_counter() - t
        named = "; ".join(f"{r.name} ({Path(r.primal_at).name})" for r in rr.failing()) or "none wrong"
        others = {}
        for r in rr.rules:
            if r.ok:
                others[r.status] = others.get(r.status, 0) + 1
        rest = ", ".join(f"{v} {k}" for k, v in sorted(others.items()))
        rows.append((name, len(rr.rules), sum(r.calls for r in rr.rules), sum(r.checked for r in rr.rules),
                     leaves, t_check, named, rest, t_rules))
    return rows


def main_found(path=ROOT / "benchmarks" / "results" / "rules_found.md"):
    rows = run_found()
    lines = [
        "# Which custom rule inside the loss is wrong? jgc.check names the leaf, jgc.check_rules the rule",
        "",
        (f"Command: `python benchmarks/bench_rules.py --found` · jax {jax.__version__} · device "
         f"{jax.devices()[0].device_kind} ({jax.default_backend()}) · {os.cpu_count()} CPU cores · "
         f"Python {platform.python_version()} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"),
        "",
        "Each row is a new loss (its time includes tracing and XLA compilation). Calls: seen in the",
        "loss / checked (per call site the first three and the one with the largest input).",
        "",
        "| loss | rules found | calls seen / checked | jgc.check says | s | jgc.check_rules names | other rules | s |",
        "|---|---:|---:|---|---:|---|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} / {r[3]} | {r[4]} | {r[5]:.1f} | {r[6]} | {r[7]} | {r[8]:.1f} |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    if "--found" in sys.argv[1:]:
        main_found()
    else:
        main()
