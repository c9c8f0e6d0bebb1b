"""Mutation tests: deliberately wrong custom_vjp / custom_jvp rules and HVPs are caught and
located; their correct twins pass.

Every plant is an entry of ``PLANTS`` (benchmarks/bench_rules.py runs the same table and
records evaluations and seconds). Expected locations are written by hand from the bug,
not read back from the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc


# -- the rules under test ------------------------------------------------------------------
def softplus_rule(factor=1.0):
    """Stable softplus with a custom_vjp; ``factor`` ≠ 1 plants a wrong factor."""

    @jax.custom_vjp
    def sp(x):
        return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))

    sp.defvjp(lambda x: (sp(x), jax.nn.sigmoid(x)), lambda s, g: (factor * g * s,))
    return sp


def matvec_rule(transpose=True):
    """y = A x with a custom_vjp; transpose=False plants the missing transpose (A g for Aᵀ g)."""

    @jax.custom_vjp
    def mv(A, x):
        return A @ x

    def bwd(res, g):
        A, x = res
        return jnp.outer(g, x), (A.T if transpose else A) @ g

    mv.defvjp(lambda A, x: (mv(A, x), (A, x)), bwd)
    return mv


def piecewise_rule(wrong_above_one=False):
    """f = x² for x ≤ 1, 2x − 1 above (C¹ at 1); the bug: slope 2x kept above 1."""

    @jax.custom_vjp
    def pw(x):
        return jnp.where(x > 1.0, 2.0 * x - 1.0, x**2)

    def bwd(x, g):
        slope = 2.0 * x if wrong_above_one else jnp.where(x > 1.0, 2.0, 2.0 * x)
        return (g * slope,)

    pw.defvjp(lambda x: (pw(x), x), bwd)
    return pw


def xsin_jvp_rule(missing_term=False):
    """f = x·sin x with a custom_jvp; the bug drops the x·cos x term of the product rule."""

    @jax.custom_jvp
    def xs(x):
        return x * jnp.sin(x)

    @xs.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        d = jnp.sin(x) + (0.0 if missing_term else x * jnp.cos(x))
        return xs(x), d * t

    return xs


def polar_jvp_rule(wrong_sign=False):
    """(r cos θ, r sin θ) with a custom_jvp; the bug flips the sign of ∂y/∂θ only."""

    @jax.custom_jvp
    def polar(r, th):
        return {"x": r * jnp.cos(th), "y": r * jnp.sin(th)}

    @polar.defjvp
    def _(primals, tangents):
        (r, th), (dr, dth) = primals, tangents
        s = -1.0 if wrong_sign else 1.0
        out = polar(r, th)
        return out, {"x": dr * jnp.cos(th) - r * jnp.sin(th) * dth,
                     "y": dr * jnp.sin(th) + s * r * jnp.cos(th) * dth}

    return polar


def scan_rule(factor=1.0):
    """A custom_vjp cell used inside lax.scan (a recurrent layer); factor ≠ 1 plants a bug."""

    @jax.custom_vjp
    def cell(h, w):
        return jnp.tanh(w * h + 0.5)

    def bwd(res, g):
        h, w = res
        d = (1.0 - jnp.tanh(w * h + 0.5) ** 2) * g
        return factor * d * w, jnp.sum(d * h)

    cell.defvjp(lambda h, w: (cell(h, w), (h, w)), bwd)

    def run(h0, w):
        hT, hs = jax.lax.scan(lambda h, _: (cell(h, w), h), h0, None, length=5)
        return hs.sum(0) + hT

    return run


def quartic(p):
    return jnp.sum(p["a"] ** 4) + jnp.sum(jnp.sin(p["a"])) * jnp.sum(p["b"] ** 2)


def quartic_hvp(wrong=False):
    def hvp(p, v):
        full = jax.jvp(jax.grad(quartic), (p,), (v,))[1]
        if wrong:  # forgets the diagonal 12 a² term of ∂²/∂a²
            full = dict(full, a=full["a"] - 12 * p["a"] ** 2 * v["a"])
        return full

    return hvp


# -- the plants -------------------------------------------------------------------------------
X = np.array([-1.3, 0.4, 2.2, -0.1], np.float64)
XPW = np.array([0.3, -0.8, 1.5, 0.9], np.float64)  # only index 2 is above 1
A = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0], [-2.0, 1.0, 1.0]])
V = np.array([0.7, -1.1, 0.4])
P = {"a": np.array([0.5, -1.5, 1.0]), "b": np.array([0.3, -0.2])}


@dataclasses.dataclass
class Plant:
    name: str
    check: str  # what is run
    run: Callable[[], object]  # returns a Report, or raises GradCheckError
    bad: bool  # True: a planted bug that must be caught
    failing: set = dataclasses.field(default_factory=set)  # expected (output_path, path) blocks
    elements: dict = dataclasses.field(default_factory=dict)  # block label → mismatched indices


def _grads(f, args, **kw):
    def run():
        try:
            return jgc.check_grads(f, args, **kw)
        except jgc.GradCheckError as e:
            return e.report
    return run


PLANTS = [
    # custom_vjp: a wrong factor
    Plant("softplus custom_vjp, correct", "check_vjp", lambda: jgc.check_vjp(softplus_rule(), X), False),
    Plant("softplus custom_vjp, factor 2 in bwd", "check_vjp",
          lambda: jgc.check_vjp(softplus_rule(2.0), X), True, {("out", "args[0]")}),
    Plant("softplus custom_vjp, factor 1.0001 in bwd", "check_jacobian",
          lambda: jgc.check_jacobian(softplus_rule(1.0001), X), True, {("out", "args[0]")},
          {"out wrt args[0]": [(0, 0), (1, 1), (2, 2), (3, 3)]}),
    Plant("softplus custom_vjp, factor 2, drop-in", "check_grads(order=2)",
          _grads(softplus_rule(2.0), (X,), order=2), True),
    # custom_vjp: a missing transpose
    Plant("matvec custom_vjp, correct", "check_vjp", lambda: jgc.check_vjp(matvec_rule(), A, V), False),
    Plant("matvec custom_vjp, missing transpose", "check_vjp",
          lambda: jgc.check_vjp(matvec_rule(False), A, V), True, {("out", "args[1]")}),
    Plant("matvec custom_vjp, missing transpose", "check_jacobian",
          lambda: jgc.check_jacobian(matvec_rule(False), A, V), True, {("out", "args[1]")},
          # ∂y_i/∂x_j = A_ij; the wrong rule gives A_ji: every off-diagonal entry with A_ij ≠ A_ji.
          {"out wrt args[1]": [(i, j) for i in range(3) for j in range(3) if A[i, j] != A[j, i]]}),
    # custom_vjp: wrong only in part of the domain
    Plant("piecewise custom_vjp, correct", "check_jacobian",
          lambda: jgc.check_jacobian(piecewise_rule(), XPW), False),
    Plant("piecewise custom_vjp, wrong for x > 1", "check_jacobian",
          lambda: jgc.check_jacobian(piecewise_rule(True), XPW), True, {("out", "args[0]")},
          {"out wrt args[0]": [(2, 2)]}),
    Plant("piecewise custom_vjp, wrong for x > 1", "check_vjp",
          lambda: jgc.check_vjp(piecewise_rule(True), XPW), True, {("out", "args[0]")}),
    # custom_jvp rules
    Plant("x·sin x custom_jvp, correct", "check_jvp", lambda: jgc.check_jvp(xsin_jvp_rule(), X), False),
    Plant("x·sin x custom_jvp, missing term", "check_jvp",
          lambda: jgc.check_jvp(xsin_jvp_rule(True), X), True, {("out", "args[0]")}),
    Plant("x·sin x custom_jvp, missing term (transposed by JAX)", "check_vjp",
          lambda: jgc.check_vjp(xsin_jvp_rule(True), X, against="numerical"), True, {("out", "args[0]")}),
    Plant("polar custom_jvp, correct", "check_jacobian",
          lambda: jgc.check_jacobian(polar_jvp_rule(), np.array([2.0, 0.5]), np.array([0.3, 1.2])), False),
    Plant("polar custom_jvp, wrong sign in ∂y/∂θ", "check_jacobian",
          lambda: jgc.check_jacobian(polar_jvp_rule(True), np.array([2.0, 0.5]), np.array([0.3, 1.2])),
          True, {("out['y']", "args[1]")}, {"out['y'] wrt args[1]": [(0, 0), (1, 1)]}),
    Plant("polar custom_jvp, wrong sign, drop-in", "check_grads(order=1)",
          _grads(polar_jvp_rule(True), (np.array([2.0, 0.5]), np.array([0.3, 1.2])), order=1), True),
    # a custom_vjp inside lax.scan
    Plant("scan over custom_vjp cell, correct", "check_grads(order=1)",
          _grads(scan_rule(), (np.array([0.1, -0.4]), np.array(0.8)), order=1), False),
    Plant("scan over custom_vjp cell, factor 0.9 on ∂h", "check_grads(order=1)",
          _grads(scan_rule(0.9), (np.array([0.1, -0.4]), np.array(0.8)), order=1), True),
    # Hessian-vector products
    Plant("quartic HVP, correct", "check_hvp", lambda: jgc.check_hvp(quartic, P, hvp=quartic_hvp()), False),
    Plant("quartic HVP, missing 12a² term", "check_hvp",
          lambda: jgc.check_hvp(quartic, P, hvp=quartic_hvp(True)), True, {("grad['a']", "params['a']")}),
    # float32, checked in its own precision
    Plant("softplus custom_vjp f32 native, correct", "check_vjp",
          lambda: jgc.check_vjp(softplus_rule(), X.astype(np.float32), precision="native"), False),
    Plant("softplus custom_vjp f32 native, factor 1.01", "check_vjp",
          lambda: jgc.check_vjp(softplus_rule(1.01), X.astype(np.float32), precision="native"), True,
          {("out", "args[0]")}),
]


@pytest.mark.parametrize("plant", PLANTS, ids=[f"{p.check}: {p.name}" for p in PLANTS])
def test_plant(plant):
    rep = plant.run()
    assert isinstance(rep, jgc.Report)
    if not plant.bad:
        assert rep.ok, rep
        assert rep.counts()["mismatch"] == 0
        return
    assert not rep.ok, f"planted bug not caught: {plant.name}\n{rep}"
    if plant.failing:
        got = {(lf.output_path, lf.path) for lf in rep.failing()}
        assert got == plant.failing, rep
    for label, idx in plant.elements.items():
        (lf,) = [lf for lf in rep.leaves if lf.name == label]
        assert sorted(lf.elements("mismatch")) == sorted(idx), rep


def test_transpose_identity_cannot_see_a_jvp_and_vjp_wrong_together():
    # JAX transposes the wrong custom_jvp rule, so J and Jᵀ agree with each other: the
    # identity alone passes, and only the numerical comparison catches the bug. This is
    # why check_vjp's default also compares against finite differences.
    f = xsin_jvp_rule(True)
    assert jgc.check_vjp(f, X, against="jvp").ok
    assert not jgc.check_vjp(f, X).ok


def test_drop_in_error_names_the_check_and_block():
    with pytest.raises(jgc.GradCheckError) as info:
        jgc.check_grads(matvec_rule(False), (A, V), order=1)
    msg = str(info.value)
    assert msg.startswith("jgc.check_grads: derivatives disagree in VJP — ⟨u[out], J t[args[1]]⟩")
    assert isinstance(info.value, AssertionError)
    assert "replaced by 'rev'" in msg  # custom_vjp: no TypeError, reverse mode instead
