"""Perturbation engine: evaluate the cost at θ + δ·e_i for many (i, δ), vectorised.

The engine works one leaf at a time. Perturbing a single leaf lets ``jax.vmap`` batch
only the part of the computation downstream of that leaf, instead of copying and
batching every parameter for every perturbation as a ravel-everything reference does.

Requests are rows (element index, offset). One call of the compiled evaluator runs
a chunk of rows in one vmapped batch; chunks are dispatched in a Python loop over a
fixed-shape compiled function, so there is one compilation per leaf and memory is
bounded by the chunk, not by the number of parameters.
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


def choose_chunk(leaf_size: int, chunk_size: int | None) -> int:
    """Return the number of cost evaluations per vmapped batch for one leaf.

    Every evaluation holds its own perturbed copy of the leaf, so the batch is capped
    by a memory budget as well as by ``DEFAULT_BATCH_EVALS``; a small leaf gets a batch
    no larger than its first pass (2 evaluations per element) needs.
    """
    if chunk_size is not None:
        return max(1, int(chunk_size))
    by_memory = max(1, BATCH_ELEMENT_BUDGET // max(1, leaf_size))
    need = 1 << max(0, (2 * leaf_size - 1).bit_length())  # next power of two ≥ 2m
    return max(1, min(DEFAULT_BATCH_EVALS, by_memory, need))


class LeafEvaluator:
    """Evaluates ``cost(x)`` at ``x0`` with single elements offset, for one leaf.

    ``cost`` maps the flattened leaf (shape ``(m,)``) and ``operands`` (the other
    parameters and the data, passed as jit arguments) to a scalar. Every request is a
    list of rows (element index, offset); rows of every stencil go through the same
    compiled batch function, so a leaf compiles once however many passes it needs.
    """

    def __init__(self, cost: Callable, x0: jax.Array, operands, *, chunk_size=None,
                 counter: Counter | None = None, complex_step: bool = False):
        self.x0 = x0
        self.operands = operands
        self.m = x0.size
        self.rows = choose_chunk(self.m, chunk_size)
        self.counter = counter if counter is not None else Counter()

        def one(x, i, d, ops):
            if complex_step:
                x = x.astype(jnp.result_type(x.dtype, jnp.complex64))
            return cost(x.at[i].set(x[i] + d), ops)

        self._batch = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, None)))

    def __call__(self, idx: np.ndarray, deltas: np.ndarray) -> np.ndarray:
        """Return the cost at x0 + deltas[k, j]·e_{idx[k]}.

        The result has shape ``deltas.shape + out_shape``: ``(n, p)`` for a scalar cost,
        ``(n, p, *shape)`` for a cost returning an array (Jacobian columns).
        """
        n, p = deltas.shape
        if n == 0:
            return np.zeros((0, p))
        rows_i = np.repeat(np.asarray(idx, np.int32), p)
        rows_d = deltas.reshape(-1)
        total, c = rows_i.size, self.rows
        nchunks = math.ceil(total / c)
        pad = nchunks * c - total
        rows_i = np.concatenate([rows_i, np.repeat(rows_i[-1:], pad)])
        rows_d = np.concatenate([rows_d, np.repeat(rows_d[-1:], pad)])
        # Dispatch is asynchronous: the loop queues every chunk before we block.
        outs = [
            self._batch(self.x0, rows_i[k * c:(k + 1) * c], rows_d[k * c:(k + 1) * c], self.operands)
            for k in range(nchunks)
        ]
        self.counter.evaluations += total
        values = np.concatenate([np.asarray(o) for o in outs])[:total]
        return values.reshape((n, p) + values.shape[1:])


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
