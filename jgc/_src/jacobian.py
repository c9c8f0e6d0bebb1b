"""The Jacobian check: every entry of J against central differences, column by column.

Works on the real view of :class:`jgc._src.vector.VectorProblem` (every floating
output element, complex ones as (Re, Im) pairs) with the error model of
``jgc.check``: the measured noise σ_j of every output element, a per-dtype step, the
tolerance atol + rtol·max(|a|, |n|), and a Richardson re-estimate (steps h, 2h, 4h) of
every column holding an entry that fails the cheap central-difference pass, with
one-sided differences to recognise kinks. The report names input leaf, output leaf
and the indices of the worst entry on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np

from . import compare, policy, validate
from .judge import ComplexStep, Evidence, Limits, Refined, judge, limits, line_central, line_complex
from .names import short_name
from .report import Report
from .summary import block_reasons, block_report, gref, make_report, twin_values
from .vector import VectorProblem, to_device
from .vector_analytic import NoForwardRule, NoReverseRule
from .vector_complex import ComplexSteps
from .vector_native import spreads_of, twin_of

JACOBIAN_MODES = ("auto", "fwd", "rev")


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


def _jac_fwd(vp: VectorProblem) -> tuple[list, list | None]:
    """The Jacobian blocks from JVPs, and their measured rounding (None: not measured)."""
    run = vp.jvp_batch(None)
    total = sum(x.size for x in vp.dyn)
    c = max(1, min(256, 2**22 // max(1, total)))  # tangent batch bounded to ~32 MiB
    A, S = [], []
    for k in range(len(vp.dyn)):
        n = vp.coordinates(k)
        if n == 0:  # an empty leaf: a block with no column, nothing to check (as jgc.check)
            A.append(np.zeros((vp.n_out, 0)))
            S = None if S is None else S + [np.zeros((vp.n_out, 0))]
            continue
        cols = [run(_basis(vp, k, ch)).T for ch in np.array_split(np.arange(n), max(1, math.ceil(n / c)))]
        A.append(np.concatenate(cols, axis=1))
        spread = spreads_of(run)
        S = None if S is None or spread is None else S + [np.concatenate([s.T for s in spread], axis=1)]
    return A, S


def _jac_rev(vp: VectorProblem, user_vjp=None) -> tuple[list, list | None]:
    """The Jacobian blocks from VJPs, and their measured rounding (None: not measured)."""
    if vp.n_out == 0:  # an empty output: blocks with no row, nothing to check (as in forward mode)
        return [np.zeros((0, vp.coordinates(k))) for k in range(len(vp.dyn))], None
    run = vp.vjp_batch(user_vjp)
    c = 256  # cotangent rows per vmapped VJP batch: each holds one gradient-sized result
    rows = [[] for _ in vp.dyn]
    for ch in np.array_split(np.arange(vp.n_out), max(1, math.ceil(vp.n_out / c))):
        C = np.zeros((ch.size, vp.n_out))
        C[np.arange(ch.size), ch] = 1.0
        W = run(C)
        for k, w in enumerate(W):
            rows[k].append(vp.to_coords(k, w))
    spread = spreads_of(run)
    S = None if spread is None else [
        np.concatenate([np.abs(vp.to_coords(k, s[k])) for s in spread], axis=0) for k in range(len(vp.dyn))]
    return [np.concatenate(r, axis=0) for r in rows], S


def _jacobian_twin(vp: VectorProblem, used: str):
    """The float64 twin's Jacobian entries for the lines of a block that hold a mismatch,
    in the mode the Jacobian was taken: (lines, (k, positions) -> values), columns of
    block k from JVPs (``lines=0``) or its rows from VJPs (``lines=1``); see
    ``summary.twin_values``. None for a user ``jac`` or where the derivatives ran at
    the reference's precision."""
    if getattr(vp, "native_view", None) is None or used not in ("fwd", "rev"):
        return None
    # Built on a mismatch's first call only, then kept: a passing check builds and runs
    # nothing, and the blocks of a failing one share one program (and, in reverse mode,
    # the rows already taken: one VJP gives a row of every block).
    made: dict = {}

    def program(mode: str):
        if mode not in made:
            made[mode] = twin_of(vp.jvp_batch(None) if mode == "fwd" else vp.vjp_batch(None))
        if made[mode] is None:
            raise ValueError("no float64 twin")  # twin_values: the native and reference values stand
        return made[mode]

    if used == "fwd":
        return 0, lambda k, cols: program("fwd")(_basis(vp, k, cols))
    taken: dict = {}

    def rows(k, at):
        need = [int(i) for i in at if int(i) not in taken]
        if need:
            C = np.zeros((len(need), vp.n_out))
            C[np.arange(len(need)), need] = 1.0
            W = program("rev")(C)
            for j, i in enumerate(need):
                taken[i] = [w[j] for w in W]
        return vp.to_coords(k, np.stack([taken[int(i)][k] for i in at]))

    return 1, rows


def check_jacobian(f: Callable, *primals, jac: Callable | None = None, argnums=None,
                   has_aux: bool = False, mode: str = "auto", precision: str = "auto",
                   rtol: float | None = None, atol: float | None = None, step: float | None = None,
                   strict: bool = False, chunk_size: int | None = None, analytic: str = "native") -> Report:
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
      analytic: "native" (default): the JVPs or VJPs (or ``jac``) at the primals' and
        data's dtypes as given, as the program runs, with their own rounding measured;
        "reference": at the reference's precision (``precision``), as the finite differences.

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
    opts = validate.options(api, precision=precision, rtol=rtol, atol=atol, step=step, strict=strict,
                            chunk_size=chunk_size, analytic=analytic)
    if mode not in JACOBIAN_MODES:
        raise ValueError(f"{api}: mode must be one of {JACOBIAN_MODES}, got {mode!r}.")
    validate.function(api, "jac", jac, "None or a callable jac(*primals)", optional=True)
    single = isinstance(argnums, int) or (argnums is None and len(primals) == 1)
    notes = []
    with VectorProblem(f, primals, argnums=argnums, has_aux=has_aux, precision=opts.precision, api=api,
                       chunk_size=opts.chunk_size, analytic=opts.analytic) as vp:
        vp.set_bank([])
        vp.measure_noise()
        S = None  # the analytic side's measured rounding, per block (None: not measured)
        if jac is not None:
            A, used = _jac_user(vp, jac, single), "jac"
        else:
            n_in = sum(vp.coordinates(k) for k in range(len(vp.dyn)))
            used = mode if mode != "auto" else ("fwd" if n_in <= vp.n_out else "rev")
            try:
                A, S = _jac_fwd(vp) if used == "fwd" else _jac_rev(vp)
            except NoForwardRule:
                if mode == "fwd":
                    raise TypeError(
                        f"{api}: mode='fwd' needs a JVP, but {short_name(f)} is a jax.custom_vjp "
                        "function (it has only a VJP). Use mode='rev' or mode='auto'."
                    ) from None
                (A, S), used = _jac_rev(vp), "rev"
                notes.append(f"{short_name(f)} has a custom_vjp rule (no JVP): the Jacobian was taken in reverse mode.")
            except NoReverseRule:
                if mode == "rev":
                    raise
                (A, S), used = _jac_fwd(vp), "fwd"
                notes.append(f"{short_name(f)} has no reverse-mode derivative: the Jacobian was taken in forward mode.")
        h = vp.relative_step("central", opts.step)
        leaves = _judge_jacobian(vp, A, h, opts, S=S, twin=_jacobian_twin(vp, used))
        return make_report(vp, leaves, api=api, mode=f"jacobian ({used})", stencil="central",
                           step=h, strict=opts.strict, notes=notes)


def _column_evidence(vp: VectorProblem, k: int, shape: tuple, h: float, step, *,
                     cx: ComplexSteps | None = None) -> Evidence:
    """The Jacobian adapter of the judge: block k's columns (n_out × coordinates of leaf k),
    by central differences at ``h``, suspect columns re-estimated whole by Richardson, and
    with ``cx`` (a real leaf with float64 blocks) the complex step of the columns holding
    an element nothing else resolved."""
    nc = vp.coordinates(k)

    def cheap():
        est = vp.coordinate(k, np.arange(nc), "central", h)
        err = compare.method_error(est.err_round, est.err_trunc, vp.sigma_rows(nc))
        return tuple(v.reshape(nc, vp.n_out).T for v in (est.value, err, est.finite))  # (n_out, columns)

    def richardson(cols):
        r = vp.coordinate(k, cols, "richardson", vp.relative_step("richardson", step))
        flat = (lambda v: v.reshape(cols.size, vp.n_out).T.ravel())
        e2 = compare.method_error(r.err_round, r.err_trunc, vp.sigma_rows(cols.size))
        if vp.is_complex(k):
            return Refined(flat(r.value), flat(e2), flat(r.finite))
        side = (lambda v: v.reshape(cols.size, vp.n_out, -1).transpose(1, 0, 2).reshape(-1, v.shape[-1]))
        noise = vp.sigma_rows(cols.size) * r.err_round / policy.RICHARDSON_NOISE_GAIN
        return Refined(flat(r.value), flat(e2), flat(r.finite), side(r.onesided), side(r.table), flat(noise))

    central = line_central(lambda cols, h_rel: vp.coordinate(k, cols, "central", h_rel), shape, 0, vp.sigma)
    complex_step = None if cx is None else ComplexStep(
        line_complex(lambda cols, h_rel: cx.columns(k, cols, h_rel), shape, 0), vp.relative_step("complex", None),
        vp.u, where=np.broadcast_to(cx.real_out[:, None], shape))
    return Evidence(cheap, richardson=richardson, lines=0, central=central, complex_step=complex_step,
                    imprecise=False, h_rel=h, u=vp.u)


def _judge_jacobian(vp: VectorProblem, A: list, h: float, opts: validate.Options, *, S: list | None = None,
                    twin=None) -> list:
    """Judge every entry of the Jacobian blocks ``A[k]`` (n_out × coordinates of leaf k);
    ``S[k]``: their measured rounding at the dtypes given (None: none measured); ``twin``:
    the float64 twin's entries for lines with a mismatch (see :func:`_jacobian_twin`)."""
    step, rtol, atol = opts.step, opts.rtol, opts.atol
    g_all = max((gref(a, 0.0) for a in A), default=0.0) or 1.0
    cx = ComplexSteps(vp)
    leaves = []
    for k, a in enumerate(A):
        nc = vp.coordinates(k)
        RT, AT, FL, GR, RS = (np.zeros_like(a) for _ in range(5))
        TL = np.zeros(a.shape, bool)
        for ol in vp.out_leaves:
            g = gref(a[ol.start:ol.stop], g_all)
            lim = limits(vp, k, ol, rtol, atol, g, block=a[ol.start:ol.stop])
            RT[ol.start:ol.stop], AT[ol.start:ol.stop], FL[ol.start:ol.stop] = lim.rtol, lim.atol, lim.floor
            GR[ol.start:ol.stop], TL[ol.start:ol.stop], RS[ol.start:ol.stop] = g, lim.tail, lim.residue
        lim = Limits(RT, AT, FL, analytic=0.0 if S is None else policy.ANALYTIC_SAFETY * S[k], tail=TL, residue=RS)
        # The complex step where some block is float64 (its tails are settled) and the
        # input leaf is real (a complex coordinate has no complex step of its own).
        ev = _column_evidence(vp, k, a.shape, h, step, cx=cx if TL.any() and not vp.is_complex(k) else None)
        judged = judge(a, lim, ev).judged
        TW = None if twin is None else twin_values(judged.codes, lambda at, k=k: twin[1](k, at), lines=twin[0])
        perm = vp.block_columns(k)
        for ol in vp.out_leaves:
            def blk(M, rows=slice(ol.start, ol.stop), perm=perm):
                return M[rows][:, perm]

            nd = len(ol.block_shape)
            leaves.append(block_report(
                blk(a), blk(judged.num), blk(judged.bound), blk(judged.codes), twin=None if TW is None else blk(TW),
                path=vp.paths[k], label=f"{ol.path} wrt {vp.paths[k]}", output_path=ol.path,
                shape=ol.block_shape + vp.in_block_shape(k), dtype=vp.orig_dtypes[k].name,
                split_index=lambda w, nd=nd: (w[:nd], w[nd:]),
                reasons=block_reasons(judged.why, a.shape, slice(ol.start, ol.stop), perm),
                step=float(np.median(h * vp.scales[k])) if vp.scales[k].size else math.nan,  # empty: none
                g_ref=float(GR[ol.start, 0]) if ol.stop > ol.start and nc else 1.0,
            ))
    return leaves
