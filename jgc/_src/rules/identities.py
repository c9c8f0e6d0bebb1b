"""Checks of a rule that need no finite differences: identities a right rule satisfies exactly.

Each compares two computations of the same value, made by JAX's own ``jvp``, ``vjp``
and ``vmap`` of the rule, and judges them by rounding alone (``subject._judge``):

- **primal**: the rule's primal output (the JVP's primal, a ``custom_vjp``'s ``fwd``)
  against the primal function. A difference is a wrong forward value, not a wrong
  derivative.
- **dot-product**: ⟨u, J t⟩ from the JVP against ⟨Jᵀu, t⟩ from the VJP. For a
  ``custom_vjp``, whose only derivative is its backward pass, J t is JAX's JVP of the
  undecorated primal function.
- **linearity**: the rule's output for α·t₁ + β·t₂ against α·out(t₁) + β·out(t₂), and
  for c·t against c·out(t) with c = −1 and magnitudes 10⁻³, 10³ (tangents for a JVP,
  cotangents for a VJP). Clipping, normalising or dropping signs breaks it.
- **batching**: ``vmap`` of the function, its JVP and its VJP over lanes of different
  points against one call per lane, with every argument batched and with each alone.
- **symbolic zeros**: the rule run with only some arguments differentiated (JAX passes
  symbolic zeros, or ``perturbed=False`` to a ``custom_vjp``), and with only some
  outputs' cotangents, against the dense result with explicit zeros.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from .. import compat, policy
from .subject import (BATCHING, DOT, LINEARITY, PRIMAL, ZEROS, _leaf_max, _Subject, compare_leaves, raised,
                      site, _judge)

# Lanes of the batching check: lane 0 is the point, the others move every element by
# a tenth of its scale (policy.coordinate_scale) in a random direction, so a batched
# rule that mixes lanes or ignores the batch axis gives a different answer per lane,
# while the points stay near the one given (inside the same domain).
LANES = 3
LANE_SPREAD = 0.1
# Multiples of a tangent (or cotangent) whose image must be the same multiple of its
# image: a sign flip and three orders of magnitude each way catch a rule that drops
# signs, normalises, or clips at a threshold within 10³ of the tangent's scale.
MULTIPLES = (-1.0, 1e-3, 1e3)
# Arguments up to which every proper subset is differentiated alone in the symbolic
# zeros check (2ⁿ − 2 patterns); above it, each argument alone and all but one.
ALL_SUBSETS = 4


def _dtype(v):
    return np.dtype(v.dtype)


def _allowance(subject: _Subject, probe, base, coeff: float) -> list:
    """Rounding of a linear map measured per output leaf: |out(t ⊙ (1 + k·u·z)) − out(t)|.

    ``probe(t)`` evaluates the map; ``base`` its value at t. The nudge moves every
    element of t by policy.ANALYTIC_PROBE_ULPS units of round-off (random signs), so the
    true change is that many units of the output, and the rest is the map's own
    rounding, which is what a sum of its values may differ by. Times
    policy.ANALYTIC_SAFETY and |coeff| (the size of the combination compared).
    """
    return [policy.ANALYTIC_SAFETY * abs(coeff) * _leaf_max(np.abs(compat.host(a) - compat.host(b)))
            for a, b in zip(probe, base)]


def _nudge(t: list, rng) -> list:
    out = []
    for v in t:
        u = policy.unit_roundoff(v.dtype)
        z = rng.choice([-1.0, 1.0], size=v.shape)
        out.append((v * (1 + policy.ANALYTIC_PROBE_ULPS * u * z)).astype(v.dtype))
    return out


def _combine(a: float, x: list, b: float, y: list) -> list:
    return [(a * p + b * q).astype(p.dtype) for p, q in zip(x, y)]


def _scaled(c: float, x: list) -> list:
    return [(c * p).astype(p.dtype) for p in x]


# -- primal agreement -----------------------------------------------------------------------------------
def primal(subject: _Subject, name: str, at: str, rng, options: dict) -> list:
    """The rule's primal output (JVP primal, fwd's output) against the primal function."""
    try:
        ref = subject.value(subject.x)
    except Exception as e:  # noqa: BLE001 (the primal itself raised: nothing to compare)
        return [site(PRIMAL, at, name, "error", reason=f"the primal function raised {raised(e)}")]
    rows = []
    for how, ok in (("jvp", subject.fwd is None), ("vjp", subject.rev is None)):
        if not ok:
            continue
        try:
            if how == "jvp":
                out = subject.jvp(subject.x, subject.tangent(rng))[0]
            else:
                out = jax.vjp(subject.go, *subject.x)[0]
        except Exception as e:  # noqa: BLE001 (the rule raised where the primal did not)
            rows.append(site(PRIMAL, at, name, "mismatch", reason=f"the rule's forward pass raised {raised(e)} "
                             "where the primal function runs"))
            break
        n, worst = compare_leaves(list(out), list(ref), subject.out_names, subject.out_dtypes,
                                  rtol=options.get("rtol"), atol=options.get("atol"))
        what = "the JVP rule's primal output" if how == "jvp" else "the forward pass (fwd)"
        if worst is not None:
            rows.append(site(PRIMAL, at, name, "mismatch", n, method=f"{how} primal vs f",
                             reason=f"wrong forward value: {what} differs from the primal function; "
                             + worst.text("rule", "primal")))
        else:
            rows.append(site(PRIMAL, at, name, "ok", n, method=f"{how} primal vs f"))
        break  # one forward pass is enough: a custom_jvp's and a custom_vjp's are the same code path
    return rows


# -- dot product ----------------------------------------------------------------------------------------
def _wide(v) -> np.ndarray:
    a = np.asarray(compat.host(v))
    return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def dot_product(subject: _Subject, name: str, at: str, rng, options: dict, primal_jvp=None) -> list:
    """⟨u, J t⟩ (JVP) against ⟨Jᵀu, t⟩ (VJP) for a few random pairs."""
    if subject.rev is not None:
        return []
    jvp = subject.jvp if subject.fwd is None else primal_jvp
    if jvp is None:
        return []
    # Complex arguments or outputs: JAX's VJP is the transpose of the JVP as a real-linear
    # map under the pairing Re Σ u·v (no conjugation), so Re⟨u, J t⟩ = Re⟨Jᵀu, t⟩ with that
    # pairing; for real values it is the ordinary dot product.
    worst, n, rt = None, 0, options.get("rtol")
    for _ in range(3):  # three pairs: a wrong transpose shows in every one of them
        t = subject.tangent(rng)
        try:
            out, jt = jvp(subject.x, t)
            u = subject.cotangent(rng, out)
            _, ju = subject.vjp(subject.x, u)
        except Exception as e:  # noqa: BLE001
            return [site(DOT, at, name, "error", reason=raised(e))]
        terms_l = [np.real(_wide(a) * _wide(b)) for a, b in zip(u, jt)]
        terms_r = [np.real(_wide(a) * _wide(b)) for a, b in zip(ju, t)]
        left = sum(float(np.sum(v)) for v in terms_l)
        right = sum(float(np.sum(v)) for v in terms_r)
        scale = sum(float(np.sum(np.abs(v))) for v in terms_l + terms_r)
        count = sum(int(np.size(v)) for v in terms_l + terms_r)
        dtype = max((_dtype(v) for v in list(jt) + list(ju)), key=lambda d: policy.unit_roundoff(d))
        # A sum of `count` rounded products is off by up to count·u times the sum of their
        # magnitudes (the classical bound), beyond the per-dtype tolerance of the judge.
        extra = count * policy.unit_roundoff(dtype) * scale
        bad, d, tol = _judge(left, right, scale, dtype, rtol=rt, atol=options.get("atol"), extra=extra)
        n += 1
        if bool(bad) and (worst is None or float(d / tol) > worst[0]):
            worst = (float(d / tol), left, right, float(tol))
    method = "JVP of the primal function vs the VJP rule" if subject.fwd is not None else "JVP vs VJP"
    if worst is None:
        return [site(DOT, at, name, "ok", n, method=method)]
    _, left, right, tol = worst
    return [site(DOT, at, name, "mismatch", n, method=method,
                 reason=f"the VJP is not the transpose of the JVP: ⟨u, J t⟩ = {left:.6g} vs ⟨Jᵀu, t⟩ = "
                 f"{right:.6g} (allowed difference {tol:.2g})")]


# -- linearity ----------------------------------------------------------------------------------------------
def linearity(subject: _Subject, name: str, at: str, rng, options: dict) -> list:
    """The rule's output is linear in the tangent (JVP) and in the cotangent (VJP)."""
    rows, whats = [], []
    if subject.fwd is None:
        whats.append("tangent")
        rows.append(_linear(subject, rng, options, "tangent", lambda t: list(subject.jvp(subject.x, t)[1]),
                            t1=subject.tangent(rng), t2=subject.tangent(rng), names=subject.out_names,
                            dtypes=subject.out_dtypes))
    if subject.rev is None:
        whats.append("cotangent")
        out = subject.value(subject.x)
        rows.append(_linear(subject, rng, options, "cotangent", lambda u: list(subject.vjp(subject.x, u)[1]),
                            t1=subject.cotangent(rng, out), t2=subject.cotangent(rng, out), names=subject.names,
                            dtypes=[_dtype(v) for v in subject.x]))
    if not rows:
        return []
    method = "linearity in the " + " and the ".join(whats)
    errors = [r for r in rows if isinstance(r, str)]
    found = [r for r in rows if not isinstance(r, str)]
    n = sum(k for k, _ in found)
    bad = [reason for _, reason in found if reason]
    if bad:
        return [site(LINEARITY, at, name, "mismatch", n, method=method, reason="; ".join(bad))]
    if errors:
        return [site(LINEARITY, at, name, "error", n, method=method, reason="; ".join(errors))]
    return [site(LINEARITY, at, name, "ok", n, method=method)]


def _linear(subject, rng, options, what, rule, *, t1, t2, names, dtypes):
    """(elements compared, why the rule is not linear in ``what`` or ""), or the error it raised."""
    try:
        r1, r2 = rule(t1), rule(t2)
        spread = _allowance(subject, rule(_nudge(t1, rng)), r1, 1.0)
        spread2 = _allowance(subject, rule(_nudge(t2, rng)), r2, 1.0)
        alpha, beta = rng.choice([-1.0, 1.0], 2) * rng.uniform(0.5, 2.0, 2)
        cases = [(f"α·{what}₁ + β·{what}₂", rule(_combine(alpha, t1, beta, t2)), _combine(alpha, r1, beta, r2),
                  [abs(alpha) * a + abs(beta) * b for a, b in zip(spread, spread2)],
                  [abs(alpha) * _leaf_max(a) + abs(beta) * _leaf_max(b) for a, b in zip(r1, r2)])]
        for c in MULTIPLES:
            cases.append((f"{c:g}·{what}", rule(_scaled(c, t1)), _scaled(c, r1), [abs(c) * s for s in spread],
                          [abs(c) * _leaf_max(a) for a in r1]))
    except Exception as e:  # noqa: BLE001
        return f"the rule raised {raised(e)} for a {what}"
    n, worst, label = 0, None, ""
    for lab, got, want, extras, scales in cases:
        finite = all(bool(np.all(np.isfinite(compat.host(w)))) for w in want)
        if not finite:  # an overflowing multiple says nothing about linearity
            continue
        k, w = compare_leaves(got, want, names, dtypes, scales=scales, extras=extras, rtol=options.get("rtol"),
                              atol=options.get("atol"))
        n += k
        if w is not None and (worst is None or w.excess > worst.excess):
            worst, label = w, lab
    if worst is None:
        return n, ""
    return n, f"the rule is not linear in the {what}: for {label}, " + worst.text("rule", "linear")


# -- batching ---------------------------------------------------------------------------------------------
def _lanes(subject: _Subject, rng) -> list | None:
    """LANES points: the given one and points moved by LANE_SPREAD of each element's scale."""
    lanes = [list(subject.x)]
    for _ in range(4 * LANES):
        if len(lanes) == LANES:
            break
        moved = [(v + LANE_SPREAD * t).astype(v.dtype) for v, t in zip(subject.x, subject.tangent(rng))]
        try:
            out = subject.value(moved)
        except Exception:  # noqa: BLE001 (outside the primal's domain: not a lane)
            continue
        if all(bool(np.all(np.isfinite(compat.host(o)))) for o in out):
            lanes.append(moved)
    return lanes if len(lanes) > 1 else None


def _stack(rows: list) -> list:
    return [jnp.stack(col) for col in zip(*rows)]


def batching(subject: _Subject, name: str, at: str, rng, options: dict, each: bool = True) -> list:
    """vmap of f, its JVP and its VJP against one call per lane, lane by lane (with every argument
    batched, and with each alone unless ``each`` is False)."""
    lanes = _lanes(subject, rng)
    if lanes is None:
        return [site(BATCHING, at, name, "not checked", reason="no second point near this one has a finite primal")]
    B = len(lanes)
    out0 = subject.value(lanes[0])
    tans = [subject.tangent(rng, x) for x in lanes]
    cots = [subject.cotangent(rng, out0) for _ in lanes]
    n_in = len(subject.x)
    patterns = [tuple(range(n_in))] + ([(k,) for k in range(n_in)] if n_in > 1 and each else [])
    programs = [("f", lambda x, t, u: list(subject.go(*x)), subject.out_names, subject.out_dtypes)]
    if subject.fwd is None:
        programs.append(("jvp", lambda x, t, u: list(subject.jvp(x, t)[1]), subject.out_names, subject.out_dtypes))
    if subject.rev is None:
        programs.append(("vjp", lambda x, t, u: list(subject.vjp(x, u)[1]), subject.names,
                         [_dtype(v) for v in subject.x]))
    method = "vmap of " + ", ".join(p[0] for p in programs) + f" over {B} lanes vs one call per lane"
    # One program computes them all: one compilation for the loop, one per batching pattern.
    jitted = jax.jit(lambda x, t, u: [fn(x, t, u) for _, fn, _, _ in programs])
    n, worst, where = 0, None, ""
    for pat in patterns:
        # Unbatched arguments (and their tangents) stay at lane 0.
        xs = [[lane[k] if k in pat else lanes[0][k] for k in range(n_in)] for lane in lanes]
        ts = [[tan[k] if k in pat else tans[0][k] for k in range(n_in)] for tan in tans]
        try:
            loop = [jitted(x, t, u) for x, t, u in zip(xs, ts, cots)]
        except Exception as e:  # noqa: BLE001 (the unbatched call itself fails: nothing to compare)
            return [site(BATCHING, at, name, "error", reason=f"one call per lane raises {raised(e)}")]
        axes = ([0 if k in pat else None for k in range(n_in)],) * 2 + (0,)
        args = ([xs[0][k] if k not in pat else jnp.stack([x[k] for x in xs]) for k in range(n_in)],
                [ts[0][k] if k not in pat else jnp.stack([t[k] for t in ts]) for k in range(n_in)],
                _stack(cots))
        label = ("every argument batched" if len(pat) == n_in and n_in > 1 else
                 f"{subject.names[pat[0]]} batched" if n_in > 1 else "its argument batched")
        try:
            batched = jax.vmap(jitted, in_axes=axes)(*args)
        except Exception as e:  # noqa: BLE001 (one call per lane works, vmap raises: a batching bug)
            progs = []
            for prog, fn, _, _ in programs:  # which of them raises, to name it
                try:
                    jax.vmap(fn, in_axes=axes)(*args)
                except Exception:  # noqa: BLE001
                    progs.append(prog)
            return [site(BATCHING, at, name, "mismatch", n, method=method,
                         reason=f"vmap of {', '.join(progs) or 'f'} with {label} raises {raised(e)} where one "
                         "call per lane runs")]
        for j, (prog, _, names, dtypes) in enumerate(programs):
            for b in range(B):
                k, w = compare_leaves([v[b] for v in batched[j]], loop[b][j], names, dtypes,
                                      rtol=options.get("rtol"), atol=options.get("atol"), prefix=f"lane {b}, ")
                n += k
                if w is not None and (worst is None or w.excess > worst.excess):
                    worst, where = w, f"{prog} with {label}"
    if worst is not None:
        return [site(BATCHING, at, name, "mismatch", n, method=method,
                     reason=f"{where}: vmap disagrees with one call per lane; " + worst.text("vmap", "one call"))]
    return [site(BATCHING, at, name, "ok", n, method=method)]


# -- symbolic zeros ------------------------------------------------------------------------------------
def _subsets(n: int) -> list:
    if n <= 1:
        return []
    if n <= ALL_SUBSETS:
        return [s for r in range(1, n) for s in itertools.combinations(range(n), r)]
    return [(k,) for k in range(n)] + [tuple(j for j in range(n) if j != k) for k in range(n)]


def _with_float0(subject: _Subject, x: list, t: list, u: list):
    """The JVP and VJP with the integer arguments differentiated too: float0 tangents in, cotangents out."""
    ints = [subject.leaves[k] for k in subject.ints]
    zeros = [np.zeros(np.shape(v), dtype=jax.dtypes.float0) for v in ints]
    got_j = got_v = None
    if subject.fwd is None:
        got_j = jax.jvp(subject.go, (*x, *ints), (*t, *zeros))[1]
    if subject.rev is None:
        _, back = jax.vjp(subject.go, *x, *ints)
        got_v = back(tuple(u))[:len(x)]
    return got_j, got_v


def symbolic_zeros(subject: _Subject, name: str, at: str, rng, options: dict) -> list:
    """Some arguments not differentiated (symbolic zero tangents), some outputs without cotangent."""
    n_in = len(subject.x)
    x = list(subject.x)
    subsets = _subsets(n_in)
    out = subject.value(x)
    n_out = len(out)
    out_subsets = _subsets(n_out)
    if not subsets and not out_subsets and not subject.ints:
        return []
    t = subject.tangent(rng)
    u = subject.cotangent(rng, out)
    n, worst, where = 0, None, ""
    rt, at_ = options.get("rtol"), options.get("atol")

    def partial(active):
        def g(*xa):
            full = list(x)
            for k, v in zip(active, xa):
                full[k] = v
            return subject.go(*full)
        return g

    try:
        dense_jvp = subject.jvp(x, t)[1] if subject.fwd is None else None
        dense_vjp = subject.vjp(x, u)[1] if subject.rev is None else None
    except Exception as e:  # noqa: BLE001
        return [site(ZEROS, at, name, "error", reason=raised(e))]
    for active in subsets:
        label = "only " + ", ".join(subject.names[k] for k in active) + " differentiated"
        g = partial(active)
        try:
            if dense_jvp is not None:
                got = jax.jit(lambda xa, ta: jax.jvp(g, xa, ta)[1])(tuple(x[k] for k in active),
                                                                   tuple(t[k] for k in active))
                zt = [t[k] if k in active else jnp.zeros_like(t[k]) for k in range(n_in)]
                want = subject.jvp(x, zt)[1]
                k_, w = compare_leaves(list(got), list(want), subject.out_names, subject.out_dtypes, rtol=rt,
                                       atol=at_, prefix="jvp: ")
                n += k_
                if w is not None and (worst is None or w.excess > worst.excess):
                    worst, where = w, label
            if dense_vjp is not None:
                got = jax.jit(lambda xa, ua: jax.vjp(g, *xa)[1](ua))(tuple(x[k] for k in active), tuple(u))
                want = [dense_vjp[k] for k in active]
                k_, w = compare_leaves(list(got), want, [subject.names[k] for k in active],
                                       [_dtype(x[k]) for k in active], rtol=rt, atol=at_, prefix="vjp: ")
                n += k_
                if w is not None and (worst is None or w.excess > worst.excess):
                    worst, where = w, label
        except Exception as e:  # noqa: BLE001 (the dense call runs, the partial one raises)
            return [site(ZEROS, at, name, "mismatch", n,
                         reason=f"{label}: the rule raises {raised(e)} where the dense call runs")]
    if dense_vjp is not None:
        for kept in out_subsets:
            label = "cotangents on " + ", ".join(subject.out_names[j] for j in kept) + " only"
            try:
                got = jax.jit(lambda xx, uu: jax.vjp(lambda *v: tuple(subject.go(*v)[j] for j in kept), *xx)[1](uu))(
                    tuple(x), tuple(u[j] for j in kept))
                zu = [u[j] if j in kept else jnp.zeros_like(u[j]) for j in range(n_out)]
                want = subject.vjp(x, zu)[1]
            except Exception as e:  # noqa: BLE001
                return [site(ZEROS, at, name, "mismatch", n,
                             reason=f"{label}: the rule raises {raised(e)} where the dense call runs")]
            k_, w = compare_leaves(list(got), list(want), subject.names, [_dtype(v) for v in x], rtol=rt, atol=at_,
                                   prefix="vjp: ")
            n += k_
            if w is not None and (worst is None or w.excess > worst.excess):
                worst, where = w, label
    if subject.ints:
        label = "integer argument " + ", ".join(subject.int_names) + " differentiated too (float0)"
        try:
            got_j, got_v = _with_float0(subject, x, t, u)
        except Exception as e:  # noqa: BLE001 (the dense call runs, the one with float0 raises)
            return [site(ZEROS, at, name, "mismatch", n,
                         reason=f"{label}: the rule raises {raised(e)} where the call without it runs")]
        for got, want, names, dtypes, pre in ((got_j, dense_jvp, subject.out_names, subject.out_dtypes, "jvp: "),
                                              (got_v, dense_vjp, subject.names, [_dtype(v) for v in x], "vjp: ")):
            if got is None or want is None:
                continue
            k_, w = compare_leaves(list(got), list(want), names, dtypes, rtol=rt, atol=at_, prefix=pre)
            n += k_
            if w is not None and (worst is None or w.excess > worst.excess):
                worst, where = w, label
    if worst is None:
        return [site(ZEROS, at, name, "ok", n, method="partial differentiation vs dense zeros")]
    return [site(ZEROS, at, name, "mismatch", n, method="partial differentiation vs dense zeros",
                 reason=f"{where}: the result differs from the dense one with zero tangents; "
                 + worst.text("symbolic", "dense"))]
