"""Directional product checks: Jacobian-vector products J·t and vector-Jacobian products uᵀJ.

* :func:`check_jvp` — J·t for random tangents t (per input leaf, so a failure names
  the leaf), all directions in one vmapped batch, against central differences.
* :func:`check_vjp` — ⟨u, J t⟩ for random cotangents u (per output leaf) and tangents t
  (per input leaf): the VJP side computes ⟨Jᵀu, t⟩, the numerical side ⟨u, (J t)_fd⟩;
  and, where f also has a JVP, the exact transpose identity ⟨u, J t⟩ = ⟨Jᵀu, t⟩.

Both, ``check_hvp`` and the ``check_grads`` drop-in run through :func:`run`, which a
frozen :class:`Plan` configures: one preparation, one noise probe and one
finite-difference pass serve every comparison of a call.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from . import compare, policy, stencils, validate
from .judge import ComplexStep, Evidence, Limits, Refined, judge, limits, line_central, line_complex
from .names import short_name
from .report import Report
from .sampling import rng_from_key
from .summary import block_reasons, block_report, gref, make_report, twin_values
from .vector import VectorProblem
from .vector_analytic import NoForwardRule, NoReverseRule
from .vector_complex import ComplexSteps
from .vector_native import first_spread, round_cotangents, twin_of

VJP_AGAINST = ("auto", "numerical", "jvp")
# Random directions per input leaf (and cotangents per output leaf). Four directions
# cost 8 evaluations per leaf; a wrong rule that is wrong in a random direction with
# probability one is caught by the first, the others guard against unlucky
# near-cancellations (a rule wrong only on a small part of the leaf).
DEFAULT_DIRECTIONS = 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run of product checks compares, and how."""

    api: str  # the front door, for messages and the report
    jvp: bool = False  # J·t from the JVP against finite differences
    vjp: bool = False  # ⟨Jᵀu, t⟩ from the VJP, against ``against``
    against: str = "numerical"  # "numerical", "jvp" or "auto" (both where f has a JVP)
    # A custom_vjp function (no JVP) is checked in reverse mode instead, and a function
    # without reverse mode in forward mode; the notes say so.
    fallback: bool = False
    # Where JAX's own JVP or VJP of f raises at the point (eagerly too: the rule is
    # broken, not its batching), its products are NaN and fail, with a note; otherwise
    # that error is raised.
    broken_as_nan: bool = False
    user_jvp: Callable | None = None  # jvp(primals, tangents), as jax.jvp (None: jax.jvp)
    user_vjp: Callable | None = None  # vjp(*primals) -> (out, vjp_fn), as jax.vjp (None: jax.vjp)
    key: Any = None  # seeds tangents and cotangents
    directions: int = DEFAULT_DIRECTIONS  # tangents per input leaf
    cotangents: int = 1  # cotangents per output leaf
    # The options shared with every check (tolerances, step, strict, precision, chunk
    # size, analytic side), validated at the front door; None: the defaults.
    options: validate.Options | None = None
    labels: tuple = ("", "")  # row prefixes of the JVP and the VJP blocks
    # What the VectorProblem takes beyond the options: argnums, has_aux, in_label,
    # out_name, allow_nonfinite, absolute_step.
    problem: dict = dataclasses.field(default_factory=dict)

    @property
    def opts(self) -> validate.Options:
        """The options; without any, the defaults of a VectorProblem (reference side)."""
        return self.options if self.options is not None else validate.Options(self.api, analytic="reference")


@dataclasses.dataclass(frozen=True)
class _Pairing:
    """The VJP side of ⟨u, J t⟩: per input leaf, ⟨Jᵀu, t⟩ for every (cotangent, tangent)."""

    A: list  # (L·nc, nd) per input leaf
    U: np.ndarray  # cotangents (L·nc, n_out)
    Wc: list  # Jᵀu in real coordinates, per input leaf
    Tc: list  # tangents in real coordinates, per input leaf
    S: list | None = None  # measured rounding of A at the dtypes given (see vector_native), per input leaf
    # The float64 twin's VJPs: cotangents (rows, n_out) -> Jᵀu per input leaf (None: no twin)
    twin: Callable | None = None


def _tangent_bank(vp: VectorProblem, rng, nd: int):
    """Per-leaf random tangents: bank row 1 + k·nd + d is direction d of leaf k (zero elsewhere)."""
    return [vp.random_tangents(rng, k, nd) for k in range(len(vp.dyn))]


def _setup_directions(vp, rng, nd):
    T = _tangent_bank(vp, rng, nd)
    vp.set_bank(T)
    vp.measure_noise()
    return T, np.arange(1, len(vp.dyn) * nd + 1)


def _directional_pass(vp: VectorProblem, B: int, h: float):
    """Central differences of J·t for bank rows 1..B, as (B, n_out) arrays (value, error, finite)."""
    dirs = np.arange(1, B + 1)
    est = vp.directional(dirs, "central", h)
    N = est.value.reshape(B, vp.n_out)
    E = compare.method_error(est.err_round, est.err_trunc, vp.sigma_rows(B)).reshape(B, vp.n_out)
    Fin = est.finite.reshape(B, vp.n_out)
    return N, E, Fin


def _richardson_rows(vp: VectorProblem, rows: np.ndarray, step) -> Refined:
    """Richardson re-estimate of J·t for bank rows ``rows + 1``, as (rows, n_out[, 3]) arrays."""
    r = vp.directional(rows + 1, "richardson", vp.relative_step("richardson", step))
    shp = (rows.size, vp.n_out)
    E = compare.method_error(r.err_round, r.err_trunc, vp.sigma_rows(rows.size)).reshape(shp)
    noise = (vp.sigma_rows(rows.size) * r.err_round / policy.RICHARDSON_NOISE_GAIN).reshape(shp)
    return Refined(r.value.reshape(shp), E, r.finite.reshape(shp), r.onesided.reshape(rows.size, vp.n_out, -1),
                   r.table.reshape(rows.size, vp.n_out, -1), noise)


def check_jvp(f: Callable, *primals, jvp: Callable | None = None, argnums=None, has_aux: bool = False,
              key=None, num_directions: int = DEFAULT_DIRECTIONS, precision: str = "auto",
              rtol: float | None = None, atol: float | None = None, step: float | None = None,
              strict: bool = False, chunk_size: int | None = None, analytic: str = "native") -> Report:
    """Check Jacobian-vector products J·t of ``f`` against directional finite differences.

    For every checked input leaf, ``num_directions`` random tangents t (normal, scaled
    by each element's scale, zero on the other leaves) are drawn from ``key``; all of
    them go through one compiled, vmapped batch: (f(x + h·t) − f(x − h·t)) / 2h. Each
    output element of each J·t is compared as in :func:`check_jacobian`.

    Args:
      f: ``f(*primals)`` returning any pytree of arrays.
      *primals: the point.
      jvp: None for ``jax.jvp(f, ...)``, or a callable ``jvp(primals, tangents) ->
        (primals_out, tangents_out)`` with ``jax.jvp``'s convention (tangents of
        unchecked primals are zeros; integer ones float0).
      argnums, has_aux: as in :func:`check_jacobian`.
      key: a ``jax.random.key`` (or int seed) for the tangents; default key(0).
      num_directions: random tangents per input leaf.
      precision, rtol, atol, step, strict, chunk_size: as in :func:`jgc.check`.
      analytic: "native" (default) or "reference", as in :func:`check_jacobian`.

    Returns:
      A :class:`jgc.Report`, one block per (input leaf, output leaf) of shape
      ``(num_directions, *output_shape)``: ``input_index`` is ``(direction,)``.

    Raises:
      TypeError: when f is a ``jax.custom_vjp`` function (it has no JVP): use
        :func:`check_vjp`.

    Example:
      >>> import jax.numpy as jnp, jgc
      >>> jgc.check_jvp(lambda x, y: (x * y, jnp.exp(x)), jnp.ones(3), jnp.arange(3.0)).ok
      True
    """
    api = "jgc.check_jvp"
    opts = validate.options(api, precision=precision, rtol=rtol, atol=atol, step=step, strict=strict,
                            chunk_size=chunk_size, analytic=analytic)
    validate.count(api, "num_directions", num_directions)
    plan = Plan(api=api, jvp=True, user_jvp=jvp, key=key, directions=num_directions, options=opts,
                problem={"argnums": argnums, "has_aux": has_aux})
    return run(f, primals, plan)[0]


def run(f: Callable, primals: tuple, plan: Plan) -> tuple[Report, bool, bool]:
    """Run the product checks of ``plan`` on ``f`` at ``primals``: (report, did JVP, did VJP)."""
    api, nd, nc, against, opts = plan.api, plan.directions, plan.cotangents, plan.against, plan.opts
    do_jvp, do_vjp = plan.jvp, plan.vjp
    rng = rng_from_key(plan.key, api)
    notes = []
    with VectorProblem(f, primals, api=api, precision=opts.precision, chunk_size=opts.chunk_size,
                       analytic=opts.analytic, **plan.problem) as vp:
        T, rows = _setup_directions(vp, rng, nd)
        h = vp.relative_step("central", opts.step)
        name = short_name(f)
        JT = S_JT = None  # J·t from the JVP, and its measured rounding at the dtypes given
        if do_jvp or (do_vjp and against in ("auto", "jvp")):
            try:
                jvps = vp.jvp_batch(plan.user_jvp, from_bank=True, broken_as_nan=plan.broken_as_nan)
                JT, S_JT = jvps(rows), first_spread(jvps)
            except NoForwardRule:
                if do_jvp and not plan.fallback:
                    raise NoForwardRule(
                        f"{api}: {name} is a jax.custom_vjp function, which has no JVP (JAX raises "
                        "on forward mode). Check its rule with jgc.check_vjp, or jgc.check_grads "
                        "(which picks reverse mode by itself)."
                    ) from None
                if do_vjp and not do_jvp and against == "jvp":
                    raise NoForwardRule(
                        f"{api}: against='jvp' needs a JVP, but {name} is a jax.custom_vjp "
                        "function. Use against='numerical'."
                    ) from None
                if do_jvp:
                    notes.append(f"{name} is a custom_vjp function (no JVP): mode 'fwd' was replaced by 'rev'.")
                    do_jvp, do_vjp = False, True
                else:
                    notes.append(f"{name} is a custom_vjp function (no JVP): its VJP was checked "
                                 "against finite differences only.")
        K, L = len(vp.dyn), len(vp.out_leaves)
        if do_vjp:
            U = np.zeros((L * nc, vp.n_out))
            z = rng.standard_normal((L * nc, vp.n_out))
            for li, ol in enumerate(vp.out_leaves):
                U[li * nc:(li + 1) * nc, ol.start:ol.stop] = z[li * nc:(li + 1) * nc, ol.start:ol.stop]
            U = round_cotangents(vp, U)
            try:
                vjps = vp.vjp_batch(plan.user_vjp, broken_as_nan=plan.broken_as_nan)
                W, S_W = vjps(U), first_spread(vjps)
            except NoReverseRule as e:
                why = str(e).strip().splitlines()[0][:160]
                if not plan.fallback:
                    raise NoReverseRule(
                        f"{api}: {name} has no reverse-mode derivative (JAX says: {why}). "
                        "Check it with jgc.check_jvp."
                    ) from None
                do_vjp = False
                if do_jvp:
                    notes.append(f"{name} has no reverse-mode derivative (JAX says: {why}): mode 'rev' was skipped.")
                else:
                    notes.append(f"{name} has no reverse-mode derivative (JAX says: {why}): "
                                 "mode 'rev' was replaced by 'fwd'.")
                    do_jvp = True
                    if JT is None:
                        jvps = vp.jvp_batch(plan.user_jvp, from_bank=True, broken_as_nan=plan.broken_as_nan)
                        JT, S_JT = jvps(rows), first_spread(jvps)
        need_fd = do_jvp or (do_vjp and against in ("auto", "numerical"))
        fd = _directional_pass(vp, K * nd, h) if need_fd else None
        leaves = []
        if do_jvp:
            leaves += _judge_directions(vp, JT, fd, plan, h, S_JT=S_JT, twin=twin_of(jvps, rows))
        if do_vjp:
            Wc = [vp.to_coords(k, w) for k, w in enumerate(W)]
            Tc = [vp.tangent_coords(k, t) for k, t in enumerate(T)]
            with np.errstate(invalid="ignore", over="ignore"):  # non-finite pairs get their own status
                A = [w @ t.T for w, t in zip(Wc, Tc)]  # (L·nc, nd) per input leaf: ⟨Jᵀu, t⟩
            S = None if S_W is None else [np.abs(vp.to_coords(k, s)) @ np.abs(t.T) for k, (s, t) in enumerate(zip(S_W, Tc))]
            pairing = _Pairing(A, U, Wc, Tc, S, twin_of(vjps))
            if against in ("auto", "numerical"):
                leaves += _judge_pairs_numerical(vp, pairing, fd, plan, h)
            if JT is not None and against in ("auto", "jvp"):
                leaves += _judge_pairs_identity(vp, pairing, JT, plan, h, S_JT=S_JT)
        mode = " + ".join(([f"jvp ({nd} directions per leaf)"] if do_jvp else [])
                          + ([f"vjp ({against})"] if do_vjp else []))
        rep = make_report(vp, leaves, api=api, mode=mode, stencil="central", step=h, strict=opts.strict,
                          notes=notes, prefixes={"JVP": plan.labels[0], "VJP": plan.labels[1]})
        return rep, do_jvp, do_vjp


def _judge_directions(vp, JT, fd, plan: Plan, h: float, *, S_JT=None, twin=None) -> list:
    """Judge J·t from the JVP (rows: tangents, columns: outputs) against finite differences
    ``fd``; ``S_JT``: its measured rounding at the dtypes given (None: none measured);
    ``twin``: the JVPs of the float64 twin, for rows with a mismatch (see ``vector_native.twin_of``)."""
    nd = plan.directions
    g_all = gref(JT, 1.0)
    RT, AT, FL, RS = (np.zeros_like(JT) for _ in range(4))
    TL = np.zeros(JT.shape, bool)
    GR = {}  # (input leaf, output leaf start) -> g_ref (a dict: empty leaves have no column)
    for k in range(len(vp.dyn)):
        r = slice(k * nd, (k + 1) * nd)
        for ol in vp.out_leaves:
            c = slice(ol.start, ol.stop)
            g = gref(JT[r, c], g_all)
            lim = limits(vp, k, ol, plan.opts.rtol, plan.opts.atol, g, block=JT[r, c])
            RT[r, c], AT[r, c], FL[r, c], TL[r, c], RS[r, c] = lim.rtol, lim.atol, lim.floor, lim.tail, lim.residue
            GR[k, ol.start] = g
    lim = Limits(RT, AT, FL, analytic=0.0 if S_JT is None else policy.ANALYTIC_SAFETY * S_JT, tail=TL, residue=RS)

    def richardson(rows):
        r2 = _richardson_rows(vp, rows, plan.opts.step)
        side = (lambda v: v.reshape(-1, v.shape[-1]))
        return Refined(r2.value.ravel(), r2.err.ravel(), r2.finite.ravel(), side(r2.onesided), side(r2.table),
                       r2.noise.ravel())

    central = line_central(lambda rows, h_rel: vp.directional(rows + 1, "central", h_rel), JT.shape, 1, vp.sigma)
    # The JVP adapter of the judge: rows are tangents, a suspect row re-estimated whole;
    # where some block is float64, the complex step along the tangents of real leaves.
    ev = Evidence(lambda: tuple(x.copy() for x in fd), richardson=richardson, lines=1, central=central,
                  complex_step=_directions_complex(vp, JT.shape, nd, TL), imprecise=False, h_rel=h, u=vp.u)
    judged = judge(JT, lim, ev).judged
    TW = twin_values(judged.codes, twin, lines=1)
    leaves = []
    for k in range(len(vp.dyn)):
        r = slice(k * nd, (k + 1) * nd)
        for ol in vp.out_leaves:
            c = slice(ol.start, ol.stop)
            leaves.append(block_report(
                JT[r, c], judged.num[r, c], judged.bound[r, c], judged.codes[r, c],
                path=vp.paths[k], label=f"{plan.labels[0]}{ol.path} · t[{vp.paths[k]}]", output_path=ol.path,
                shape=(nd,) + ol.block_shape, dtype=vp.orig_dtypes[k].name,
                split_index=lambda w: (w[1:], w[:1]), step=h, g_ref=float(GR[k, ol.start]),
                twin=None if TW is None else TW[r, c],
                reasons=block_reasons(judged.why, JT.shape, r, np.arange(ol.start, ol.stop)),
            ))
    return leaves


def _real_rows(vp, nd: int) -> np.ndarray:
    """Per bank row 1…K·nd (a tangent of leaf k), whether the leaf is real: only a real
    leaf moved by i·h·t has a complex step."""
    return np.repeat([not vp.is_complex(k) for k in range(len(vp.dyn))], nd)


def _directions_complex(vp, shape: tuple, nd: int, tail: np.ndarray) -> ComplexStep | None:
    """The complex step of J·t rows (bank rows 1…), where some entry is float64 (else None)."""
    if not tail.any():
        return None
    cx = ComplexSteps(vp)
    return ComplexStep(line_complex(lambda rows, h_rel: cx.directions(rows + 1, h_rel), shape, 1),
                       vp.relative_step("complex", None), vp.u,
                       where=_real_rows(vp, nd)[:, None] & cx.real_out[None, :])


def _paired_complex(idx, h_rel, *, cx, first, shape, cols, U):
    """The complex step of the pairing ⟨u, J t⟩ (as :func:`_paired_central`): values of the
    pairs at flat indices ``idx`` of a (cotangents, directions) block."""
    us, ds = np.unravel_index(np.asarray(idx, np.int64), shape)
    uds, where = np.unique(ds, return_inverse=True)
    est = cx.directions(first + uds + 1, h_rel)
    v, f = (x.reshape(uds.size, -1)[:, cols] for x in (est.value, est.finite))
    value = (U @ v.T)[us, where]
    return stencils.Estimate(value, np.zeros_like(value), np.zeros_like(value), np.all(f, axis=1)[where])


def _pair_blocks(vp, nd, nc):
    """Yield (input leaf k, output leaf, direction rows, cotangent rows, output columns)."""
    for k in range(len(vp.dyn)):
        r = slice(k * nd, (k + 1) * nd)
        for li, ol in enumerate(vp.out_leaves):
            yield k, ol, r, slice(li * nc, (li + 1) * nc), slice(ol.start, ol.stop)


def _paired_richardson(vp, first: int, U, absU, cols, ds: np.ndarray, *, step) -> Refined:
    """Richardson re-estimate of the pairing ⟨u, J t⟩ for directions ``ds`` (bank rows
    ``first + ds + 1``), every cotangent of ``U`` (restricted to output columns ``cols``)."""
    r2 = _richardson_rows(vp, first + ds, step)
    n2 = U @ r2.value[:, cols].T
    o2 = np.einsum("uj,djs->uds", U, r2.onesided[:, cols, :])
    tb2 = np.einsum("uj,djs->uds", U, r2.table[:, cols, :])
    return Refined(
        n2.ravel(), (absU @ r2.err[:, cols].T).ravel(),
        np.broadcast_to(np.all(r2.finite[:, cols], axis=1)[None, :], n2.shape).ravel(),
        o2.reshape(-1, o2.shape[-1]), tb2.reshape(-1, tb2.shape[-1]), (absU @ r2.noise[:, cols].T).ravel())


def _paired_central(bad, h_rel, *, vp, first, shape, cols, U, absU):
    """Central differences of the pairing ⟨u, J t⟩ at relative step h_rel, for the step
    ladder: (value, round-off scale, finite) of the pairs at flat indices ``bad`` of a
    (cotangents, directions) block whose directions are bank rows ``first + 1 …``, and
    ``cols`` the output leaf's columns."""
    us, ds = np.unravel_index(bad, shape)
    uds, where = np.unique(ds, return_inverse=True)
    rows = first + uds + 1
    est = vp.directional(rows, "central", h_rel)
    v, g, f = (x.reshape(rows.size, vp.n_out)[:, cols] for x in (est.value, est.err_round, est.finite))
    return (U @ v.T)[us, where], (absU @ (g * vp.sigma[cols]).T)[us, where], np.all(f, axis=1)[where]


def _judge_pairs_numerical(vp, pairing: _Pairing, fd, plan: Plan, h: float) -> list:
    """Judge ⟨Jᵀu, t⟩ against ⟨u, (J t)_fd⟩, block by block."""
    nd, nc = plan.directions, plan.cotangents
    N, E, Fin = fd
    absU = np.abs(pairing.U)
    cx = ComplexSteps(vp)  # programs built on first use only
    leaves = []
    for k, ol, r, cu, c in _pair_blocks(vp, nd, nc):
        # one (input leaf, output leaf) block of the pairing ⟨u, J t⟩
        a = pairing.A[k][cu]
        Uc = pairing.U[cu, c]
        n = Uc @ N[r, c].T
        err = absU[cu, c] @ E[r, c].T
        fin = np.broadcast_to(np.all(Fin[r, c], axis=1)[None, :], a.shape).copy()
        # Magnitude of the terms of the pairing: its rounding scale for atol.
        g = gref(absU[cu, c] @ np.abs(N[r, c]).T, 1.0)
        lim = limits(vp, k, ol, plan.opts.rtol, plan.opts.atol, g, block=a)
        if pairing.S is not None:
            lim = dataclasses.replace(lim, analytic=policy.ANALYTIC_SAFETY * pairing.S[k][cu])
        # The complex step along the block's tangents (a real input leaf, real outputs).
        cs = None if not lim.tail or vp.is_complex(k) or ol.is_complex else ComplexStep(
            functools.partial(_paired_complex, cx=cx, first=k * nd, shape=a.shape, cols=c, U=Uc),
            vp.relative_step("complex", None), vp.u)
        ev = Evidence(lambda n=n, err=err, fin=fin: (n, err, fin),
                      richardson=functools.partial(_paired_richardson, vp, k * nd, Uc, absU[cu, c], c,
                                                   step=plan.opts.step),
                      lines=0, central=functools.partial(_paired_central, vp=vp, first=k * nd, shape=a.shape,
                                                         cols=c, U=Uc, absU=absU[cu, c]),
                      complex_step=cs, imprecise=False, h_rel=h, u=vp.u)
        judged = judge(a, lim, ev).judged
        twin = None if pairing.twin is None else (
            lambda bad, k=k, cu=cu: vp.to_coords(k, pairing.twin(pairing.U[cu][bad])[k]) @ pairing.Tc[k].T)
        leaves.append(block_report(
            a, judged.num, judged.bound, judged.codes,
            path=vp.paths[k], label=f"{plan.labels[1]}⟨u[{ol.path}], J t[{vp.paths[k]}]⟩", output_path=ol.path,
            shape=(nc, nd), dtype=vp.orig_dtypes[k].name, split_index=lambda w: (w[:1], w[1:]), step=h, g_ref=g,
            twin=twin_values(judged.codes, twin, lines=1), reasons=judged.why,
        ))
    return leaves


def _judge_pairs_identity(vp, pairing: _Pairing, JT, plan: Plan, h: float, *, S_JT=None) -> list:
    """Judge ⟨Jᵀu, t⟩ against ⟨u, J t⟩ from the JVP: the transpose identity, exact up to
    rounding (at the dtypes given, the rounding both sides were measured to carry)."""
    nd, nc = plan.directions, plan.cotangents
    absU = np.abs(pairing.U)
    leaves = []
    for k, ol, r, cu, c in _pair_blocks(vp, nd, nc):
        # one (input leaf, output leaf) block of the pairing ⟨u, J t⟩
        a = pairing.A[k][cu]
        b = pairing.U[cu, c] @ JT[r, c].T
        # Both sides are exact up to rounding: scale atol by the size of the terms.
        terms = absU[cu, c] @ np.abs(JT[r, c]).T + np.abs(pairing.Wc[k][cu]) @ np.abs(pairing.Tc[k]).T
        g = gref(terms, 1.0)
        both = (0.0 if pairing.S is None else pairing.S[k][cu]) + (
            0.0 if S_JT is None else absU[cu, c] @ S_JT[r, c].T)
        # The identity adapter of the judge: exact on both sides, a cheap pass only.
        first = (b, policy.ANALYTIC_SAFETY * both * np.ones_like(a), np.isfinite(b))
        ev = Evidence(lambda first=first: first, imprecise=False)
        judged = judge(a, limits(vp, k, ol, plan.opts.rtol, plan.opts.atol, g), ev).judged
        leaves.append(block_report(
            a, b, judged.bound, judged.codes,
            path=vp.paths[k], label=f"{plan.labels[1]}⟨u[{ol.path}], J t[{vp.paths[k]}]⟩ transpose",
            output_path=ol.path, shape=(nc, nd), dtype=vp.orig_dtypes[k].name,
            split_index=lambda w: (w[:1], w[1:]), step=h, g_ref=g,
        ))
    return leaves


def check_vjp(f: Callable, *primals, vjp: Callable | None = None, jvp: Callable | None = None,
              argnums=None, has_aux: bool = False, key=None, num_directions: int = DEFAULT_DIRECTIONS,
              num_cotangents: int = DEFAULT_DIRECTIONS, against: str = "auto", precision: str = "auto",
              rtol: float | None = None, atol: float | None = None, step: float | None = None,
              strict: bool = False, chunk_size: int | None = None, analytic: str = "native") -> Report:
    """Check vector-Jacobian products uᵀJ of ``f`` through ⟨u, J t⟩ = ⟨Jᵀu, t⟩.

    Random cotangents u (``num_cotangents`` per output leaf, zero on the other output
    leaves) and tangents t (``num_directions`` per input leaf) are drawn from ``key``.
    For every pair, the VJP side ⟨Jᵀu, t⟩ (one vmapped batch of VJPs) is compared with

    * "numerical": ⟨u, (J t)_fd⟩ from central differences along t (one vmapped batch
      of 2 evaluations per direction); its error bar is Σ_j |u_j|·err_j. Catches any
      wrong VJP, including a wrong ``custom_jvp`` rule transposed by JAX.
    * "jvp": ⟨u, J t⟩ from the JVP (``jax.jvp`` or ``jvp``): the exact transpose
      identity, no finite differences, tolerance rtol only. Catches a VJP that is not
      the transpose of the JVP (a missing transpose, a wrong hand-written ``vjp``), but
      not a JVP and VJP that are wrong together.

    Complex numbers follow JAX: ⟨a, b⟩ = Re Σ a·b over (Re, Im) coordinates, i.e.
    ``jax.vjp``'s cotangent of an output is paired bilinearly, not conjugated.

    Args:
      f: ``f(*primals)`` returning any pytree of arrays.
      *primals: the point.
      vjp: None for ``jax.vjp(f, ...)``, or ``vjp(*primals) -> (primals_out, vjp_fn)``
        with ``jax.vjp``'s convention (vjp_fn returns one cotangent per primal).
      jvp: for against="jvp"/"auto": None for ``jax.jvp``, or as in :func:`check_jvp`.
      argnums, has_aux: as in :func:`check_jacobian`.
      key: a ``jax.random.key`` or int seed; default key(0).
      num_directions, num_cotangents: tangents per input leaf, cotangents per output leaf.
      against: "auto" (numerical, plus the transpose identity where f has a JVP),
        "numerical" or "jvp".
      precision, rtol, atol, step, strict, chunk_size: as in :func:`jgc.check`.
      analytic: "native" (default) or "reference", as in :func:`check_jacobian`.

    Returns:
      A :class:`jgc.Report`, one block per (output leaf, input leaf) and check, of shape
      ``(num_cotangents, num_directions)``: ``output_index`` is ``(cotangent,)`` and
      ``input_index`` ``(direction,)``.

    Example:
      >>> import jax, jax.numpy as jnp, jgc
      >>> @jax.custom_vjp
      ... def square(x):
      ...     return x ** 2
      >>> square.defvjp(lambda x: (x ** 2, x), lambda x, g: (2 * x * g,))
      >>> jgc.check_vjp(square, jnp.array([1.0, -2.0])).ok
      True
    """
    api = "jgc.check_vjp"
    opts = validate.options(api, precision=precision, rtol=rtol, atol=atol, step=step, strict=strict,
                            chunk_size=chunk_size, analytic=analytic)
    validate.count(api, "num_directions", num_directions)
    validate.count(api, "num_cotangents", num_cotangents)
    if against not in VJP_AGAINST:
        raise ValueError(f"{api}: against must be one of {VJP_AGAINST}, got {against!r}.")
    plan = Plan(api=api, vjp=True, against=against, user_jvp=jvp, user_vjp=vjp, key=key,
                directions=num_directions, cotangents=num_cotangents, options=opts,
                problem={"argnums": argnums, "has_aux": has_aux})
    return run(f, primals, plan)[0]
