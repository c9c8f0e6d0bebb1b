"""Host callbacks inside a rule's primal, evaluated one call at a time under ``vmap``.

A check evaluates a rule at many perturbed points in one ``vmap``. A
``jax.pure_callback`` made without a ``vmap_method`` (Equinox's runtime errors,
``eqx.error_if``, are one) has no batching rule, and the whole check would stop. While
:func:`sequential_callbacks` is active such a callback is batched as
``vmap_method="sequential"``: the host function runs once per point, as it would in a
Python loop. Callbacks that name their own ``vmap_method`` keep it.
"""

from __future__ import annotations

import contextlib
import threading

# private: the batching table JAX keeps per primitive (pinned by tests/test_rules.py)
from jax._src import callback as jax_callback
from jax._src.interpreters import batching

_LOCK = threading.Lock()


@contextlib.contextmanager
def sequential_callbacks():
    """Batch ``pure_callback`` calls that chose no ``vmap_method`` as "sequential" while active."""
    prim = jax_callback.pure_callback_p
    table = batching.fancy_primitive_batchers
    with _LOCK:
        original = table.get(prim)
        if original is None:  # this JAX batches callbacks differently: leave it alone
            yield
            return

        def batch(axis_data, vals, dims, **params):
            if params.get("vmap_method") is None:
                params = {**params, "vmap_method": "sequential"}
            return original(axis_data, vals, dims, **params)

        table[prim] = batch
        try:
            yield
        finally:
            table[prim] = original
