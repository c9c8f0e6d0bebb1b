"""The one problem class of every check, and the output laid out as a vector.

:class:`Prepared` is the problem of every check, scalar or vector: it holds the frozen
record that ``preparation.prepare`` makes (the split, the leaves at evaluation
precision, the data, u, the scales), retries at the dtypes given
(``preparation.retried``), keeps the one table of compiled evaluators of the leaves'
coordinates, estimates derivatives on real coordinates from them
(:meth:`Prepared.estimate`, the Jacobian's columns and a scalar cost's elements alike),
evaluates f afresh at the point and bounds how far two compilations may differ (the
determinism checks), and gives steps through ``steps.Steps``. A subclass lays the
output out: ``problem.Problem`` a scalar cost, one output J, and
:class:`VectorProblem` here any pytree of outputs as one real vector

    y = vec(f(*primals))   (complex leaves contribute (Re, Im) pairs, interleaved)

with the rounding noise of every element of y. (The class lives here, not in
``preparation``, because it evaluates through the engine: the import chain from
``python -m jgc`` through the Jacobian check has no room for a module between this one
and ``engine``.) The two layouts are two classes because what they measure differs,
and a verdict depends on it: the scalar probe takes the median over 7 lines of one
value, the vector probe σ_j per output element along one line (``noise.SCALAR``,
``noise.VECTOR``, with the reason); u counts the output's dtypes for a vector (its
layout rounds there) and the leaves' only for J; and the relative noise steps are
sized for is σ/max(|J|, gradient scale) against the 90th percentile of σ_j/|y_j|.

The Jacobian, JVP, VJP and HVP checks (``jacobian``, ``products``, ``hvp``) all work on
the real view of :class:`VectorProblem`, which is also how JAX's convention for complex
derivatives is honoured: a complex number is a point of R², tangents are R-linear, and
``jax.vjp``'s cotangent of a (Re, Im) pair (c_r, c_i) is c_r − i·c_i. The layout of y
is in ``vector_layout`` (whose dtypes enter u); the analytic side (JVPs, VJPs) in
``vector_analytic``, and as the program runs it, at the dtypes given, in
``vector_native``. f is evaluated off the point only by the engine: the direction bank
(the noise probe's line and the tangents) as line rows of ``engine.LineEvaluator``,
whole Jacobian columns as coordinate rows of ``engine.LeafEvaluator``
(:meth:`Prepared.evaluator`). The bank may be set before or after the noise is
measured. Its noise comes from the probe every check uses (``noise.probe``) in the
vector design (``noise.VECTOR``: one line, σ_j per output element), its steps from
``steps.Steps`` (:meth:`Prepared.relative_step`), as a scalar check's do.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import compat, compiling, engine, noise, stencils, trees, vector_analytic, vector_native
from . import validate as validate_options
from .names import short_name
from .preparation import (
    ChangedByWidening,
    OutputFormError,
    Preparation,
    Scoped,
    drop_aux,
    prepare,
    retried,
    unit_roundoff,
    validate,
    validate_chunk_size,
)
from .progress import Counter
from .steps import Steps
from .vector_layout import Layout


@contextlib.contextmanager
def _quiet_nonfinite(scope):
    """``scope`` with ``jax.debug_nans``/``debug_infs`` off: a perturbed point where f is
    legitimately not finite is part of the check (a non-finite status), not an error."""
    with scope, jax.debug_nans(False), jax.debug_infs(False):
        yield


def as_array_primal(x):
    """Python float/complex scalars become arrays of JAX's default dtype, so they can be checked."""
    if isinstance(x, (float, complex)) and not isinstance(x, bool):
        return np.asarray(x, dtype=jnp.result_type(x))
    return x


def to_device(x, dtype=None):
    """A host array on the default device: an explicit transfer (``jax.transfer_guard``)."""
    return jax.device_put(np.asarray(x, dtype))


class Prepared(Scoped):
    """The one problem class of every check: the prepared inputs of f, and f off the point.

    It holds the frozen :class:`jgc._src.preparation.Preparation` (``prep``, whose fields
    it reads through: ``dyn``, ``scales``, ...) with what a running check adds: the
    scoped x64 context, the evaluation counter, clock and notes, and the one retry at
    the dtypes given (:func:`jgc._src.preparation.retried`). On that record it does,
    for every check alike: the evaluators of the leaves' coordinates (one table, built
    on first use and started afresh with each attempt), the finite-difference estimate
    on real coordinates (:meth:`estimate`), f at the point from a fresh trace and the
    bound two compilations of it may differ by (the determinism checks), and the steps
    (:meth:`relative_step`, through ``steps.Steps``).

    A subclass lays the output out: ``problem.Problem`` a scalar cost, one output J
    (``n_out`` = 1, y0 = [J(θ)]), and :class:`VectorProblem` any pytree of outputs as the
    real vector y. Each says what ``evaluated`` is (J, or vec(f)) and its value at the
    point (``output_at_point``), measures its noise (``noise.probe`` in its design) and
    gives ``relative_noise``. What else a subclass has is its own, not another version
    of what is here: J's form check and the evaluators small leaves share (``Problem``,
    which hands every other leaf to :meth:`evaluator`); the direction bank, the JVP/VJP
    side and ``check_primal`` (``VectorProblem``).
    """

    FN = "fn"  # how notes name the checked function
    n_out = 1  # outputs of the evaluated function (the vector layout sets its own)
    # Largest relative step for which fn is resolved (the scalar noise probe sets it when
    # J oscillates on a scale shorter than its default spacing; see steps.Steps.cap).
    wave_cap = math.inf
    # Whether the noise probe found kinks near the point (the scalar probe sets it).
    kinks = False

    def _begin(self, checked, precision: str) -> None:
        """Start the counter and clock; note the dtypes of ``checked``'s leaves."""
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

    def __enter__(self):
        """Prepare at evaluation precision; if fn refuses its inputs there, at the dtypes
        given (see :func:`jgc._src.preparation.retried`). x64 is enabled inside when the
        check needs it."""

        def attempt(widen, scope, as_given):
            self.widen, self.as_given = widen, as_given
            self._scope = self._scoped(scope)
            self.counter = Counter()
            return super(Prepared, self).__enter__()

        return retried(attempt, precision=self.precision_asked, orig_dtypes=self.orig_dtypes,
                       notes=self.notes, fn=self.FN)

    def _scoped(self, scope):
        """The context a check runs in, given its precision scope (subclasses add to it)."""
        return scope

    def _prepared(self, checked, args, **how) -> Preparation:
        """Make ``self.prep`` (see :func:`jgc._src.preparation.prepare`) at this attempt's
        precision; keep its notes; start the evaluator table and the noise afresh."""
        self.prep = prepare(checked, args, widen=self.widen, as_given=self.as_given, **how)
        self.notes.extend(self.prep.notes)
        self.paths = [self._label(p) for p in self.prep.split.dynamic_paths]
        # The compiled evaluator of each leaf's coordinates, by (leaf, complex step),
        # built on first use (a check of few leaves, or in directions, uses few or none).
        self._evaluators: dict = {}
        self.sigma = None  # the measured noise (the layout's measure sets it)
        return self.prep

    def _label(self, path: str) -> str:
        """A leaf's path as reports name it (the vector layout names the primal first)."""
        return path

    # The prepared record's fields, read through.
    split = property(lambda self: self.prep.split)
    dyn = property(lambda self: self.prep.dyn)
    eval_dtypes = property(lambda self: list(self.prep.eval_dtypes))
    rebuild_args = property(lambda self: self.prep.rebuild_args)
    argarr = property(lambda self: self.prep.argarr)
    global_scale = property(lambda self: self.prep.global_scale)
    scales = property(lambda self: self.prep.scales)

    @property
    def skipped(self) -> tuple:
        """(path, description) of every leaf of the checked tree that is not perturbed."""
        return tuple((self._label(p), d) for p, d in self.split.skipped)

    @property
    def precision(self) -> str:
        return self.prep.precision

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    # -- coordinates -------------------------------------------------------------
    def is_complex(self, k: int) -> bool:
        return bool(jnp.iscomplexobj(self.dyn[k]))

    def coordinates(self, k: int) -> int:
        """Real coordinates of leaf k: Re parts first, then Im parts for complex leaves."""
        return self.dyn[k].size * (2 if self.is_complex(k) else 1)

    # -- f at the point, and how far two compilations of it may differ ---------------
    def _fresh_value(self) -> np.ndarray:
        """The evaluated function at the point from a new trace and compilation (its own
        jit, never a cached trace), as a float64 vector of ``n_out`` values."""
        fresh = jax.jit(lambda d, a: self.evaluated(d, a))
        with compat.float_checks_off():  # a non-finite value is the caller's to judge
            return compat.host(fresh(self.dyn, self.argarr)).astype(np.float64).reshape(-1)

    def primal_bound(self, y=None):
        """How far f(x) from two compilations may differ, per output: 1e3·u·max|y|, and
        at least 8σ_j once the noise is measured. Two compilations may fuse and round
        differently by a few u (an ill-conditioned f amplifies that), or by a few σ_j
        where f rounds in a coarser dtype inside (bfloat16 matmuls of float32 params);
        Python-level randomness differs by O(|y|). ``y``: f at the point (``y0``)."""
        y = self.y0 if y is None else y
        fin = np.abs(y[np.isfinite(y)])
        bound = 1e3 * self.u * max(float(np.max(fin, initial=0.0)), 1e-30)
        if self.sigma is None:
            return bound
        return np.maximum(bound, 8.0 * np.where(np.isfinite(self.sigma), self.sigma, 0.0))

    def _differs(self, again, y=None) -> np.ndarray:
        """Where ``again`` (f at the point from another trace) differs from ``y`` (``y0``)
        beyond :meth:`primal_bound`; NaN against NaN is the same."""
        y = self.y0 if y is None else y
        with np.errstate(invalid="ignore"):
            same = (again == y) | (np.isnan(again) & np.isnan(y)) | (np.abs(again - y) <= self.primal_bound(y))
        return ~same

    # -- evaluation off the point, and the estimate on coordinates -------------------
    def leaf_function(self, k: int):
        """The evaluated function of leaf k raveled, the other leaves and the data operands."""
        shape = self.dyn[k].shape

        def leaf(x, ops):
            dyn, argarr = ops
            dyn = list(dyn)
            dyn[k] = x.reshape(shape)
            return self.evaluated(dyn, argarr)

        return leaf

    def _probe_bank_of(self, k: int, complex_step: bool):
        """Lines an evaluator of leaf k also walks (``engine.LeafEvaluator``'s ``lines``), or None."""

    def evaluator(self, k: int, complex_step: bool = False) -> engine.LeafEvaluator:
        """The compiled evaluator of leaf k's coordinate rows (``engine.LeafEvaluator``):
        f at θ + δ·e_i, built on first use and kept in the table preparation starts."""
        cache = self._evaluators
        if (k, complex_step) not in cache:
            operands = (self.dyn, self.argarr)
            if complex_step and compat.strict_promotion():
                # Strict promotion has no complex × real path, so the leaves not stepped
                # and floating data become complex too (imaginary part 0, so that
                # Im f(θ + ih·e_i) is unchanged).
                operands = tuple([compat.as_complex(x) for x in arrays] for arrays in operands)
            cache[k, complex_step] = engine.LeafEvaluator(
                self.leaf_function(k), jax.device_put(compat.host(self.dyn[k]).ravel()), operands,
                chunk_size=self.chunk_size, counter=self.counter, complex_step=complex_step,
                lines=self._probe_bank_of(k, complex_step),
            )
        return cache[k, complex_step]

    def estimate(self, k: int, coords: np.ndarray, stencil: str, h_rel: float) -> stencils.Estimate:
        """Finite-difference estimate for real coordinates ``coords`` of leaf k: one row per
        coordinate and output (coordinate-major, ``len(coords)·n_out`` rows)."""
        x = self.dyn[k]
        m = x.size
        x0 = compat.host(x).ravel()
        elem = coords % m
        unit = np.where(coords >= m, 1j, 1.0) if np.iscomplexobj(x0) else np.ones(coords.size)
        h = h_rel * self.scales[k][elem]
        if stencil == "complex":
            return self._complex_step(k, elem, h, x0)
        offs = stencils.offsets(stencil)
        deltas = (offs[None, :] * h[:, None] * unit[:, None]).astype(x0.dtype)
        jv = self._rows(self.evaluator(k)(elem, deltas), offs.size)
        # |taken| is the real step, or the imaginary one for an i·h perturbation.
        taken = np.abs(engine.actual_steps(x0, elem, deltas))
        return stencils.estimate(stencil, np.tile(self.output_at_point(), elem.size), jv,
                                 np.repeat(taken, self.n_out, axis=0))

    def _rows(self, values, p: int) -> np.ndarray:
        """Evaluator values (coordinates, offsets[, outputs]) as rows (coordinate·output, offsets).
        The coordinates are counted, not inferred: an output of size 0 has no rows."""
        values = np.real(np.asarray(values))
        return values.reshape(values.shape[0], p, self.n_out).transpose(0, 2, 1).reshape(-1, p)

    def _complex_step(self, k: int, elem: np.ndarray, h: np.ndarray, x0: np.ndarray) -> stencils.Estimate:
        """Im f(θ + ih·e_i)/h for real leaf k (see stencils.complex_step)."""
        if np.iscomplexobj(x0):
            raise ValueError(
                f"{self.api}: stencil='complex' needs real parameters, but leaf "
                f"{self.paths[k]} is complex. Use stencil='central'."
            )
        deltas = (1j * h)[:, None].astype(np.result_type(x0.dtype, np.complex64))
        try:
            jv = self.evaluator(k, complex_step=True)(elem, deltas)
        except Exception as e:
            raise ValueError(
                f"{self.api}: stencil='complex' evaluates fn at complex parameters, and "
                f"{short_name(self.fn)} failed there ({type(e).__name__}: {e}). The cost is not "
                "complex-safe (comparisons, abs, real-only ops); use stencil='central'."
            ) from e
        if not np.iscomplexobj(jv):
            raise ValueError(
                f"{self.api}: stencil='complex' needs a complex-safe cost, but "
                f"{short_name(self.fn)} returned a real value for complex parameters at leaf "
                f"{self.paths[k]} (abs, jnp.real, astype or a comparison dropped the "
                "imaginary part), so Im J(θ+ih)/h would be 0. Use stencil='central'."
            )
        rows = np.asarray(jv).reshape(-1)  # coordinate-major, as the rows of _rows
        return stencils.complex_step(rows, np.repeat(h, self.n_out), self.u)

    # -- steps -------------------------------------------------------------------
    def relative_step(self, stencil: str, step: float | None) -> float:
        """h/s for a stencil: given, or from :class:`steps.Steps` (the layout's
        ``relative_noise``, this problem's wave and kink caps)."""
        return Steps(self).relative(stencil, step)


class VectorProblem(Prepared):
    """A vector-valued check's problem: the one problem class with the output laid out as
    the real vector y (see the module doc). A context manager."""

    FN = "f"

    def __init__(self, f: Callable, primals: tuple, *, argnums=None, has_aux: bool = False,
                 precision: str = "auto", api: str, chunk_size: int | None = None,
                 in_label: Callable[[int], str] | None = None, out_name: str = "out",
                 allow_nonfinite: bool = False, absolute_step: bool = False, analytic: str = "reference"):
        validate(api, f, signature="f(*primals)", has_aux=has_aux, precision=precision, leaves=primals,
                 traced_hint="A derivative check needs concrete numbers: call it outside transformations.")
        validate_chunk_size(api, chunk_size)
        if not primals:
            raise TypeError(f"{api}: pass the point to check at, f(*primals); no primals were given.")
        self.f, self.api, self.has_aux = f, api, has_aux
        self.fn = f  # as Problem names it (reports read it)
        # With allow_nonfinite, NaN/Inf in the primals or in f(*primals) is compared as
        # jax.test_util.check_grads compares it (see jgc.check_grads) instead of refused.
        self.allow_nonfinite = allow_nonfinite
        # absolute_step: every element's scale is 1, so a step h moves x by h·t with t
        # an unscaled N(0, 1) direction: jax.test_util.check_grads's meaning of eps.
        self.absolute_step = absolute_step
        self.argnums = validate_options.argnums(argnums, len(primals), api)
        self.primals = tuple(as_array_primal(p) if i in self.argnums else p for i, p in enumerate(primals))
        self.chunk_size, self.analytic_asked, self.x64_given = chunk_size, analytic, compat.x64_enabled()
        self.in_label = in_label or (lambda i: f"args[{i}]")
        self.out_name = out_name
        checked = tuple(self.primals[i] for i in self.argnums)
        self._begin(checked, precision)

    def _scoped(self, scope):
        return _quiet_nonfinite(scope)

    # -- preparation -------------------------------------------------------------
    def _label(self, p: str) -> str:
        # split_params paths start with the index into the tuple of checked primals.
        j, rest = p[1:].split("]", 1)
        return self.in_label(self.argnums[int(j)]) + rest

    def _prepare(self):
        nums = self.argnums
        checked = tuple(self.primals[i] for i in nums)
        others = tuple(None if i in nums else p for i, p in enumerate(self.primals))
        # bfloat16/float16 steps round to 0 or to coarse multiples of θ; float32 is the
        # narrowest precision in which differences resolve (as in Problem). Floating data
        # is widened with the primals, as in jgc.check (one precision inside f).
        prep = self._prepared(checked, others, what=f"{self.api}: the primals at argnums {nums}",
                              names=("primals", "the primals not checked"), finite=not self.allow_nonfinite,
                              absolute=self.absolute_step)
        dyn = prep.given
        # Shapes only (a trace, no compile): the first value comes from the compiled noise
        # probe at t = 0, so checking a function costs no op-by-op eager run.
        out = self._first_output()
        self._same_form_as_given(out, dyn, others)
        self.layout = Layout.of(out, name=self.out_name, api=self.api, f=self.f)
        self.out_leaves, self.out_skipped = self.layout.leaves, self.layout.skipped
        self.n_out, self.out_dtype = self.layout.size, self.layout.dtype
        self.y0 = None
        # The output layout's dtypes round too: u is that of the coarsest of them and the leaves'.
        self.u = unit_roundoff(list(prep.eval_dtypes) + [ol.dtype for ol in self.out_leaves])
        self.F = lambda d, a: self.vec(self.call(d, a))
        self.bank = self._lines = None  # set by set_bank (measure_noise sets one without tangents)
        # f(x) from a derivative rule's own trace, by rule, where it is not f's (see check_primal).
        self.primal_mismatches: dict = {}
        self.native_view = vector_native.native_view(self, dyn, others, self.analytic_asked)

    def _same_form_as_given(self, out, dyn, others) -> None:
        """Raise ChangedByWidening when f's outputs at evaluation precision have other
        shapes than at the dtypes given (one more trace, only when some dtype changed)."""
        given_args = trees.array_leaves(others)
        if all(a.dtype == b.dtype for a, b in zip(list(self.dyn) + list(self.argarr), list(dyn) + given_args)):
            return
        try:
            given = jax.eval_shape(self.call, dyn, given_args)
        except Exception:  # noqa: BLE001 - f runs at its evaluation precision; that is what counts
            return
        shapes = [jax.tree_util.tree_map(lambda o: tuple(o.shape), t) for t in (out, given)]
        if shapes[0] != shapes[1]:
            raise ChangedByWidening(f"output shapes {shapes[0]}, against {shapes[1]} at the dtypes given")

    @property
    def evaluated(self):
        """The function evaluated off the point: y = vec(f) of the perturbed leaves and data."""
        return self.F

    def call(self, dyn, argarr):
        """f at the given perturbed leaves, aux dropped."""
        out = self.f(*self.primals_from(dyn, argarr))
        return drop_aux(out, self.has_aux, api=self.api, fn=self.f, arg="f", first="output")

    def primals_from(self, dyn, argarr) -> list:
        prims = list(self.rebuild_args(argarr))
        tree = self.split.combine(dyn)
        for j, i in enumerate(self.argnums):
            prims[i] = tree[j]
        return prims

    def _first_output(self):
        try:
            return jax.eval_shape(self.call, self.dyn, self.argarr)
        except OutputFormError:
            raise
        except Exception as e:  # re-raised with context, same type
            e.add_note(f"{self.api}: raised while evaluating {short_name(self.f)}(*primals) at the given point.")
            raise

    def vec(self, out):
        """The real output vector y of an output pytree (see vector_layout.Layout.vec)."""
        return self.layout.vec(out)

    def unvec_cotangent(self, c, out):
        return self.layout.unvec_cotangent(c, out)

    def _check_first(self):
        y = self.y0
        bad = ~np.isfinite(y)
        if bad.any() and self.allow_nonfinite:
            self.notes.append(f"f is not finite at {int(bad.sum())} output element(s) at the given point: "
                              "they are compared as NaN == NaN, as jax.test_util.check_grads does.")
        elif bad.any():
            _, at = self.layout.first(bad)
            raise ValueError(
                f"{self.api}: {short_name(self.f)} returned a non-finite value at output {at} at the "
                "given point; a derivative check needs finite outputs. Check for log(0), division "
                "by zero or overflow there."
            )

    def check_primal(self, again, user: str | None = None, label: str = "JVP"):
        """Compare f(x) from another trace (the JVP's or VJP's primal output) with y0.

        The compiled probe and the analytic batch are separate traces: Python-level
        randomness (np.random, a fresh key per call) makes them differ. With a user rule,
        a difference means its primal output is not f's. Without one, f is traced and
        compiled once more on its own: if that agrees with y0, f is deterministic and it
        is JAX's derivative rule whose primal output is not f(x) (``eigh`` with
        ``symmetrize_input=False`` symmetrizes inside its JVP rule); that is recorded in
        ``primal_mismatches`` (reported as a mismatch), as jax.test_util.check_grads
        reports it.
        """
        y = self.y0
        again = np.asarray(again, np.float64)
        bad = self._differs(again)
        if user is not None and np.any(bad):
            j, at = self.layout.first(bad)
            raise ValueError(
                f"{self.api}: the primal output of {user} differs from f at output {at}: {again[j]!r} "
                f"against f's {y[j]!r}. A rule must return f(*primals) as its primal output (check "
                "the forward function of the custom rule)."
            )
        if np.any(bad) and not np.any(bad & ~(np.isnan(again) | np.isnan(y))):
            # Only where one side is NaN: NaN propagation through max, min or sort is not
            # fixed between two compilations; such outputs compare as NaN, as above.
            self.notes.append(f"f's output is NaN at the given point in one compilation and not in "
                              f"another ({label}): compared as NaN.")
            return
        if np.any(bad) and not np.any(self._differs(self._fresh_value())):
            self.primal_mismatches.setdefault(label, again)
            return
        if np.any(bad):
            raise ValueError(
                f"{self.api}: f is not deterministic: two evaluations at the same point gave "
                "different outputs. A derivative check needs f to be a function of its inputs; "
                "if it uses randomness, pass a fixed PRNG key as an argument."
            )

    # -- coordinates -------------------------------------------------------------
    def block_columns(self, k: int) -> np.ndarray:
        """Permutation taking the (Re…, Im…) coordinate order to the (elem, Re/Im) layout."""
        m, n = self.dyn[k].size, self.coordinates(k)
        if n == m:
            return np.arange(m)
        t = np.arange(n)
        return (t % 2) * m + t // 2

    def in_block_shape(self, k: int) -> tuple:
        return tuple(self.dyn[k].shape) + ((2,) if self.is_complex(k) else ())

    def to_coords(self, k: int, w: np.ndarray) -> np.ndarray:
        """Cotangent of leaf k (batch, *shape) → real coordinates (JAX: ∂/∂x − i∂/∂y)."""
        w = np.asarray(w).reshape(w.shape[0], -1)
        if self.is_complex(k):
            return np.concatenate([w.real, -w.imag], axis=1)
        return w.real if np.iscomplexobj(w) else w

    def tangent_coords(self, k: int, t: np.ndarray) -> np.ndarray:
        """Tangent of leaf k (batch, *shape) → real coordinates (Re…, Im…)."""
        t = np.asarray(t).reshape(t.shape[0], -1)
        return np.concatenate([t.real, t.imag], axis=1) if self.is_complex(k) else t

    # -- noise and steps ----------------------------------------------------------
    def random_tangents(self, rng: np.random.Generator, k: int, n: int) -> np.ndarray:
        """n random tangents of leaf k, scaled by each element's scale s_i: shape (n, *leaf)."""
        x = self.dyn[k]
        shape = (n,) + tuple(x.shape)
        z = rng.standard_normal(shape)
        if self.is_complex(k):
            z = (z + 1j * rng.standard_normal(shape)) / np.sqrt(2)
        return (z * self.scales[k].reshape(x.shape)).astype(x.dtype)

    def set_bank(self, tangents: list[np.ndarray] | None):
        """Fix the direction bank: row 0 is the noise probe, row 1 + k·nd + d is tangent d of leaf k.

        ``tangents`` holds per leaf k an array (nd, *shape_k) (the same nd for every leaf).
        Rows are decoded inside the compiled function, so the bank costs nd copies of the
        parameters, not nd·K (a direction of leaf k is zero on the other leaves). One
        compiled, vmapped function evaluates f at x + s·bank[b] for rows (s, b): the noise
        probe, the first pass and the Richardson refinement share one compile.
        """
        rng = np.random.default_rng(0)
        probe = []
        for k, x in enumerate(self.dyn):
            sign = rng.choice([-1.0, 1.0], size=x.size)
            if self.is_complex(k):
                sign = sign * np.where(rng.random(x.size) < 0.5, 1.0, 1j)
            probe.append(to_device((sign * self.scales[k]).reshape(x.shape).astype(x.dtype)))
        if tangents:
            tangents = vector_native.as_given(self, tangents)
            nd = int(np.asarray(tangents[0]).shape[0])
            tang = [to_device(np.asarray(t, x.dtype).reshape((nd,) + tuple(x.shape)))
                    for t, x in zip(tangents, self.dyn)]
        else:
            nd, tang = 1, [to_device(np.zeros((1,) + tuple(x.shape), x.dtype)) for x in self.dyn]
        self.bank = (probe, tang)
        total = sum(x.size for x in self.dyn)
        self.rows = self.chunk_size or max(1, min(engine.DEFAULT_BATCH_EVALS, engine.BATCH_ELEMENT_BUDGET // max(1, total)))

        def tangent_of(b, bank):
            probe, tang = bank
            r = jnp.maximum(b - 1, 0)
            k, d = r // nd, r % nd
            return [jnp.where(b == 0, p, jnp.where(k == j, t[d], jnp.zeros_like(p)))
                    for j, (p, t) in enumerate(zip(probe, tang))]

        self.tangent_of = tangent_of
        # A few calls a check (noise probe, directions, refinement): compiled without LLVM
        # optimisation (see compiling.fast). Rows (b, s) are line rows of the engine: s is
        # cast to the direction's dtype (t may be complex), the product to the leaf's.
        self._lines = engine.LineEvaluator(self.F, self.dyn, self.argarr, self.bank, rows=self.rows,
                                           t_dtype=np.float64 if jax.config.jax_enable_x64 else np.float32,
                                           direction=tangent_of, counter=self.counter, options=compiling.fast())

    def chunked(self, fn, rows: np.ndarray, *operands):
        """Run a vmapped fn over bank rows in fixed-size chunks (one compile, bounded memory)."""
        c = self.rows
        n = rows.size
        nch = max(1, math.ceil(n / c))
        rows = np.concatenate([rows, np.repeat(rows[-1:], nch * c - n)]).astype(np.int32)
        outs = [fn(to_device(rows[i * c:(i + 1) * c]), *operands) for i in range(nch)]
        return jax.tree_util.tree_map(lambda *xs: np.concatenate([compat.host(x) for x in xs])[:n], *outs)

    def eval_rows(self, s: np.ndarray, b: np.ndarray) -> np.ndarray:
        """y at x + s_r·bank[b_r] for every row r: shape (rows, n_out)."""
        if s.size == 0:
            return np.zeros((0, self.n_out))
        return np.asarray(self._lines(b, s), np.float64).reshape(s.size, self.n_out)

    def measure_noise(self):
        """σ_j of every output element's rounding noise, along the probe direction (bank row 0).

        The probe direction does not depend on the tangents, so the bank may be set before
        or after (without one, a bank of no tangents is set here).

        Per element: sixth differences of 16 equally spaced values (``noise.VECTOR``, see
        jgc/_src/noise.py), floored at u·|y_j| — the rounding of y_j itself, which the
        probe cannot go below. With 10 differences per element the estimate is good to
        ~25%; the comparison's 8σ safety factor covers that spread. When the elements
        look far noisier than the dtype, finer probes tell rounding noise from jumps or
        short waves crossed by the line (a remainder, a floor): see noise.finest.
        """
        if self._lines is None:
            self.set_bank([])
        levels = {}  # spacing -> (values, (σ_j, effective u))
        moving = None  # outputs that move along the first probe (a constant one is no staircase)

        def probe(t):
            nonlocal moving
            vals = self.eval_rows(t, np.zeros(t.size, np.int64))
            if moving is None:
                self.y0 = vals[0].copy()  # t = 0: f at the point itself
                self._check_first()
                with np.errstate(invalid="ignore"):
                    moving = np.any(np.diff(vals, axis=0) != 0, axis=0)
            levels[t[1]] = (vals, noise.per_output(vals, self.y0, self.u))  # t[1]: the spacing
            return vals.T[moving], levels[t[1]][1][1] / self.u

        # The one probe of every check (noise.probe), in the vector design (noise.VECTOR says why).
        _, _, kept, base = noise.probe(probe, self.u, noise.VECTOR)
        vals, (self.sigma, self.u_eff) = levels[kept]
        if not np.all(np.isfinite(vals)):
            self.notes.append("f was not finite along the noise probe; noise taken as u·|y|.")
        if kept < base:
            self.notes.append(
                f"f jumps or varies on a scale shorter than the default noise probe ({base:.1e}·s); "
                f"noise measured at spacing {kept:.1e}·s.")
        if self.u_eff > noise.SUSPICIOUS * self.u:
            self.notes.append(
                f"f is noisier than its dtype (σ/|y| ≈ {self.u_eff:.1e} against u = {self.u:.1e}); "
                "steps and error bars were sized for the measured noise."
            )

    def relative_noise(self, grad_scale: float = 0.0) -> float:
        """f's noise relative to its outputs: ``u_eff`` from :meth:`measure_noise` (the 90th
        percentile of σ_j/|y_j|, never below u), measured here if not yet; the gradient
        scale does not enter."""
        if self.sigma is None:
            self.measure_noise()
        return self.u_eff

    # -- finite differences --------------------------------------------------------
    def directional(self, dirs: np.ndarray, stencil: str, h_rel: float) -> stencils.Estimate:
        """Central-type estimate of J·bank[d] for every d in dirs; rows (len(dirs)·n_out)."""
        offs = stencils.offsets(stencil)
        p, nd = offs.size, dirs.size
        s = np.tile(offs * h_rel, nd)
        b = np.repeat(dirs, p)
        jv = self._rows(self.eval_rows(s, b).reshape(nd, p, self.n_out), p)  # rows (direction·output, offsets)
        hv = np.broadcast_to(np.abs(offs * h_rel), jv.shape)
        return stencils.estimate(stencil, np.tile(self.output_at_point(), nd), jv, hv)

    def coordinate(self, k: int, coords: np.ndarray, stencil: str, h_rel: float) -> stencils.Estimate:
        """Estimate of Jacobian columns for real coordinates of leaf k; rows (len(coords)·n_out):
        :meth:`Prepared.estimate`, by the name the Jacobian check calls it."""
        return self.estimate(k, coords, stencil, h_rel)

    def output_at_point(self) -> np.ndarray:
        """y = vec(f(x)) as the compiled probe computes it (measured here if not yet)."""
        if self.sigma is None:
            self.measure_noise()
        return self.y0

    def sigma_rows(self, n: int) -> np.ndarray:
        if self.sigma is None:
            self.measure_noise()
        return np.tile(self.sigma, n)

    # -- analytic side: "native" (native_view) runs it at the dtypes given, x64 as the caller had it
    def jvp_batch(self, user_jvp: Callable | None, from_bank: bool = False, broken_as_nan: bool = False):
        """g(T) = J·t for each tangent t of a batch (see vector_analytic.jvp_batch, vector_native.batch)."""
        return vector_native.batch(self, vector_analytic.jvp_batch, user_jvp, from_bank, broken_as_nan)

    def vjp_batch(self, user_vjp: Callable | None, broken_as_nan: bool = False):
        """g(C) = per-leaf cotangents of a batch of real cotangents (see vector_analytic.vjp_batch)."""
        return vector_native.batch(self, vector_analytic.vjp_batch, user_vjp, broken_as_nan)
