"""JAX's API where it moved between versions, and jgc's conduct under JAX's modes.

Every other module takes these names from here, so that supporting one more JAX
version, or one more of JAX's modes, is a change in this file only. The oldest JAX
that jgc supports is the lower bound in ``pyproject.toml``; CI runs the smoke tests
(``pytest -m smoke``) on it.

JAX's modes, and what jgc does under each:

* ``jax.numpy_dtype_promotion("strict")``: jgc's own traced code casts explicitly
  (never two dtypes in one operation), and the user's ``fn`` runs under the user's mode.
* ``jax.debug_nans`` / ``jax.debug_infs``: a perturbed point may legitimately give a
  non-finite cost (``sqrt`` or ``log`` stepped past 0, ``exp`` stepped past overflow);
  the check reports it as non-finite. So jgc's evaluations of J, which include
  perturbed points, run under :func:`float_checks_off`. The analytic gradient at θ
  (``jax.grad`` of fn, or the user's ``grad`` callable) runs under the user's flags: a
  NaN there is the user's to see, as they asked.
* ``jax.transfer_guard("disallow")``: every transfer jgc makes is explicit
  (``jax.device_put`` to the device, :func:`host` back).
"""

from __future__ import annotations

import contextlib
import inspect

import jax
import ml_dtypes
import numpy as np
from jax._src import source_info_util  # private: pinned by tests/test_rules.py

try:  # jax >= 0.8
    _enable_x64 = jax.enable_x64
except AttributeError:  # older JAX: the experimental context managers
    from jax.experimental import disable_x64 as _disable_x64
    from jax.experimental import enable_x64 as _experimental_enable_x64

    def _enable_x64(flag: bool = True):
        return _experimental_enable_x64() if flag else _disable_x64()

try:
    from jax.dtypes import TypePromotionError
except ImportError:  # older JAX kept it private
    from jax._src.dtypes import TypePromotionError  # noqa: F401

try:
    from jax.extend.core import DropVar
except ImportError:  # older JAX: only in jax.core
    from jax.core import DropVar  # noqa: F401

Tracer = jax.core.Tracer


try:  # private: the Python-level tracing and compilation caches, nothing else
    from jax._src.util import clear_all_caches as _clear_staging_caches
except ImportError:  # pragma: no cover - a JAX without it: clear every cache instead
    _clear_staging_caches = jax.clear_caches

# The two tracing caches that JAX 0.10.2 keys without the x64 state (see enable_x64), where
# this JAX has them. Clearing only those keeps the caches that do key it: JAX's
# primitive callables and their compiled programs. Clearing every cache at each x64 flip
# recompiled every primitive met afterwards, op by op: a check_rules call of a float32
# loss flips x64 about ten times, and in tests/test_rules.py 30% of the compilations
# were programs compiled before in the same process. Checked on JAX 0.10
# (tests/test_jax_state.py, x64 off and on); any other JAX, older or newer, clears every
# cache, as before: which caches key the x64 state is private and may change.
try:  # private, as above
    from jax._src import pjit as _pjit
    from jax._src.interpreters import partial_eval as _pe

    _X64_BLIND = tuple(c for c in (getattr(_pjit, "_infer_params_cached", None), getattr(_pe, "trace_to_jaxpr", None))
                       if hasattr(c, "cache_clear"))
except ImportError:  # pragma: no cover - another layout: every cache is cleared
    _X64_BLIND = ()
if len(_X64_BLIND) != 2 or tuple(int(v) for v in jax.__version__.split(".")[:2]) != (0, 10):
    _X64_BLIND = ()


def _clear_x64_blind() -> None:
    """Clear JAX's tracing caches keyed without the x64 state (every staging cache where unknown)."""
    if not _X64_BLIND:
        _clear_staging_caches()
        return
    for cache in _X64_BLIND:
        cache.cache_clear()


@contextlib.contextmanager
def enable_x64(flag: bool = True):
    """A context manager that turns 64-bit types on (or off) inside it only, isolated.

    JAX keeps some tracing caches keyed without the x64 state (JAX 0.10.2:
    ``pjit._infer_params_cached`` and ``partial_eval.trace_to_jaxpr``). A function traced
    inside a scope that flips x64, for instance ``jnp.matmul`` with a NumPy float64
    constant under ``jax.jit``, leaves an entry that the same call outside the scope
    reuses with the other dtypes, and the user's next eager call raises
    ``RuntimeProgramInputMismatch`` (f32 expected, f64 buffer given); entries made before
    the scope are reused inside it the same way. So when the flag changes, those caches
    are cleared on the way in and on the way out: nothing traced on one side is seen
    on the other. The caches keyed with the x64 state (the C++ caches of compiled
    executables, JAX's primitive callables and their lowered and compiled programs)
    are kept, so neither the user's jitted functions nor the primitives run op by op
    are compiled again. A scope that changes nothing (x64 already as asked) clears
    nothing.
    """
    if bool(flag) == x64_enabled():
        yield
        return
    _clear_x64_blind()
    try:
        with _enable_x64(flag):
            yield
    finally:
        _clear_x64_blind()


def x64_enabled() -> bool:
    """True when 64-bit types are on here (inside a scope, or globally)."""
    return bool(jax.config.jax_enable_x64)


def finfo(dtype):
    """The machine limits of a floating or complex dtype (a complex one's real part).

    ``np.finfo`` knows bfloat16 and the float8 types only from NumPy 2 on (NumPy 1.26,
    which the oldest supported JAX runs with, raises); ``ml_dtypes.finfo`` knows them and
    NumPy's own floats on every version.
    """
    return ml_dtypes.finfo(np.dtype(dtype))


def strict_promotion() -> bool:
    """True under ``jax.numpy_dtype_promotion("strict")``."""
    return jax.config.jax_numpy_dtype_promotion == "strict"


def result_type(*dtypes) -> np.dtype:
    """The common dtype of jgc's own operands, whatever the user's promotion mode.

    ``jnp.result_type`` raises under strict promotion for two different dtypes; jgc
    promotes its own values explicitly, as NumPy does, within what x64 allows here.
    """
    return np.dtype(jax.dtypes.canonicalize_dtype(np.result_type(*dtypes)))


def float_checks_off():
    """Scope ``jax.debug_nans(False)`` and ``jax.debug_infs(False)`` (see the module doc).

    Entered around jgc's evaluations of J only; the flags are restored on exit.
    """
    stack = contextlib.ExitStack()
    stack.enter_context(jax.debug_nans(False))
    stack.enter_context(jax.debug_infs(False))
    return stack


def internal_checks_on() -> bool:
    """True under ``jax_enable_checks`` (JAX's assertions on its own internals)."""
    return bool(getattr(jax.config, "jax_enable_checks", False))


def internal_checks_off():
    """Scope ``jax_enable_checks`` off (JAX's debugging assertions on its own tracing).

    Under it JAX 0.10.2 asserts while *tracing* some ``custom_jvp`` functions with
    non-differentiable arguments (``jax.vjp`` of ``jax.scipy.special.log_ndtr`` under
    ``jax.jit`` or ``jax.eval_shape``), although the same function runs eagerly. Entered
    only to re-run a check that raised so, after JAX's eager evaluation worked.
    """
    try:
        from jax._src.config import enable_checks  # private: a context-manager state
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return enable_checks(False)


def float_checks_on() -> bool:
    """True under ``jax.debug_nans(True)`` or ``jax.debug_infs(True)``."""
    return bool(jax.config.jax_debug_nans or jax.config.jax_debug_infs)


def host(x) -> np.ndarray:
    """A device array (or NumPy array) as a NumPy array, by an explicit transfer."""
    return np.asarray(jax.device_get(x))


def as_complex(x):
    """A real floating array as complex, on the device (moved explicitly, through the host);
    anything else (complex, ints, keys, bfloat16) as it is. The complex step's operands."""
    if not np.issubdtype(np.dtype(x.dtype), np.floating):
        return x
    return jax.device_put(host(x).astype(result_type(x.dtype, np.complex64)))


def is_tracer(x) -> bool:
    return isinstance(x, Tracer)


def bind(eqn, *args):
    """Apply a jaxpr equation's primitive to ``args`` with the equation's params.

    ``get_bind_params`` returns the params (JAX ≥ 0.9.2), or ``(subfuns, params)``
    before, where call primitives carry their functions as subfuns.
    """
    got = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(got, tuple):
        subfuns, params = got
        return eqn.primitive.bind(*subfuns, *args, **params)
    return eqn.primitive.bind(*args, **got)


# source_info_util.user_frames takes an equation's traceback (newer JAX) or its
# whole SourceInfo (older JAX).
_FRAMES_OF_INFO = next(iter(inspect.signature(source_info_util.user_frames).parameters)) == "source_info"


def user_frames(source_info):
    """The user's frames (JAX's own filtered out) of an equation's ``source_info``, innermost first."""
    if source_info.traceback is None:
        return iter(())
    return source_info_util.user_frames(source_info if _FRAMES_OF_INFO else source_info.traceback)
