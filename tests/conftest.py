import jax
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _no_global_x64_leak():
    """Every test starts and ends with JAX's default (x64 off): jgc must only scope it."""
    assert not jax.config.jax_enable_x64
    yield
    assert not jax.config.jax_enable_x64, "a global x64 flip was left behind"


@pytest.fixture
def rng():
    return np.random.default_rng(0)
