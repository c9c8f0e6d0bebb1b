"""Blocks of vector checks: the judge's limits per (output leaf, input leaf), summaries, the report.

The Jacobian, JVP, VJP and HVP checks judge entries grouped in blocks: one output
leaf against one input leaf. Each block has its own tolerance (in the coarser of the
two dtypes, scaled by the block's largest derivative) and its own row in the report.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import policy, vector_native
from .judge import Limits
from .report import LeafReport, Report
from .statuses import MISMATCH
from .summary import assemble, summarize
from .vector import VectorProblem


def limits(vp, k: int, ol, rtol, atol, g_ref) -> Limits:
    """The judge's limits for block (output leaf ol, input leaf k), the block's largest |g| g_ref."""
    # The analytic side rounds in the coarser of the input's evaluation dtype and the
    # output's dtype (a function that computes in float32 inside a float64 check).
    # At the dtypes given (analytic="native"), the dtypes given.
    d = vector_native.analytic_dtype(vp, k, ol)
    rt, at = policy.default_tolerances(d, g_ref, rtol, atol)
    return Limits(rt, at, 1e-3 * g_ref)


def gref(a: np.ndarray, fallback: float) -> float:
    fin = np.abs(a[np.isfinite(a)])
    g = float(fin.max()) if fin.size else 0.0
    return g if g > 0 else fallback


def block_report(a, n, bound, codes, *, path, label, output_path, shape, dtype, split_index: Callable,
                 step: float, g_ref: float) -> LeafReport:
    """The LeafReport of one block of entries (flat, in the block's C order)."""
    size = int(np.prod(shape, dtype=np.int64))
    return summarize(a, n, bound, codes, indices=np.arange(np.size(a)), path=path, shape=tuple(shape),
                     dtype=dtype, size=size, step=step, g_ref=g_ref, split_index=split_index,
                     output_path=output_path, label=label)


def primal_blocks(vp: VectorProblem, prefixes: dict) -> list:
    """Mismatch blocks for derivative rules whose primal output is not f(x) (see check_primal)."""
    out = []
    for which, again in getattr(vp, "primal_mismatches", {}).items():
        bad = vp._differs(again)
        for ol in vp.out_leaves:
            c = slice(ol.start, ol.stop)
            out.append(block_report(
                again[c], vp.y0[c], np.broadcast_to(vp.primal_bound(), vp.y0.shape)[c],
                np.where(bad[c], MISMATCH, 0).astype(np.int8),
                path=ol.path, label=f"{prefixes.get(which, which + ': ')}primal output {ol.path} (f(x) from "
                f"jax.{which.lower()})", output_path=ol.path, shape=ol.block_shape, dtype=ol.dtype.name,
                split_index=lambda w: (w, ()), step=0.0, g_ref=gref(vp.y0[c], 1.0)))
    return out


def make_report(vp: VectorProblem, leaves: list, *, api, mode, stencil, step, strict, notes=(),
                prefixes=None) -> Report:
    leaves = list(leaves) + primal_blocks(vp, prefixes or {})
    skipped = tuple(vp.skipped) + tuple((p, f"output {d}") for p, d in vp.out_skipped)
    return assemble(vp, leaves, stencil=stencil, step=step, strict=strict, mode=mode, notes=notes,
                    skipped=skipped, noise=float(np.max(vp.sigma, initial=0.0)), api=api)
