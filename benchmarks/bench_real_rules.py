"""Question: on small losses built with libraries nobody here wrote, does jgc.check_rules
stay quiet where a rule is right, and what does it report for each rule it finds?

Each case is a small float64 loss on jax.nn / jax.scipy / jax.numpy.linalg, optax,
Equinox, lineax, optimistix, diffrax, jaxopt, TensorFlow Probability's JAX substrate,
distrax, or a primitive made here with its own JVP rule. Per case it gives the rules
found (custom_jvp / custom_vjp rules and the JVP and transpose rules registered on
primitives defined outside JAX), how many call sites were checked, the count of each
status, whether ``.ok`` holds (every case is built from correct library code unless its
name says "planted" or "a library bug"; those must fail), and the time. Below the
table, each rule that is wrong or approximate is listed with its worst element or its
measured error next to the tolerance. A library that is not installed skips its cases
(the table says so).

Run from the repository root:  python benchmarks/bench_real_rules.py  (writes
benchmarks/results/real_rules.md; ``--only NAME`` runs the cases whose name holds NAME
and prints their reports).
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import importlib.util
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import jgc  # noqa: E402

CASES = []
PLANTS_TO_UNDO = []  # a case that patches a library restores it after its check


def case(name, needs=(), planted=False):
    def deco(make):
        CASES.append((name, needs, planted, make))
        return make
    return deco


def patches_library(name):
    """Cases that patch a library's rule run last: its compiled programs may keep the patch."""
    return "planted" in name and "error in" in name


def have(mod):
    return importlib.util.find_spec(mod) is not None


# -- jax itself ---------------------------------------------------------------------------------
X = jnp.array([0.3, -1.2, 2.0, 0.7])


@case("jax.nn.softmax with where")
def _():
    mask = jnp.array([True, True, False, True])
    return lambda x: jnp.sum(jax.nn.softmax(x, where=mask) * jnp.arange(4.0)), X


@case("jax.nn relu, gelu, silu, logsumexp")
def _():
    return lambda x: jnp.sum(jax.nn.relu(x) + jax.nn.gelu(x) + jax.nn.silu(x)) + jax.nn.logsumexp(x), X


@case("jnp.linalg det, slogdet, pinv")
def _():
    a = jnp.array([[2.0, 0.3, 0.1], [0.2, 1.5, -0.4], [0.0, 0.6, 1.1]])
    return lambda m: jnp.linalg.det(m) + jnp.linalg.slogdet(m)[1] + jnp.sum(jnp.linalg.pinv(m)), a


@case("jax.scipy.special xlogy, xlog1py, entr, logsumexp")
def _():
    from jax.scipy import special as sp
    x = jnp.array([0.3, 1.2, 2.0, 0.7])
    return lambda x: jnp.sum(sp.xlogy(x, x + 1) + sp.xlog1py(x, x) + sp.entr(x)) + sp.logsumexp(x), x


@case("jnp.clip with infinite bound, sinc, logaddexp")
def _():
    return lambda x: jnp.sum(jnp.clip(x, -jnp.inf, 1.0) ** 2 + jnp.sinc(x) + jnp.logaddexp(x, 0.5 * x)), X


@case("custom_jvp called with a -inf bound, correct")
def _():
    @jax.custom_jvp
    def soft_clip(x, lo):
        return jnp.where(x > lo, jnp.tanh(x), lo)

    soft_clip.defjvp(lambda p, t: (soft_clip(*p), jnp.where(p[0] > p[1], (1 - jnp.tanh(p[0]) ** 2), 0.0) * t[0]))
    return lambda x: jnp.sum(soft_clip(x, -jnp.inf)), X


@case("custom_jvp called with a -inf bound, planted 1% error", planted=True)
def _():
    @jax.custom_jvp
    def soft_clip_bad(x, lo):
        return jnp.where(x > lo, jnp.tanh(x), lo)

    soft_clip_bad.defjvp(lambda p, t: (soft_clip_bad(*p),
                                       1.01 * jnp.where(p[0] > p[1], (1 - jnp.tanh(p[0]) ** 2), 0.0) * t[0]))
    return lambda x: jnp.sum(soft_clip_bad(x, -jnp.inf)), X


def _masked_lse(factor):
    @jax.custom_jvp
    def masked_lse(x):
        return jax.scipy.special.logsumexp(x)

    @masked_lse.defjvp
    def masked_lse_jvp(p, t):
        (x,), (tx,) = p, t
        return masked_lse(x), factor * jnp.sum(jax.nn.softmax(x) * jnp.where(jnp.isfinite(x), tx, 0.0))

    mask = jnp.array([True, False, True, True])
    return lambda x: masked_lse(jnp.where(mask, x, -jnp.inf)), X


@case("custom_jvp logsumexp over a -inf-masked operand, correct")
def _():
    return _masked_lse(1.0)


@case("custom_jvp logsumexp over a -inf-masked operand, planted 1% error", planted=True)
def _():
    return _masked_lse(1.01)


@case("jax.scipy.stats norm.logcdf (log_ndtr), logsumexp with b")
def _():
    from jax.scipy import special as sp
    from jax.scipy.stats import norm
    return lambda x: jnp.sum(norm.logcdf(x)) + sp.logsumexp(x, b=jnp.array([1.0, 2.0, 0.5, 1.0])), X


# -- a primitive made here, with a JVP rule registered on it ---------------------------------
def _cube_primitive(factor):
    from jax.extend.core import Primitive
    from jax.interpreters import ad, batching, mlir

    p = Primitive(f"cube_{factor}")
    p.def_impl(lambda x: x ** 3)
    p.def_abstract_eval(lambda x: x)
    mlir.register_lowering(p, mlir.lower_fun(lambda x: x ** 3, multiple_results=False))
    batching.defvectorized(p)

    def cube_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return p.bind(x), factor * 3 * x ** 2 * t

    ad.primitive_jvps[p] = cube_jvp
    return lambda x: jnp.sum(jnp.sin(p.bind(x))), X


@case("user primitive with ad.primitive_jvps rule, correct")
def _():
    return _cube_primitive(1.0)


@case("user primitive with ad.primitive_jvps rule, planted 1% error", planted=True)
def _():
    return _cube_primitive(1.01)


# -- optax --------------------------------------------------------------------------------------
@case("optax losses and safe_norm", needs=("optax",))
def _():
    import optax
    labels = jnp.array([0.0, 1.0, 0.0, 0.0])
    return lambda x: (optax.softmax_cross_entropy(x, labels) + jnp.sum(optax.huber_loss(x))
                      + optax.safe_norm(x, 1e-6)), X


@case("optax scale_gradient", needs=("optax",))
def _():
    import optax
    return lambda x: jnp.sum(optax.scale_gradient(x, 0.5) ** 2), X


# -- Equinox ------------------------------------------------------------------------------------
@case("Equinox MLP with stop-gradient markers", needs=("equinox",))
def _():
    import equinox as eqx
    mlp = eqx.nn.MLP(4, 2, 8, 2, key=jax.random.PRNGKey(0), activation=jax.nn.softplus)
    mlp = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, mlp)

    def loss(m, x):
        y = m(x)
        return jnp.sum(y ** 2) + jnp.sum(eqx.internal.nondifferentiable_backward(y))

    return loss, mlp, X


@case("Equinox filter_custom_jvp", needs=("equinox",))
def _():
    import equinox as eqx

    @eqx.filter_custom_jvp
    def softabs(x):
        return jnp.sqrt(x ** 2 + 1e-2)

    @softabs.def_jvp
    def softabs_jvp(primals, tangents):
        (x,), (tx,) = primals, tangents
        return softabs(x), x / jnp.sqrt(x ** 2 + 1e-2) * tx

    return lambda x: jnp.sum(softabs(x)), X


# -- lineax / optimistix ------------------------------------------------------------------------
A3 = jnp.array([[3.0, 0.4, 0.1], [0.4, 2.5, -0.3], [0.1, -0.3, 1.8]])


@case("lineax linear_solve LU", needs=("lineax",))
def _():
    import lineax as lx
    b = jnp.array([1.0, -0.5, 0.25])

    def loss(a):
        return jnp.sum(lx.linear_solve(lx.MatrixLinearOperator(a), b, lx.LU()).value ** 2)

    return loss, A3


@case("lineax linear_solve CG", needs=("lineax",))
def _():
    import lineax as lx
    b = jnp.array([1.0, -0.5, 0.25])

    def loss(a):
        op = lx.MatrixLinearOperator(a, lx.positive_semidefinite_tag)
        return jnp.sum(lx.linear_solve(op, b, lx.CG(rtol=1e-10, atol=1e-10)).value ** 2)

    return loss, A3


@case("lineax linear_solve LU, planted 1% error in the primitive's JVP", needs=("lineax",), planted=True)
def _():
    import lineax as lx
    import lineax._solve as solve
    from jax.interpreters import ad

    prim = solve.linear_solve_p
    right = ad.primitive_jvps[prim]

    def planted_jvp(primals, tangents, **params):
        out, t_out = right(primals, tangents, **params)
        return out, jax.tree_util.tree_map(lambda t: 1.01 * t if isinstance(t, jax.Array) else t, t_out)

    ad.primitive_jvps[prim] = planted_jvp
    PLANTS_TO_UNDO.append(lambda: ad.primitive_jvps.__setitem__(prim, right))
    b = jnp.array([1.0, -0.5, 0.25])
    return (lambda a: jnp.sum(lx.linear_solve(lx.MatrixLinearOperator(a), b, lx.LU()).value ** 2)), A3


@case("optimistix root find (Newton)", needs=("optimistix",))
def _():
    import optimistix as optx

    def loss(theta):
        sol = optx.root_find(lambda y, th: jnp.tanh(y) + y - th, optx.Newton(rtol=1e-10, atol=1e-10),
                             jnp.zeros(3), args=theta)
        return jnp.sum(sol.value ** 2)

    return loss, jnp.array([0.5, -0.2, 1.0])


@case("optimistix minimise (BFGS)", needs=("optimistix",))
def _():
    import optimistix as optx

    def loss(theta):
        sol = optx.minimise(lambda y, th: jnp.sum((y - th) ** 2) + 0.1 * jnp.sum(y ** 4), optx.BFGS(1e-10, 1e-10),
                            jnp.zeros(3), args=theta)
        return jnp.sum(sol.value ** 2)

    return loss, jnp.array([0.5, -0.2, 1.0])


# -- diffrax ------------------------------------------------------------------------------------
def _ode_loss(adjoint, scale=1.0, dt=0.1):
    import diffrax

    def loss(k):
        term = diffrax.ODETerm(lambda t, y, k: -k * y + jnp.sin(t))
        sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, 1.0, dt, jnp.array([1.0, 0.5]), args=k,
                                  adjoint=adjoint, stepsize_controller=diffrax.ConstantStepSize())
        return jnp.sum(sol.ys[-1] ** 2)

    return loss, jnp.array([0.7, 1.3])


@case("diffrax Tsit5, RecursiveCheckpointAdjoint", needs=("diffrax",))
def _():
    import diffrax
    return _ode_loss(diffrax.RecursiveCheckpointAdjoint())


@case("diffrax Tsit5, BacksolveAdjoint", needs=("diffrax",))
def _():
    import diffrax
    return _ode_loss(diffrax.BacksolveAdjoint())


@case("diffrax Tsit5, BacksolveAdjoint at dt=0.5 (the continuous adjoint's error shows)", needs=("diffrax",))
def _():
    import diffrax
    return _ode_loss(diffrax.BacksolveAdjoint(), dt=0.5)


@case("diffrax Tsit5, BacksolveAdjoint, planted 1% error in its backward", needs=("diffrax",), planted=True)
def _():
    import diffrax
    import diffrax._adjoint as adjoint

    rule = adjoint._loop_backsolve
    right = rule.fn_bwd

    def planted_bwd(*a, **k):  # every cotangent the backward pass returns, 1 % too large
        return jax.tree_util.tree_map(lambda g: None if g is None else 1.01 * g, right(*a, **k))

    rule.fn_bwd = planted_bwd
    PLANTS_TO_UNDO.append(lambda: setattr(rule, "fn_bwd", right))
    return _ode_loss(diffrax.BacksolveAdjoint())


# -- jaxopt -------------------------------------------------------------------------------------
@case("jaxopt implicit root (custom_root)", needs=("jaxopt",))
def _():
    import jaxopt

    def loss(theta):
        solver = jaxopt.GradientDescent(fun=lambda w, th: jnp.sum((w - th) ** 2) + jnp.sum(w ** 4), maxiter=500,
                                        tol=1e-12, implicit_diff=True)
        return jnp.sum(solver.run(jnp.zeros(3), th=theta).params ** 2)

    return loss, jnp.array([0.5, -0.2, 1.0])


@case("jaxopt perturbed argmax", needs=("jaxopt",))
def _():
    from jaxopt import perturbations

    def argmax_one_hot(x):
        return jax.nn.one_hot(jnp.argmax(x), x.shape[-1])

    pert = perturbations.make_perturbed_argmax(argmax_one_hot, num_samples=20, sigma=0.5)
    return lambda x: jnp.sum(pert(x, jax.random.PRNGKey(0)) * jnp.arange(4.0)), X


# -- TensorFlow Probability, distrax ----------------------------------------------------------
def _tfp():
    from tensorflow_probability.substrates import jax as tfp
    return tfp


@case("TFP bessel_ive with a constant order", needs=("tensorflow_probability",))
def _():
    tfp = _tfp()
    return lambda x: jnp.sum(tfp.math.bessel_ive(1.5, x)), jnp.array([0.3, 1.2, 2.0, 0.7])


# TFP's derivative of betainc in a is wrong at integer a: at (1, 3.5, 0.35) its rule gives
# -0.3234, mpmath's derivative of the regularised incomplete beta is -0.27384 (checked by
# hand with mpmath.diff at 30 digits). A library bug, so the case expects a failure.
@case("TFP betainc at integer a (a library bug)", needs=("tensorflow_probability",), planted=True)
def _():
    tfp = _tfp()
    return lambda p: tfp.math.betainc(p[0], p[1], p[2]), jnp.array([1.0, 3.5, 0.35])


@case("TFP lbeta, log_gamma_difference, igammainv", needs=("tensorflow_probability",))
def _():
    tfp = _tfp()
    return (lambda p: tfp.math.lbeta(p[0], p[1]) + tfp.math.log_gamma_difference(p[0], p[1])
            + tfp.math.igammainv(p[1], 0.3)), jnp.array([1.3, 2.5])


@case("TFP Gamma sample (implicit reparameterisation)", needs=("tensorflow_probability",))
def _():
    tfp = _tfp()
    return (lambda c: jnp.sum(tfp.distributions.Gamma(c, 1.0).sample(seed=jax.random.PRNGKey(1)))), \
        jnp.array([1.3, 2.5])


@case("distrax Normal log_prob and Tanh bijector", needs=("distrax",))
def _():
    import distrax

    def loss(p):
        d = distrax.Transformed(distrax.Normal(p[0], jnp.exp(p[1])), distrax.Tanh())
        return d.log_prob(0.3)

    return loss, jnp.array([0.1, -0.2])


def _details(name, rep) -> list[str]:
    """The wrong and approximate rules of a case, one line each, with where and how much."""
    out = []
    for r in rep.rules:
        if r.status not in ("mismatch", "approximate", "error"):
            continue
        what = f"{r.kind} {r.name}, rule {r.rule_name} at {r.rule_at}: {r.status}"
        site = next((s for s in r.sites if s.status == r.status), None)
        if r.status == "mismatch" and r.worst is not None:
            what += f"; worst {r.worst.describe()}"
            if site is not None and site.error is not None:
                what += f"; relative error {site.error:.2g}"
        elif site is not None and site.reason:
            what += f" ({site.reason})"
        out.append(f"- {name}: {what}")
    return out


DETAILS = []


def run(only=None):
    rows = []
    for name, needs, planted, make in sorted(CASES, key=lambda c: patches_library(c[0])):
        if only and only not in name:
            continue
        missing = [m for m in needs if not have(m)]
        if missing:
            rows.append((name, "skipped: " + ", ".join(missing) + " not installed", *[""] * (len(COLUMNS) - 2)))
            continue
        built = make()
        fn, params, *args = built
        t = time.perf_counter()
        try:
            rep = jgc.check_rules(fn, params, *args)
        except Exception as e:  # noqa: BLE001 (a crash is a row of the table, not the end of the run)
            rows.append((name, f"raised {type(e).__name__}: {str(e).splitlines()[0][:80]}", *[""] * (len(COLUMNS) - 2)))
            continue
        finally:
            while PLANTS_TO_UNDO:
                PLANTS_TO_UNDO.pop()()
        dt = time.perf_counter() - t
        counts = collections.Counter(r.status for r in rep.rules)
        right = rep.ok != planted
        if only:
            print(rep, "\n")
        TOTALS.update(counts)
        TOTALS["primitive rules"] += sum(r.kind.startswith("primitive") for r in rep.rules)
        DETAILS.extend(_details(name, rep))
        checked = sum(s.checked > 0 for r in rep.rules for s in r.sites if s.status in ("ok", "mismatch", "approximate"))
        rows.append((name, len(rep.rules), sum(r.kind.startswith("primitive") for r in rep.rules), checked,
                     *[counts.get(st, 0) for st in STATUS_COLUMNS],
                     ("ok" if rep.ok else "FAIL") + ("" if right else " (WRONG)"), f"{dt:.1f}"))
    return rows


STATUS_COLUMNS = ("ok", "intended", "approximate", "not on the differentiated path", "mismatch", "error", "not checked")
COLUMNS = ("loss", "rules found", "of them on primitives", "call sites checked", "ok", "intended", "approximate",
           "not on the path", "mismatch", "error", "not checked", "verdict", "seconds")


TOTALS = collections.Counter()


def versions() -> str:
    found = []
    for dist in ("jax", "optax", "equinox", "lineax", "optimistix", "diffrax", "jaxopt", "tfp-nightly", "distrax"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only")
    ns = ap.parse_args()
    rows = run(ns.only)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 3) + "---|---:|"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    lines += ["", "Wrong and approximate rules (worst element, or measured error next to the tolerance):", ""]
    lines += DETAILS
    print("\n".join(lines))
    if ns.only:
        return
    n_prim = TOTALS.pop("primitive rules", 0)
    total = sum(TOTALS.values())
    head = ["# jgc.check_rules on real libraries", "",
            f"Command: `python benchmarks/bench_real_rules.py` · Python {platform.python_version()} · {versions()}",
            "", f"Rules found over all cases: {total}, {n_prim} of them registered on primitives ("
            + ", ".join(f"{c} {st}" for st, c in TOTALS.most_common()) + "). A verdict marked WRONG is "
            "one the case did not expect (a correct rule called wrong, or a planted error missed).", ""]
    (ROOT / "benchmarks" / "results" / "real_rules.md").write_text("\n".join(head + lines) + "\n")


if __name__ == "__main__":
    main()
