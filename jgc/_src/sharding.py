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

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


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
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

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
