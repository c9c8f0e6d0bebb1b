"""The real output vector of a vector-valued check: where each floating output leaf lies.

Every floating output leaf of f is laid out in one real vector

    y = vec(f(*primals))   (complex leaves contribute (Re, Im) pairs, interleaved)

and :class:`Layout` maps between the output pytree and y: ``vec`` (linear in the
output), its transpose ``unvec_cotangent`` (JAX's bilinear pairing of cotangents) and
``locate`` (which leaf and index an element of y is).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from . import compat, trees
from .names import short_name


def zero_tangent(x):
    """A zero tangent for a primal leaf (float0 for integer/bool leaves, as JAX wants)."""
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros(x.shape, x.dtype)
        return np.zeros(x.shape, dtype=jax.dtypes.float0)
    if isinstance(x, (float, complex)):
        return type(x)(0)
    if isinstance(x, (int, bool)):
        return np.zeros((), dtype=jax.dtypes.float0)
    return x


@dataclasses.dataclass(frozen=True)
class OutLeaf:
    """One floating output leaf and its slice of the real output vector y."""

    pos: int  # position among the output tree's leaves
    path: str
    shape: tuple
    dtype: np.dtype  # as evaluated
    is_complex: bool
    start: int
    stop: int

    @property
    def block_shape(self) -> tuple:
        """Shape of this leaf in y's real view: complex leaves gain a trailing (Re, Im) axis."""
        return self.shape + ((2,) if self.is_complex else ())


@dataclasses.dataclass(frozen=True)
class Layout:
    """The floating output leaves of f in y, the leaves left out, y's size and real dtype."""

    leaves: list  # OutLeaf, in output order
    skipped: list  # (path, description) of the outputs that are not floating
    size: int
    dtype: np.dtype

    @classmethod
    def of(cls, out, *, name: str, api: str, f) -> Layout:
        """The layout of an output pytree (arrays or shapes); its paths start with ``name``.

        Raises:
          ValueError: when f returned no floating output.
        """
        wp, _ = jax.tree_util.tree_flatten_with_path(out)
        leaves, skipped, start = [], [], 0
        for pos, (path, leaf) in enumerate(wp):
            p = name + jax.tree_util.keystr(path)
            arr = leaf if isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array, np.ndarray, np.generic)) else None
            if arr is None or not jnp.issubdtype(arr.dtype, jnp.inexact):
                desc = trees.describe(leaf)
                skipped.append((p, desc))
                continue
            is_c = bool(jnp.issubdtype(arr.dtype, jnp.complexfloating))
            n = int(np.prod(arr.shape, dtype=np.int64)) * (2 if is_c else 1)
            leaves.append(OutLeaf(pos, p, tuple(arr.shape), np.dtype(arr.dtype), is_c, start, start + n))
            start += n
        if not leaves:
            raise ValueError(
                f"{api}: {short_name(f)} returned no floating-point output (outputs seen: "
                f"{[d for _, d in skipped] or 'none'}), so there is no derivative to "
                "check. Return float or complex arrays."
            )
        reals = [compat.finfo(ol.dtype).dtype if ol.is_complex else ol.dtype for ol in leaves]
        return cls(leaves, skipped, start, np.result_type(*reals))

    def vec(self, out):
        """The real output vector y of an output pytree (linear in the output).

        Evaluated at complex inputs (the complex step, Im f(x + i·h·v)/h), a real output
        leaf keeps its imaginary part, and y is complex (a complex output leaf's (Re, Im)
        view has no complex step: its entries are NaN there).
        """
        leaves = jax.tree_util.tree_leaves(out)
        parts = []
        for ol in self.leaves:
            x = jnp.asarray(leaves[ol.pos])
            if ol.is_complex:
                x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
            elif jnp.iscomplexobj(x):
                parts.append(x.ravel())
                continue
            parts.append(x.ravel().astype(self.dtype))
        stepped = [p.dtype for p in parts if jnp.iscomplexobj(p)]
        if stepped:  # explicit casts: no implicit complex × real promotion (strict mode)
            parts = [jnp.full(p.shape, jnp.nan, stepped[0]) if ol.is_complex else p.astype(stepped[0])
                     for p, ol in zip(parts, self.leaves)]
        return jnp.concatenate(parts)

    def unvec_cotangent(self, c, out):
        """The output cotangent whose pairing with a tangent gives c·vec(tangent).

        JAX pairs cotangents bilinearly: for a (Re, Im) pair the cotangent is c_r − i·c_i
        (the transpose of vec, as jax.vjp computes it). Integer outputs get float0 zeros.
        """
        leaves, treedef = jax.tree_util.tree_flatten(out)
        cts = [zero_tangent(x) for x in leaves]
        for ol in self.leaves:
            seg = c[ol.start:ol.stop]
            if ol.is_complex:
                seg = seg.reshape(-1, 2)
                v = (seg[:, 0] - 1j * seg[:, 1]).astype(ol.dtype)
            else:
                v = seg.astype(ol.dtype)
            cts[ol.pos] = v.reshape(ol.shape)
        return jax.tree_util.tree_unflatten(treedef, cts)

    def locate(self, j: int) -> tuple[OutLeaf, tuple]:
        """The output leaf that element j of y belongs to, and its index in the leaf's block."""
        for ol in self.leaves:
            if ol.start <= j < ol.stop:
                return ol, tuple(int(i) for i in np.unravel_index(j - ol.start, ol.block_shape))
        raise IndexError(j)

    def first(self, bad: np.ndarray) -> tuple[int, str]:
        """The first element of y flagged in ``bad``, and its name (``out['w'][0, 1]``)."""
        j = int(np.argmax(bad))
        ol, idx = self.locate(j)
        return j, f"{ol.path}{list(idx)}"
