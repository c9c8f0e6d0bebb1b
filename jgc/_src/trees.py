"""Pytree plumbing: which leaves are perturbed, and how to put a tree back together.

Only inexact (floating or complex) array leaves are perturbed. Every other leaf —
integer and bool arrays, PRNG keys (typed ``key<impl>`` arrays and raw uint32 ones),
Python numbers, callables, strings, None — is carried through untouched and listed as
skipped. Nothing the caller passed is modified: array leaves are copied into fresh JAX
arrays (NumPy arrays are mutable, JAX arrays are not). Typed keys have no NumPy dtype,
so they are passed on as the (immutable) JAX arrays they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
    """A params pytree split into the perturbed leaves and everything else."""

    treedef: Any
    leaves: tuple  # every leaf of the tree, perturbed ones replaced by None
    dynamic_index: tuple  # positions (in ``leaves``) of the perturbed leaves
    paths: tuple  # keystr paths of every leaf
    skipped: tuple  # (path, description) of the leaves that are not perturbed

    def combine(self, dynamic) -> Any:
        """Rebuild the full pytree from a sequence of perturbed leaves."""
        leaves = list(self.leaves)
        for pos, value in zip(self.dynamic_index, dynamic):
            leaves[pos] = value
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    @property
    def dynamic_paths(self) -> tuple:
        return tuple(self.paths[i] for i in self.dynamic_index)


def is_typed_key(leaf) -> bool:
    """True for a new-style PRNG key array (dtype ``key<impl>``, e.g. ``jax.random.key(0)``)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or isinstance(dtype, np.dtype):  # NumPy has no key dtype
        return False
    try:
        return bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))
    except TypeError:  # a .dtype that is not a dtype (some other library's object)
        return False


def describe(leaf) -> str:
    """A short description of a leaf for the report: ``float32[3]``, ``key<fry>[]``, ``int``."""
    if is_typed_key(leaf):
        return f"{leaf.dtype}{list(leaf.shape)}"  # e.g. key<fry>[]: no NumPy dtype exists
    if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
        return f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"
    if callable(leaf):
        return f"callable {getattr(leaf, '__name__', type(leaf).__name__)}"
    return type(leaf).__name__


def is_inexact_array(leaf) -> bool:
    """True for NumPy / JAX arrays (and NumPy scalars) of a floating or complex dtype."""
    if not isinstance(leaf, (np.ndarray, np.generic, jax.Array)):
        return False
    return bool(jnp.issubdtype(leaf.dtype, jnp.inexact))


def split_params(params, *, what: str = "params", finite: bool = True) -> tuple[Split, list]:
    """Split ``params`` into a :class:`Split` and a list of perturbed leaves (copies).

    Raises:
      ValueError: if there is no floating leaf, or (``finite``) a floating leaf holds
        NaN or Inf.
    """
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths, leaves, dyn_index, dyn, skipped = [], [], [], [], []
    for i, (path, leaf) in enumerate(path_leaves):
        p = jax.tree_util.keystr(path) or "<root>"
        paths.append(p)
        if is_inexact_array(leaf):
            # A host copy: the caller's NumPy buffer is never aliased or written. Checks
            # and copies run in NumPy, so no tiny XLA program is compiled per leaf shape.
            host = np.array(jax.device_get(leaf), copy=True)  # explicit transfer (guards)
            arr = jax.device_put(host)  # jnp.asarray would compile a program per shape
            if finite and not np.all(np.isfinite(host)):
                bad = np.argwhere(~np.isfinite(host))
                where = tuple(int(x) for x in bad[0]) if arr.ndim else ()
                raise ValueError(
                    f"{what} leaf {p} holds non-finite values (NaN or Inf), first at index "
                    f"{where}; a gradient check needs a finite point. Check the "
                    "initialisation or pass the parameters where the cost is defined."
                )
            dyn_index.append(i)
            dyn.append(arr)
            leaves.append(None)
        else:
            leaves.append(leaf)
            skipped.append((p, describe(leaf)))
    if not dyn:
        raise ValueError(
            f"{what} has no floating-point array leaves, so there is nothing to perturb "
            f"(leaves seen: {[d for _, d in skipped] or 'none'}). Pass the parameters as "
            "float arrays, e.g. jnp.asarray(x, jnp.float32), not Python numbers or ints."
        )
    split = Split(treedef, tuple(leaves), tuple(dyn_index), tuple(paths), tuple(skipped))
    return split, dyn


def wide_dtype(dtype) -> np.dtype:
    """The float64 counterpart of an inexact dtype: complex128 for complex, else float64."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.complexfloating):
        return np.dtype(np.complex128)
    return np.dtype(np.float64)


def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array))


def array_leaves(args: tuple) -> list:
    """The array leaves of ``args`` as given (not copied), in the order of split_args'
    traced leaves: its ``rebuild`` takes them in place of its copies."""
    return [x for x in jax.tree_util.tree_leaves(args) if _is_array(x)]


def split_args(args: tuple, *, widen: bool = False) -> tuple[Callable[[Any], tuple], list]:
    """Separate array leaves of ``args`` (traced under jit) from static ones.

    Python numbers, strings and other objects stay static (closed over), so code that
    branches on them in Python keeps working under our jit. Typed PRNG keys are traced
    as they are (a key array is a valid jit argument and cannot become NumPy).

    With ``widen``, floating and complex array leaves are cast (exactly) to float64 /
    complex128, the precision the parameters are evaluated in: code that keeps its own
    dtypes consistent (Equinox's ``State.set``, a ``lax.scan`` carry started from the
    data) sees one precision. Integer, bool and key leaves are never cast.
    """
    leaves, treedef = jax.tree_util.tree_flatten(args)
    is_arr = [_is_array(x) for x in leaves]

    def copy(x):
        if is_typed_key(x):
            return x
        host = np.array(jax.device_get(x), copy=True)  # never alias the caller's (mutable) NumPy array
        if widen and is_inexact_array(host):
            host = host.astype(wide_dtype(host.dtype))
        return jax.device_put(host)

    arrays = [copy(x) for x, a in zip(leaves, is_arr) if a]

    def rebuild(dynamic) -> tuple:
        it = iter(dynamic)
        full = [next(it) if a else x for x, a in zip(leaves, is_arr)]
        return jax.tree_util.tree_unflatten(treedef, full)

    return rebuild, arrays
