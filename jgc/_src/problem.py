"""A scalar cost's problem: the one problem class with one output, J.

:class:`Problem` is built once per scalar check: ``jgc.check`` in every mode,
``numerical_grad`` and ``check_taylor``. It is the problem class every check uses,
:class:`jgc._src.vector.Prepared` (the frozen record of ``preparation.prepare``, the
retry at the dtypes given, the evaluator table, the estimate on coordinates, the
determinism bound, the steps), with the output laid out as one scalar: what is
evaluated is the cost J (``full_cost``), its value at the point is [J(θ)] (``n_out`` =
1), and its noise is measured along random lines (``noise.probe`` in the scalar design,
``noise.SCALAR``: 7 lines of 10 points, whose median survives kinks; a vector function
needs σ per output element, hence its own design). What only a scalar cost has is
here: J's form checked at the point (a real floating scalar) and its determinism
shortcut (two traces of one program are the same function), its relative noise
(:meth:`Problem.relative_noise`: σ relative to max(|J|, gradient scale)), and
evaluators that several small leaves share (one raveled evaluator, whose program also
walks the noise probe's lines in a small model); ``jax.grad`` compiled ahead. Every
evaluation of J off the point goes through the engine: coordinate rows
(``engine.LeafEvaluator``), and the noise probe's lines as line rows, of the whole
evaluator of a small model or of an ``engine.LineEvaluator``. The Jacobian, JVP, VJP
and HVP checks lay the output out as a vector: :class:`jgc._src.vector.VectorProblem`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import compat, compiling, engine, noise, progress
from .names import short_name
from .preparation import OutputFormError, cost_of, validate
from .vector import Prepared

# Models up to this many elements use one raveled evaluator (see _merged_evaluator).
MERGE_LIMIT = 4096
# In larger models, leaves of at most this many elements share one raveled evaluator
# (up to MERGE_LIMIT elements in all): checking such a leaf costs 2m evaluations of the
# whole model, less than compiling a program of its own (0.1–0.3 s a program on a 2-core
# CPU: the transformer block of bench_arch.py at n ≈ 1e4 compiled 17 programs, 15 of
# them for leaves, 13 of which are of at most 1024 elements).
SMALL_LEAF = 1024


def _require_finite(api, value):
    if not math.isfinite(value):
        raise ValueError(
            f"{api}: fn returned {value} at the given params; a gradient check needs a "
            "finite cost. Check for log(0), division by zero or overflow at this point."
        )


def _bits(x) -> np.ndarray:
    """A constant of a jaxpr as a NumPy array (a typed PRNG key as its raw key data)."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _same_program(a, b) -> bool:
    """Two closed jaxprs with the same equations and the same constants, bit for bit."""
    if str(a.jaxpr) != str(b.jaxpr) or len(a.consts) != len(b.consts):
        return False
    for x, y in zip(a.consts, b.consts):
        x, y = _bits(x), _bits(y)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


class Problem(Prepared):
    """A scalar cost's problem: the one problem class (``vector.Prepared``) with one output J.

    Use as a context manager: inside it, x64 is enabled when the check evaluates in
    float64 (scoped; nothing is left behind when it exits).
    """

    def __init__(self, fn: Callable, params, args: tuple, *, precision: str = "auto",
                 api: str = "jgc.check", chunk_size: int | None = None,
                 ahead: tuple[str, ...] = (), has_aux: bool = False):
        validate(api, fn, signature="fn(params, *args) -> scalar", has_aux=has_aux,
                 precision=precision, leaves=(params, args),
                 traced_hint="A gradient check needs concrete numbers: call it outside transformations, "
                             "e.g. in a test or once before the training loop.")
        self.fn, self.params, self.args, self.api = fn, params, args, api
        self.has_aux = has_aux
        self.chunk_size = chunk_size
        # Programs the caller will need, compiled on worker threads while the noise
        # probe runs: "grad" (jax.grad of the cost), "evaluators" (every leaf's).
        self.ahead = ahead
        self._grad = None
        self._begin(params, precision)

    # -- preparation -----------------------------------------------------------
    def _prepare(self):
        prep = self._prepared(self.params, self.args, what=f"{self.api}: params", names=("parameters", "args"))
        self.u = prep.u
        # The leaves that share one raveled evaluator ("merged" in the evaluator table).
        self.merged_group = self._merged_group()

        def full_cost(dyn, argarr):
            out = self.fn(self.split.combine(dyn), *self.rebuild_args(argarr))
            return cost_of(out, self.has_aux, api=self.api, fn=self.fn)

        self.full_cost = full_cost
        self.j0 = self._first_value()
        self._compile_ahead()
        self.sigma = self._measure_noise()

    def _compile_ahead(self) -> None:
        """Start compiling the programs named in ``ahead`` (see compiling.py).

        Only lowering happens here; a failure leaves the program to be built on first
        use, where its error is raised in context.
        """
        # Under debug_nans/debug_infs the gradient is left to jax.jit, whose call reports
        # a non-finite gradient as the FloatingPointError the user asked for.
        if "grad" in self.ahead and not compat.float_checks_on():
            try:
                # Runs once: compiled without LLVM optimisation (compiling.fast()). The
                # program XLA builds (fusions, algebraic rewrites) is the same; only the
                # machine code is less tuned, and its rounding can differ from an
                # optimised build in the last bits, far below any tolerance.
                self._grad = compiling.Ahead(self._jitted_grad(), self.dyn, self.argarr,
                                             options=compiling.fast())
            except Exception:  # noqa: BLE001 - re-raised by gradient() with context
                self._grad = None
        if "evaluators" in self.ahead:
            merged = self._merged_evaluator()
            shared = merged[1] if merged else {}
            evaluators = ([merged[0]] if merged else []) + [
                self.evaluator(k) for k in range(len(self.dyn)) if k not in shared]
            for ev in evaluators:
                try:
                    ev.compile_ahead()
                except Exception:  # noqa: BLE001, S110 - compiled (and raised) on first call
                    pass

    def _jitted_grad(self):
        return jax.jit(jax.grad(self.full_cost))

    def gradient(self) -> list:
        """``jax.grad`` of the cost w.r.t. the checked leaves, at θ."""
        grad = self._grad if self._grad is not None else self._jitted_grad()
        return grad(self.dyn, self.argarr)

    @property
    def evaluated(self):
        """The function evaluated off the point: the cost J of the perturbed leaves and data."""
        return self.full_cost

    def output_at_point(self) -> np.ndarray:
        """[J(θ)]: the one output at the point, as the compiled noise probe computed it."""
        return np.array([self.j0])

    def _jaxpr(self):
        """(J's jaxpr, its output shapes), traced afresh (a new function, never a cached
        trace); tracing alone, no lowering: a check of a small model spent about as long
        lowering as tracing."""
        return jax.make_jaxpr(lambda dyn, argarr: self.full_cost(dyn, argarr), return_shape=True)(
            self.dyn, self.argarr)

    def _first_value(self) -> float:
        # One compiled evaluation, not an eager one: eager mode compiles every primitive
        # of the cost separately (~0.4 s for a small MLP on a CPU, most of a check's set-up).
        try:
            jaxpr, out_shape = self._jaxpr()
        except OutputFormError:
            raise  # its message says all there is to say
        except Exception as e:  # re-raised with context, same type
            e.add_note(
                f"{self.api}: raised while evaluating {short_name(self.fn)}(params, *args) at the "
                "unperturbed parameters (traced with jax.jit, as every evaluation of the check is), "
                "before any perturbation."
                + (" Floating params and args were cast to float64 for the check; if the error "
                   "is about dtypes, precision='native' keeps them as passed." if self.widen else "")
            )
            raise
        outs = jax.tree_util.tree_leaves(out_shape)
        arr = outs[0] if len(outs) == 1 else None
        if arr is None or tuple(arr.shape) != ():
            shape = tuple(arr.shape) if arr is not None else f"a pytree of {len(outs)} leaves"
            raise ValueError(
                f"{self.api}: fn must return a scalar cost J, but {short_name(self.fn)} returned "
                f"shape {shape}. Reduce it (e.g. jnp.mean or .sum()), or use "
                "jgc.check_jacobian for vector-valued functions."
            )
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(
                f"{self.api}: fn must return a real floating scalar, got dtype {arr.dtype}. "
                "For a complex output take jnp.real/jnp.abs of it, or use jgc.check_jacobian."
            )
        # Determinism: a cost that draws new randomness each time it is traced (a Python
        # RNG, a stateful key) traces to a different program (other equations, or other
        # constants); only then do we compile and compare values (a fixed program is
        # deterministic on a CPU). J(θ) itself comes from the noise probe's first point,
        # so no program is compiled here.
        if _same_program(jaxpr, self._jaxpr()[0]):
            return math.nan
        # Two fresh traces and compilations compared as a vector check compares its
        # primal outputs (Prepared.primal_bound: 1e3·u·|J| before the noise is known).
        value = self._fresh_value()  # a non-finite J(θ) gets _require_finite's error
        _require_finite(self.api, float(value[0]))
        again = self._fresh_value()
        self.counter.add(2)
        if np.any(self._differs(again, value)):
            raise ValueError(
                f"{self.api}: fn is not deterministic: two evaluations at the same params gave "
                f"{float(value[0])!r} and {float(again[0])!r}. A gradient check needs J to be a function of params. "
                "If it uses randomness (dropout, noise), pass a fixed PRNG key in args, e.g. "
                "jgc.check(loss, params, batch, jax.random.key(0))."
            )
        return float(value[0])

    def _measure_noise(self) -> float:
        """σ of J's rounding noise, the median over a few random lines (see noise.py)."""
        n = sum(x.size for x in self.dyn)
        fit = engine.rows_in_budget(n)
        start = time.perf_counter()
        whole = self._whole_evaluator() if fit >= noise.SCALAR.evaluations else None
        cost_lines = self._probe_whole(whole) if whole is not None else self._probe_lines(fit)
        # What one program of the cost costs to build, and one evaluation to run: the
        # default mode estimates the time of a full check from them (strategies.py).
        self.compile_seconds = time.perf_counter() - start
        probes = []

        def counted(t):
            probes.append(t)
            begin = time.perf_counter()
            values = cost_lines(t)
            if len(probes) == 1:
                self.eval_seconds = (time.perf_counter() - begin) / (noise.SCALAR.evaluations)
            return values

        # A big model's probe takes a while (70 evaluations, more if J is noisy).
        with progress.attached(self.counter, noise.SCALAR.evaluations, "jgc: noise probe"):
            sigma, values, kept = noise.measure(counted, self.u)
        # Kinks near θ (relu, abs, max): their roughness is not noise (see noise.py), and
        # steps.Steps keeps steps at the size that balances the noise measured without them.
        self.kinks = noise.kinked(values)
        if kept < noise.spacing(self.u):
            # At spacing 8·kept J's variation swamped its noise: J changes shape on that
            # scale, so no step should be longer than the spacing that resolved it.
            self.wave_cap = kept
            self.notes.append(
                f"J varies on a scale shorter than the default noise probe "
                f"({noise.spacing(self.u):.1e}·s); noise measured at spacing {kept:.1e}·s.")
        # J(θ) as compiled code computes it (the engine's values are compiled too).
        _require_finite(self.api, float(values[0, 0]))
        self.j0 = float(values[0, 0])
        floor = self.u * abs(self.j0)
        if not math.isfinite(sigma):
            self.notes.append("J was not finite along the noise probe; noise taken as u·|J|.")
            return floor
        if sigma > 64 * floor and floor > 0:
            self.notes.append(
                f"J is noisier than its dtype: σ ≈ {sigma / abs(self.j0):.1e}·|J| against "
                f"u = {self.u:.1e} (the cost computes in lower precision somewhere, or J is "
                "a small difference of large terms); steps and error bars were sized for "
                "the measured noise."
            )
        return max(sigma, floor)

    def _probe_bank(self) -> np.ndarray:
        """The probe's LINES directions over every leaf raveled together, shape (LINES, n):
        the lines of :meth:`_probe_lines` (the same signs, drawn in the same order)."""
        rng = np.random.default_rng(0)
        dirs = [rng.choice([-1.0, 1.0], size=(noise.SCALAR.lines, s.size)) * s for s in self.scales]
        return np.concatenate(dirs, axis=1).astype(self.dyn[0].dtype)

    def _whole_evaluator(self):
        """The evaluator whose program also walks the noise probe's lines (see
        engine.LeafEvaluator's ``lines``), or None: the evaluator of every leaf raveled
        together, or of the only leaf, in a model of fewer than engine.SPARSE_LEAF
        elements. A small check then compiles one program of the cost instead of two
        (the probe and the evaluator: about a third of a small check's time)."""
        merged = self._merged_evaluator()
        if merged is not None:
            return merged[0] if merged[0].lines else None
        if len(self.dyn) == 1 and self._has_lines():
            return self.evaluator(0)
        return None

    def _has_lines(self) -> bool:
        return (all(not jnp.iscomplexobj(x) for x in self.dyn) and len({x.dtype for x in self.dyn}) == 1
                and sum(x.size for x in self.dyn) < engine.SPARSE_LEAF)

    def _probe_whole(self, ev):
        """cost_lines(t) through the evaluator ``ev`` of every leaf (its ``along`` rows)."""
        try:
            ev.compile_ahead(background=False)  # a no-op when it was compiled ahead
        except Exception:  # noqa: BLE001, S110 - compiled (and raised, in context) on first call
            pass
        ev.ready()
        lines = np.repeat(np.arange(noise.SCALAR.lines), noise.SCALAR.points)

        def cost_lines(t):
            return ev.along(lines, np.tile(np.asarray(t), noise.SCALAR.lines)).reshape(noise.SCALAR.lines, noise.SCALAR.points)

        return cost_lines

    def _probe_lines(self, fit: int):
        """cost_lines(t) through an engine.LineEvaluator of every leaf: every line and
        point in one batch (LINES·POINTS copies) when they fit the memory budget, else one
        line per call, at most ``fit`` points per vmapped batch (a divisor of POINTS,
        walked by ``lax.map``). The lines are those of :meth:`_probe_bank` (the same signs,
        drawn in the same order, kept as bits on the host)."""
        rng = np.random.default_rng(0)
        bits = []
        for s in self.scales:  # leaf after leaf, line after line: the order of one (LINES, m) draw
            bits.append([np.packbits(noise.signs(rng, s.size) > 0) for _ in range(noise.SCALAR.lines)])

        def direction(lines):
            return [jax.device_put(np.stack([(2.0 * np.unpackbits(b[l], count=s.size) - 1.0) * s for l in lines])
                                   .astype(x.dtype).reshape((len(lines),) + x.shape))
                    for b, x, s in zip(bits, self.dyn, self.scales)]

        together = fit >= noise.SCALAR.evaluations
        per = max(d for d in range(1, noise.SCALAR.points + 1) if noise.SCALAR.points % d == 0 and d <= fit)
        wide = jnp.float64 if compat.x64_enabled() else jnp.float32
        # Runs a few times only: compiled without LLVM optimisation (compiling.fast()),
        # on this thread while the programs compiled ahead build on the workers.
        ev = engine.LineEvaluator(
            self.full_cost, self.dyn, self.argarr, direction(range(noise.SCALAR.lines) if together else [0]),
            rows=noise.SCALAR.evaluations if together else per, groups=1 if together else noise.SCALAR.points // per,
            t_dtype=wide, counter=self.counter, options=compiling.fast())
        held = [0]  # the line the evaluator's bank holds (line by line)

        def cost_lines(t):
            if together:
                lines = np.repeat(np.arange(noise.SCALAR.lines), noise.SCALAR.points)
                return ev(lines, np.tile(np.asarray(t), noise.SCALAR.lines)).reshape(noise.SCALAR.lines, noise.SCALAR.points)
            rows = []
            for l in range(noise.SCALAR.lines):
                rows.append(ev(0, t, bank=None if l == held[0] else direction([l])))
                held[0] = l
            return np.stack(rows)

        return cost_lines

    # -- steps and evaluators ----------------------------------------------------
    def relative_noise(self, grad_scale: float) -> float:
        """J's rounding noise relative to its scale, never below u (see steps.Steps.u_eff).

        The noise is taken relative to max(|J|, grad_scale): when J is a small difference
        of large terms (a confident cross-entropy), |J| alone would make the relative noise
        look huge and the steps absurdly large.
        """
        scale = max(abs(self.j0), grad_scale)
        return self.u if scale == 0 else max(self.u, self.sigma / scale)

    def _merged_evaluator(self):
        """One evaluator over several leaves raveled together, or None.

        Per-leaf evaluators compile once per leaf; for a small leaf that compilation
        (~0.1–0.5 s a leaf on a CPU) costs more than checking it. Raveling batches
        every operation of the cost downstream of any leaf of the group, which only
        matters for large leaves, so a model of at most MERGE_LIMIT elements shares a
        single evaluator, and in a larger model its leaves of at most SMALL_LEAF
        elements share one (in one real dtype). Returns (evaluator, {leaf: offset}).
        """
        if "merged" not in self._evaluators:
            merged = None
            group, offsets = self.merged_group
            if len(group) > 1:
                shapes = [self.dyn[k].shape for k in group]

                def cost(flat, ops):
                    dyn, argarr = ops
                    dyn = list(dyn)
                    for k, a, b, sh in zip(group, offsets[:-1], offsets[1:], shapes):
                        dyn[k] = flat[a:b].reshape(sh)
                    return self.full_cost(dyn, argarr)

                # On the host: eager jnp ops would each compile a small program.
                x0 = jax.device_put(np.concatenate([compat.host(self.dyn[k]).ravel() for k in group]))
                # The leaves outside the group are operands; a group of every leaf needs none.
                rest = [None if k in group else x for k, x in enumerate(self.dyn)]
                whole = len(group) == len(self.dyn) and self._has_lines()
                ev = engine.LeafEvaluator(cost, x0, (rest, self.argarr), chunk_size=self.chunk_size,
                                          counter=self.counter,
                                          lines=jax.device_put(self._probe_bank()) if whole else None)
                merged = (ev, {k: int(o) for k, o in zip(group, offsets[:-1])})
            self._evaluators["merged"] = merged
        return self._evaluators["merged"]

    def _merged_group(self) -> tuple[list, np.ndarray]:
        """The leaves that share one raveled evaluator (see :meth:`_merged_evaluator`) and
        their offsets in it: a pure function of the leaves' sizes and dtypes."""
        real = [k for k, x in enumerate(self.dyn) if not jnp.iscomplexobj(x)]
        total = sum(x.size for x in self.dyn)
        if len(real) == len(self.dyn) and len({x.dtype for x in self.dyn}) == 1 and total <= MERGE_LIMIT:
            group = real
        else:
            small = [k for k in real if self.dyn[k].size <= SMALL_LEAF]
            dtype = max({self.dyn[k].dtype for k in small}, key=lambda d: sum(
                self.dyn[k].size for k in small if self.dyn[k].dtype == d), default=None)
            group = [k for k in small if self.dyn[k].dtype == dtype]
            while sum(self.dyn[k].size for k in group) > MERGE_LIMIT:
                group.remove(max(group, key=lambda k: self.dyn[k].size))
        sizes = [self.dyn[k].size for k in group]
        return group, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def evaluator(self, k: int, complex_step: bool = False):
        """Leaf k's evaluator: the shared raveled one for a leaf of the merged group (its
        coordinates shifted by the leaf's offset), else the leaf's own (``Prepared.evaluator``)."""
        merged = None if complex_step else self._merged_evaluator()
        if merged is not None and k in merged[1]:
            ev, offset = merged[0], merged[1][k]
            return lambda idx, deltas: ev(np.asarray(idx) + offset, deltas)
        return super().evaluator(k, complex_step)

    def _probe_bank_of(self, k: int, complex_step: bool):
        """The noise probe's lines, walked by the evaluator of the only leaf of a small model
        (see :meth:`_whole_evaluator`)."""
        whole = not complex_step and len(self.dyn) == 1 and self._has_lines()
        return jax.device_put(self._probe_bank()) if whole else None
