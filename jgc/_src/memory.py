"""How much memory a batch of perturbed copies may take on this machine.

Every batch of the engine (a vmapped set of perturbed parameter vectors) is sized from a
budget in elements: a fixed cap (the engine's ``BATCH_ELEMENT_BUDGET``), or less when
``MEMORY_FRACTION`` of the memory available now is smaller. Available memory is the
accelerator's free memory where it reports ``memory_stats()``, else the host's
available RAM (psutil, or ``os.sysconf`` without it).
"""

from __future__ import annotations

import os

import jax

# At most this fraction of the memory available when a batch is sized. The rest is left
# to the model's own activations, the check's per-element arrays (parameters at
# evaluation precision, gradient, scales: a few copies of n) and everything else
# running on the machine.
MEMORY_FRACTION = 0.125


def available_bytes(device=None) -> int | None:
    """Bytes of memory free for new arrays on ``device`` (default the first), or None."""
    device = jax.devices()[0] if device is None else device
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001 - a backend without memory statistics
            stats = {}
        if "bytes_limit" in stats:
            return max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported here
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def budget_elements(cap: int) -> int:
    """Elements of perturbed copies (8 bytes each) one batch may hold: ``cap``, or less
    when ``MEMORY_FRACTION`` of the available memory is smaller."""
    free = available_bytes()
    if free is None:
        return int(cap)
    return int(max(1, min(cap, MEMORY_FRACTION * free // 8)))
