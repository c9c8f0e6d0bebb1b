"""Question: on realistic gradients, who cries wolf and who misses bugs?

Runs every model of the zoo (tests/zoo.py: hand-written backprop for an MLP, layer
norm, batch norm, attention, an RNN with BPTT, an implicit layer, a confident softmax,
a saturated tanh layer, a ReLU network, mixed parameter scales 1e4/1e-6, a float64
model whose forward runs in float32), in float32 and float64, through four checkers:

* jgc.check (default options; float32 is evaluated in float64),
* jgc.check(precision="native") (float32 stays float32: the TPU situation),
* the course's recipe: two-sided differences with ε = 1e-4 in the parameters' dtype and
  the normwise test ‖a − n‖ / ‖a + n‖ < 1e-9,
* jax.test_util.check_grads(order=1, modes=["rev"]) on a custom_vjp wrapper whose
  backward is the hand-written gradient (its default eps and tolerances),
* torch.autograd.gradcheck (default eps=1e-6, atol=1e-5, rtol=1e-3), slow mode, on a
  torch.autograd.Function whose backward is the hand-written gradient.

Scenarios: the correct gradient (a failure is a false alarm), every planted bug, and one
element corrupted by a relative 1e-6 (float64) or 1e-2 (float32). A bug counts as caught
when the checker fails; jgc must also name the leaf (and the index for single elements).

Run: python benchmarks/bench_verdicts.py  (writes benchmarks/results/verdicts.md)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import jgc  # noqa: E402
import zoo  # noqa: E402


def course_check(case, grad_fn, dtype):
    """The lecture's recipe: ε = 1e-4, two-sided differences, normwise < 1e-9."""
    flat, unravel = ravel_pytree(case.params)
    cost = jax.jit(lambda v: case.cost(unravel(v), *case.args))
    eps = 1e-4
    eye = jnp.eye(flat.size, dtype=flat.dtype) * eps
    num = (jax.vmap(cost)(flat + eye) - jax.vmap(cost)(flat - eye)) / (2 * eps)
    ana, _ = ravel_pytree(grad_fn(case.params, *case.args))
    num, ana = np.asarray(num, np.float64), np.asarray(ana, np.float64)
    return float(np.linalg.norm(ana - num) / np.linalg.norm(ana + num)) < 1e-9


def jax_check_grads(case, grad_fn):
    """jax.test_util.check_grads on a custom_vjp whose backward is the hand gradient."""
    from jax.test_util import check_grads

    @jax.custom_vjp
    def f(p):
        return case.cost(p, *case.args)

    def fwd(p):
        return f(p), p

    def bwd(p, ct):
        return (jax.tree_util.tree_map(lambda g: ct * g, grad_fn(p, *case.args)),)

    f.defvjp(fwd, bwd)
    try:
        check_grads(f, (case.params,), order=1, modes=["rev"])
        return True
    except AssertionError:
        return False


def torch_gradcheck(case, grad_fn, fast=False):
    import torch

    flat, unravel = ravel_pytree(case.params)
    cost = jax.jit(lambda v: case.cost(unravel(v), *case.args))
    gflat = jax.jit(lambda v: ravel_pytree(grad_fn(unravel(v), *case.args))[0])
    dt = np.asarray(flat).dtype

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.as_tensor(np.asarray(cost(jnp.asarray(x.detach().numpy()))))

        @staticmethod
        def backward(ctx, ct):
            (x,) = ctx.saved_tensors
            g = torch.as_tensor(np.asarray(gflat(jnp.asarray(x.detach().numpy())))).to(ct.dtype)
            return ct * g

    x = torch.tensor(np.asarray(flat, dt), requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(torch.autograd.gradcheck(Fn.apply, (x,), raise_exception=False, fast_mode=fast))


def jgc_verdict(case, grad_fn, precision, bug=None):
    rep = jgc.check(case.cost, case.params, *case.args, grad=grad_fn, precision=precision)
    located = None
    if bug is not None and not rep.ok:
        paths = [lf.path for lf in rep.failing()]
        located = bug.leaf in paths
        if bug.index is not None and located:
            located = rep.leaf(bug.leaf).elements("mismatch") == [bug.index]
    return rep.ok, located, rep.evaluations, rep.seconds, rep.counts()["inconclusive"]


def scenarios(case, dtype):
    yield "correct", case.grad, None
    for name, bug in case.bugs.items():
        yield name, bug.grad, bug
    leaf = next(iter(case.params))
    rel = 1e-6 if dtype == "float64" else 1e-2
    with jax.enable_x64(dtype == "float64"):
        bug = zoo.single_element_bug(case, leaf, rel)
    yield f"one element of {leaf} off by {rel:g}", bug.grad, bug


def run(quick: bool):
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    rows = []
    makers = zoo.MAKERS[:3] if quick else zoo.MAKERS
    for dtype in ("float64", "float32"):
        for make in makers:
            with jax.enable_x64(dtype == "float64"):
                case = make(jnp.dtype(dtype))
            for name, grad_fn, bug in scenarios(case, dtype):
                with jax.enable_x64(dtype == "float64"):
                    r = {"model": case.name, "dtype": dtype, "scenario": name, "bug": bug is not None}
                    r["course"] = course_check(case, grad_fn, dtype)
                    r["check_grads"] = jax_check_grads(case, grad_fn)
                    if have_torch:
                        r["torch"] = torch_gradcheck(case, grad_fn)
                        r["torch_fast"] = torch_gradcheck(case, grad_fn, fast=True)
                ok, loc, ev, sec, inc = jgc_verdict(case, grad_fn, "auto", bug)
                r.update(jgc=ok, jgc_located=loc, jgc_evals=ev, jgc_seconds=sec, jgc_inconclusive=inc)
                if dtype == "float32":
                    ok, loc, _, _, inc = jgc_verdict(case, grad_fn, "native", bug)
                    r.update(jgc_native=ok, jgc_native_located=loc, jgc_native_inconclusive=inc)
                rows.append(r)
                print(r, flush=True)
    return rows, have_torch


TOOLS = [("jgc", "jgc.check (default)"), ("jgc_native", "jgc.check native float32"),
         ("course", "course ε=1e-4, norm<1e-9"), ("check_grads", "jax check_grads"),
         ("torch", "torch gradcheck"), ("torch_fast", "torch gradcheck fast")]


def summarise(rows, have_torch, cmd, seconds):
    lines = ["# Verdicts: false alarms and bugs caught on realistic gradients", ""]
    lines.append(f"Command: `{cmd}` — {seconds:.0f} s. Machine: {platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores, Python {platform.python_version()}, jax {jax.__version__}, "
                 f"backend {jax.default_backend()}.")
    if not have_torch:
        lines.append("torch was not installed: its columns are missing.")
    lines.append("")
    lines.append("| checker | dtype | false alarms (correct gradients) | bugs caught | bugs located (leaf, and index for single elements) |")
    lines.append("|---|---|---|---|---|")
    for key, label in TOOLS:
        for dtype in ("float64", "float32"):
            sub = [r for r in rows if r["dtype"] == dtype and key in r]
            if not sub:
                continue
            good = [r for r in sub if not r["bug"]]
            bad = [r for r in sub if r["bug"]]
            fa = sum(not r[key] for r in good)
            caught = sum(not r[key] for r in bad)
            loc = ""
            if key.startswith("jgc"):
                loc = str(sum(bool(r.get(f"{key}_located")) for r in bad)) + f"/{len(bad)}"
            lines.append(f"| {label} | {dtype} | {fa}/{len(good)} | {caught}/{len(bad)} | {loc or 'cannot locate'} |")
    lines.append("")
    lines.append("Misses of jgc (default), with the reason its report gives (the `detect` column):")
    for r in rows:
        if r["bug"] and r["jgc"]:
            lines.append(f"- {r['model']} {r['dtype']}: {r['scenario']}")
    lines.append("")
    lines.append("Every scenario (✓ = the checker passed the gradient, ✗ = it failed it; `jgc inc`: "
                 "elements jgc (default / native) called inconclusive, which fail only under strict=True):")
    lines.append("")
    keys = [k for k, _ in TOOLS if any(k in r for r in rows)]
    lines.append("| model | dtype | scenario | " + " | ".join(keys) + " | jgc inc | jgc evals | jgc s |")
    lines.append("|---|---|---|" + "---|" * len(keys) + "---|---|---|")
    for r in rows:
        cells = ["✓" if r.get(k) else ("✗" if k in r else "") for k in keys]
        inc = str(r.get("jgc_inconclusive", "")) + (f" / {r['jgc_native_inconclusive']}"
                                                    if "jgc_native_inconclusive" in r else "")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['scenario']} | " + " | ".join(cells)
                     + f" | {inc} | {r['jgc_evals']} | {r['jgc_seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three models only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "verdicts.md"))
    ns = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows, have_torch = run(ns.quick)
    cmd = "python benchmarks/bench_verdicts.py" + (" --quick" if ns.quick else "")
    text = summarise(rows, have_torch, cmd, time.perf_counter() - t0)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
