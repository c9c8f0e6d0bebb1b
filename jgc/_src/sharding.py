"""Spread the rows of an evaluation batch across devices with ``jax.sharding``.

A batch of perturbations is embarrassingly parallel: every row is one cost
evaluation. We lay the devices on a one-axis mesh ("rows"), replicate the parameters
and data on every device once, and shard each batch's row arrays along that axis;
``jax.jit`` then runs each device's share of the vmapped batch where its rows live.
With ``jax.distributed.initialize()`` called first, ``jax.devices()`` lists the devices
of every host, and the same code runs across hosts (see docs/readme-scale.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import compat

# Replicated copies of jax arrays already laid out on a mesh, by id of the source array
# (which is immutable): every leaf's evaluator replicates the same parameters and data,
# and each copy is made, and checked across processes, once. An entry goes with its
# source array.
_replicated: dict[int, tuple[Mesh, jax.Array]] = {}


def _remember(src, mesh, out):
    key = id(src)
    try:
        weakref.finalize(src, _replicated.pop, key, None)
    except TypeError:  # not weak-referenceable: not cached
        return
    _replicated[key] = (mesh, out)


@dataclasses.dataclass(frozen=True)
class RowSharding:
    mesh: Mesh

    @property
    def size(self) -> int:
        return self.mesh.devices.size

    @classmethod
    def create(cls, devices=None) -> RowSharding | None:
        """Return a row sharding over ``devices`` (default: all), or None for one device.

        ``devices=False`` (or a single device) turns sharding off.
        """
        if devices is False:
            return None
        devs = list(jax.devices() if devices is None or devices is True else devices)
        if len(devs) <= 1:
            return None
        return cls(Mesh(np.array(devs), ("rows",)))

    def replicate(self, tree):
        """A copy of every array of ``tree`` on every device of the mesh.

        Across processes, each process lays its own copy on its own devices; the copies
        must be equal, which is checked (a 16-byte digest per array is exchanged).
        """
        spec = NamedSharding(self.mesh, PartitionSpec())
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        out = [None] * len(leaves)
        todo = []
        for k, x in enumerate(leaves):
            hit = _replicated.get(id(x)) if isinstance(x, jax.Array) else None
            if hit is not None and hit[0] == self.mesh:
                out[k] = hit[1]
            else:
                todo.append(k)
        if todo and jax.process_count() == 1:
            made = jax.device_put([leaves[k] for k in todo], spec)
        elif todo:
            host = [compat.host(leaves[k]) for k in todo]
            _require_same_on_every_process(host)
            made = [jax.make_array_from_callback(h.shape, spec, lambda i, h=h: h[i]) for h in host]
        for k, y in zip(todo, made if todo else []):
            out[k] = y
            if isinstance(leaves[k], jax.Array):
                _remember(leaves[k], self.mesh, y)
        return jax.tree_util.tree_unflatten(treedef, out)

    def split_rows(self, arrays):
        spec = NamedSharding(self.mesh, PartitionSpec("rows"))
        if jax.process_count() == 1:
            return [jax.device_put(a, spec) for a in arrays]
        # Several hosts: every process holds the same full row arrays (the check is
        # deterministic), and each contributes the shards of its own devices.
        return [jax.make_array_from_callback(a.shape, spec, lambda i, a=a: a[i]) for a in arrays]

    def gather(self, out) -> np.ndarray:
        """Bring a row-sharded result to host memory (from every host when distributed)."""
        if jax.process_count() == 1:
            return np.asarray(jax.device_get(out))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(out, tiled=True))


def _require_same_on_every_process(arrays: list) -> None:
    """Raise a clear error if ``arrays`` differ between the processes of jax.distributed."""
    from jax.experimental import multihost_utils

    digests = np.stack([
        np.frombuffer(hashlib.blake2b(
            f"{a.shape}{a.dtype}".encode() + np.ascontiguousarray(a).tobytes(), digest_size=16,
        ).digest(), np.uint8) for a in arrays])
    every = np.asarray(multihost_utils.process_allgather(digests))  # (processes, arrays, 16)
    differ = np.any(every != every[:1], axis=2)  # (processes, arrays)
    if differ.any():
        procs, which = np.nonzero(differ)
        a = arrays[int(which[0])]
        raise ValueError(
            f"jgc: the parameters or data differ between processes: an input of shape "
            f"{tuple(a.shape)} and dtype {a.dtype} on process {int(procs[0])} is not the one on "
            f"process 0 ({int(differ.any(axis=0).sum())} of {len(arrays)} inputs differ). Under "
            "jax.distributed every batch of perturbations is spread over the devices of every "
            "process, so every process must call the check with the same params and args: "
            "load the same batch on every host (same files, same seed), or gather per-host "
            "batches first (jax.experimental.multihost_utils.process_allgather)."
        )
