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
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import compat, compiling, policy
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


def _allowance(probe, base, coeff: float) -> list:
    """Rounding of a linear map measured per output leaf: |out(t ⊙ (1 + k·u·z)) − out(t)|.

    ``probe`` is the map's value at the nudged t, ``base`` its value at t. The nudge moves every
    element of t by policy.ANALYTIC_PROBE_ULPS units of round-off (random signs), so the
    true change is that many units of the output, and the rest is the map's own
    rounding, which is what a sum of its values may differ by. Times
    policy.ANALYTIC_SAFETY and |coeff| (the size of the combination compared).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        return [policy.ANALYTIC_SAFETY * abs(coeff) * _leaf_max(np.abs(compat.host(a) - compat.host(b)))
                for a, b in zip(probe, base)]


def _host(v) -> np.ndarray:
    return np.asarray(compat.host(v))


# Tangents, cotangents and points are made on the host (NumPy), then rounded to their
# dtype: the arithmetic on them would otherwise compile one small program per shape.
def _nudge(t: list, rng) -> list:
    out = []
    for v in t:
        v = _host(v)
        u = policy.unit_roundoff(v.dtype)
        z = rng.choice([-1.0, 1.0], size=v.shape)
        out.append((v * (1 + policy.ANALYTIC_PROBE_ULPS * u * z)).astype(v.dtype))
    return out


def _combine(a: float, x: list, b: float, y: list) -> list:
    with np.errstate(invalid="ignore", over="ignore"):
        return [(a * _host(p) + b * _host(q)).astype(p.dtype) for p, q in zip(x, y)]


def _scaled(c: float, x: list) -> list:
    with np.errstate(invalid="ignore", over="ignore"):
        return [(c * _host(p)).astype(p.dtype) for p in x]


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
        rows.append(_primal_row(subject, name, at, options, how, out=out, ref=ref))
        break  # one forward pass is enough: a custom_jvp's and a custom_vjp's are the same code path
    return rows


def _primal_row(subject: _Subject, name: str, at: str, options: dict, how: str, *, out, ref):
    """The primal check's row: ``out``, the rule's forward value (from ``how``), against ``ref``, f's."""
    n, worst = compare_leaves(list(out), list(ref), subject.out_names, subject.out_dtypes,
                              rtol=options.get("rtol"), atol=options.get("atol"))
    what = "the JVP rule's primal output" if how == "jvp" else "the forward pass (fwd)"
    if worst is not None:
        return site(PRIMAL, at, name, "mismatch", n, method=f"{how} primal vs f",
                    reason=f"wrong forward value: {what} differs from the primal function; "
                    + worst.text("rule", "primal"))
    return site(PRIMAL, at, name, "ok", n, method=f"{how} primal vs f")


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
    found, whats = [], []
    if subject.fwd is None:
        whats.append("tangent")
        found.append(_linear(rng, options, "tangent", lambda t: list(subject.jvp(subject.x, t)[1]),
                             t1=subject.tangent(rng), t2=subject.tangent(rng), names=subject.out_names,
                             dtypes=subject.out_dtypes))
    if subject.rev is None:
        whats.append("cotangent")
        out = subject.value(subject.x)
        found.append(_linear(rng, options, "cotangent", lambda u: list(subject.vjp(subject.x, u)[1]),
                             t1=subject.cotangent(rng, out), t2=subject.cotangent(rng, out), names=subject.names,
                             dtypes=[_dtype(v) for v in subject.x]))
    return _linearity_rows(found, whats, name, at)


def _linearity_rows(found: list, whats: list, name: str, at: str) -> list:
    """The linearity row from each map's (elements compared, why not linear or "") or the error it raised."""
    if not found:
        return []
    method = "linearity in the " + " and the ".join(whats)
    errors = [r for r in found if isinstance(r, str)]
    found = [r for r in found if not isinstance(r, str)]
    n = sum(k for k, _ in found)
    bad = [reason for _, reason in found if reason]
    if bad:
        return [site(LINEARITY, at, name, "mismatch", n, method=method, reason="; ".join(bad))]
    if errors:
        return [site(LINEARITY, at, name, "error", n, method=method, reason="; ".join(errors))]
    return [site(LINEARITY, at, name, "ok", n, method=method)]


def _linear_inputs(t1: list, t2: list, rng) -> tuple[list, tuple]:
    """The (co)tangents the linearity check maps: t₁, t₂, each nudged (for the rounding), α·t₁ + β·t₂,
    and c·t₁ for c in MULTIPLES; with (α, β)."""
    n1, n2 = _nudge(t1, rng), _nudge(t2, rng)
    alpha, beta = rng.choice([-1.0, 1.0], 2) * rng.uniform(0.5, 2.0, 2)
    ins = [[_host(v) for v in t1], [_host(v) for v in t2], n1, n2, _combine(alpha, t1, beta, t2)]
    return ins + [_scaled(c, t1) for c in MULTIPLES], (alpha, beta)


def _linear(rng, options, what, rule, *, t1, t2, names, dtypes):
    """(elements compared, why the rule is not linear in ``what`` or ""), or the error it raised."""
    ins, coeffs = _linear_inputs(t1, t2, rng)
    try:
        got = [rule(t) for t in ins]
    except Exception as e:  # noqa: BLE001
        return f"the rule raised {raised(e)} for a {what}"
    return _linear_verdict(got, coeffs, options, what, names, dtypes)


def _linear_verdict(got: list, coeffs: tuple, options: dict, what: str, names: list, dtypes: list):
    """Judge the images ``got`` of :func:`_linear_inputs`' (co)tangents."""
    got = [[_host(v) for v in r] for r in got]
    r1, r2, p1, p2, mixed, *multiples = got
    alpha, beta = coeffs
    spread, spread2 = _allowance(p1, r1, 1.0), _allowance(p2, r2, 1.0)
    cases = [(f"α·{what}₁ + β·{what}₂", mixed, _combine(alpha, r1, beta, r2),
              [abs(alpha) * a + abs(beta) * b for a, b in zip(spread, spread2)],
              [abs(alpha) * _leaf_max(a) + abs(beta) * _leaf_max(b) for a, b in zip(r1, r2)])]
    for c, image in zip(MULTIPLES, multiples):
        cases.append((f"{c:g}·{what}", image, _scaled(c, r1), [abs(c) * s for s in spread],
                      [abs(c) * _leaf_max(a) for a in r1]))
    n, worst, label = 0, None, ""
    for lab, image, want, extras, scales in cases:
        finite = all(bool(np.all(np.isfinite(w))) for w in want)
        if not finite:  # an overflowing multiple says nothing about linearity
            continue
        k, w = compare_leaves(image, want, names, dtypes, scales=scales, extras=extras, rtol=options.get("rtol"),
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
        moved = _moved(subject.x, subject.tangent(rng))
        try:
            out = subject.value(moved)
        except Exception:  # noqa: BLE001 (outside the primal's domain: not a lane)
            continue
        if all(bool(np.all(np.isfinite(compat.host(o)))) for o in out):
            lanes.append(moved)
    return lanes if len(lanes) > 1 else None


def _moved(x: list, t: list) -> list:
    """x moved by LANE_SPREAD·t, at x's dtypes (another lane)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return [(_host(v) + LANE_SPREAD * _host(d)).astype(v.dtype) for v, d in zip(x, t)]


def _stack(rows: list) -> list:
    return [np.stack([_host(v) for v in col]) for col in zip(*rows)]


def _programs_of(subject: _Subject) -> list:
    """(name, output names, output dtypes) of the programs the batching check compares: f, its JVP, its VJP."""
    progs = [("f", subject.out_names, subject.out_dtypes)]
    if subject.fwd is None:
        progs.append(("jvp", subject.out_names, subject.out_dtypes))
    if subject.rev is None:
        progs.append(("vjp", subject.names, [_dtype(v) for v in subject.x]))
    return progs


def _compare_lanes(progs: list, batched: list, loop: list, label: str, options: dict,
                   rounding: Callable[[], list | None] | None = None) -> tuple:
    """(elements compared, worst disagreement, where) of ``batched`` (per program, leaves stacked over
    lanes) against ``loop`` (per lane, per program, leaves).

    vmap and one call per lane run the same formula through different kernels (XLA's
    vectorised and scalar transcendentals round differently), and a formula that cancels
    (1 − tanh² at |x| = 10 in float32: 1 ulp of tanh is all of the result) turns one
    rounding into a large relative difference. So where lanes disagree at a dtype narrower
    than float64, ``rounding()`` gives the same calls per lane at float64, and each leaf
    may also differ by ROUNDOFF_SAFETY times the largest error the unbatched calls make
    against it: the rounding of this formula at this dtype, measured. A batching bug moves
    a lane by far more than its own dtype's rounding does.
    """
    def compare(extras) -> tuple:
        n, worst, where = 0, None, ""
        for j, (prog, names, dtypes) in enumerate(progs):
            for b in range(len(loop)):
                k, w = compare_leaves([_host(v)[b] for v in batched[j]], [_host(v) for v in loop[b][j]], names,
                                      dtypes, rtol=options.get("rtol"), atol=options.get("atol"),
                                      extras=None if extras is None else extras[j], prefix=f"lane {b}, ")
                n += k
                if w is not None and (worst is None or w.excess > worst.excess):
                    worst, where = w, f"{prog} with {label}"
        return n, worst, where

    n, worst, where = compare(None)
    # finfo of a complex dtype is its real part's: complex128 has 64 bits there, not narrow.
    narrow = any(compat.finfo(d).bits < 64 for _, _, dtypes in progs for d in dtypes)
    if worst is None or rounding is None or not narrow:
        return n, worst, where
    twin = rounding()
    if twin is None:
        return n, worst, where
    extras = []
    for j, (_, names, _) in enumerate(progs):
        per_leaf = []
        for k in range(len(names)):
            with np.errstate(invalid="ignore"):
                d = [np.abs(_wide(loop[b][j][k]) - _wide(twin[b][j][k])) for b in range(len(loop))]
            d = np.concatenate([np.ravel(v) for v in d])
            d = d[np.isfinite(d)]
            per_leaf.append(policy.ROUNDOFF_SAFETY * float(d.max()) if d.size else 0.0)
        extras.append(per_leaf)
    return compare(extras)


def _float64_calls(subject: _Subject, progs: list, rows: list) -> Callable[[], list | None]:
    """The programs ``progs`` called once per (point, tangent, cotangent) of ``rows`` at float64,
    as :func:`_compare_lanes`' rounding reference; None where the function does not run at
    float64 or keeps its narrower dtypes there (then it is no reference)."""
    subject = subject.twin or subject
    fns = {"f": lambda x, t, u: list(subject.go(*x)), "jvp": lambda x, t, u: list(subject.jvp(x, t)[1]),
           "vjp": lambda x, t, u: list(subject.vjp(x, u)[1])}

    def widen(vs):
        return [_wide(v) if np.issubdtype(np.asarray(v).dtype, np.inexact) else _host(v) for v in vs]

    def run():
        try:
            with compat.enable_x64(True):
                call = jax.jit(lambda x, t, u: [fns[p](x, t, u) for p, _, _ in progs])
                got = [jax.tree_util.tree_map(_host, call(widen(x), widen(t), widen(u))) for x, t, u in rows]
        except Exception:  # noqa: BLE001 (no float64 run: the comparison stands as it is)
            return None
        wide = all(np.asarray(v).dtype.itemsize >= 8 for lane in got for prog in lane for v in prog
                   if np.issubdtype(np.asarray(v).dtype, np.inexact))
        return got if wide else None

    return run


def _batching_row(name: str, at: str, method: str, n: int, worst, where: str):
    if worst is not None:
        return site(BATCHING, at, name, "mismatch", n, method=method,
                    reason=f"{where}: vmap disagrees with one call per lane; " + worst.text("vmap", "one call"))
    return site(BATCHING, at, name, "ok", n, method=method)


def _batching_method(progs: list, lanes: int) -> str:
    return "vmap of " + ", ".join(p[0] for p in progs) + f" over {lanes} lanes vs one call per lane"


def _pattern_label(subject: _Subject, pat: tuple) -> str:
    n_in = len(subject.x)
    return ("every argument batched" if len(pat) == n_in and n_in > 1 else
            f"{subject.names[pat[0]]} batched" if n_in > 1 else "its argument batched")


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
    fns = {"f": lambda x, t, u: list(subject.go(*x)), "jvp": lambda x, t, u: list(subject.jvp(x, t)[1]),
           "vjp": lambda x, t, u: list(subject.vjp(x, u)[1])}
    progs = _programs_of(subject)
    programs = [(prog, fns[prog]) for prog, _, _ in progs]
    method = _batching_method(progs, B)
    # One program computes them all: one compilation for the loop, one per batching pattern.
    jitted = jax.jit(lambda x, t, u: [fn(x, t, u) for _, fn in programs])
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
        args = ([xs[0][k] if k not in pat else np.stack([_host(x[k]) for x in xs]) for k in range(n_in)],
                [ts[0][k] if k not in pat else np.stack([_host(t[k]) for t in ts]) for k in range(n_in)],
                _stack(cots))
        label = _pattern_label(subject, pat)
        try:
            batched = jax.vmap(jitted, in_axes=axes)(*args)
        except Exception as e:  # noqa: BLE001 (one call per lane works, vmap raises: a batching bug)
            progs = []
            for prog, fn in programs:  # which of them raises, to name it
                try:
                    jax.vmap(fn, in_axes=axes)(*args)
                except Exception:  # noqa: BLE001
                    progs.append(prog)
            return [site(BATCHING, at, name, "mismatch", n, method=method,
                         reason=f"vmap of {', '.join(progs) or 'f'} with {label} raises {raised(e)} where one "
                         "call per lane runs")]
        k, w, wh = _compare_lanes(progs, batched, loop, label, options,
                                  _float64_calls(subject, progs, list(zip(xs, ts, cots))))
        n += k
        if w is not None and (worst is None or w.excess > worst.excess):
            worst, where = w, wh
    return [_batching_row(name, at, method, n, worst, where)]


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


# -- primal, linearity and batching from two compiled programs ------------------------------------------
# Points drawn at once as the batching check's lanes: twice the lanes needed besides the
# point itself, so that one or two outside the primal's domain still leave LANES lanes.
CANDIDATES = 2 * (LANES - 1)


# The programs of :func:`together` are compiled without XLA's backend optimisations
# (compiling.fast): each runs once or twice on a few small arrays, where compiling is what
# costs (about half as long at level 0), and each check compares values computed in the
# same program.
def _quick(fn, *args):
    """``fn`` compiled for ``args`` as a program that runs only a few times."""
    return compiling.compiled_fast(fn, *args)


def _together_programs(subject: _Subject) -> tuple:
    """(f, JVP and VJP with their primal outputs mapped over rows of (point, tangent, cotangent), one
    call per row, and the same under vmap over lanes; that under vmap alone), compiled once for the
    subject at every point."""
    got = subject.programs.get("together")
    if got is None:
        jvp_ok, vjp_ok = subject.fwd is None, subject.rev is None

        def one(x, t, u):
            out = {"f": list(subject.go(*x))}
            if jvp_ok:
                p, jt = jax.jvp(subject.go, tuple(x), tuple(t))
                out["jvp primal"], out["jvp"] = list(p), list(jt)
            if vjp_ok:
                p, back = jax.vjp(subject.go, *x)
                out["vjp primal"], out["vjp"] = list(p), list(back(tuple(u)))
            return out

        def both(rows, lanes):
            return jax.lax.map(lambda a: one(*a), rows), jax.vmap(one)(*lanes)

        got = subject.programs["together"] = (both, jax.vmap(one))
    return got


def together(subject: _Subject, name: str, at: str, rng, options: dict, chosen) -> list | None:
    """The rows of :func:`primal`, :func:`linearity` and :func:`batching` (every argument batched),
    those in ``chosen``, from one compiled program instead of one or more per check.

    The program maps f, the JVP and the VJP (with their primal outputs) over rows of
    (point, tangent, cotangent), one call per row (``lax.map``: the rule is traced once):
    the point and the batching check's candidate lanes with their directions, then the
    point with each (co)tangent of the linearity check; and it runs the same under
    ``vmap`` over the point and the first LANES − 1 candidates. Where the primal is not
    finite at one of those, a second program runs the vmap over the point and the first
    candidates where it is. Each check judges these values as it judges its own. Returns
    None where a program raises or fewer than LANES lanes have a finite primal: the
    caller then runs each check alone, which finds which of them raises, and where.
    """
    jvp_ok, vjp_ok = subject.fwd is None, subject.rev is None
    if not (jvp_ok or vjp_ok):
        return None
    shapes = jax.eval_shape(subject.go, *subject.x)
    x = [_host(v) for v in subject.x]
    lanes = [x] + [_moved(x, subject.tangent(rng)) for _ in range(CANDIDATES)]
    tans = [[_host(v) for v in subject.tangent(rng, p)] for p in lanes]
    cots = [[_host(v) for v in subject.cotangent(rng, shapes)] for _ in lanes]
    rows = [(p, t, u) for p, t, u in zip(lanes, tans, cots)]
    lin_t = lin_u = None
    if LINEARITY in chosen:
        if jvp_ok:
            lin_t = _linear_inputs(subject.tangent(rng), subject.tangent(rng), rng)
        if vjp_ok:
            lin_u = _linear_inputs(subject.cotangent(rng, shapes), subject.cotangent(rng, shapes), rng)
        n_lin = len(MULTIPLES) + 5
        for j in range(n_lin):
            rows.append((x, lin_t[0][j] if lin_t else tans[0], lin_u[0][j] if lin_u else cots[0]))
    by_row, by_lane = _together_programs(subject)
    stacked = [_stack(col) for col in zip(*rows)]
    # The first LANES rows are vmapped in the same program: they are the lanes where the
    # primal is finite at the candidates drawn first, as it nearly always is.
    try:
        lanes_args = [[v[:LANES] for v in a] for a in stacked]
        got, batched = jax.tree_util.tree_map(_host, _quick(by_row, stacked, lanes_args)(stacked, lanes_args))
    except Exception:  # noqa: BLE001 (each check alone says which raises)
        return None
    finite = [i for i in range(1, len(lanes)) if all(bool(np.all(np.isfinite(v[i]))) for v in got["f"])]
    keep = [0] + finite[:LANES - 1]
    if BATCHING in chosen and len(keep) < LANES:
        return None
    if BATCHING in chosen and keep != list(range(LANES)):
        try:
            lanes_args = [[v[np.array(keep)] for v in a] for a in stacked]
            batched = jax.tree_util.tree_map(_host, _quick(by_lane, *lanes_args)(*lanes_args))
        except Exception:  # noqa: BLE001 (as above: batching alone names the program that raises)
            return None
    out = []
    if PRIMAL in chosen:
        how = "jvp" if jvp_ok else "vjp"
        out.append(_primal_row(subject, name, at, options, how, out=[v[0] for v in got[how + " primal"]],
                               ref=[v[0] for v in got["f"]]))
    if LINEARITY in chosen:
        start, found, whats = len(lanes), [], []
        for what, lin, prog, names, dtypes in (
                ("tangent", lin_t, "jvp", subject.out_names, subject.out_dtypes),
                ("cotangent", lin_u, "vjp", subject.names, [_dtype(v) for v in subject.x])):
            if lin is None:
                continue
            images = [[v[start + j] for v in got[prog]] for j in range(len(lin[0]))]
            whats.append(what)
            found.append(_linear_verdict(images, lin[1], options, what, names, dtypes))
        out += _linearity_rows(found, whats, name, at)
    if BATCHING in chosen:
        progs = _programs_of(subject)
        loop = [[[v[i] for v in got[prog]] for prog, _, _ in progs] for i in keep]
        n, worst, where = _compare_lanes(progs, [batched[prog] for prog, _, _ in progs], loop,
                                         _pattern_label(subject, tuple(range(len(x)))), options,
                                         _float64_calls(subject, progs, [rows[i] for i in keep]))
        out.append(_batching_row(name, at, _batching_method(progs, len(keep)), n, worst, where))
    return out
