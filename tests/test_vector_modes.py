"""The vector front doors under JAX's own modes.

check_jacobian, check_jvp, check_vjp, check_hvp and check_grads must work under
``jax.numpy_dtype_promotion("strict")``, ``jax.debug_nans(True)`` and
``jax.transfer_guard("disallow")``, with x64 on and off, on complex inputs (where a
real step times a complex direction is a float × complex product that strict
promotion refuses) and real ones; a point where f is legitimately not finite along a
step must not surface as a FloatingPointError from inside jgc.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc

Z = (np.array([0.3, -1.1, 0.7]) + 1j * np.array([0.5, 0.2, -0.4])).astype(np.complex64)
X = np.array([0.3, -1.1, 0.7], np.float32)

MODES = {
    "strict": lambda: jax.numpy_dtype_promotion("strict"),
    "debug_nans": lambda: jax.debug_nans(True),
    "transfer_guard": lambda: jax.transfer_guard("disallow"),
}
DOORS = {
    "check_jacobian": lambda: jgc.check_jacobian(jnp.sin, Z),
    "check_jvp": lambda: jgc.check_jvp(jnp.sin, Z),
    "check_vjp": lambda: jgc.check_vjp(lambda z: jnp.abs(z) ** 2, Z),
    "check_hvp": lambda: jgc.check_hvp(lambda p: jnp.sum(jnp.sin(p) ** 2), X),
    "check_grads": lambda: jgc.check_grads(jnp.sin, (Z,), 2),
}


@pytest.fixture(params=[False, True], ids=["x32", "x64"])
def x64(request):
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", request.param)
    yield request.param
    jax.config.update("jax_enable_x64", old)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("door", list(DOORS))
def test_front_door_under_mode(door, mode, x64):
    with MODES[mode]():
        rep = DOORS[door]()
    assert rep.ok


def test_non_finite_steps_are_not_floating_point_errors():
    # sqrt is NaN left of 0: the steps around x = 1e-9 cross it. Under debug_nans that
    # is a non-finite element of the report, not a FloatingPointError.
    x = np.array([1e-9, 0.5, 2.0])
    with jax.enable_x64(True), jax.debug_nans(True), contextlib.suppress(jgc.GradCheckError):
        rep = jgc.check_jvp(jnp.sqrt, x, num_directions=1)
        assert rep.counts()["ok"] > 0
