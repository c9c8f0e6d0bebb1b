import jax
import numpy as np
import pytest

if not hasattr(jax, "enable_x64"):
    # The tests scope x64 with jax.enable_x64 (JAX >= 0.8); on older JAX the same
    # context manager comes from jgc's compatibility layer, as jgc itself uses it.
    from jgc._src.compat import enable_x64

    jax.enable_x64 = enable_x64


@pytest.fixture(autouse=True)
def _no_global_x64_leak():
    """Every test starts and ends with JAX's default (x64 off): jgc must only scope it."""
    assert not jax.config.jax_enable_x64
    yield
    assert not jax.config.jax_enable_x64, "a global x64 flip was left behind"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The smoke subset (pytest -m smoke), which .ci/run also runs on the oldest supported
# JAX: these whole files, plus the tests marked smoke one by one elsewhere. Together
# they cover every stencil and mode of jgc.check, numerical_grad, Jacobian/JVP/VJP
# checks, check_taylor and JAX's modes, in about a minute on 2 cores.
SMOKE_FILES = {"test_api.py", "test_numerics.py", "test_modes.py", "test_jacobian.py"}
# Files that hold smoke tests marked one by one.
SMOKE_MARKED = {"test_jax_modes.py"}


def pytest_ignore_collect(collection_path, config):
    """Under ``-m smoke`` only the smoke files are imported.

    The oldest-JAX environment installs jgc's own dependencies only, so test files that
    import Flax, Equinox or Haiku at module level could not even be collected there.
    """
    if config.getoption("markexpr", "") != "smoke" or collection_path.is_dir():
        return None
    name = collection_path.name
    if name.startswith("test_") and name.endswith(".py"):
        return name not in SMOKE_FILES | SMOKE_MARKED
    return None


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SMOKE_FILES:
            item.add_marker(pytest.mark.smoke)
