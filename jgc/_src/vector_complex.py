"""The complex step of a vector check: Im f(x + i·h·v)/h along Jacobian columns or tangents.

A float64 derivative far below what float64 central differences resolve (σ'(40) =
4e-18 against a bar of ≈ 1e-11) is resolved by the complex step, which has no
subtraction, where f is complex-safe. The judge asks it only for the few elements
nothing else resolved (``judge.ComplexStep``, the same probe as a scalar cost's, which
also tests complex-safety on elements already resolved). f is evaluated through the
engine, as every other point off x: a Jacobian column moves one real coordinate by
i·h (the problem's one estimate on coordinates, ``stencil="complex"``, as a scalar
cost's), a tangent moves every leaf by i·h·t (``engine.LineEvaluator`` on the leaves
made complex, with the bank times i). The output vector keeps the imaginary part of
real output leaves (``vector_layout.Layout.vec``); complex output leaves have no
complex step of their own (NaN there), so the judge never counts them resolved.
"""

from __future__ import annotations

import jax
import numpy as np

from . import compat, compiling, engine, stencils


class ComplexSteps:
    """Im f(x + i·h·v)/h of a :class:`jgc._src.vector.VectorProblem` ``vp``, (lines · n_out) flat.

    Programs are built on first use and kept: a check whose elements are all resolved
    by central differences builds none.
    """

    def __init__(self, vp):
        self.vp = vp
        self.real_out = np.zeros(vp.n_out, bool)  # the outputs that have a complex step
        for ol in vp.out_leaves:
            self.real_out[ol.start:ol.stop] = not ol.is_complex
        self._lines = None

    def columns(self, k: int, cols: np.ndarray, h_rel: float) -> stencils.Estimate:
        """Jacobian columns ``cols`` of real leaf k (coordinates = elements)."""
        return self.vp.estimate(k, np.asarray(cols, np.int64), "complex", h_rel)

    def directions(self, rows: np.ndarray, h_rel: float) -> stencils.Estimate:
        """J·t for bank rows ``rows`` (see ``vp.set_bank``), at relative step h_rel."""
        vp = self.vp
        if self._lines is None:
            probe, tang = vp.bank
            bank = ([compat.as_complex(p) for p in probe], [jax.device_put(1j * compat.host(compat.as_complex(t))) for t in tang])
            # Under strict promotion (no complex × real path) the data become complex too,
            # with imaginary part 0, as for a coordinate's complex step.
            data = [compat.as_complex(a) for a in vp.argarr] if compat.strict_promotion() else vp.argarr
            self._lines = engine.LineEvaluator(vp.evaluated, [compat.as_complex(x) for x in vp.dyn], data, bank,
                                               rows=vp.rows, t_dtype=np.float64 if jax.config.jax_enable_x64
                                               else np.float32, direction=vp.tangent_of, counter=vp.counter,
                                               options=compiling.fast())
        rows = np.asarray(rows, np.int64)
        jv = np.asarray(self._lines(rows, np.full(rows.size, h_rel)))
        if not np.iscomplexobj(jv):
            raise ValueError("f returned a real value for complex inputs: it is not complex-safe")
        return stencils.complex_step(jv.reshape(-1), np.full(jv.size, h_rel), vp.u)
