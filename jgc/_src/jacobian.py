"""Front doors beyond scalar losses: Jacobians, JVPs, VJPs and second order.

All four work on the real view of :class:`jgc._src.vector.VectorProblem` (every floating
output element, complex ones as (Re, Im) pairs) and share the error model of
``jgc.check``: the measured noise σ_j of every output element, a per-dtype step, the
tolerance atol + rtol·max(|a|, |n|), and a Richardson re-estimate (steps h, 2h, 4h) of
every entry that fails the cheap central-difference pass, with one-sided differences
to recognise kinks.

* :func:`check_jacobian` — every column J[:, i] by central differences against
  ``jax.jacfwd``/``jax.jacrev`` (or a user Jacobian); the report names input leaf,
  output leaf and the indices of the worst entry on both sides.
* :func:`check_jvp` — J·t for random tangents t (per input leaf, so a failure names
  the leaf), all directions in one vmapped batch.
* :func:`check_vjp` — ⟨u, J t⟩ for random cotangents u (per output leaf) and tangents t
  (per input leaf): the VJP side computes ⟨Jᵀu, t⟩, the numerical side ⟨u, (J t)_fd⟩;
  and, where f also has a JVP, the exact transpose identity ⟨u, J t⟩ = ⟨Jᵀu, t⟩.
* :func:`check_hvp` — Hessian-vector products (order 2) and higher directional
  derivatives: differences of the gradient against ``jax.jvp(jax.grad(f))`` or a user
  ``hvp(params, v, *args)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import compare, policy, stencils, trees
from .report import MISMATCH, STATUS_NAMES, LeafReport, Report, typical_and_largest, verdict
from .vector import NoForwardRule, NoReverseRule, VectorProblem, fname, to_device

JACOBIAN_MODES = ("auto", "fwd", "rev")
VJP_AGAINST = ("auto", "numerical", "jvp")
# Random directions per input leaf (and cotangents per output leaf). Four directions
# cost 8 evaluations per leaf; a wrong rule that is wrong in a random direction with
# probability one is caught by the first, the others guard against unlucky
# near-cancellations (a rule wrong only on a small part of the leaf).
DEFAULT_DIRECTIONS = 4


# -- shared helpers ---------------------------------------------------------------------
def _validate_common(api, rtol, atol, num=None, name=None):
    for nm, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                  and v >= 0 and math.isfinite(v)):
            raise ValueError(f"{api}: {nm} must be a non-negative number or None, got {v!r}.")
    if name is not None and not (isinstance(num, int) and not isinstance(num, bool) and num >= 1):
        raise ValueError(f"{api}: {name} must be a positive int, got {num!r}.")


def rng_from_key(key, api) -> np.random.Generator:
    """A NumPy generator seeded by a jax.random key or an int (None: seed 0, reproducible).

    Directions are drawn on the host with NumPy: jax.random would compile a kernel for
    every new shape, which dominates the cost of checking many small functions.
    """
    if key is None:
        return np.random.default_rng(0)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return np.random.default_rng(int(key))
    if isinstance(key, (jax.Array, np.ndarray)):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        data = np.asarray(key)
        if np.issubdtype(data.dtype, np.integer):
            return np.random.default_rng(data.astype(np.uint64).ravel().tolist())
    raise TypeError(f"{api}: key must be a jax.random.key (or an int seed), got {type(key).__name__}.")


def _dtype_tols(vp, k: int, ol, rtol, atol, g_ref):
    """rtol/atol/floor for the block (output leaf ol, input leaf k)."""
    # The analytic side rounds in the coarser of the input's evaluation dtype and the
    # output's dtype (a function that computes in float32 inside a float64 check).
    d = max([vp.eval_dtypes[k], ol.dtype], key=policy.unit_roundoff)
    rt = policy.default_rtol(d) if rtol is None else rtol
    at = policy.default_atol_factor(d) * g_ref if atol is None else atol
    return rt, at, 1e-3 * g_ref


def _gref(a: np.ndarray, fallback: float) -> float:
    fin = np.abs(a[np.isfinite(a)])
    g = float(fin.max()) if fin.size else 0.0
    return g if g > 0 else fallback


def _scalar(v):
    return complex(v) if np.iscomplexobj(v) else float(v)


def block_report(*, path, label, output_path, shape, dtype, a, n, bound, codes, onesided=None,
                 split_index: Callable, step: float, g_ref: float) -> LeafReport:
    """A LeafReport for one block of entries (flat, in the block's C order)."""
    a, n, bound, codes = (np.ravel(x) for x in (a, n, bound, codes))
    size = int(np.prod(shape, dtype=np.int64))
    d = np.abs(a - n)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, d / bound, np.where(d > 0, np.inf, 0.0))
        ratio = np.where(np.isnan(ratio), np.inf, ratio)
        mag = np.maximum(np.abs(a), np.abs(n))
        rel = np.where((mag >= 1e-3 * g_ref) & (mag > 0), d / mag, 0.0)
        det = np.where(np.abs(a) > 0, (bound + np.where(d <= bound, d, 0.0)) / np.abs(a), np.inf)
    w = int(np.argmax(ratio)) if d.size else 0
    if d.size and codes.max() >= MISMATCH:
        bad = np.flatnonzero(codes == MISMATCH)
        w = int(bad[np.argmax(ratio[bad])])
    counts = {nm: int(np.sum(codes == i)) for i, nm in enumerate(STATUS_NAMES)}
    nrm = float(np.linalg.norm(np.where(np.isfinite(a + n), a + n, 0)))
    dn = float(np.linalg.norm(np.where(np.isfinite(d), d, 0)))
    widx = tuple(int(i) for i in np.unravel_index(w, shape)) if d.size else ()
    out_idx, in_idx = split_index(widx) if d.size else ((), ())
    fin = d[np.isfinite(d)]
    return LeafReport(
        path=path, shape=tuple(shape), dtype=dtype, size=size, checked=int(d.size),
        status=STATUS_NAMES[int(codes.max())] if codes.size else "ok", counts=counts,
        max_abs_err=float(fin.max()) if fin.size else (math.nan if d.size else 0.0),
        max_rel_err=float(np.max(rel[np.isfinite(rel)], initial=0.0)),
        worst_index=widx, worst_analytic=_scalar(a[w]) if d.size else math.nan,
        worst_numeric=_scalar(n[w]) if d.size else math.nan,
        worst_bound=float(bound[w]) if d.size else math.nan,
        normwise=dn / nrm if nrm > 0 else (0.0 if dn == 0 else math.inf),
        detectable_rel=typical_and_largest(a, det)[0], detectable_rel_largest=typical_and_largest(a, det)[1],
        step=step,
        indices=np.arange(d.size), analytic=a, numeric=n, bound=bound, codes=codes,
        onesided=onesided, output_path=output_path, output_index=tuple(out_idx),
        input_index=tuple(in_idx), label=label,
    )


def _primal_blocks(vp: VectorProblem, prefixes: dict) -> list:
    """Mismatch blocks for derivative rules whose primal output is not f(x) (see check_primal)."""
    out = []
    for which, again in getattr(vp, "primal_mismatches", {}).items():
        bad = vp._differs(again)
        for ol in vp.out_leaves:
            c = slice(ol.start, ol.stop)
            out.append(block_report(
                path=ol.path, label=f"{prefixes.get(which, which + ': ')}primal output {ol.path} (f(x) from "
                f"jax.{which.lower()})", output_path=ol.path, shape=ol.block_shape, dtype=ol.dtype.name,
                a=again[c], n=vp.y0[c], bound=np.full(ol.stop - ol.start, vp.primal_bound()),
                codes=np.where(bad[c], MISMATCH, 0).astype(np.int8), split_index=lambda w: (w, ()),
                step=0.0, g_ref=_gref(vp.y0[c], 1.0)))
    return out


def make_report(vp: VectorProblem, leaves: list, *, api, mode, stencil, step, strict, notes=(),
                prefixes=None) -> Report:
    leaves = list(leaves) + _primal_blocks(vp, prefixes or {})
    ok, normwise = verdict(leaves, strict)
    skipped = tuple(vp.skipped) + tuple((p, f"output {d}") for p, d in vp.out_skipped)
    return Report(
        ok=ok, leaves=tuple(leaves), skipped=skipped,
        normwise=normwise, evaluations=vp.counter.evaluations, seconds=vp.elapsed(), precision=vp.precision,
        stencil=stencil, step=step, noise=float(np.max(vp.sigma, initial=0.0)), cost=math.nan,
        mode=mode, strict=strict, notes=tuple(vp.notes) + tuple(notes), function=_name(vp.f), api=api,
    )


def _name(fn) -> str:
    mod = getattr(fn, "__module__", None)
    name = fname(fn)
    return f"{mod}.{name}" if mod and mod not in ("__main__",) else name


def _classify_rows(a, n, err, finite, rt, at, floor, kink=None):
    tol = compare.tolerance(a, n, rt, at)
    return tol, compare.classify(a, n, err, tol, finite, kink=kink, floor=floor,
                                 rel=rt * np.maximum(np.abs(a), np.abs(n)))


# -- Jacobian -------------------------------------------------------------------------------
def _jac_user(vp: VectorProblem, jac, single: bool) -> list:
    api = vp.api
    try:
        res = jac(*vp.primals_from(vp.dyn, vp.argarr))
    except Exception as e:
        e.add_note(f"{api}: raised while calling jac(*primals).")
        raise
    out_def = jax.tree_util.tree_structure(vp.call(vp.dyn, vp.argarr))
    try:
        per_out = out_def.flatten_up_to(res)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{api}: jac(*primals) must be shaped like jax.jacfwd(f, argnums): the output's tree "
            f"{out_def} with, at every output leaf, the inputs' tree. Got {jax.tree_util.tree_structure(res)}."
        ) from e
    A = [np.zeros((vp.n_out, vp.coordinates(k))) for k in range(len(vp.dyn))]
    for ol in vp.out_leaves:
        piece = per_out[ol.pos]
        try:
            per_in = vp.split.treedef.flatten_up_to((piece,) if single else tuple(piece))
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{api}: jac at output {ol.path} must hold the tree of the checked primals "
                f"{vp.split.treedef} (a tuple over argnums unless argnums is an int or there is "
                "one primal), as jax.jacfwd returns it."
            ) from e
        for k, pos in enumerate(vp.split.dynamic_index):
            b = np.asarray(per_in[pos])
            want = ol.shape + tuple(vp.dyn[k].shape)
            if tuple(b.shape) != want:
                raise ValueError(
                    f"{api}: jac block for output {ol.path} and input {vp.paths[k]} has shape "
                    f"{tuple(b.shape)}; expected output shape + input shape = {want}."
                )
            b2 = b.reshape(int(np.prod(ol.shape, dtype=np.int64)), -1)
            ci = vp.is_complex(k)
            if ol.is_complex and ci:  # holomorphic f' = a + ib: [[a, −b], [b, a]]
                rows = np.empty((b2.shape[0] * 2, b2.shape[1] * 2))
                rows[0::2] = np.concatenate([b2.real, -b2.imag], axis=1)
                rows[1::2] = np.concatenate([b2.imag, b2.real], axis=1)
            elif ol.is_complex:  # real input, complex output: ∂Re/∂x, ∂Im/∂x
                rows = np.empty((b2.shape[0] * 2, b2.shape[1]))
                rows[0::2], rows[1::2] = b2.real, b2.imag
            elif ci:  # real output of a complex input: JAX's gradient ∂/∂x − i·∂/∂y
                rows = np.concatenate([b2.real, -b2.imag], axis=1)
            else:
                if np.iscomplexobj(b2) and np.any(b2.imag):
                    raise TypeError(
                        f"{api}: jac block for real output {ol.path} and real input {vp.paths[k]} "
                        "is complex; a real function has a real Jacobian."
                    )
                rows = b2.real
            A[k][ol.start:ol.stop] = rows
    return A


def _basis(vp: VectorProblem, k: int, coords: np.ndarray) -> list:
    m = vp.dyn[k].size
    out = []
    for j, x in enumerate(vp.dyn):
        t = np.zeros((coords.size,) + tuple(x.shape), x.dtype)
        if j == k:
            flat = t.reshape(coords.size, -1)
            val = np.where(coords >= m, 1j, 1.0) if vp.is_complex(k) else np.ones(coords.size)
            flat[np.arange(coords.size), coords % m] = val
        out.append(to_device(t))
    return out


def _jac_fwd(vp: VectorProblem) -> list:
    run = vp.jvp_batch(None)
    total = sum(x.size for x in vp.dyn)
    c = max(1, min(256, 2**22 // max(1, total)))  # tangent batch bounded to ~32 MiB
    A = []
    for k in range(len(vp.dyn)):
        n = vp.coordinates(k)
        cols = [run(_basis(vp, k, ch)).T for ch in np.array_split(np.arange(n), max(1, math.ceil(n / c)))]
        A.append(np.concatenate(cols, axis=1))
    return A


def _jac_rev(vp: VectorProblem, user_vjp=None) -> list:
    run = vp.vjp_batch(user_vjp)
    c = 256  # cotangent rows per vmapped VJP batch: each holds one gradient-sized result
    rows = [[] for _ in vp.dyn]
    for ch in np.array_split(np.arange(vp.n_out), max(1, math.ceil(vp.n_out / c))):
        C = np.zeros((ch.size, vp.n_out))
        C[np.arange(ch.size), ch] = 1.0
        W = run(C)
        for k, w in enumerate(W):
            rows[k].append(vp.to_coords(k, w))
    return [np.concatenate(r, axis=0) for r in rows]


def check_jacobian(f: Callable, *primals, jac: Callable | None = None, argnums=None,
                   has_aux: bool = False, mode: str = "auto", precision: str = "auto",
                   rtol: float | None = None, atol: float | None = None, step: float | None = None,
                   strict: bool = False, chunk_size: int | None = None) -> Report:
    """Check every entry of the Jacobian of ``f`` at ``primals`` against finite differences.

    Column i of the Jacobian (the derivative of every floating output element with
    respect to input coordinate i) is (f(x + h·e_i) − f(x − h·e_i)) / 2h, all columns
    of a leaf in one compiled, vmapped, chunked batch. Entry (j, i) agrees when

        |a_ji − n_ji| ≤ atol + rtol·max(|a_ji|, |n_ji|) + 8·σ_j/h + 2·trunc_ji

    with σ_j the measured noise of output element j and trunc_ji a Richardson estimate
    (steps h, 2h, 4h) made for entries that fail the first pass.

    Complex numbers follow JAX: a complex leaf is a pair of real coordinates, so the
    report's blocks give complex outputs and inputs a trailing axis of length 2
    (0 = real part, 1 = imaginary part). A user ``jac`` for complex leaves is read as
    ``jax.jacfwd(..., holomorphic=True)`` (complex → complex), ∂f/∂x (real → complex)
    or JAX's gradient ∂f/∂x − i·∂f/∂y (complex → real).

    Args:
      f: ``f(*primals)`` returning any pytree of arrays (with ``has_aux``, a pair
        ``(output, aux)``; aux is ignored). Integer outputs are listed as skipped.
      *primals: the point. Only floating/complex array leaves of the checked primals
        are perturbed; Python floats become arrays.
      jac: None to use JAX's autodiff (``mode``), or a callable ``jac(*primals)``
        returning what ``jax.jacfwd(f, argnums)`` returns: the output tree, holding at
        each output leaf the checked inputs (a tuple over argnums, unless argnums is an
        int or f has one primal), blocks of shape output shape + input shape.
      argnums: which primals are checked: None (default, all), an int or a tuple.
      has_aux: f returns ``(output, aux)``.
      mode: "auto" (reverse mode for ``custom_vjp`` functions, whose JVP raises;
        forward mode where reverse is not defined, e.g. ``while_loop``; otherwise the
        cheaper of the two), "fwd" (``jax.jacfwd``) or "rev" (``jax.jacrev``).
      precision, rtol, atol, step, strict, chunk_size: as in :func:`jgc.check`.

    Returns:
      A :class:`jgc.Report` with one :class:`jgc.LeafReport` per (output leaf, input
      leaf) block: ``path`` is the input leaf, ``output_path`` the output leaf,
      ``shape`` the block's (output shape + input shape), and ``worst_index`` =
      ``output_index + input_index``.

    Raises:
      TypeError, ValueError: for bad input; the message names the argument.

    Example:
      >>> import jax.numpy as jnp, jgc
      >>> rep = jgc.check_jacobian(lambda x: {"y": jnp.sin(x) * x[0]}, jnp.array([0.5, 2.0]))
      >>> rep.ok, rep.leaves[0].shape
      (True, (2, 2))
    """
    api = "jgc.check_jacobian"
    _validate_common(api, rtol, atol)
    if mode not in JACOBIAN_MODES:
        raise ValueError(f"{api}: mode must be one of {JACOBIAN_MODES}, got {mode!r}.")
    if jac is not None and not callable(jac):
        raise TypeError(f"{api}: jac must be None or a callable jac(*primals), got {type(jac).__name__}.")
    single = isinstance(argnums, int) or (argnums is None and len(primals) == 1)
    notes = []
    with VectorProblem(f, primals, argnums=argnums, has_aux=has_aux, precision=precision, api=api,
                       chunk_size=chunk_size) as vp:
        vp.set_bank([])
        vp.measure_noise()
        if jac is not None:
            A, used = _jac_user(vp, jac, single), "jac"
        else:
            n_in = sum(vp.coordinates(k) for k in range(len(vp.dyn)))
            used = mode if mode != "auto" else ("fwd" if n_in <= vp.n_out else "rev")
            try:
                A = _jac_fwd(vp) if used == "fwd" else _jac_rev(vp)
            except NoForwardRule:
                if mode == "fwd":
                    raise TypeError(
                        f"{api}: mode='fwd' needs a JVP, but {fname(f)} is a jax.custom_vjp "
                        "function (it has only a VJP). Use mode='rev' or mode='auto'."
                    ) from None
                A, used = _jac_rev(vp), "rev"
                notes.append(f"{fname(f)} has a custom_vjp rule (no JVP): the Jacobian was taken in reverse mode.")
            except NoReverseRule:
                if mode == "rev":
                    raise
                A, used = _jac_fwd(vp), "fwd"
                notes.append(f"{fname(f)} has no reverse-mode derivative: the Jacobian was taken in forward mode.")
        h = vp.relative_step("central", step)
        leaves = _judge_jacobian(vp, A, h, step, rtol, atol)
        return make_report(vp, leaves, api=api, mode=f"jacobian ({used})", stencil="central",
                           step=h, strict=strict, notes=notes)


def _judge_jacobian(vp: VectorProblem, A: list, h, step, rtol, atol) -> list:
    g_all = max((_gref(a, 0.0) for a in A), default=0.0) or 1.0
    leaves = []
    for k, a in enumerate(A):
        nc = vp.coordinates(k)
        coords = np.arange(nc)
        est = vp.coordinate(k, coords, "central", h)
        N = est.value.reshape(nc, vp.n_out).T
        E = compare.method_error(est.err_round, est.err_trunc, vp.sigma_rows(nc)).reshape(nc, vp.n_out).T
        Fin = est.finite.reshape(nc, vp.n_out).T
        RT, AT, FL, GR = (np.zeros_like(a) for _ in range(4))
        for ol in vp.out_leaves:
            g = _gref(a[ol.start:ol.stop], g_all)
            rt, at, fl = _dtype_tols(vp, k, ol, rtol, atol, g)
            RT[ol.start:ol.stop], AT[ol.start:ol.stop], FL[ol.start:ol.stop], GR[ol.start:ol.stop] = rt, at, fl, g
        tol, codes = _classify_rows(a, N, E, Fin, RT, AT, FL)
        bad_cols = np.flatnonzero(np.any((codes == MISMATCH) & np.isfinite(a), axis=0))
        if bad_cols.size:
            r = vp.coordinate(k, bad_cols, "richardson", vp.relative_step("richardson", step))
            shp = (bad_cols.size, vp.n_out)
            N2, F2 = r.value.reshape(shp).T, r.finite.reshape(shp).T
            E2 = compare.method_error(r.err_round, r.err_trunc, vp.sigma_rows(bad_cols.size)).reshape(shp).T
            O2 = r.onesided.reshape(bad_cols.size, vp.n_out, -1).transpose(1, 0, 2)
            T2 = getattr(r, "table", None)
            T2 = None if T2 is None else T2.reshape(bad_cols.size, vp.n_out, -1).transpose(1, 0, 2)
            sel = codes[:, bad_cols] == MISMATCH
            a2 = a[:, bad_cols]
            t2 = compare.tolerance(a2, N2, RT[:, bad_cols], AT[:, bad_cols])
            noise = (np.repeat(vp.sigma[:, None], bad_cols.size, 1) * r.err_round.reshape(shp).T / 1.65)
            kink = None
            if not vp.is_complex(k):
                kink = _kink(O2.reshape(-1, O2.shape[-1]), None if T2 is None else T2.reshape(-1, T2.shape[-1]),
                             noise.ravel(), a2.ravel(), t2.ravel()).reshape(a2.shape)
            c2 = compare.classify(a2, N2, E2, t2, F2, kink=kink, floor=FL[:, bad_cols])
            for arr, new in ((N, N2), (E, E2), (tol, t2), (Fin, F2)):
                sub = arr[:, bad_cols]
                sub[sel] = new[sel]
                arr[:, bad_cols] = sub
            sub = codes[:, bad_cols]
            sub[sel] = c2[sel]
            codes[:, bad_cols] = sub
        perm = vp.block_columns(k)
        for ol in vp.out_leaves:
            def blk(M, rows=slice(ol.start, ol.stop), perm=perm):
                return M[rows][:, perm]

            nd = len(ol.block_shape)
            leaves.append(block_report(
                path=vp.paths[k], label=f"{ol.path} wrt {vp.paths[k]}", output_path=ol.path,
                shape=ol.block_shape + vp.in_block_shape(k), dtype=vp.orig_dtypes[k].name,
                a=blk(a), n=blk(N), bound=blk(tol + E), codes=blk(codes),
                split_index=lambda w, nd=nd: (w[:nd], w[nd:]),
                step=float(np.median(h * vp.scales[k])), g_ref=float(GR[ol.start, 0]) if ol.stop > ol.start and nc else 1.0,
            ))
    return leaves


# -- JVP / VJP ------------------------------------------------------------------------------
def _tangent_bank(vp: VectorProblem, rng, nd: int):
    """Per-leaf random tangents: bank row 1 + k·nd + d is direction d of leaf k (zero elsewhere)."""
    return [vp.random_tangents(rng, k, nd) for k in range(len(vp.dyn))]


def _directional_pass(vp: VectorProblem, B: int, h: float, step):
    """Central differences of J·t for bank rows 1..B, as (B, n_out) arrays."""
    dirs = np.arange(1, B + 1)
    est = vp.directional(dirs, "central", h)
    N = est.value.reshape(B, vp.n_out)
    E = compare.method_error(est.err_round, est.err_trunc, vp.sigma_rows(B)).reshape(B, vp.n_out)
    Fin = est.finite.reshape(B, vp.n_out)
    return N, E, Fin


def _richardson_rows(vp: VectorProblem, rows: np.ndarray, step):
    """Richardson re-estimate of J·t for bank rows ``rows + 1``, with one-sided slopes for kinks."""
    r = vp.directional(rows + 1, "richardson", vp.relative_step("richardson", step))
    shp = (rows.size, vp.n_out)
    E = compare.method_error(r.err_round, r.err_trunc, vp.sigma_rows(rows.size)).reshape(shp)
    noise = (vp.sigma_rows(rows.size) * r.err_round / 1.65).reshape(shp)
    ones = r.onesided.reshape(rows.size, vp.n_out, -1)
    table = getattr(r, "table", None)
    table = None if table is None else table.reshape(rows.size, vp.n_out, -1)
    return r.value.reshape(shp), E, r.finite.reshape(shp), ones, table, noise


def _kink(onesided, table, noise, a, tol):
    """stencils.kink on flat rows."""
    return stencils.kink(onesided, table, noise, a, tol)


def _setup_directions(vp, rng, nd):
    T = _tangent_bank(vp, rng, nd)
    vp.set_bank(T)
    vp.measure_noise()
    return T, np.arange(1, len(vp.dyn) * nd + 1)


def check_jvp(f: Callable, *primals, jvp: Callable | None = None, argnums=None, has_aux: bool = False,
              key=None, num_directions: int = DEFAULT_DIRECTIONS, precision: str = "auto",
              rtol: float | None = None, atol: float | None = None, step: float | None = None,
              strict: bool = False, chunk_size: int | None = None) -> Report:
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
    _validate_common(api, rtol, atol, num_directions, "num_directions")
    rep, _, _ = directional_checks(
        api, f, primals, do_jvp=True, do_vjp=False, jvp=jvp, vjp=None, against="numerical",
        fallback=False, argnums=argnums, has_aux=has_aux, key=key, nd=num_directions, nc=1,
        precision=precision, rtol=rtol, atol=atol, step=step, strict=strict, chunk_size=chunk_size)
    return rep


def directional_checks(api, f, primals, *, do_jvp, do_vjp, jvp, vjp, against, fallback, argnums,
                       has_aux, key, nd, nc, precision, rtol, atol, step, strict, chunk_size,
                       labels=("", ""), in_label=None, out_name="out", allow_nonfinite=False,
                       absolute_step=False):
    """The shared body of check_jvp, check_vjp and check_grads.

    One preparation, one noise probe and one finite-difference pass (J·t for every
    tangent) serve both the JVP comparison and the VJP pairing. With ``fallback``, a
    custom_vjp function (no JVP) is checked in reverse mode instead, and a function
    without reverse mode in forward mode; the notes say so.

    Returns:
      (report, did_jvp, did_vjp).
    """
    rng = rng_from_key(key, api)
    notes = []
    with VectorProblem(f, primals, argnums=argnums, has_aux=has_aux, precision=precision, api=api,
                       chunk_size=chunk_size, in_label=in_label, out_name=out_name,
                       allow_nonfinite=allow_nonfinite, absolute_step=absolute_step) as vp:
        T, rows = _setup_directions(vp, rng, nd)
        h = vp.relative_step("central", step)
        name = fname(f)
        JT = None
        if do_jvp or (do_vjp and against in ("auto", "jvp")):
            try:
                JT = vp.jvp_batch(jvp, from_bank=True)(rows)
            except NoForwardRule:
                if do_jvp and not fallback:
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
            try:
                W = vp.vjp_batch(vjp)(U)
            except NoReverseRule:
                if not fallback:
                    raise NoReverseRule(
                        f"{api}: {name} has no reverse-mode derivative (JAX: lax.while_loop or "
                        "fori_loop with a dynamic trip count). Check it with jgc.check_jvp."
                    ) from None
                do_vjp = False
                if do_jvp:
                    notes.append(f"{name} has no reverse-mode derivative: mode 'rev' was skipped.")
                else:
                    notes.append(f"{name} has no reverse-mode derivative: mode 'rev' was replaced by 'fwd'.")
                    do_jvp = True
                    if JT is None:
                        JT = vp.jvp_batch(jvp, from_bank=True)(rows)
        need_fd = do_jvp or (do_vjp and against in ("auto", "numerical"))
        N, E, Fin = _directional_pass(vp, K * nd, h, step) if need_fd else (None, None, None)
        leaves = []
        if do_jvp:
            leaves += _judge_directions(vp, JT, nd, h, step, rtol, atol, N, E, Fin, prefix=labels[0])
        if do_vjp:
            Wc = [vp.to_coords(k, w) for k, w in enumerate(W)]
            Tc = [vp.tangent_coords(k, t) for k, t in enumerate(T)]
            with np.errstate(invalid="ignore", over="ignore"):  # non-finite pairs get their own status
                A = [w @ t.T for w, t in zip(Wc, Tc)]  # (L·nc, nd) per input leaf: ⟨Jᵀu, t⟩
            if against in ("auto", "numerical"):
                leaves += _judge_pairs_numerical(vp, A, U, nd, nc, h, step, rtol, atol, N, E, Fin,
                                                 prefix=labels[1])
            if JT is not None and against in ("auto", "jvp"):
                leaves += _judge_pairs_identity(vp, A, U, Wc, Tc, JT, nd, nc, h, rtol, atol, prefix=labels[1])
        mode = " + ".join(([f"jvp ({nd} directions per leaf)"] if do_jvp else [])
                          + ([f"vjp ({against})"] if do_vjp else []))
        rep = make_report(vp, leaves, api=api, mode=mode, stencil="central", step=h, strict=strict, notes=notes,
                          prefixes={"JVP": labels[0], "VJP": labels[1]})
        return rep, do_jvp, do_vjp


def _judge_directions(vp, JT, nd, h, step, rtol, atol, N, E, Fin, prefix="") -> list:
    K = len(vp.dyn)
    N, E, Fin = N.copy(), E.copy(), Fin.copy()
    g_all = _gref(JT, 1.0)
    RT, AT, FL = (np.zeros_like(JT) for _ in range(3))
    GR = {}  # (input leaf, output leaf start) -> g_ref (a dict: empty leaves have no column)
    for k in range(K):
        r = slice(k * nd, (k + 1) * nd)
        for ol in vp.out_leaves:
            c = slice(ol.start, ol.stop)
            g = _gref(JT[r, c], g_all)
            RT[r, c], AT[r, c], FL[r, c] = _dtype_tols(vp, k, ol, None if rtol is None else rtol,
                                                       atol, g)
            GR[k, ol.start] = g
    tol, codes = _classify_rows(JT, N, E, Fin, RT, AT, FL)
    bad_rows = np.flatnonzero(np.any((codes == MISMATCH) & np.isfinite(JT), axis=1))
    if bad_rows.size:
        N2, E2, F2, O2, T2, noise = _richardson_rows(vp, bad_rows, step)
        a2 = JT[bad_rows]
        t2 = compare.tolerance(a2, N2, RT[bad_rows], AT[bad_rows])
        kink = _kink(O2.reshape(-1, O2.shape[-1]), None if T2 is None else T2.reshape(-1, T2.shape[-1]),
                     noise.ravel(), a2.ravel(), t2.ravel()).reshape(a2.shape)
        c2 = compare.classify(a2, N2, E2, t2, F2, kink=kink, floor=FL[bad_rows])
        sel = codes[bad_rows] == MISMATCH
        for arr, new in ((N, N2), (E, E2), (tol, t2), (Fin, F2), (codes, c2)):
            sub = arr[bad_rows]
            sub[sel] = new[sel]
            arr[bad_rows] = sub
    leaves = []
    for k in range(K):
        r = slice(k * nd, (k + 1) * nd)
        for ol in vp.out_leaves:
            c = slice(ol.start, ol.stop)
            leaves.append(block_report(
                path=vp.paths[k], label=f"{prefix}{ol.path} · t[{vp.paths[k]}]", output_path=ol.path,
                shape=(nd,) + ol.block_shape, dtype=vp.orig_dtypes[k].name,
                a=JT[r, c], n=N[r, c], bound=(tol + E)[r, c], codes=codes[r, c],
                split_index=lambda w: (w[1:], w[:1]), step=h, g_ref=float(GR[k, ol.start]),
            ))
    return leaves


def check_vjp(f: Callable, *primals, vjp: Callable | None = None, jvp: Callable | None = None,
              argnums=None, has_aux: bool = False, key=None, num_directions: int = DEFAULT_DIRECTIONS,
              num_cotangents: int = DEFAULT_DIRECTIONS, against: str = "auto", precision: str = "auto",
              rtol: float | None = None, atol: float | None = None, step: float | None = None,
              strict: bool = False, chunk_size: int | None = None) -> Report:
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
    _validate_common(api, rtol, atol, num_directions, "num_directions")
    _validate_common(api, None, None, num_cotangents, "num_cotangents")
    if against not in VJP_AGAINST:
        raise ValueError(f"{api}: against must be one of {VJP_AGAINST}, got {against!r}.")
    rep, _, _ = directional_checks(
        api, f, primals, do_jvp=False, do_vjp=True, jvp=jvp, vjp=vjp, against=against, fallback=False,
        argnums=argnums, has_aux=has_aux, key=key, nd=num_directions, nc=num_cotangents,
        precision=precision, rtol=rtol, atol=atol, step=step, strict=strict, chunk_size=chunk_size)
    return rep


def _pair_blocks(vp, nd, nc):
    """Yield (input leaf k, output leaf, direction rows, cotangent rows, output columns)."""
    for k in range(len(vp.dyn)):
        r = slice(k * nd, (k + 1) * nd)
        for li, ol in enumerate(vp.out_leaves):
            yield k, ol, r, slice(li * nc, (li + 1) * nc), slice(ol.start, ol.stop)


def _judge_pairs_numerical(vp, A, U, nd, nc, h, step, rtol, atol, N, E, Fin, prefix="") -> list:
    absU = np.abs(U)
    leaves = []
    for k, ol, r, cu, c in _pair_blocks(vp, nd, nc):
        # one (input leaf, output leaf) block of the pairing ⟨u, J t⟩
        a = A[k][cu]
        Uc = U[cu, c]
        n = Uc @ N[r, c].T
        err = absU[cu, c] @ E[r, c].T
        fin = np.broadcast_to(np.all(Fin[r, c], axis=1)[None, :], a.shape).copy()
        # Magnitude of the terms of the pairing: its rounding scale for atol.
        g = _gref(absU[cu, c] @ np.abs(N[r, c]).T, 1.0)
        rt, at, fl = _dtype_tols(vp, k, ol, rtol, atol, g)
        tol, codes = _classify_rows(a, n, err, fin, rt, at, fl)
        bad_d = np.flatnonzero(np.any((codes == MISMATCH) & np.isfinite(a), axis=0))
        if bad_d.size:
            N2, E2, F2, O2, T2, noise = _richardson_rows(vp, k * nd + bad_d, step)
            n2 = Uc @ N2[:, c].T
            e2 = absU[cu, c] @ E2[:, c].T
            f2 = np.broadcast_to(np.all(F2[:, c], axis=1)[None, :], n2.shape)
            o2 = np.einsum("uj,djs->uds", Uc, O2[:, c, :])
            tb2 = None if T2 is None else np.einsum("uj,djs->uds", Uc, T2[:, c, :])
            nz = absU[cu, c] @ noise[:, c].T
            a2 = a[:, bad_d]
            t2 = compare.tolerance(a2, n2, rt, at)
            kink = _kink(o2.reshape(-1, o2.shape[-1]), None if tb2 is None else tb2.reshape(-1, tb2.shape[-1]),
                         nz.ravel(), a2.ravel(), t2.ravel()).reshape(a2.shape)
            c2 = compare.classify(a2, n2, e2, t2, f2, kink=kink, floor=fl)
            sel = codes[:, bad_d] == MISMATCH
            for arr, new in ((n, n2), (err, e2), (tol, t2), (fin, f2), (codes, c2)):
                sub = arr[:, bad_d]
                sub[sel] = new[sel]
                arr[:, bad_d] = sub
        leaves.append(block_report(
            path=vp.paths[k], label=f"{prefix}⟨u[{ol.path}], J t[{vp.paths[k]}]⟩", output_path=ol.path,
            shape=(nc, nd), dtype=vp.orig_dtypes[k].name, a=a, n=n, bound=tol + err, codes=codes,
            split_index=lambda w: (w[:1], w[1:]), step=h, g_ref=g,
        ))
    return leaves


def _judge_pairs_identity(vp, A, U, Wc, Tc, JT, nd, nc, h, rtol, atol, prefix="") -> list:
    absU = np.abs(U)
    leaves = []
    for k, ol, r, cu, c in _pair_blocks(vp, nd, nc):
        # one (input leaf, output leaf) block of the pairing ⟨u, J t⟩
        a = A[k][cu]
        b = U[cu, c] @ JT[r, c].T
        # Both sides are exact up to rounding: scale atol by the size of the terms.
        terms = absU[cu, c] @ np.abs(JT[r, c]).T + np.abs(Wc[k][cu]) @ np.abs(Tc[k]).T
        g = _gref(terms, 1.0)
        rt, at, fl = _dtype_tols(vp, k, ol, rtol, atol, g)
        tol = compare.tolerance(a, b, rt, at)
        codes = compare.classify(a, b, np.zeros_like(a), tol, np.isfinite(b), floor=fl)
        leaves.append(block_report(
            path=vp.paths[k], label=f"{prefix}⟨u[{ol.path}], J t[{vp.paths[k]}]⟩ transpose",
            output_path=ol.path, shape=(nc, nd), dtype=vp.orig_dtypes[k].name,
            a=a, n=b, bound=tol, codes=codes, split_index=lambda w: (w[:1], w[1:]), step=h, g_ref=g,
        ))
    return leaves


# -- second order -----------------------------------------------------------------------------
def check_hvp(f: Callable, params: Any, *args, hvp: Callable | None = None, order: int = 2,
              key=None, num_directions: int = DEFAULT_DIRECTIONS, precision: str = "auto",
              rtol: float | None = None, atol: float | None = None, step: float | None = None,
              strict: bool = False, chunk_size: int | None = None) -> Report:
    """Check Hessian-vector products (order=2) or higher directional derivatives of a scalar ``f``.

    With order=2 the function under test is the gradient g(θ) = ∇f(θ, *args); its JVP
    along v is the Hessian-vector product H·v, taken from ``jax.jvp(jax.grad(f))`` or a
    user ``hvp(params, v, *args)``, and compared with central differences of the
    gradient, (g(θ + h·v) − g(θ − h·v)) / 2h, element by element (see
    :func:`check_jvp`). With order=k > 2, g is the (k−1)-th derivative applied to k−2
    fixed random vectors, differentiated by ``jax.jvp``. Only floating leaves of
    ``params`` are differentiated.

    Args:
      f: the scalar cost ``f(params, *args)``.
      params: the point (any pytree).
      *args: data, never perturbed.
      hvp: None for ``jax.jvp(jax.grad(f))``, or ``hvp(params, v, *args)`` returning a
        pytree like params (order=2 only).
      order: 2 (Hessian-vector products) or higher.
      key, num_directions, precision, rtol, atol, step, strict, chunk_size: as in
        :func:`check_jvp`.

    Returns:
      A :class:`jgc.Report` with blocks ``grad[leaf] · t[params leaf]`` of shape
      ``(num_directions, *leaf shape)``.

    Example:
      >>> import jax.numpy as jnp, jgc
      >>> f = lambda p: jnp.sum(p ** 3)
      >>> jgc.check_hvp(f, jnp.array([1.0, 2.0]), hvp=lambda p, v: 6 * p * v).ok
      True
    """
    api = "jgc.check_hvp"
    if not callable(f):
        raise TypeError(f"{api}: f must be callable as f(params, *args) -> scalar, got {type(f).__name__}.")
    if not (isinstance(order, int) and not isinstance(order, bool) and order >= 2):
        raise ValueError(f"{api}: order must be an int ≥ 2 (2 checks Hessian-vector products), got {order!r}.")
    if hvp is not None and order != 2:
        raise ValueError(f"{api}: a user hvp can only be checked with order=2, got order={order}.")
    if hvp is not None and not callable(hvp):
        raise TypeError(f"{api}: hvp must be a callable hvp(params, v, *args), got {type(hvp).__name__}.")
    split0, dyn0 = trees.split_params(params, what=f"{api}: params")
    rng = rng_from_key(key, api)
    seed = int(rng.integers(2**31))
    # Fixed vectors for the derivatives of order > 2 (drawn inside the trace from
    # constants, so every evaluation sees the same ones).
    fixed = [[np.random.default_rng([seed, j, i]).standard_normal(np.shape(x)) for i, x in enumerate(dyn0)]
             for j in range(order - 2)]

    def dyn_of(p):
        leaves = split0.treedef.flatten_up_to(p)
        return [leaves[i] for i in split0.dynamic_index]

    def as_tree(dl):
        leaves = [None] * len(split0.leaves)
        for pos, v in zip(split0.dynamic_index, dl):
            leaves[pos] = v
        return jax.tree_util.tree_unflatten(split0.treedef, leaves)

    def derivative(p, *a):
        """The (order−1)-th derivative of f along fixed vectors, as a tree like params."""
        def grad_dyn(d):
            return jax.grad(lambda dd: f(split0.combine(dd), *a))(d)

        g = grad_dyn
        for j in range(order - 2):
            def along(d, g=g, j=j):
                vs = [jnp.asarray(v, x.dtype) for v, x in zip(fixed[j], d)]
                return jax.jvp(g, (d,), (vs,))[1]
            g = along
        return as_tree(g(dyn_of(p)))

    user_jvp = None
    if hvp is not None:
        def user_jvp(primals, tangents):
            p, a = primals[0], primals[1:]
            res = hvp(p, tangents[0], *a)
            try:
                dl = dyn_of(res)
            except (ValueError, TypeError) as e:
                raise ValueError(
                    f"{api}: hvp(params, v, *args) must return a pytree shaped like params "
                    f"({split0.treedef}); got {jax.tree_util.tree_structure(res)}."
                ) from e
            return derivative(*primals), as_tree(dl)

    derivative.__qualname__ = f"{fname(f)} (derivative of order {order - 1})"
    _validate_common(api, rtol, atol, num_directions, "num_directions")
    rep, _, _ = directional_checks(
        api, derivative, (params, *args), do_jvp=True, do_vjp=False, jvp=user_jvp, vjp=None,
        against="numerical", fallback=False, argnums=0, has_aux=False, key=seed, nd=num_directions,
        nc=1, precision=precision, rtol=rtol, atol=atol, step=step, strict=strict,
        chunk_size=chunk_size, in_label=lambda i: "params", out_name="grad")
    return dataclasses.replace(rep, mode=f"hvp (order {order}, {num_directions} directions per leaf)",
                               function=_name(f))
