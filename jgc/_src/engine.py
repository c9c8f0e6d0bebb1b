"""Perturbation engine: evaluate the cost at θ + δ·e_i for many (i, δ), vectorised.

The engine works one leaf at a time. Perturbing a single leaf lets ``jax.vmap`` batch
only the part of the computation downstream of that leaf, instead of copying and
batching every parameter for every perturbation as a ravel-everything reference does.

For a leaf with m elements, a *chunk* of c coordinates and a stencil of p offsets,
one call of the compiled evaluator runs c·p cost evaluations in one vmapped batch.
Chunks are dispatched in a Python loop over a fixed-shape compiled function, so there
is one compilation per (leaf, stencil width) and memory is bounded by the chunk, not
by the number of parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Evaluations in one vmapped batch. Larger batches amortise dispatch, but past ~128
# they mostly add allocation traffic on CPU; the memory cap below bounds big leaves.
DEFAULT_BATCH_EVALS = 128
# Elements of perturbed leaf copies alive in one batch (2^24 float64 = 128 MiB).
BATCH_ELEMENT_BUDGET = 2**24


@dataclasses.dataclass
class Counter:
    """Counts cost evaluations (the lecture's price of a numerical gradient)."""

    evaluations: int = 0


def choose_chunk(leaf_size: int, width: int, chunk_size: int | None) -> int:
    """Return the number of coordinates per vmapped batch for one leaf."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    by_evals = max(1, DEFAULT_BATCH_EVALS // width)
    by_memory = max(1, BATCH_ELEMENT_BUDGET // max(1, leaf_size * width))
    return max(1, min(by_evals, by_memory))


class LeafEvaluator:
    """Evaluates ``cost(x)`` at ``x0`` with single elements offset, for one leaf.

    ``cost`` maps the flattened leaf (shape ``(m,)``) to a scalar; all other
    parameters and data are bound as jit arguments by the caller through ``operands``.
    """

    def __init__(self, cost: Callable, x0: jax.Array, operands, *, chunk_size=None,
                 counter: Counter | None = None, complex_step: bool = False):
        self.x0 = x0
        self.operands = operands
        self.m = x0.size
        self.chunk_size = chunk_size
        self.counter = counter if counter is not None else Counter()
        self.complex_step = complex_step
        self._compiled = {}

        def one(x, i, d, ops):
            if complex_step:
                x = x.astype(jnp.result_type(x.dtype, jnp.complex64))
            y = x.at[i].set(x[i] + d)
            return cost(y, ops)

        def batch(x, idx, deltas, ops):
            # idx: (c,), deltas: (c, p) -> (c, p)
            inner = jax.vmap(one, in_axes=(None, None, 0, None))
            return jax.vmap(inner, in_axes=(None, 0, 0, None))(x, idx, deltas, ops)

        self._batch = jax.jit(batch)

    def __call__(self, idx: np.ndarray, deltas: np.ndarray) -> np.ndarray:
        """Return J at x0 + deltas[k, j]·e_{idx[k]}, shape ``deltas.shape``."""
        n, p = deltas.shape
        if n == 0:
            return np.zeros((0, p))
        c = min(choose_chunk(self.m, p, self.chunk_size), n)
        nchunks = math.ceil(n / c)
        pad = nchunks * c - n
        idx_p = np.concatenate([idx, np.repeat(idx[-1:], pad)]).astype(np.int32)
        del_p = np.concatenate([deltas, np.repeat(deltas[-1:], pad, axis=0)])
        outs = []
        # Dispatch is asynchronous: the loop queues every chunk before we block.
        for k in range(nchunks):
            sl = slice(k * c, (k + 1) * c)
            outs.append(self._batch(self.x0, idx_p[sl], del_p[sl], self.operands))
        self.counter.evaluations += n * p
        values = np.concatenate([np.asarray(o) for o in outs])[:n]
        return values


def actual_steps(x0: np.ndarray, idx: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Return the representable offsets (x_i + δ) − x_i in the leaf's own dtype.

    Rounding θ_i + δ to the leaf's dtype changes the step that was really taken; using
    the representable difference removes that error from the quotient entirely.
    """
    base = x0[idx][:, None]
    return ((base + deltas.astype(x0.dtype)) - base).astype(deltas.dtype)


def noise_level(cost_dir: Callable, t: np.ndarray) -> tuple[float, np.ndarray]:
    """Estimate the standard deviation σ of rounding noise in J along a line.

    ``cost_dir(t)`` evaluates J(θ + t_j·v) for a vector of offsets t (vmapped). With
    equally spaced t, the k-th differences of a smooth function shrink like (Δt)^k
    while those of independent noise keep variance C(2k, k)·σ² (Hamming's
    observation, used by Moré and Wild's ECnoise). We use k = 6 on 16 points, where
    the spacing is chosen so that the smooth part of the 6th difference is below u.

    Returns (σ, values).
    """
    f = np.asarray(cost_dir(t), dtype=np.float64)
    if not np.all(np.isfinite(f)):
        return float("nan"), f
    k = 6
    d = np.diff(f, n=k)
    gamma = math.factorial(k) ** 2 / math.factorial(2 * k)
    sigma = math.sqrt(gamma * float(np.mean(d * d)))
    return sigma, f
