"""Question: can jgc check research-size models (10⁷–10⁸ parameters) on a small machine?

Four float32 models, built with Equinox:

* ``mlp``: the 2-layer tanh MLP of 9.3M parameters (3000 → 3000 → 100, batch 32);
* ``mlp50``: the same MLP at 49.7M parameters (7000 → 7000 → 100, batch 32);
* ``resnet``: a ResNet-50-shaped CNN (bottleneck stages 3-4-6-3, widths 256 … 2048,
  ≈25.6M parameters, no normalisation layers), on 2 images of 32×32;
* ``gpt2``: a GPT-2-small-shaped transformer (12 blocks, d = 768, 12 heads, vocabulary
  50257 with tied embeddings, 1024 positions: ≈124M parameters), on 1 sequence of 8
  tokens.

Every dense and convolution layer runs through a ``jax.custom_vjp`` (its backward pass
is ``jax.vjp`` of the layer). For each model, each in a fresh subprocess so that peak
memories are separate:

* ``check_grads``: ``jax.test_util.check_grads(order=1, modes=("rev",))``;
* ``directional``: ``jgc.check(..., mode="directional")``;
* ``default``: ``jgc.check(...)`` with no mode (full mode only when it fits a minute);
* ``planted``: directional again, with one layer's custom_vjp returning its weight's
  cotangent 1% too large: the check must fail and name that layer's weight.

Each subprocess also times one jitted evaluation of the loss in float32 and in float64
(the check evaluates in float64); "floor" is the check's evaluations × one float64
evaluation. Peak memory is the subprocess's peak resident set (``ru_maxrss``).

Run:  python benchmarks/bench_big.py [--cases mlp mlp50 resnet gpt2] [--runs ...] [--timeout 900]
      [--locate N]  (the planted run's locate=: fewer elements isolated, a shorter run)
Appends each row to benchmarks/results/big.jsonl (``--fresh`` starts it again) and writes
benchmarks/results/big.md from the last row of each model and run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = ("check_grads", "directional", "default", "planted")
CASES = ("mlp", "mlp50", "resnet", "gpt2")


# ---------------------------------------------------------------- models ----
def _models():
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    def scaled_vjp(f, scale):
        """f(x, w) with a custom_vjp whose w-cotangent is multiplied by ``scale``."""

        @jax.custom_vjp
        def g(x, w):
            return f(x, w)

        def fwd(x, w):
            y, pull = jax.vjp(f, x, w)
            return y, pull

        def bwd(pull, ct):
            dx, dw = pull(ct)
            return dx, dw * scale if scale != 1.0 else dw

        g.defvjp(fwd, bwd)
        return g

    def matmul(x, w):
        return x @ w

    def conv(x, w, stride=1):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    class Dense(eqx.Module):
        weight: jax.Array
        bias: jax.Array
        scale: float = eqx.field(static=True, default=1.0)

        def __init__(self, key, din, dout, scale=1.0, std=None):
            std = (1.0 / din) ** 0.5 if std is None else std
            self.weight = jax.random.normal(key, (din, dout), jnp.float32) * std
            self.bias = jnp.zeros(dout, jnp.float32)
            self.scale = scale

        def __call__(self, x):
            return scaled_vjp(matmul, self.scale)(x, self.weight) + self.bias

    class Conv(eqx.Module):
        weight: jax.Array
        stride: int = eqx.field(static=True)
        scale: float = eqx.field(static=True, default=1.0)

        def __init__(self, key, k, cin, cout, stride=1, scale=1.0, gain=1.0):
            self.weight = jax.random.normal(key, (k, k, cin, cout), jnp.float32) * gain * (2.0 / (k * k * cin)) ** 0.5
            self.stride, self.scale = stride, scale

        def __call__(self, x):
            return scaled_vjp(lambda a, w: conv(a, w, self.stride), self.scale)(x, self.weight)

    class LayerNorm(eqx.Module):
        gamma: jax.Array
        beta: jax.Array

        def __init__(self, d):
            self.gamma, self.beta = jnp.ones(d, jnp.float32), jnp.zeros(d, jnp.float32)

        def __call__(self, x):
            m = x.mean(-1, keepdims=True)
            v = ((x - m) ** 2).mean(-1, keepdims=True)
            return (x - m) / jnp.sqrt(v + 1e-5) * self.gamma + self.beta

    # ---- the 9.3M MLP
    class MLP(eqx.Module):
        l1: Dense
        l2: Dense

        def __init__(self, key, width, bad=None):
            k1, k2 = jax.random.split(key)
            self.l1 = Dense(k1, width, width, scale=1.01 if bad == "l1" else 1.0)
            self.l2 = Dense(k2, width, 100, scale=1.01 if bad == "l2" else 1.0)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    def mlp_of(width):
        def case(bad):
            k = jax.random.split(jax.random.key(0), 3)
            model = MLP(k[0], width, "l1" if bad else None)
            x = jax.random.normal(k[1], (32, width), jnp.float32)
            y = jax.random.normal(k[2], (32, 100), jnp.float32)

            def loss(m, x, y):
                return jnp.mean((m(x) - y) ** 2)

            return loss, model, (x, y), ".l1.weight"

        return case

    # ---- ResNet-50-shaped CNN
    class Bottleneck(eqx.Module):
        c1: Conv
        c2: Conv
        c3: Conv
        proj: Conv | None

        def __init__(self, key, cin, width, cout, stride, scale=1.0):
            k = jax.random.split(key, 4)
            self.c1 = Conv(k[0], 1, cin, width)
            self.c2 = Conv(k[1], 3, width, width, stride, scale=scale)
            self.c3 = Conv(k[2], 1, width, cout, gain=0.2)
            self.proj = Conv(k[3], 1, cin, cout, stride) if (cin != cout or stride != 1) else None

        def __call__(self, x):
            h = jax.nn.relu(self.c1(x))
            h = jax.nn.relu(self.c2(h))
            h = self.c3(h)
            return jax.nn.relu(h + (self.proj(x) if self.proj is not None else x))

    class ResNet(eqx.Module):
        stem: Conv
        blocks: list
        fc: Dense

        def __init__(self, key, bad=None):
            keys = iter(jax.random.split(key, 40))
            self.stem = Conv(next(keys), 7, 3, 64, 2)
            blocks, cin = [], 64
            for stage, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
                for j in range(n):
                    stride = 2 if (j == 0 and stage > 0) else 1
                    scale = 1.01 if bad == (stage, j) else 1.0
                    blocks.append(Bottleneck(next(keys), cin, width, 4 * width, stride, scale))
                    cin = 4 * width
            self.blocks = blocks
            self.fc = Dense(next(keys), cin, 1000)

        def __call__(self, x):
            h = jax.nn.relu(self.stem(x))
            for b in self.blocks:
                h = b(h)
            return self.fc(h.mean((1, 2)))

    def resnet_case(bad):
        k = jax.random.split(jax.random.key(1), 3)
        model = ResNet(k[0], (2, 3) if bad else None)
        x = jax.random.normal(k[1], (2, 32, 32, 3), jnp.float32)
        labels = jnp.array([3, 7])

        def loss(m, x, labels):
            logits = m(x)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(labels.size), labels])

        return loss, model, (x, labels), ".blocks[9].c2.weight"

    # ---- GPT-2-small-shaped transformer
    D, H, L, V, P = 768, 12, 12, 50257, 1024

    class Block(eqx.Module):
        ln1: LayerNorm
        qkv: Dense
        proj: Dense
        ln2: LayerNorm
        fc: Dense
        out: Dense

        def __init__(self, key, scale=1.0):
            k = jax.random.split(key, 4)
            self.ln1, self.ln2 = LayerNorm(D), LayerNorm(D)
            self.qkv = Dense(k[0], D, 3 * D, std=0.02)
            self.proj = Dense(k[1], D, D, std=0.02 / (2 * L) ** 0.5)
            self.fc = Dense(k[2], D, 4 * D, std=0.02, scale=scale)
            self.out = Dense(k[3], 4 * D, D, std=0.02 / (2 * L) ** 0.5)

        def __call__(self, x):
            T = x.shape[0]
            q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
            q, k, v = (a.reshape(T, H, D // H).transpose(1, 0, 2) for a in (q, k, v))
            att = q @ k.transpose(0, 2, 1) / (D // H) ** 0.5
            att = jnp.where(jnp.tril(jnp.ones((T, T), bool)), att, -1e9)
            y = (jax.nn.softmax(att, -1) @ v).transpose(1, 0, 2).reshape(T, D)
            x = x + self.proj(y)
            return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))

    class GPT(eqx.Module):
        wte: jax.Array
        wpe: jax.Array
        blocks: list
        ln_f: LayerNorm

        def __init__(self, key, bad=None):
            k = jax.random.split(key, L + 2)
            self.wte = jax.random.normal(k[0], (V, D), jnp.float32) * 0.02
            self.wpe = jax.random.normal(k[1], (P, D), jnp.float32) * 0.01
            self.blocks = [Block(k[2 + i], 1.01 if bad == i else 1.0) for i in range(L)]
            self.ln_f = LayerNorm(D)

        def __call__(self, tokens):
            x = self.wte[tokens] + self.wpe[: tokens.size]
            for b in self.blocks:
                x = b(x)
            return self.ln_f(x) @ self.wte.T

    def gpt2_case(bad):
        k = jax.random.split(jax.random.key(2), 2)
        model = GPT(k[0], 5 if bad else None)
        tokens = jax.random.randint(k[1], (9,), 0, V)

        def loss(m, tokens):
            logits = m(tokens[:-1])
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(tokens.size - 1), tokens[1:]])

        return loss, model, (tokens,), ".blocks[5].fc.weight"

    return {"mlp": mlp_of(3000), "mlp50": mlp_of(7000), "resnet": resnet_case, "gpt2": gpt2_case}


# ------------------------------------------------------------ one run -------
def _time_eval(loss, params, args, x64):
    import jax
    import jax.numpy as jnp

    import jgc  # noqa: F401

    def widen(t):
        return jax.tree_util.tree_map(
            lambda a: a.astype(jnp.float64) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) else a, t)

    with jax.enable_x64(x64):
        p, a = (widen(params), widen(args)) if x64 else (params, args)
        f = jax.jit(loss)
        jax.block_until_ready(f(p, *a))
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(f(p, *a))
            best = min(best, time.perf_counter() - t)
    return best


def child(case, run, locate=None):
    import equinox as eqx
    import jax

    import jgc

    loss, params, args, bad_path = _models()[case](run == "planted")
    n = sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(params, eqx.is_inexact_array)))
    out = {"case": case, "run": run, "n": int(n)}
    t0 = time.perf_counter()
    if run == "check_grads":
        from jax.test_util import check_grads

        try:
            check_grads(lambda p: loss(p, *args), (params,), order=1, modes=("rev",))
            out["ok"] = True
        except AssertionError as e:  # its float32 finite differences on a correct model
            out["ok"] = False
            out["error_text"] = str(e).strip().splitlines()[-3:]
    else:
        kw = {} if run == "default" else {"mode": "directional"}
        if run == "planted" and locate is not None:
            kw["locate"] = locate
            out["options"] = f"locate={locate}"
        rep = jgc.check(loss, params, *args, **kw)
        out.update(ok=rep.ok, evaluations=rep.evaluations, mode=rep.mode,
                   failing=[lf.path for lf in rep.failing()], head=str(rep).splitlines()[0],
                   report=str(rep))
        if run == "planted":
            out["named"] = bad_path in out["failing"]
    out["seconds"] = time.perf_counter() - t0
    out["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["eval32_s"] = _time_eval(loss, params, args, False)
    out["eval64_s"] = _time_eval(loss, params, args, True)
    print("RESULT " + json.dumps(out))


# ------------------------------------------------------------- driver -------
def machine() -> str:
    import jax

    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        mem = "RAM unknown"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem}; "
            f"Python {platform.python_version()}, JAX {jax.__version__}, {jax.default_backend()}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--runs", nargs="+", default=list(RUNS))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per subprocess")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "RUN"))
    ap.add_argument("--locate", type=int, help="wrong elements the planted run isolates (jgc.check's "
                    "locate=; 0 names the failing layer from its screens alone)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "big.md"))
    ap.add_argument("--fresh", action="store_true", help="forget rows of earlier runs (big.jsonl)")
    ap.add_argument("--write-only", action="store_true", help="write big.md from big.jsonl, run nothing")
    a = ap.parse_args()
    if a.child:
        child(*a.child, locate=a.locate)
        return
    store = Path(a.out).with_suffix(".jsonl")
    if a.fresh and store.exists():
        store.unlink()
    for case in [] if a.write_only else a.cases:
        for run in a.runs:
            t = time.perf_counter()
            try:
                extra = ["--locate", str(a.locate)] if a.locate is not None and run == "planted" else []
                p = subprocess.run([sys.executable, __file__, "--child", case, run, *extra], capture_output=True,
                                   text=True, timeout=a.timeout, env=dict(os.environ, JGC_PROGRESS="0"))
                lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                r = json.loads(lines[-1][7:]) if lines else {"case": case, "run": run,
                                                             "error": (p.stderr or p.stdout)[-800:]}
            except subprocess.TimeoutExpired:
                r = {"case": case, "run": run, "error": f"did not finish in {a.timeout:.0f} s"}
            r["wall_s"] = time.perf_counter() - t
            r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            r["load"] = os.getloadavg()[0]  # the machine's 1-minute load when the row ended
            r["command"] = "python benchmarks/bench_big.py " + " ".join(sys.argv[1:])
            print(json.dumps({k: v for k, v in r.items() if k != "report"}), flush=True)
            with store.open("a") as f:
                f.write(json.dumps(r) + "\n")
    # Rows of every invocation so far (the last of each model and run), in a fixed order.
    last = {}
    for line in store.read_text().splitlines():
        r = json.loads(line)
        last[r["case"], r["run"]] = r
    rows = [last[c, r] for c in CASES for r in RUNS if (c, r) in last]
    write(rows, a)


def _when(r) -> str:
    if "date" not in r:
        return "by 2026-12-07 15:28 UTC"
    return r["date"] + (f" (load {r['load']:.1f})" if "load" in r else "")


def write(rows, a):
    cg = {r["case"]: r for r in rows if r["run"] == "check_grads" and "seconds" in r}
    lines = [
        "# jgc on research-size models",
        "",
        f"Machine: {machine()}.",
        "",
        "Commands (each row says which made it): "
        + ", ".join(f"`{c}`" for c in dict.fromkeys(r.get("command", "") for r in rows)) + ".",
        "",
        "Each row is a fresh subprocess: time of the check (set-up and compilation included), "
        "its peak resident memory, its cost evaluations, one jitted evaluation of the loss "
        "(float32 as given, float64 as the check evaluates), and the floor: evaluations × one "
        "float64 evaluation. `check_grads` is `jax.test_util.check_grads(order=1, "
        "modes=(\"rev\",))` on the same model.",
        "",
        "Rows of earlier invocations stay until a model and run is measured again; `measured` "
        "gives each row's time and the machine's load average then (rows before 2026-12-07 "
        "15:28 UTC carry neither).",
        "",
        "| model | params | run | verdict | time | × check_grads | peak memory | evaluations | eval f32 | eval f64 | floor | measured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | {r['run']} | **did not complete**: {r['error'][-200:]!r} "
                         f"| | | | | | | | {_when(r)} |")
            continue
        base = cg.get(r["case"])
        ratio = f"{r['seconds'] / base['seconds']:.1f}×" if base and r["run"] != "check_grads" else ""
        ev = r.get("evaluations")
        if r["run"] == "check_grads":
            verdict = "passes" if r["ok"] else "**fails** (false alarm: the model is correct)"
        elif r["run"] == "planted":
            verdict = ("fails, names " + ", ".join(f"`{p}`" for p in r["failing"])) if not r["ok"] else \
                "**passes: missed**"
            if r.get("options"):
                verdict += f" ({r['options']})"
        else:
            verdict = ("PASS" if r["ok"] else "FAIL") + f" ({r['mode']})"
        floor = f"{ev * r['eval64_s']:.1f} s" if ev else ""
        lines.append(
            f"| {r['case']} | {r['n'] / 1e6:.1f}M | {r['run']} | {verdict} | {r['seconds']:.1f} s | {ratio} | "
            f"{r['peak_gib']:.2f} GiB | {ev or ''} | {r['eval32_s'] * 1e3:.1f} ms | {r['eval64_s'] * 1e3:.1f} ms | "
            f"{floor} | {_when(r)} |")
    lines += [
        "",
        "Reading the table:",
        "",
        "- `jax.test_util.check_grads` raised on the correct float32 models "
        + ", ".join(c for c, r in cg.items() if not r["ok"])
        + " (passed: " + (", ".join(c for c, r in cg.items() if r["ok"]) or "none") + "): its own "
        "finite differences in float32 disagree with the VJP by 1.3–4.8% (its tolerance is "
        "2e-3). jgc evaluates the reference in float64 and passes them.",
        "- A planted run marked `locate=N` isolated at most N wrong elements (jgc.check's "
        "`locate=`; the default is 4); with `locate=0` the layer is named from its screens "
        "alone.",
        "- The machine is shared: other processes (a second developer's test runs, and for "
        "some rows this repository's test suite) ran on the same 2 cores, so times vary by "
        "up to 2× between rows; a ratio to check_grads compares rows of one invocation only "
        "roughly.",
        "- The float64 evaluation of a perturbed point costs more than the `eval f64` column: "
        "the perturbed copy of every parameter (θ + t·v, 8 bytes each) is written and read "
        "again, which on the 124M model is 1 GiB per evaluation.",
    ]
    lines += ["", "First line of each jgc report:", ""]
    for r in rows:
        if "head" in r:
            lines.append(f"- {r['case']} / {r['run']}: `{r['head']}`")
    for r in rows:
        if r.get("run") == "planted" and "report" in r:
            lines += ["", f"Report of the planted error in {r['case']}:", "", "```", r["report"], "```"]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
