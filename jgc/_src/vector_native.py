"""The analytic side of a vector check at the dtypes given, beside a float64 reference.

With ``analytic="native"``, a :class:`jgc._src.vector.VectorProblem` keeps a
:class:`NativeView` of itself: the checked primals and the data as the caller passed
them, evaluated under the caller's own x64 setting, so JVPs and VJPs (JAX's or the
user's rules) run as the program runs, with its float32/bfloat16 rounding and the
casts inside, while the finite differences stay at the reference's precision. Each
batch of products carries its own rounding, measured at nudged points
(:class:`NativeRun`), which joins the judge's error bar.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from . import compat, policy, trees
from .vector_layout import Layout


class TwinDiffers(Exception):
    """f at the dtypes given is another function than at the reference's precision."""


class NativeView:
    """A vector problem as the user's program runs it: the checked primals and the data at
    the dtypes given, under the caller's own x64 setting (``scope``), its outputs laid out
    at their own dtypes. Everything else (split, bank rows, chunking, notes) is the
    reference problem's ``vp``: the JVP and VJP batches above run on this view unchanged.
    """

    def __init__(self, vp, dyn: list, argarr: list, x64: bool):
        self.vp, self.dyn, self.argarr, self.x64 = vp, list(dyn), list(argarr), x64
        with self.scope():
            out = jax.eval_shape(vp.call, self.dyn, self.argarr)
        self.layout = Layout.of(out, name=vp.out_name, api=vp.api, f=vp.f)
        if [(o.start, o.stop) for o in self.layout.leaves] != [(o.start, o.stop) for o in vp.out_leaves]:
            raise TwinDiffers("the outputs at the dtypes given have another layout")
        self.out_dtype = self.layout.dtype
        self.u = max(policy.unit_roundoff(d) for d in
                     [x.dtype for x in self.dyn] + [o.dtype for o in self.layout.leaves])
        self.F = lambda d, a: self.layout.vec(vp.call(d, a))
        self.checking = True  # off at the nudged points of a spread (another point)
        self._bank = (None, None)

    def __getattr__(self, name):
        return getattr(self.vp, name)

    def scope(self):
        return compat.enable_x64(self.x64)

    def vec(self, out):
        return self.layout.vec(out)

    def unvec_cotangent(self, c, out):
        return self.layout.unvec_cotangent(c, out)

    def dtype(self, k: int) -> np.dtype:
        return np.dtype(self.dyn[k].dtype)

    @property
    def bank(self):
        """The reference's direction bank in the dtypes given (its tangents were rounded
        to them when the bank was set, so the cast is exact)."""
        ref, cast = self._bank
        if ref is not self.vp.bank:
            probe, tang = self.vp.bank
            cast = ([jax.device_put(compat.host(p).astype(self.dtype(k))) for k, p in enumerate(probe)],
                    [jax.device_put(compat.host(t).astype(self.dtype(k))) for k, t in enumerate(tang)])
            self._bank = (self.vp.bank, cast)
        return cast

    def check_primal(self, again, user: str | None = None, label: str = "JVP"):
        """f(x) from the rule at the dtypes given, against the reference's y0: a rounding
        difference stays within 2e3·u of the coarsest dtype given (at most 1e-2 relative:
        bfloat16 code rounds by a few 1e-3) of the size of the terms y rounds at (max|y|,
        or σ_j/u_ref where the reference's noise shows larger terms), plus 64σ_j of the
        reference's measured noise (as for a scalar cost); beyond that, f at the dtypes
        given is another function (randomness or arrays at the default dtype depend on
        x64, or code branches on the dtype)."""
        if not self.checking:
            return
        y = self.vp.y0
        again = np.asarray(again, np.float64)
        fin = np.abs(y[np.isfinite(y)])
        sigma = np.where(np.isfinite(self.vp.sigma), self.vp.sigma, 0.0) if self.vp.sigma is not None else 0.0
        terms = np.maximum(float(np.max(fin, initial=0.0)), sigma / self.vp.u)
        bound = min(2e3 * self.u, 1e-2) * terms + 64.0 * sigma
        with np.errstate(invalid="ignore"):
            off = np.abs(again - y) > bound
        if np.any(off):
            j, at = self.vp.layout.first(off)
            raise TwinDiffers(f"f at output {at} is {again[j]:.6g} at the dtypes given against {y[j]:.6g}")


def _wide(x):
    x = compat.host(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


class NativeRun:
    """A batch of JVPs or VJPs (``make(view)``, see :func:`jvp_batch`) evaluated at the
    dtypes given, returned at float64, with each result's own rounding measured.

    After every call, ``spreads`` holds, per call, the largest deviation of each result
    over ``policy.ANALYTIC_PROBES`` points nudged by ``policy.ANALYTIC_PROBE_ULPS``
    round-offs of each coordinate's scale (as the scalar check measures its gradient's
    rounding); a deviation beyond ``policy.ANALYTIC_JUMP``·u of the batch's largest
    value crossed a kink and counts 0. If f at the dtypes given is another function
    (:class:`TwinDiffers`), every call runs at the reference's precision (``reference``)
    with a note, and ``spreads`` holds None.
    """

    def __init__(self, view: NativeView, make: Callable, reference: Callable):
        self.view, self.reference = view, reference
        self.run = make(view)
        self.spreads: list = []

    def __call__(self, batch):
        view = self.view
        if view is None:
            self.spreads.append(None)
            return self.reference(batch)
        given = batch
        if isinstance(batch, list):  # per-leaf tangents: in the leaves' dtypes given
            batch = [jax.device_put(compat.host(t).astype(view.dtype(k))) for k, t in enumerate(batch)]
        with view.scope():
            try:
                out = jax.tree_util.tree_map(_wide, self.run(batch))
            except TwinDiffers as e:
                differs = e
            else:
                self.spreads.append(self._spread(batch, out))
                return out
        view.vp.notes.append(
            f"f differs between the dtypes given and the reference's precision beyond rounding ({differs}: "
            "randomness or arrays at the default dtype that depend on x64, or code that branches on the "
            "dtype), so its derivatives were evaluated "
            "at the reference's precision too, as with analytic='reference'.")
        self.view = view.vp.native_view = None
        self.spreads = [None] * (len(self.spreads) + 1)
        return self.reference(given)

    def _spread(self, batch, out):
        view = self.view
        rng = np.random.default_rng(0)
        hosts = [compat.host(x) for x in view.dyn]
        spread = jax.tree_util.tree_map(lambda o: np.zeros(np.shape(o)), out)
        kept = view.dyn
        view.checking = False
        try:
            for _ in range(policy.ANALYTIC_PROBES):
                view.dyn = [jax.device_put((x.astype(np.float64) + policy.ANALYTIC_PROBE_ULPS
                                            * policy.unit_roundoff(x.dtype) * s.reshape(x.shape)
                                            * rng.choice([-1.0, 1.0], x.shape)).astype(x.dtype))
                            if not np.iscomplexobj(x) else jax.device_put(x)
                            for x, s in zip(hosts, view.vp.scales)]
                try:
                    again = jax.tree_util.tree_map(_wide, self.run(batch))
                except Exception:  # noqa: BLE001 - no sample: judged without the analytic bar
                    return None
                spread = jax.tree_util.tree_map(
                    lambda s, a, o: np.maximum(s, np.where(np.isfinite(a - o), np.abs(a - o), np.inf)),
                    spread, again, out)
        finally:
            view.dyn, view.checking = kept, True
        top = max((float(np.max(np.abs(o[np.isfinite(o)]), initial=0.0))
                   for o in jax.tree_util.tree_leaves(out)), default=0.0)
        cap = policy.ANALYTIC_JUMP * view.u * top
        return jax.tree_util.tree_map(lambda s: np.where(s <= cap, s, 0.0), spread)


def spreads_of(run) -> list | None:
    """The measured rounding of every call of ``run`` so far (see :class:`NativeRun`), or
    None where the analytic side runs at the reference's precision; the list is emptied."""
    got = getattr(run, "spreads", None)
    if got is None:
        return None
    out, run.spreads = list(got), []
    return None if any(s is None for s in out) else out


def native_view(vp, dyn: list, others: tuple, analytic: str) -> NativeView | None:
    """The view of ``vp`` at the dtypes given (``dyn``: the checked leaves as given,
    ``others``: the unchecked primals), or None where the analytic side runs at the
    reference's precision: ``analytic="reference"``, or nothing was widened or raised."""
    if analytic == "reference":
        return None
    _, args = trees.split_args(others)
    if [x.dtype for x in list(dyn) + args] == [x.dtype for x in list(vp.dyn) + list(vp.argarr)]:
        return None
    try:
        view = NativeView(vp, dyn, args, vp.x64_given)
    except TwinDiffers as e:
        vp.notes.append(f"f has other outputs at the dtypes given ({e}): its derivatives were evaluated "
                        "at the reference's precision, as with analytic='reference'.")
        return None
    given = sorted({np.dtype(x.dtype).name for x in list(dyn) + args if trees.is_inexact_array(x)})
    vp.notes.append(f"derivatives (JVPs, VJPs) at the dtypes given ({', '.join(given)}), as the program "
                    "runs; the finite-difference reference at the precision shown (analytic='reference' "
                    "evaluates both there).")
    return view


def batch(vp, make: Callable, *options):
    """``make(vp, *options)`` (a JVP or VJP batch: :func:`jvp_batch`, :func:`vjp_batch`), at
    the dtypes given where ``vp`` has a native view (a :class:`NativeRun`)."""
    view = getattr(vp, "native_view", None)
    reference = make(vp, *options)
    return reference if view is None else NativeRun(view, lambda v: make(v, *options), reference)


def as_given(vp, tangents: list) -> list:
    """Per-leaf tangents rounded to the dtypes given (exactly representable there), so
    that the finite differences and the analytic side move along the same direction."""
    view = getattr(vp, "native_view", None)
    if view is None or not tangents:
        return tangents
    return [np.asarray(t).astype(view.dtype(k)).astype(np.asarray(t).dtype) for k, t in enumerate(tangents)]


def round_cotangents(vp, U: np.ndarray) -> np.ndarray:
    """Real cotangents (rows, n_out) rounded to the output dtypes given (see :func:`as_given`)."""
    view = getattr(vp, "native_view", None)
    if view is None:
        return U
    U = np.array(U, np.float64)
    for ol in view.layout.leaves:
        real = compat.finfo(ol.dtype).dtype if ol.is_complex else ol.dtype
        U[:, ol.start:ol.stop] = U[:, ol.start:ol.stop].astype(real).astype(np.float64)
    return U


def analytic_dtype(vp, k: int, ol) -> np.dtype:
    """The dtype the analytic side of block (output leaf ``ol``, input leaf k) rounds in: the
    coarser of the input's and the output's, as evaluated (given, or the reference's)."""
    view = getattr(vp, "native_view", None)
    if view is not None:
        pair = [view.dtype(k), view.layout.leaves[vp.out_leaves.index(ol)].dtype]
    else:
        pair = [vp.eval_dtypes[k], ol.dtype]
    return max(pair, key=policy.unit_roundoff)


def twin_of(run, rows: np.ndarray | None = None) -> Callable | None:
    """The float64 twin of a batch ``run`` that ran at the dtypes given: a function
    (selected batch positions) -> the same products by the program at the reference's
    precision, for the elements a report prints (a mismatch's native value beside its
    twin's and the reference's). ``rows``: the batch ``run`` was called with, where
    positions select from it (the bank rows of JVPs); without it the caller passes
    the batch itself (cotangents of VJPs). None where the analytic side ran at the
    reference's precision (nothing to compare) or switched there (:class:`TwinDiffers`)."""
    if not isinstance(run, NativeRun) or run.view is None:
        return None
    return (lambda at: run.reference(rows[at])) if rows is not None else run.reference


def first_spread(run):
    """The measured rounding of a run called once (see :func:`spreads_of`), or None."""
    got = spreads_of(run)
    return got[0] if got else None
