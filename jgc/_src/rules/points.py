"""Points made from the one given, where a rule's bugs often hide: signs, tails, 0 and ±1.

:func:`jgc.check_rule` with ``explore=True`` runs every check again at each of these
points: every differentiated argument with its signs flipped, scaled by 10⁻² and 10²
(towards the origin and into the tails), and set to the special values 0, 1 and −1.
A point is kept only where the primal is finite there (a logarithm is not checked at
−x), and each is reported by its label.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .. import compat
from .subject import _Subject

# Scalings of the given point: a sign flip (an activation's other branch: elu for
# negative inputs when the caller fed positives), two orders of magnitude each way
# (near zero, where a formula may divide by a small number, and the tails, where
# an unstable formula overflows or cancels), then the special points.
SCALINGS = ((-1.0, "−x"), (1e-2, "10⁻²·x"), (1e2, "10²·x"))
SPECIAL = ((0.0, "0"), (1.0, "1"), (-1.0, "−1"))


def points(subject: _Subject, rng) -> list:
    """(label, leaves) of every generated point where the primal is finite, duplicates left out."""
    del rng  # the points are deterministic; the checks at them draw from the seed
    cands = [(f"x → {lab}", [(c * v).astype(v.dtype) for v in subject.x]) for c, lab in SCALINGS]
    cands += [(f"x = {lab}", [jnp.full_like(v, c) for v in subject.x]) for c, lab in SPECIAL]
    seen = [_key(subject.x)]
    out = []
    for label, x in cands:
        k = _key(x)
        if any(k == s for s in seen):
            continue
        seen.append(k)
        try:
            y = subject.value(x)
        except Exception:  # noqa: BLE001 (outside the primal's domain: not a point to check)
            continue
        if all(bool(np.all(np.isfinite(compat.host(o)))) for o in y):
            out.append((f"point {label}", x))
    return out


def _key(x: list) -> tuple:
    return tuple(np.asarray(compat.host(v)).tobytes() for v in x)
