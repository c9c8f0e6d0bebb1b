"""The complex step of a vector check: Im f(x + i·h·v)/h along Jacobian columns or tangents.

A float64 derivative far below what float64 central differences resolve (σ'(40) =
4e-18 against a bar of ≈ 1e-11) is resolved by the complex step, which has no
subtraction, where f is complex-safe. The judge asks it only for the few elements
nothing else resolved (``judge.ComplexStep``, the same probe as a scalar cost's, which
also tests complex-safety on elements already resolved). f is evaluated through the
engine, as every other point off x: a Jacobian column moves one real coordinate by
i·h (``engine.LeafEvaluator`` with ``complex_step``), a tangent moves every leaf by
i·h·t (``engine.LineEvaluator`` on the leaves made complex, with the bank times i).

Only real output leaves have a complex step here: Im of a complex output's (Re, Im)
view is no derivative. Their entries are NaN, so the judge never counts them resolved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import compat, compiling, engine, stencils


def _complex(x):
    """A leaf or bank array on the device, complex (real ones get imaginary part 0)."""
    x = compat.host(x)
    return jax.device_put(x.astype(np.result_type(x.dtype, np.complex64)))


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
        self._columns: dict = {}
        self._lines = None

    def cost(self, dyn, argarr):
        """f's output vector, complex where its real output leaves are (NaN on complex ones)."""
        vp = self.vp
        leaves = jax.tree_util.tree_leaves(vp.call(dyn, argarr))
        parts = []
        for ol in vp.out_leaves:
            y = jnp.asarray(leaves[ol.pos])
            if ol.is_complex:
                parts.append(jnp.full(2 * y.size, jnp.nan, jnp.complex128 if jax.config.jax_enable_x64
                                      else jnp.complex64))
            else:
                parts.append(y.ravel().astype(jnp.result_type(y.dtype, jnp.complex64)))
        return jnp.concatenate(parts)

    def _estimate(self, jv, h: np.ndarray) -> stencils.Estimate:
        """An estimate from complex values jv (lines, n_out) at steps h (lines,)."""
        jv = np.asarray(jv).reshape(-1, self.vp.n_out)
        if not np.iscomplexobj(jv):
            raise ValueError("f returned a real value for complex inputs: not complex-safe")
        return stencils.complex_step(jv.ravel(), np.repeat(h, self.vp.n_out), self.vp.u)

    def columns(self, k: int, cols: np.ndarray, h_rel: float) -> stencils.Estimate:
        """Jacobian columns ``cols`` of real leaf k (coordinates = elements)."""
        vp = self.vp
        x = vp.dyn[k]
        if k not in self._columns:
            shape = x.shape

            def cost(xf, ops):
                dyn, argarr = ops
                dyn = list(dyn)
                dyn[k] = xf.reshape(shape)
                return self.cost(dyn, argarr)

            self._columns[k] = engine.LeafEvaluator(cost, jax.device_put(compat.host(x).ravel()),
                                                    (vp.dyn, vp.argarr), chunk_size=vp.chunk_size,
                                                    counter=vp.counter, complex_step=True)
        cols = np.asarray(cols, np.int64)
        h = h_rel * vp.scales[k].ravel()[cols]
        deltas = (1j * h)[:, None].astype(np.result_type(x.dtype, np.complex64))
        return self._estimate(self._columns[k](cols, deltas), h)

    def directions(self, rows: np.ndarray, h_rel: float) -> stencils.Estimate:
        """J·t for bank rows ``rows`` (see ``vp.set_bank``), at relative step h_rel."""
        vp = self.vp
        if self._lines is None:
            probe, tang = vp.bank
            bank = ([_complex(p) for p in probe], [jax.device_put(1j * compat.host(_complex(t))) for t in tang])
            self._lines = engine.LineEvaluator(self.cost, [_complex(x) for x in vp.dyn], vp.argarr, bank,
                                               rows=vp.rows, t_dtype=np.float64 if jax.config.jax_enable_x64
                                               else np.float32, direction=vp.tangent_of, counter=vp.counter,
                                               options=compiling.fast())
        rows = np.asarray(rows, np.int64)
        s = np.full(rows.size, h_rel)
        return self._estimate(self._lines(rows, s), s)
