"""Preparation shared by every check: validated options, evaluation precision and step scales.

:class:`jgc._src.problem.Problem` (a scalar cost) and
:class:`jgc._src.vector.VectorProblem` (a vector function) both derive from
:class:`Prepared`. It owns what the two have in common: the check of the options they
share, the scoped x64 context, the perturbed leaves cast to their evaluation precision
(float64 where available, never below float32), the precision label of the report,
the unit round-off u and the scale s_i that sizes the step of every element.

It also reads the form of fn's result: a cost alone, or a pair (output, aux) with
``has_aux``. Both kinds of check trace fn and take from its result the part that is
differentiated; a result of the wrong form for its ``has_aux`` setting raises
:class:`OutputFormError` with a message saying which form was expected.
"""

from __future__ import annotations

import contextlib
import math
import time

import jax
import numpy as np

from . import compat, compiling, policy, trees
from . import validate as valid
from .names import short_name
from .progress import Counter

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


class Prepared(Scoped):
    """The state every prepared check holds: notes, evaluation counter and clock, the
    dtypes of the checked leaves, and (once prepared) those leaves at evaluation
    precision with their scales."""

    FN = "fn"  # how notes name the checked function

    def _begin(self, checked, precision: str):
        """Start the counter and clock; return the precision scope for ``checked``'s leaves."""
        self.counter = Counter()
        self.t0 = time.perf_counter()
        self.compile_clock = compiling.Clock()  # programs built while the check runs
        self.notes: list[str] = []
        # Errors of JAX's own derivative rules that a check took as NaN values (see
        # vector_analytic); the Report keeps them, and check_grads' failure names the first.
        self.rule_errors: list[Exception] = []
        self.precision_asked = precision
        self.as_given = False
        orig = [x for x in jax.tree_util.tree_leaves(checked) if trees.is_inexact_array(x)]
        self.orig_dtypes = [np.dtype(x.dtype) for x in orig]
        self.widen, scope = precision_scope(precision, self.orig_dtypes, self.notes)
        return scope

    def __enter__(self):
        """Prepare at evaluation precision; if fn refuses its inputs there, at the dtypes given.

        Code that fixes its own dtypes (a float32 constant under strict promotion, a
        float16 init value of ``lax.reduce_window``) cannot take float64 (or float32 for
        16-bit) inputs: the first trace raises a TypeError. Unless float64 was asked
        for explicitly, the check is then prepared again at the dtypes given, with steps
        and tolerances for that precision, and a note says so. An error at the dtypes
        given is fn's own and is raised.
        """
        kept = len(self.notes)
        try:
            return super().__enter__()
        except (TypeError, compat.TypePromotionError) as e:
            refused = None if self.as_given else refused_widening(
                e, widened=self.widen, orig_dtypes=self.orig_dtypes, asked=self.precision_asked, fn=self.FN)
            if refused is None:
                raise
        del self.notes[kept:]
        self.widen, scope = precision_scope("native", self.orig_dtypes, self.notes)
        self._scope = self._scoped(scope)
        self.as_given = True
        self.counter = Counter()
        self.notes.append(as_given_note(refused, self.orig_dtypes))
        return super().__enter__()

    def _scoped(self, scope):
        """The context a check runs in, given its precision scope (subclasses add to it)."""
        return scope

    def _at_eval_precision(self, dyn: list, *, narrowed_note: str) -> None:
        """Set ``dyn`` and ``eval_dtypes`` (see :func:`evaluation_leaves`)."""
        self.dyn, narrowed = evaluation_leaves(dyn, self.widen, self.as_given)
        if narrowed:
            self.notes.append(narrowed_note)
        self.eval_dtypes = [np.dtype(x.dtype) for x in self.dyn]

    def _set_scales(self, *, absolute: bool = False) -> None:
        self.global_scale, self.scales = step_scales(self.dyn, absolute=absolute)

    @property
    def precision(self) -> str:
        return precision_label(self.eval_dtypes)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
