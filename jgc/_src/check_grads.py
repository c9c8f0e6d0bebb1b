"""``jgc.check_grads``: a drop-in for ``jax.test_util.check_grads``.

Same positional signature and meaning — check forward ("fwd", JVPs) and reverse
("rev", VJPs) derivatives of ``f`` at ``args`` up to ``order`` — so a test suite
switches with one import:

    from jgc import check_grads          # was: from jax.test_util import check_grads

What differs, on purpose:

* ``jax.custom_vjp`` functions have no JVP. JAX's default modes raise TypeError on
  them; here "fwd" is skipped for such a function (with a note) and its VJP is
  checked. Likewise "rev" is skipped where reverse mode is undefined (a
  ``while_loop`` with a dynamic trip count, an op without a transpose rule) and
  "fwd" is checked.
* Several random directions per input leaf (and cotangents per output leaf), not one.
* Tolerances are per element: atol + rtol·max(|a|, |n|) plus the error the finite
  difference can explain (measured noise, Richardson truncation estimate). They are
  never multiplied by the array size (JAX's are: 1% off on 10⁴ elements passes there).
  The added error bar only covers what the differences themselves cannot resolve, so
  it cannot hide a derivative that is wrong by more than the differences' own error.
* ``eps`` means what it means in JAX: x moves by eps·t along a direction t ~ N(0, 1).
  None (default) picks a step per element from the dtype, the element's scale and
  the measured noise, rather than a fixed 1e-4.
* Outputs that are not finite at the given point (``asin`` outside [-1, 1]) and
  non-finite primals are compared as JAX compares them: NaN against NaN agrees
  (reported as non-finite, failing only with ``strict``); a NaN derivative where f
  is finite around x is a mismatch.
* A derivative rule whose primal output differs from f(x) (JAX's ``eigh`` with
  ``symmetrize_input=False`` symmetrizes inside its JVP rule) is a mismatch of the
  "primal output" block, as JAX's "JVP primal" check reports it; f itself is traced
  twice to tell that apart from randomness inside f, which is refused.
* A derivative that JAX cannot compute at the point — its JVP or VJP raises there,
  also without jit or vmap (a ``custom_vjp`` backward rule that returns the wrong
  structure, a JVP rule whose tangent has the wrong shape, a primitive whose
  transpose rule raises) — is a failure of that check, not an error: its values are
  taken as NaN and a note quotes JAX's error. JAX's checker raises that error instead.
  Where JAX declares a rule missing ("not implemented", "not supported"), a missing
  VJP is a fallback to "fwd" as above, and a missing JVP is raised. So are errors of
  tracing f itself (a tracer turned into a NumPy array) and errors that only batching
  (``jax.vmap``) or compiling causes; the error's note says which.
* A mismatch raises :class:`jgc.GradCheckError` (an ``AssertionError``) whose message
  names the check (e.g. "VJP of JVP"), the output and input leaves, the direction
  and cotangent, both values, and holds the full report; success returns the report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import compat, validate
from .errors import GradCheckError
from .messages import failure_message, where
from .names import short_name
from .products import Plan, run
from .report import Report
from .sampling import rng_from_key
from .vector import as_array_primal
from .vector_analytic import NoForwardRule

MODE_NAMES = ("fwd", "rev", "lin")


def _resolve_tol(tol, args, name):
    """A number, None, or JAX's {dtype: tol} dict resolved to the loosest entry that applies."""
    if tol is None:
        return None
    if isinstance(tol, dict):
        dts = {np.dtype(x.dtype) for x in jax.tree_util.tree_leaves(args)
               if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)}
        vals = [float(v) for k, v in tol.items() if np.dtype(k) in dts]
        return max(vals) if vals else None
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)):
        raise TypeError(f"jgc.check_grads: {name} must be a number, a {{dtype: number}} dict or None, got {tol!r}.")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"jgc.check_grads: {name} must be non-negative and finite, got {tol!r}.")
    return float(tol)


def _random_like(rng, x):
    if isinstance(x, (np.ndarray, np.generic, jax.Array)) and jnp.issubdtype(x.dtype, jnp.inexact):
        z = rng.standard_normal(x.shape)
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            z = z + 1j * rng.standard_normal(x.shape)
        return np.asarray(z, x.dtype)
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        return np.zeros(x.shape, jax.dtypes.float0)
    return x


def _cast_cotangent(c, o):
    """The fixed random cotangent c in the dtype of the output o (x64 may be scoped on)."""
    if hasattr(o, "dtype") and jnp.issubdtype(o.dtype, jnp.inexact):
        return jnp.asarray(c).astype(o.dtype)
    return np.zeros(np.shape(o), jax.dtypes.float0)


def _jvp_function(f, n, lin=False):
    """g(*primals, *tangents) = (f(primals), J·tangents): the function whose derivatives are order+1."""
    def g(*a):
        prim, tang = a[:n], a[n:]
        if lin:
            out, f_lin = jax.linearize(f, *prim)
            return out, f_lin(*tang)
        return jax.jvp(f, prim, tang)
    g.__qualname__ = f"jvp({short_name(f)})"
    return g


def _vjp_function(f, ct_tree):
    """h(*primals) = Jᵀ·ct for a fixed cotangent ct (JAX's check_grads uses the output itself)."""
    def h(*a):
        out, fn = jax.vjp(f, *a)
        ct = jax.tree_util.tree_map(_cast_cotangent, ct_tree, out)
        return fn(ct)
    h.__qualname__ = f"vjp({short_name(f)})"
    return h


def check_grads(f: Callable, args, order: int, modes=("fwd", "rev"), atol=None, rtol=None, eps=None, *,
                # 2 directions per leaf (JAX checks 1): a second draw guards against an
                # unlucky near-cancellation at half the cost of jgc.check_jvp's default 4.
                # On small functions it costs no measurable time (the same programs, a few
                # more rows of the same batch: 12 ops checked alternately with 1 and 2 took
                # 8.9 and 8.1 s); on 200 of JAX's harnesses and the planted wrong rules of
                # benchmarks/bench_rules.py (10 keys each) no verdict changed with 1.
                key=None, num_directions: int = 2, precision: str = "auto", strict: bool = False,
                err_msg: str = "") -> Report:
    """Check JVPs and VJPs of ``f`` up to ``order`` against finite differences, like JAX's.

    A drop-in for ``jax.test_util.check_grads(f, args, order, modes, atol, rtol, eps)``:
    for each mode and each order k ≤ ``order``, the derivative of order k is checked
    along random directions (recursively, as JAX does: "JVP of JVP", "VJP of JVP", …).
    "fwd" checks J·t against central differences (:func:`jgc.check_jvp`); "rev" checks
    ⟨u, J t⟩ = ⟨Jᵀu, t⟩ against central differences and, where f has a JVP, the exact
    transpose identity (:func:`jgc.check_vjp`); "lin" checks ``jax.linearize``.

    Element i agrees when |a_i − n_i| ≤ atol + rtol·max(|a_i|, |n_i|) + (error the finite
    difference can explain); atol and rtol are not scaled by the array size.

    Args:
      f: the function, ``f(*args)`` returning any pytree of arrays.
      args: tuple (or list) of arguments; every floating/complex array argument is
        checked (Python floats too); integer and boolean arguments are carried (their
        tangents are float0 zeros, as JAX wants).
      order: highest order of derivatives to check (1, 2, …).
      modes: any of "fwd", "rev", "lin". For a ``jax.custom_vjp`` function "fwd" is
        replaced by "rev"; where reverse mode is undefined, "rev" by "fwd".
      atol, rtol: a number or a ``{dtype: number}`` dict as in JAX (the loosest entry
        for the dtypes of the checked arguments applies; dtypes not in the dict use
        jgc's defaults); None for jgc's per-dtype defaults (float64 1e-7, float32 1e-4
        relative). Applied per element, not multiplied by the array size.
      eps: finite-difference step as in JAX: x ± eps·t for t ~ N(0, 1) (absolute, the
        same for every element); None picks a step per element from the dtype, the
        element's scale and the measured noise.
      key: ``jax.random.key`` or int seed for directions and cotangents (default 0).
      num_directions: random directions per input leaf (and cotangents per output leaf).
      precision: "auto" (float32 checked in float64 where available), "float64", "native".
      strict: also fail on inconclusive and non-finite elements.
      err_msg: extra text for the failure message (as in JAX's check_jvp/check_vjp).

    Returns:
      A :class:`jgc.Report` of every check made (labels say which), when all agree.

    Raises:
      jgc.GradCheckError: (an AssertionError) when a derivative disagrees; ``.report``
        holds the report, the message names where.
      TypeError, ValueError: for bad arguments.

    Example:
      >>> import jax, jax.numpy as jnp, jgc
      >>> @jax.custom_vjp
      ... def f(x):
      ...     return jnp.sin(x)
      >>> f.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, g: (c * g,))
      >>> jgc.check_grads(f, (jnp.array([0.3, 1.2]),), order=1).ok  # JAX's raises TypeError
      True
    """
    api = "jgc.check_grads"
    validate.function(api, "f", f, "callable as f(*args)")
    if isinstance(args, (str, bytes, dict)) or not hasattr(args, "__iter__"):
        raise TypeError(f"{api}: args must be a tuple of arguments, e.g. (x,) for f(x); got {type(args).__name__}.")
    args = tuple(as_array_primal(a) for a in args)
    if not (isinstance(order, (int, np.integer)) and not isinstance(order, bool) and order >= 1):
        raise ValueError(f"{api}: order must be a positive int (1: first derivatives), got {order!r}.")
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    bad = [m for m in modes if m not in MODE_NAMES]
    if bad or not modes:
        raise ValueError(f"{api}: modes must be a non-empty tuple of {MODE_NAMES}, got {modes!r}.")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating))
                            or not (eps > 0 and math.isfinite(eps))):
        raise ValueError(f"{api}: eps must be a positive step (as in JAX: x moves by eps·t for a "
                         f"direction t ~ N(0, 1)) or None, got {eps!r}.")
    # Every check of every order shares these settings; each level says what it compares.
    # allow_nonfinite: outputs NaN at x compare as JAX compares them; absolute_step: eps
    # moves x by eps·t for an unscaled t, as in JAX.
    # The options, parsed as JAX's check_grads reads them (tolerances per dtype, an
    # absolute eps); the analytic side at the reference precision, as JAX compares.
    opts = validate.Options(api, precision=precision, rtol=_resolve_tol(rtol, args, "rtol"),
                            atol=_resolve_tol(atol, args, "atol"), step=None if eps is None else float(eps),
                            strict=strict, analytic="reference")
    base = Plan(api=api, options=opts, directions=num_directions,
                problem={"allow_nonfinite": True, "absolute_step": eps is not None})
    rng = rng_from_key(key, api)
    parts, notes = [], []
    _check_level(f, args, int(order), modes, prefix="", rng=rng, base=base, found=(parts, notes))
    rep = _merge(parts, notes, order, modes)
    if not rep.ok:
        head = f"jgc.check_grads: derivatives disagree{where(rep, _position)}."
        # A derivative JAX could not compute: its error (and traceback) is the cause.
        cause = rep.rule_errors[0] if rep.rule_errors else None
        hint = HINT if cause is None else BROKEN_HINT
        raise GradCheckError(failure_message(head, rep, custom_message=err_msg or None, hint=hint), rep) from cause
    return rep


def _check_level(f, args, order, modes, *, prefix, rng, base, found):
    """Check derivatives of ``f`` of this order, then recurse on its JVP and VJP functions."""
    parts, notes = found
    k_fwd, k_lin = (int(s) for s in rng.integers(2**31, size=2))
    of = f" of {prefix}" if prefix else ""
    want_fwd, want_rev = "fwd" in modes, "rev" in modes
    did_fwd = did_rev = False
    if want_fwd or want_rev or "lin" not in modes:
        # One preparation and one finite-difference pass serve the JVP and the VJP. When
        # the JVP is compared with finite differences already, the transpose identity
        # adds nothing the numerical VJP check does not: skip its compile.
        plan = dataclasses.replace(base, jvp=want_fwd, vjp=want_rev, against="numerical" if want_fwd else "auto",
                                   fallback=True, broken_as_nan=True, key=k_fwd, cotangents=base.directions,
                                   labels=(f"JVP{of}: ", f"VJP{of}: "))
        rep, did_fwd, did_rev = _run_traced(f, args, plan, notes)
        parts.append(rep)
    if "lin" in modes:
        def lin(p, t):
            out, f_lin = jax.linearize(f, *p)
            return out, f_lin(*t)

        try:
            plan = dataclasses.replace(base, jvp=True, user_jvp=lin, key=k_lin, labels=(f"LIN{of}: ", ""))
            parts.append(run(f, args, plan)[0])
            did_fwd = True
        except NoForwardRule:
            notes.append(f"{short_name(f)} is a custom_vjp function (no JVP): mode 'lin' was skipped.")
    if order <= 1:
        return
    if did_fwd:
        tangents = tuple(_random_like(rng, a) for a in args)
        g = _jvp_function(f, len(args), lin="fwd" not in modes)
        _check_level(g, args + tangents, order - 1, modes, prefix=f"JVP{of}", rng=rng, base=base, found=found)
    if did_rev:
        out = jax.eval_shape(f, *args)
        leaves, treedef = jax.tree_util.tree_flatten(out)
        ct = jax.tree_util.tree_unflatten(treedef, [_random_like(rng, np.zeros(o.shape, o.dtype))
                                                    for o in leaves])
        _check_level(_vjp_function(f, ct), args, order - 1, modes, prefix=f"VJP{of}", rng=rng, base=base,
                     found=found)


def _run_traced(f, args, plan, notes):
    """``run(f, args, plan)``; under ``jax_enable_checks``, once more with it off where
    JAX's assertions stopped the traced check and f runs eagerly at the point.

    JAX's checker evaluates op by op, where those assertions do not fire; jgc traces
    (``jax.eval_shape``, ``jax.jit``, ``jax.vmap``), where JAX 0.10.2 asserts on some
    ``custom_jvp`` functions (``jax.vjp`` of ``log_ndtr``). The retry changes no
    value: it only skips JAX's self-checks while tracing, and a note says so.
    """
    try:
        return run(f, args, plan)
    except GradCheckError:
        raise
    except Exception as e:
        if not compat.internal_checks_on() or not _runs_eagerly(f, args):
            raise
        with compat.internal_checks_off():
            out = run(f, args, plan)
        notes.append(f"{short_name(f)} was traced with JAX's internal checks (jax_enable_checks) off: "
                     f"with them, tracing it raised {type(e).__name__}, while it runs eagerly at the point.")
        return out


def _runs_eagerly(f, args) -> bool:
    """f and its VJP run op by op at the point (no jit, no vmap) under the current flags."""
    try:
        out, pull = jax.vjp(f, *args)
        pull(jax.tree_util.tree_map(jnp.ones_like, out))
    except Exception:  # noqa: BLE001 - a function that fails eagerly too keeps its error
        return False
    return True


def _merge(parts, notes, order, modes) -> Report:
    leaves = tuple(lf for r in parts for lf in r.leaves)
    first = parts[0]
    seen, skipped = set(), []
    for r in parts:
        for s in r.skipped:
            if s not in seen:
                seen.add(s)
                skipped.append(s)
    # check_vjp's own custom_vjp note repeats what the mode note already says.
    allnotes = list(dict.fromkeys(list(notes) + [n for r in parts for n in r.notes]))
    return dataclasses.replace(
        first, ok=all(r.ok for r in parts), leaves=leaves, skipped=tuple(skipped),
        normwise=max(r.normwise for r in parts), evaluations=sum(r.evaluations for r in parts),
        seconds=sum(r.seconds for r in parts), compile_seconds=sum(r.compile_seconds for r in parts),
        programs=sum(r.programs for r in parts), step=float(np.median([r.step for r in parts])),
        noise=max(r.noise for r in parts), mode=f"check_grads(order={order}, modes={','.join(modes)})",
        notes=tuple(allnotes), api="jgc.check_grads", rule_errors=tuple(e for r in parts for e in r.rule_errors),
    )


def _position(lf) -> str:
    """Where a block of check_grads fails: the check, the block, and the cotangent or direction."""
    check, _, block = lf.name.partition(": ")
    if lf.shape and len(lf.shape) == 2 and lf.label.count("⟨"):
        pos = f"cotangent {lf.output_index[0]}, direction {lf.input_index[0]}"
    else:
        pos = (f"element {list(lf.output_index)} of {lf.output_path}, direction "
               f"{lf.input_index[0] if lf.input_index else 0}")
    return f" in {check} — {block} ({pos})"


# Where to look next when check_grads fails: it checks random directions, not elements.
HINT = (" To find the wrong element, run jgc.check_jacobian on the same function "
        "(every entry is checked and located).")
# ... or, when JAX could not compute a derivative at all, its error.
BROKEN_HINT = (" JAX's own derivative raised at the point (see the notes); its error, with "
               "the traceback into the rule, is this failure's cause.")
