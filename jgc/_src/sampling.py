"""Which elements a sampled check judges, and the seeds that make it reproducible.

A sample takes each leaf's largest-|g| elements (where a wrong factor is largest in
absolute terms) plus a stratified sample over the flat index (every region of the
leaf represented). Keys, ints or JAX PRNG keys, are read in one place for every
front door that draws at random.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import compat, validate

# Elements per leaf in sampled mode: 64 coordinates (128 evaluations) per leaf catch
# a wrong formula (which touches many elements) with certainty and a single wrong
# element with probability 64/m, at a cost independent of the model's size.
DEFAULT_SAMPLES = 64
# A quarter of each leaf's samples go to its largest |g| elements, where a wrong factor
# is largest in absolute terms; the rest are stratified over the flat index so that
# every region of the leaf (rows, columns, channels) is represented.
TOP_FRACTION = 0.25
# Small leaves (biases, scales) get at least this many samples when a budget is split.
MIN_PER_LEAF = 4

def key_entropy(key, api: str) -> int | list:
    """The entropy of a key: an int for an int (None: 0), the words of a JAX PRNG key's data."""
    if key is None:
        return 0
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    try:
        arr = key if isinstance(key, jax.Array) else np.asarray(key)  # no implicit transfer
        if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
            arr = jax.random.key_data(arr)
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise TypeError
        return compat.host(arr).astype(np.uint64).ravel().tolist()
    except (TypeError, ValueError) as e:
        raise TypeError(f"{api}: key must be an int or a JAX PRNG key (jax.random.key), got "
                        f"{type(key).__name__}.") from e


def seed_from_key(key, api: str = "jgc.check") -> int:
    """A 32-bit seed from a key (an int is taken modulo 2³²)."""
    e = key_entropy(key, api)
    if isinstance(e, int):
        return e & 0xFFFFFFFF
    return int(np.random.SeedSequence(e).generate_state(1)[0])


def rng_from_key(key, api: str) -> np.random.Generator:
    """A NumPy generator seeded by a key (None: seed 0, reproducible).

    Directions are drawn on the host with NumPy: jax.random would compile a kernel for
    every new shape, which dominates the cost of checking many small functions.
    """
    return np.random.default_rng(key_entropy(key, api))


def samples_per_leaf(sizes, samples=None, total=None) -> list[int]:
    """How many elements to check in each leaf.

    ``samples`` an int: that many per leaf (all of a smaller leaf); a float in (0, 1]:
    that fraction of each leaf (at least one element). ``total``: split a total over
    leaves in proportion to their size, with at least ``MIN_PER_LEAF`` each.
    """
    if samples is not None:
        if isinstance(samples, float):
            if not 0 < samples <= 1:
                raise ValueError(f"jgc.check: samples as a fraction must be in (0, 1], got {samples!r}.")
            return [min(m, max(1, math.ceil(samples * m))) for m in sizes]
        samples = validate.count("jgc.check", "samples", samples)
        return [min(m, samples) for m in sizes]
    if total is None:
        return [min(m, DEFAULT_SAMPLES) for m in sizes]
    n = max(1, sum(sizes))
    base = [min(m, MIN_PER_LEAF) for m in sizes]
    left = max(0, total - sum(base))
    return [min(m, b + int(left * m / n)) for m, b in zip(sizes, base)]


def sample_elements(a_flat: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``count`` sorted element indices: the largest |a| first, the rest stratified."""
    m = a_flat.size
    if count >= m:
        return np.arange(m)
    if count <= 0:
        return np.zeros(0, np.int64)
    mag = np.abs(np.asarray(a_flat))
    mag = np.where(np.isfinite(mag), mag, np.inf)  # a NaN/Inf analytic value is checked first
    top = max(1, int(count * TOP_FRACTION))
    chosen = np.argpartition(-mag, top - 1)[:top]
    rest = count - top
    if rest:
        edges = np.linspace(0, m, rest + 1).astype(np.int64)
        width = np.maximum(edges[1:] - edges[:-1], 1)
        strat = np.minimum(edges[:-1] + (rng.random(rest) * width).astype(np.int64), m - 1)
        chosen = np.union1d(chosen, strat)
        if chosen.size < count:  # collisions with the top elements: fill at random
            pool = np.setdiff1d(np.arange(m), chosen)
            chosen = np.union1d(chosen, rng.choice(pool, count - chosen.size, replace=False))
    return np.sort(chosen).astype(np.int64)
