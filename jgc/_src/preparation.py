"""Preparation shared by every check: one frozen record of the inputs at evaluation precision.

:func:`prepare` makes the :class:`Preparation` of every check, scalar or vector: the
split of the checked tree into perturbed leaves and the rest, those leaves as given and
at their evaluation precision (float64 where available, never below float32), the data
widened with them, the unit round-off u, the scale s_i that sizes the step of every
element, and notes saying what changed. At the dtypes given (``widen=False,
as_given=True``) it is also the record of the analytic side as the program runs it
(``analytic.native_gradient``: the split, the data, the scales its rounding is sampled
at) and ``check_hvp``'s split of params. The one problem class that holds that record
through a check, :class:`jgc._src.vector.Prepared`, builds on it. :func:`retried` is
the one place where a check falls back to the dtypes given when fn refuses wider
inputs: every problem and ``check_rules`` (whose capture splits its inputs itself) go
through it.

It also reads the form of fn's result: a cost alone, or a pair (output, aux) with
``has_aux``. Both kinds of check trace fn and take from its result the part that is
differentiated; a result of the wrong form for its ``has_aux`` setting raises
:class:`OutputFormError` with a message saying which form was expected.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import compat, policy, trees
from . import validate as valid
from .names import short_name

PRECISIONS = valid.PRECISIONS


# -- the form of fn's result ------------------------------------------------------------
class OutputFormError(TypeError):
    """fn's result has the wrong form for its ``has_aux`` setting (found while tracing)."""


def is_cost_and_aux(out) -> bool:
    """True for a pair (scalar, anything): what a has_aux loss returns."""
    return (isinstance(out, (tuple, list)) and len(out) == 2
            and (isinstance(out[0], (int, float)) or getattr(out[0], "shape", None) == ()))


def describe_output(out) -> str:
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} elements"
    shape = getattr(out, "shape", None)
    return f"an array of shape {tuple(shape)}" if shape is not None else f"a {type(out).__name__}"


def drop_aux(out, has_aux: bool, *, api: str, fn, arg: str = "fn", first: str = "cost"):
    """Return the part of ``fn``'s result that is differentiated: all of it, or ``out[0]``.

    With ``has_aux`` (as in ``jax.grad``) ``fn`` returns a pair ``(output, aux)``, a tuple
    or a list. aux may hold anything (arrays, ints, PRNG keys, strings) and is dropped
    here, inside the traced function, so it is never perturbed, compared, converted or
    returned from a transformation.

    Raises:
      OutputFormError: a ``TypeError``, when ``has_aux`` is set and ``out`` is not a pair.
    """
    if not has_aux:
        return out
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0]
    raise OutputFormError(
        f"{api}: has_aux=True expects {arg} to return a pair ({first}, aux), as "
        f"jax.grad(..., has_aux=True) does, but {short_name(fn)} returned {describe_output(out)}. "
        f"Return ({first}, aux), or pass has_aux=False."
    )


def cost_of(out, has_aux: bool, *, api: str, fn):
    """The cost J in a scalar cost's result; a (cost, aux) pair without ``has_aux`` is refused.

    Raises:
      OutputFormError: ``out`` is a (scalar, aux) pair and ``has_aux`` is not set, or
        ``has_aux`` is set and ``out`` is not a pair.
    """
    if not has_aux and is_cost_and_aux(out):
        raise OutputFormError(
            f"{api}: fn must return a scalar cost J, but {short_name(fn)} returned "
            f"{describe_output(out)}, the first a scalar: a (cost, aux) pair. Pass "
            "has_aux=True to check the cost and ignore aux, as jax.grad(fn, has_aux=True) "
            "does, or return the cost alone."
        )
    return drop_aux(out, has_aux, api=api, fn=fn)


# -- options, precision and scales --------------------------------------------------------
def validate(api: str, fn, *, signature: str, has_aux, precision, leaves, traced_hint: str) -> None:
    """Refuse options every check refuses: a non-callable fn, a non-bool has_aux, an
    unknown precision, and traced values among ``leaves``.

    ``signature`` is how fn is called (``"fn(params, *args) -> scalar"``); its name is
    the option named in the message. ``traced_hint`` follows the traced-values message.
    """
    valid.function(api, signature.split("(", 1)[0], fn, f"callable as {signature}")
    if not isinstance(has_aux, bool):
        raise TypeError(f"{api}: has_aux must be True or False, got {has_aux!r}.")
    valid.precision(api, precision)
    valid.concrete(api, leaves, traced_hint)


def validate_chunk_size(api: str, chunk_size) -> None:
    """chunk_size: a positive int, or None (chosen from a memory budget)."""
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"{api}: chunk_size must be a positive int or None, got {chunk_size!r}.")


def precision_scope(precision: str, orig_dtypes, notes: list):
    """Decide whether to evaluate in float64 and return (widen, x64 context manager).

    "auto" widens wherever the backend has float64 (not on TPU, where a note says so);
    the scope enables x64 only inside the check, so no global flag is left behind.
    """
    if precision == "auto":
        widen = jax.default_backend() != "tpu"
        if not widen and any(policy.unit_roundoff(d) > 1e-12 for d in orig_dtypes):
            notes.append("float64 is not available on TPU: checked in native precision with "
                         "tolerances and steps for that precision.")
    else:
        widen = precision == "float64"
    needs_x64 = widen or any(d in (np.float64, np.complex128) for d in orig_dtypes)
    return widen, (compat.enable_x64(True) if needs_x64 else contextlib.nullcontext())


class Scoped:
    """A context manager that enters ``self._scope`` (x64 or not), then ``_prepare()``.

    Subclasses set ``_scope`` (see :func:`precision_scope`) and define ``_prepare``;
    the scope is left again if preparation fails, so no flag is ever left behind.
    """

    def __enter__(self):
        self._scope.__enter__()
        try:
            self._prepare()
        except BaseException:
            self._scope.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        return self._scope.__exit__(*exc)


def _narrow(dtype) -> bool:
    """True for bfloat16/float16 (and narrower): too coarse for finite differences."""
    return policy.unit_roundoff(dtype) > 1e-6


def evaluation_leaves(dyn: list, widen: bool, as_given: bool = False) -> tuple[list, bool]:
    """The perturbed leaves at evaluation precision, and whether narrow ones were raised.

    With ``widen`` every leaf becomes float64 (complex128); otherwise bfloat16/float16
    leaves become float32, unless ``as_given`` (fn accepts no other dtype). Casts run
    on the host (NumPy), not as one compiled XLA program per shape, and are exact.
    """
    if widen:
        return [jax.device_put(compat.host(x).astype(trees.wide_dtype(x.dtype))) for x in dyn], False
    if as_given or not any(_narrow(x.dtype) for x in dyn):
        return dyn, False
    # bfloat16 carries 8 bits: steps near θ round to 0 or to a coarse multiple of θ, so
    # a numerical derivative in bfloat16 is mostly 0 or garbage. The reference is
    # therefore always evaluated in float32 at least.
    return [jax.device_put(compat.host(x).astype(np.float32)) if _narrow(x.dtype) else x for x in dyn], True


def precision_label(eval_dtypes) -> str:
    """The report's precision: "float64", or "native (float32, ...)"."""
    if all(policy.unit_roundoff(d) < 1e-12 for d in eval_dtypes):
        return "float64"
    return "native (" + ", ".join(sorted({np.dtype(d).name for d in eval_dtypes})) + ")"


def unit_roundoff(dtypes) -> float:
    """u of the coarsest of ``dtypes``: the round-off every evaluation carries."""
    return max(policy.unit_roundoff(d) for d in dtypes)


def step_scales(dyn: list, *, absolute: bool = False) -> tuple[float, list[np.ndarray]]:
    """(global scale, per-leaf scales s_i): the RMS of every element, and per element
    max(|θ_i|, rms(leaf)) (see policy.coordinate_scale); ``absolute``: every s_i is 1.

    Non-finite elements (inf or NaN inputs, allowed by jgc.check_grads) count as 0: their
    scale stays finite, so the point itself (t = 0 on every line) is evaluated as given.
    """
    # One array per leaf, made the leaf's scales in place: no concatenated or squared
    # copies of a research-size model.
    mags = []
    for x in dyn:
        m = np.abs(compat.host(x)).ravel()  # a new array
        m[~np.isfinite(m)] = 0.0
        mags.append(m)
    n = sum(m.size for m in mags)
    rms = math.sqrt(sum(policy.sum_of_squares(m) for m in mags) / n) if n else 0.0
    global_scale = rms if rms > 0 and math.isfinite(rms) else 1.0
    scales = [np.ones(m.size) if absolute else policy.coordinate_scale(m, global_scale, overwrite=True)
              for m in mags]
    return global_scale, scales


class ChangedByWidening(TypeError):
    """fn's result at evaluation precision differs in form from its result at the dtypes
    given (``lax.bitcast_convert_type`` of a float64 splits every element in two)."""


def refused_widening(e: Exception, *, widened: bool, orig_dtypes, asked: str, fn: str) -> str | None:
    """Why ``fn``'s error ``e`` at evaluation precision calls for a check at the dtypes
    given (the start of a note), or None when ``e`` is to be raised.

    Code that fixes its own dtypes (a float32 constant under strict promotion, a float16
    init value of ``lax.reduce_window``) cannot take float64 (or float32 for 16-bit)
    inputs: its first trace raises a TypeError. Unless float64 was asked for
    explicitly, the check is then made at the dtypes given. The form of fn's result
    (OutputFormError) is the same at every precision: raised.
    """
    if isinstance(e, OutputFormError) or not isinstance(e, (TypeError, compat.TypePromotionError)):
        return None
    changed = widened or any(_narrow(d) for d in orig_dtypes)
    if asked == "float64" or not changed:
        return None
    first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:120]
    wider = "float64" if widened else "float32"
    if isinstance(e, compat.TypePromotionError):
        return f"{fn} did not accept float64 inputs under strict dtype promotion"
    if isinstance(e, ChangedByWidening):
        return f"{fn} computes something else at {wider}: {e}"
    return f"{fn} refused its inputs at {wider} ({type(e).__name__}: {first})"


def as_given_note(refused: str, orig_dtypes) -> str:
    """The note of a check made at the dtypes given (see :func:`refused_widening`)."""
    given = ", ".join(sorted({np.dtype(d).name for d in orig_dtypes}))
    return f"{refused}: checked at the dtypes given ({given}), with steps and tolerances for that precision."


def retried(attempt: Callable, *, precision: str, orig_dtypes, notes: list, fn: str = "fn"):
    """``attempt(widen, scope, as_given)`` at evaluation precision; if fn refuses its inputs
    there, once more at the dtypes given. The one place a check falls back to them.

    Code that fixes its own dtypes (a float32 constant under strict promotion, a
    float16 init value of ``lax.reduce_window``) cannot take float64 (or float32 for
    16-bit) inputs: the first trace raises a TypeError. Unless float64 was asked for
    explicitly, ``attempt`` then runs again at the dtypes given (``widen`` False, the
    scope of :func:`precision_scope` for "native"), with steps and tolerances for that
    precision, and a note in ``notes`` says so; the notes the first attempt added are
    dropped. An error at the dtypes given is fn's own and is raised. Every prepared
    check (``vector.Prepared``) and ``check_rules`` run through it.
    """
    widen, scope = precision_scope(precision, orig_dtypes, notes)
    kept = len(notes)
    try:
        return attempt(widen, scope, False)
    except (TypeError, compat.TypePromotionError) as e:
        refused = refused_widening(e, widened=widen, orig_dtypes=orig_dtypes, asked=precision, fn=fn)
        if refused is None:
            raise
    del notes[kept:]
    widen, scope = precision_scope("native", orig_dtypes, notes)
    notes.append(as_given_note(refused, orig_dtypes))
    return attempt(widen, scope, True)


@dataclasses.dataclass(frozen=True)
class Preparation:
    """What every check prepares from its inputs, once: the record :func:`prepare` makes.

    ``split`` separates the checked leaves from the rest (``trees.split_params``);
    ``given`` are those leaves as passed and ``dyn`` the same leaves at evaluation
    precision (``eval_dtypes``); ``rebuild_args``/``argarr`` the data, widened with them;
    ``widen`` and ``as_given`` say which precision that is (``as_given``: fn refused the
    wider one, see :func:`retried`); ``u`` is the unit round-off of the leaves,
    ``global_scale`` and ``scales`` size every step (:func:`step_scales`); ``notes``
    say what preparation changed. The lists are not to be changed in place.
    """

    split: Any
    given: list
    dyn: list
    eval_dtypes: tuple
    rebuild_args: Callable
    argarr: list
    widen: bool
    as_given: bool
    u: float
    global_scale: float
    scales: tuple
    notes: tuple

    @property
    def precision(self) -> str:
        """The report's precision: "float64", or "native (float32, ...)"."""
        return precision_label(self.eval_dtypes)


def prepare(checked, args, *, widen: bool, as_given: bool = False, what: str, names: tuple[str, str],
            finite: bool = True, absolute: bool = False) -> Preparation:
    """The :class:`Preparation` of a check of ``checked`` (the tree that is perturbed) with
    data ``args`` (never perturbed), at evaluation precision (``widen``: float64).

    ``what`` names ``checked`` in errors; ``names`` = (the checked leaves, the data) in
    notes ("parameters", "args"); ``finite`` refuses non-finite leaves; ``absolute`` makes
    every scale 1 (see :func:`step_scales`).
    """
    split, given = trees.split_params(checked, what=what, finite=finite)
    notes = []
    dyn, narrowed = evaluation_leaves(given, widen, as_given)
    if narrowed:
        notes.append(f"bfloat16/float16 {names[0]} were evaluated in float32 (the narrowest precision "
                     "in which finite differences resolve).")
    eval_dtypes = tuple(np.dtype(x.dtype) for x in dyn)
    # Floating data is widened with the checked leaves (exact casts of copies): code that
    # checks its own dtypes (Equinox's State.set, a scan carry started from the data)
    # would otherwise meet float64 values computed from params next to float32 data.
    rebuild_args, argarr = trees.split_args(args, widen=widen)
    narrow = sorted({np.dtype(x.dtype).name for x in jax.tree_util.tree_leaves(args)
                     if trees.is_inexact_array(x) and np.dtype(x.dtype) != trees.wide_dtype(x.dtype)})
    if widen and narrow:
        notes.append(f"{'/'.join(narrow)} arrays in {names[1]} were evaluated in float64 like the "
                     f"{names[0]} (copies); precision='native' passes them as given.")
    global_scale, scales = step_scales(dyn, absolute=absolute)
    return Preparation(split=split, given=given, dyn=dyn, eval_dtypes=eval_dtypes, rebuild_args=rebuild_args,
                       argarr=argarr, widen=widen, as_given=as_given, u=unit_roundoff(eval_dtypes),
                       global_scale=global_scale, scales=tuple(scales), notes=tuple(notes))
