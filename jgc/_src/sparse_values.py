"""The three kinds of value the sparse evaluator (``sparse.py``) computes with.

* ``Plain``: the same for every perturbation of a batch;
* ``Batched``: one dense array per perturbation (what ``jax.vmap`` would hold);
* ``Sparse``: one shared ``base`` array, and for perturbation k the values ``new[k]``
  at flat positions ``pos[k]``; elsewhere equal to ``base``.

Also here: turning values into dense rows, and flat/multi-index arithmetic on them.
"""

from __future__ import annotations

import threading

import jax.numpy as jnp

# A Sparse value with more changed entries than this fraction of its size is made
# dense: past it, gathers and scatters cost more than dense batched arithmetic.
DENSE_FRACTION = 0.25


class Plain:
    """A value shared by every perturbation of the batch."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v


class Batched:
    """One dense array per perturbation: ``v`` has a leading axis of the batch size."""

    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v


class Sparse:
    """A shared ``base``; perturbation k holds ``new[k]`` at flat positions ``pos[k]``."""

    __slots__ = ("base", "new", "pos")

    def __init__(self, base, pos, new):
        self.base, self.pos, self.new = base, pos, new

    @property
    def shape(self):
        return self.base.shape


# Per thread, while a batch is traced: the largest value, in elements, that still differed
# from θ's in one entry per row and yet had to be copied densely (see
# ``batched_single_entry``).
trace = threading.local()


def densify(x: Sparse) -> Batched:
    """Dense rows of a Sparse value (recorded in ``trace.densified`` for one-entry changes)."""
    c = x.pos.shape[0]
    if x.pos.shape[1] == 1:
        trace.densified = max(getattr(trace, "densified", 0), int(x.base.size))
    flat = jnp.broadcast_to(x.base.reshape(-1), (c, x.base.size))
    rows = jnp.arange(c, dtype=jnp.int32)[:, None]
    flat = flat.at[rows, x.pos].set(x.new.astype(x.base.dtype))
    return Batched(flat.reshape((c,) + x.base.shape))


def unravel(pos, shape):
    """Multi-index of flat positions: a tuple of int32 arrays shaped like ``pos``."""
    if not shape:
        return ()
    return tuple(jnp.asarray(a, jnp.int32) for a in jnp.unravel_index(pos, shape))


def ravel(index, shape):
    flat = jnp.zeros_like(index[0]) if index else jnp.zeros((), jnp.int32)
    for a, n in zip(index, shape):
        flat = flat * n + a
    return flat


def at(x, pos):
    """Values of a Plain array at flat positions ``pos`` (of its own shape)."""
    return x.reshape(-1)[pos]


def as_batched(v, c: int, aval):
    """A value as c dense rows of ``aval``'s shape and dtype."""
    if isinstance(v, Sparse):
        v = densify(v)
    if isinstance(v, Plain):
        return jnp.broadcast_to(jnp.asarray(v.v, aval.dtype), (c,) + tuple(aval.shape))
    return v.v.astype(aval.dtype)
