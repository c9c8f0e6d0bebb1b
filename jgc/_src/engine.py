"""Perturbation engine: evaluate the cost at θ + δ·e_i (or θ + t·v) for many rows, vectorised.

The engine works one leaf at a time. Perturbing a single leaf lets ``jax.vmap`` batch
only the part of the computation downstream of that leaf, instead of copying and
batching every parameter for every perturbation as a ravel-everything reference does.

Requests are rows (element index, offset). One call of the compiled evaluator runs
``groups`` chunks of ``chunk`` rows: ``lax.map`` walks the chunks inside one XLA
program (one dispatch, one reused batch buffer), and each chunk is one vmapped batch.
Every call has the same shape (short requests are padded), so a leaf compiles once
however many passes it needs, and memory is bounded by one chunk, not by the number
of parameters. With several devices, each chunk's rows are sharded across them.

:class:`LineEvaluator` runs the other kind of row, a point on a line (l, t): θ + t·v_l
for directions v_l held in a bank, through the same dispatch loop and counter: the
noise probes, the vector checks' directions, check_taylor's line.
:class:`DirectionEvaluator` does the same for perturbations along random directions
restricted to index ranges, generated on the device, the building block of the
directional mode and of its group-testing localisation. Every evaluator's calls, its
line layout for research-size models included, go through one dispatch loop
(:func:`_dispatch`), which queues them, gathers the values in order and counts them.

Outside this layer nothing vmaps the checked function at perturbed points
(tests/test_architecture.py), so a faster evaluation is a change here only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import compat, compiling, memory, sharding, sparse
from .progress import Counter  # noqa: F401 - engine.Counter: where evaluations are counted

# Evaluations in one vmapped batch for small leaves. Larger batches amortise dispatch,
# but past ~128 they mostly add allocation traffic on CPU.
DEFAULT_BATCH_EVALS = 128
# Elements of perturbed leaf copies alive in one batch (2^24 float64 = 128 MiB): the
# memory bound of a check whatever n.
BATCH_ELEMENT_BUDGET = 2**24
# Steps one compiled call walks along one direction (see DirectionEvaluator's line
# layout): the Richardson table of a screen takes 6, a localisation test 4, a short
# central difference 2.
LINE_STEPS = 6
# Directions one compiled call of the line layout walks, one after the other: a screen's
# 8 directions, or a localisation level's 4 parts, in one call. Each call writes its
# direction and perturbed copy into freshly allocated buffers (on a CPU, page faults:
# ≈35 ms for 74 MB, more than a step of the 9.3M-parameter MLP adds to its evaluation),
# so a call should walk many steps. Memory holds one direction at a time.
LINE_DIRS = 8


def rows_in_budget(copy_elements: int) -> int:
    """Rows of ``copy_elements`` perturbed elements each that fit one batch (at least 1):
    ``BATCH_ELEMENT_BUDGET``, or less where memory is short (``memory.budget_elements``)."""
    return max(1, memory.budget_elements(BATCH_ELEMENT_BUDGET) // max(1, int(copy_elements)))
# Rows per vmapped batch for leaves big enough to need many batches. Measured on a
# 2-core CPU with a tanh MLP (n = 1e4 and 1e5): 16–32 rows per batch inside lax.map
# ran as fast as any larger batch and 1.5–2.5x faster than a Python loop over 64–128
# row batches at 1e5 (the batch buffer stays in cache and is reused).
LARGE_LEAF_BATCH = 32
# Batches per call for big leaves (lax.map): 8 x 32 = 256 rows per dispatch keeps the
# dispatch overhead below 1% while padding a short request (pilots, refinement) costs
# at most 256 evaluations' time, < 0.4% of the 2m ≥ 65536 of a grouped leaf.
GROUPS = 8
# Leaves from this size on use lax.map over batches (measured: 1.5–2.5x faster warm at
# 1e5 elements). Below it (1e4: same warm time either way) the plain vmapped batch
# compiles in about half the time of the lax.map program.
GROUPED_LEAF = 2**15
# Leaves from this size on use LARGE_LEAF_BATCH rows per batch: at 1e4 elements 16–32
# rows ran ~1.5x faster than 128 (the batch's copies stay in cache).
MID_LEAF = 2**12
# Leaves at least this large answer short requests with a plain batch (a second
# compilation) instead of padding them to a whole lax.map call: at 2^18 elements a
# padded call (256 rows) costs about as much as compiling a small batch on a CPU.
SINGLE_BATCH_LEAF = 2**18
# Dense leaves whose full central-difference check takes at most this many calls are
# compiled without LLVM optimisation (compiling.fast()): ~0.1 s less compilation a
# program, for ~2x the run time of each call. Measured on the tanh MLPs of
# bench_speed.py: the merged 1e3 model (17 calls) and W2, b1, b2 of the 1e4 one (15, 2,
# 1 calls of 0.5-6 ms) gain; W2 of the 1e5 model (49 calls of 6.5 ms) would lose.
FAST_CALLS = 32
# Leaves from this size on are evaluated by the sparse interpreter (sparse.py). Below
# it a check is dominated by compilation, which the interpreter's larger program makes
# ~25% slower (measured on the 11 zoo models, 6–96 parameters: 18.9 s vs 15.3 s),
# while dense copies of a few thousand elements cost little.
SPARSE_LEAF = 2**12
# Rows per batch on the sparse path (see LeafEvaluator).
SPARSE_BATCH = 512
# ...fewer where rows go dense downstream (a deep MLP's later layers): their dense
# values of one batch should fit in about this many bytes. Measured with two tanh layers
# of 64×176 float64 per row (2-core Xeon, 4 MiB L2): 72–84 µs per row for 32–128 rows
# (2.8–11 MiB), 116 µs for 256 rows and 143 µs for 1024.
DENSE_ROWS_BYTES = 4 * 2**20
# The sparse path is left for plain vmap when its trace copies a one-entry change of at
# least this fraction of the leaf's size per row (the perturbation meets an op without a
# sparse rule while the leaf is still whole: a grouped convolution by it, a scan that
# carries it). Its rows would cost what vmap's do, in batches of SPARSE_BATCH rather
# than the dense layout's cache-sized ones. Measured on bench_arch.py's ~1e4 float64
# models before scans and convolutions had sparse rules: the RNN's check 3.7 → 2.1 s
# cold, the CNN's 4.3 → 3.2 s; the MLPs keep the sparse path.
WHOLE_LEAF_COPY = 1.0
# The last few errors that sent a leaf back to plain vmap (for tests and debugging).
SPARSE_FALLBACKS: list[str] = []


def choose_chunk(leaf_size: int, chunk_size: int | None) -> int:
    """Return the number of cost evaluations per vmapped batch for one leaf.

    Every evaluation holds its own perturbed copy of the leaf, so the batch is capped
    by a memory budget as well as by ``DEFAULT_BATCH_EVALS``; a small leaf gets a batch
    no larger than its first pass (2 evaluations per element) needs.
    """
    if chunk_size is not None:
        return max(1, int(chunk_size))
    by_memory = rows_in_budget(leaf_size)
    need = 1 << max(0, (2 * leaf_size - 1).bit_length())  # next power of two ≥ 2m
    return max(1, min(DEFAULT_BATCH_EVALS, by_memory, need))


def choose_layout(leaf_size: int, chunk_size: int | None, devices: int = 1) -> tuple[int, int]:
    """Return (rows per vmapped batch, batches per call) for a leaf.

    Small leaves keep one batch per call. A leaf of at least ``GROUPED_LEAF`` elements
    gets ``GROUPS`` smaller batches of ``LARGE_LEAF_BATCH`` rows walked by
    ``lax.map``: same memory bound, far less
    allocation churn and dispatch. With several devices the rows of a batch are split
    across them, so the batch is ``devices`` times larger and calls are not grouped.
    """
    if chunk_size is not None:
        return max(1, int(chunk_size)) * devices, 1
    c = choose_chunk(leaf_size, None)
    if devices > 1:
        return c * devices, 1
    if leaf_size >= GROUPED_LEAF:
        return min(c, LARGE_LEAF_BATCH), GROUPS
    if leaf_size >= MID_LEAF:
        return min(c, LARGE_LEAF_BATCH), 1
    return c, 1


class LeafEvaluator:
    """Evaluates ``cost(x)`` at ``x0`` with single elements offset, for one leaf.

    ``cost`` maps the flattened leaf (shape ``(m,)``) and ``operands`` (the other
    parameters and the data, passed as jit arguments) to a scalar or an array. Every
    request is a list of rows (element index, offset); rows of every stencil go
    through the same compiled function, so a leaf compiles once however many passes
    it needs.

    With ``lines`` (an array (L, m) of directions, real leaves only), the same program
    also evaluates ``cost(x0 + t·lines[l])`` for rows (l, t) (:meth:`along`): a check's
    noise probe then needs no program of its own.
    """

    def __init__(self, cost: Callable, x0: jax.Array, operands, *, chunk_size=None,
                 counter: Counter | None = None, complex_step: bool = False,
                 devices=None, fast_compile: bool | None = None, lines=None):
        self.m = x0.size
        self.lines = lines is not None
        self.counter = counter if counter is not None else Counter()
        self.shard = sharding.RowSharding.create(devices)
        ndev = self.shard.size if self.shard else 1
        self.rows, self.groups = choose_layout(self.m, chunk_size, ndev)
        if self.lines:
            operands = (operands, lines)
        if self.shard:
            x0, operands = self.shard.replicate((x0, operands))
        self.x0, self.operands = x0, operands

        def one(x, i, d, ops):
            if complex_step:
                x = x.astype(compat.result_type(x.dtype, jnp.complex64))
            # Only this leaf is copied and batched; the rest of the model is shared.
            return cost(x.at[i].set(x[i] + d), ops)

        def one_or_line(x, i, d, l, t, ops):
            ops, bank = ops
            # A row is an element offset (t = 0) or a point on line l (t ≠ 0), never both:
            # each keeps exactly the arithmetic it has alone (x + 0·v would turn a -0.0
            # element into +0.0).
            moved = jnp.where(t != 0, x + t * bank[l], x.at[i].set(x[i] + d))
            return cost(moved, ops)

        if self.lines:
            batch = jax.vmap(one_or_line, in_axes=(None, 0, 0, 0, 0, None))
        else:
            batch = jax.vmap(one, in_axes=(None, 0, 0, None))
        self.sparse = False
        if not complex_step and not self.lines and sparse.ENABLED and self.m >= SPARSE_LEAF:
            # Same values, without a dense copy of the leaf per row (see sparse.py). Any
            # failure to interpret the cost falls back to the plain vmap above.
            try:
                fast = sparse.batched_single_entry(cost, x0, operands)
                probe = (jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2,), x0.dtype))
                # Interpret once abstractly: an unsupported corner raises here, not later
                # inside a check. The cost was already traced by the interpreter, so the
                # expected shapes come from that trace (no second trace through vmap).
                got = jax.eval_shape(fast, x0, *probe, operands)
                want = [(2,) + tuple(o.shape) for o in jax.tree_util.tree_leaves(fast.out_shape)]
                if (jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(fast.out_shape)
                        and [tuple(a.shape) for a in jax.tree_util.tree_leaves(got)] == want
                        and fast.densified < WHOLE_LEAF_COPY * self.m):
                    batch, self.sparse = fast, True
            except Exception as e:  # noqa: BLE001 - any interpreter gap: use vmap
                SPARSE_FALLBACKS.append(f"{type(e).__name__}: {e}"[:500])
                del SPARSE_FALLBACKS[:-20]
        if self.sparse and chunk_size is None and not self.shard:
            # Rows are cheap on the sparse path, and the part of the cost shared by all
            # rows is computed once per batch: one large batch per call beats lax.map
            # over small ones (W1 of the 1e5 MLP: 7.6 µs per evaluation with 1024 rows,
            # 9.2 with 256, 15 with 8 × 32). Bounded by the memory budget in case an op
            # needs dense copies of the leaf.
            self.rows = int(np.clip(BATCH_ELEMENT_BUDGET // self.m, 16, SPARSE_BATCH))
            if batch.dense_row:
                fit = DENSE_ROWS_BYTES // (batch.dense_row * np.dtype(x0.dtype).itemsize)
                self.rows = int(np.clip(fit, 16, self.rows))
            self.groups = 1
        if fast_compile is None:
            fast_compile = not self.sparse and math.ceil(2 * self.m / self.per_call) <= FAST_CALLS
        # Applied through compiling.Ahead before the first call; the plain jit fallback
        # stays optimised.
        self._options = compiling.fast() if fast_compile and not self.shard else None
        self._delta_dtype = np.result_type(x0.dtype, np.complex64) if complex_step else x0.dtype
        self._single = jax.jit(batch)
        if self.groups > 1:
            def grouped(x, i, d, ops):
                return jax.lax.map(lambda r: batch(x, r[0], r[1], ops), (i, d))

            self._call = jax.jit(grouped)
        else:
            self._call = self._single

    def compile_ahead(self, background: bool = True) -> None:
        """Lower the evaluator now and compile it on a worker thread (compiling.Ahead).

        The first call waits for that compilation. Sharded evaluators compile on first
        call as before (their arguments carry shardings).
        """
        if self.shard or isinstance(self._call, compiling.Ahead):
            return
        shape = (self.groups, self.rows) if self.groups > 1 else (self.rows,)
        cols = [jax.ShapeDtypeStruct(shape, np.int32), jax.ShapeDtypeStruct(shape, self._delta_dtype)]
        if self.lines:
            cols += [jax.ShapeDtypeStruct(shape, np.int32), jax.ShapeDtypeStruct(shape, self.x0.dtype)]
        single = self._call is self._single
        self._call = compiling.Ahead(self._call, self.x0, *cols, self.operands,
                                     options=self._options, background=background)
        if single:
            self._single = self._call

    @property
    def per_call(self) -> int:
        return self.rows * self.groups

    def __call__(self, idx: np.ndarray, deltas: np.ndarray) -> np.ndarray:
        """Return the cost at x0 + deltas[k, j]·e_{idx[k]}.

        The result has shape ``deltas.shape + out_shape``: ``(n, p)`` for a scalar cost,
        ``(n, p, *shape)`` for a cost returning an array (Jacobian columns).
        """
        deltas = np.asarray(deltas)
        n, p = deltas.shape
        if n == 0:
            return np.zeros((0, p))
        if self._options and not isinstance(self._call, compiling.Ahead):
            self.compile_ahead(background=False)
        rows_i = np.repeat(np.asarray(idx, np.int32), p)
        rows_d = deltas.reshape(-1)
        cols = (rows_i, rows_d)
        if self.lines:  # element rows: t = 0
            cols += (np.zeros(rows_i.size, np.int32), np.zeros(rows_i.size, self.x0.dtype))
        if self.groups > 1 and rows_i.size <= self.rows * (self.groups // 2) and self.m >= SINGLE_BATCH_LEAF:
            # A short request (step pilots, refinement) on a huge leaf: padding it to a
            # whole lax.map call would cost more than compiling one plain batch.
            values = _run_rows(_Single(self), cols, rows_i.size)
        else:
            values = _run_rows(self, cols, rows_i.size)
        return values.reshape((n, p) + values.shape[1:])

    def along(self, line: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The cost at x0 + t[k]·lines[line[k]] for every k (built with ``lines``); a row
        with t = 0 is x0 itself."""
        t = np.asarray(t, self.x0.dtype).ravel()
        zeros = np.zeros(t.size, np.int32)
        cols = (zeros, np.zeros(t.size, self._delta_dtype), np.asarray(line, np.int32).ravel(), t)
        if self._options and not isinstance(self._call, compiling.Ahead):
            self.compile_ahead(background=False)
        return _run_rows(self, cols, t.size)

    def ready(self) -> None:
        """Wait until the program compiled ahead (if any) is built."""
        if isinstance(self._call, compiling.Ahead):
            self._call.wait()


class _Single:
    """View of a grouped LeafEvaluator that dispatches one plain batch per call."""

    def __init__(self, ev):
        self.rows, self.groups, self.shard, self.counter = ev.rows, 1, ev.shard, ev.counter
        self.x0, self.operands, self._call = ev.x0, ev.operands, ev._single

    per_call = LeafEvaluator.per_call


def _run_rows(ev, cols: tuple, total: int) -> np.ndarray:
    """Pad ``cols`` (arrays of length ``total``) to whole calls of ``ev``'s program, and
    run them through the one dispatch loop (:func:`_dispatch`)."""
    per = ev.per_call
    ncalls = math.ceil(total / per)
    pad = ncalls * per - total
    # Padding repeats the last row: a valid point, so no NaN/Inf from padding.
    cols = [np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in cols]
    shape = (ev.groups, ev.rows) if ev.groups > 1 else (ev.rows,)
    calls = [([c[k * per:(k + 1) * per].reshape(shape + c.shape[1:]) for c in cols], min(per, total - k * per))
             for k in range(ncalls)]
    return _dispatch(ev, ev._call, calls, len(shape))


def _dispatch(ev, program, calls: list, lead: int) -> np.ndarray:
    """The engine's one dispatch loop: ``program(ev.x0, *args, ev.operands)`` for every
    (args, rows) of ``calls``; returns the first ``rows`` values of each call (its ``lead``
    leading axes merged into one), in order, and counts them on ``ev.counter``.

    Dispatch is asynchronous: every call is queued before we block on the first result,
    and results are collected (and progress reported) in order. With a row sharding
    (``ev.shard``) each call's rows are split across the devices and gathered back.
    """
    outs = []
    values = []
    # Perturbed points may legitimately give a non-finite J: reported, never raised.
    with compat.float_checks_off():
        for args, rows in calls:
            args = ev.shard.split_rows(args) if ev.shard else jax.device_put(args)
            outs.append((program(ev.x0, *args, ev.operands), rows))
        for o, rows in outs:
            v = ev.shard.gather(o) if ev.shard else compat.host(o)
            # The leading axes merged by their sizes (not -1: an output of size 0 has no -1).
            values.append(v.reshape((int(np.prod(v.shape[:lead], dtype=np.int64)),) + v.shape[lead:])[:rows])
            ev.counter.add(rows)
    return np.concatenate(values)


class LineEvaluator:
    """Evaluates ``cost`` at points on lines through θ: a row (l, t) is θ + t·v_l.

    ``leaves`` is θ (the list of arrays the cost takes first) and ``bank`` the
    directions, an operand of the program: by default one array (L, *shape) per leaf,
    v_l = [b[l] for b in bank] (a bank of one line is not indexed, so a batch holds no
    copy of it per row); ``direction(l, bank)`` decodes any other bank (None for a leaf
    not moved). A leaf moves to x + (t·v).astype(x.dtype) with t cast to v's dtype first:
    the bank's dtype sets the precision of the product. Rows go through the engine's one
    dispatch loop (:func:`_run_rows`, which counts them): ``rows`` per vmapped batch,
    ``groups`` batches per call walked by ``lax.map``, every call of one shape, so the
    program compiles once (through the process's program cache, compiling.Ahead) however
    many rows a check asks for. The noise probes, the vector checks' direction bank,
    check_taylor's line and the directional passes all use it.
    """

    def __init__(self, cost: Callable, leaves, operands, bank, *, rows: int, groups: int = 1,
                 t_dtype=None, direction: Callable | None = None, counter: Counter | None = None,
                 options: dict | None = None):
        self.counter = counter if counter is not None else Counter()
        self.shard = None
        self.rows, self.groups = max(1, int(rows)), max(1, int(groups))
        self.x0, self.operands = list(leaves), (operands, bank)
        self.t_dtype = np.dtype(t_dtype if t_dtype is not None else compat.result_type(*[x.dtype for x in leaves]))
        if direction is None:
            def direction(l, bank):
                return [b[0] if b.shape[0] == 1 else b[l] for b in bank]

        def one(xs, l, t, ops):
            ops, bank = ops
            moved = [x if v is None else x + (t.astype(v.dtype) * v).astype(x.dtype)
                     for x, v in zip(xs, direction(l, bank))]
            return cost(moved, ops)

        batch = jax.vmap(one, in_axes=(None, 0, 0, None))
        if self.groups > 1:
            def grouped(xs, l, t, ops):
                return jax.lax.map(lambda r: batch(xs, r[0], r[1], ops), (l, t))

            program = jax.jit(grouped)
        else:
            program = jax.jit(batch)
        shape = (self.groups, self.rows) if self.groups > 1 else (self.rows,)
        self._call = compiling.Ahead(program, self.x0, jax.ShapeDtypeStruct(shape, np.int32),
                                     jax.ShapeDtypeStruct(shape, self.t_dtype), self.operands,
                                     options=options, background=False)

    per_call = LeafEvaluator.per_call

    def __call__(self, line, t, bank=None) -> np.ndarray:
        """The cost at θ + t[k]·v_{line[k]} for every k, shape (rows, *out). A ``bank`` given
        (same shapes and dtypes: the same program) replaces the one held, from now on."""
        t = np.asarray(t, self.t_dtype).ravel()
        line = np.broadcast_to(np.asarray(line, np.int32).ravel(), t.shape)
        if t.size == 0:
            return np.zeros((0,))
        if bank is not None:
            self.operands = (self.operands[0], bank)
        return _run_rows(self, (line, t), t.size)


class DirectionEvaluator:
    """Evaluates ``cost`` at θ + t·v for random directions v on index ranges of the parameters.

    The leaves are numbered as one flat index space (leaf after leaf). A row is
    (seed, lo, hi, t): the direction has v_i = ±s_i (pseudo-random signs from a hash of
    (i, seed, ``key``), s the per-element scale) for lo ≤ i < hi and 0 elsewhere, so a
    row may screen one leaf, or a sub-range of it while localising. Directions are
    generated on the device (no host memory however large the model; a hash compiles
    and runs far faster than a PRNG), and one compiled function serves every leaf and
    every range: a check compiles once however many leaves it screens. Leaves with
    ``movable[k]`` False (complex ones) are never moved.

    With the cost, every row also returns ⟨g, Δ⟩ for the representable perturbation
    Δ = (θ + t·v) − θ actually taken (one extra dot product per row).
    """

    def __init__(self, cost: Callable, leaves, operands, scales, *, grads, movable,
                 key: int = 0, rows: int = 16, counter: Counter | None = None, devices=None,
                 exact_dots: bool = True):
        self.counter = counter if counter is not None else Counter()
        # With several devices each batch's rows are split across them (as in
        # LeafEvaluator): a screen of k directions per leaf runs on every device.
        self.shard = sharding.RowSharding.create(devices)
        ndev = self.shard.size if self.shard else 1
        sizes = [int(np.size(x)) for x in leaves]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        n = int(self.offsets[-1])
        if n >= 2**31:
            raise ValueError("DirectionEvaluator: more than 2^31 parameters are not supported.")
        # J and the dots in float64 (float32 without x64), whatever the gradient's dtype.
        wide = compat.result_type(np.float64, *[np.asarray(g).dtype for g in grads])
        self.dtype = compat.result_type(*[x.dtype for x, mv in zip(leaves, movable) if mv] or [wide])
        # Built on the host and moved with device_put: eager jnp casts would each compile
        # a small program per shape. The gradient stays in its own dtype (cast inside the
        # dot). A scale given as one number s₀ stands for max(|θ_i|, s₀) (a non-finite θ_i
        # counting as 0), policy.coordinate_scale's form, computed on the device: no copy of
        # the scales there.
        aux = [(jax.device_put(np.asarray(s, x.dtype).reshape(() if np.ndim(s) == 0 else x.shape)),
                jax.device_put(np.asarray(g).reshape(x.shape))) if mv else None
               for x, s, g, mv in zip(leaves, scales, grads, movable)]
        # Each row holds a perturbed copy of the parameters and a direction.
        by_memory = rows_in_budget(2 * n)
        self.rows, self.groups = max(1, min(rows, by_memory)) * ndev, 1
        # Line layout, when a batch holds one row (past ~8e6 parameters, or memory short):
        # a call walks up to LINE_DIRS directions, building each once (its signs, one byte
        # an element) and walking its steps (LINE_STEPS at most).
        self.lines = by_memory == 1 and not self.shard
        # ``exact_dots`` False (line layout only): the second column is t·⟨g, v⟩ from one
        # dot per direction instead of ⟨g, Δ⟩ per step. On a big model that dot is a pass
        # over g, θ and θ + t·v per evaluation (≈20 ms of a 25 ms float64 evaluation of a
        # 9.3M-parameter MLP); the caller then bounds what the rounding of θ + t·v can
        # change (Δ − t·v is at most u·|θ + t·v| per element).
        self.exact_dots = exact_dots or not self.lines
        salt = np.uint32(key & 0xFFFFFFFF)
        offs = [int(o) for o in self.offsets[:-1]]

        def direction(xs, aux, seed, lo, hi):
            """The signs of v (int8, 0 off the range [lo, hi)): one byte an element, v itself
            (sign · scale) is formed inside each step's perturbation."""
            seed = seed.astype(jnp.uint32) ^ salt
            out = []
            for x, a, off in zip(xs, aux, offs):
                if a is None:
                    out.append(None)
                    continue
                i = jnp.arange(x.size, dtype=jnp.int32).reshape(x.shape) + off
                out.append(jnp.where((i >= lo) & (i < hi), signs(i.astype(jnp.uint32), seed, jnp.int8),
                                     jnp.zeros((), jnp.int8)))
            return out

        def vector(x, sign, a):
            s = a[0] if a[0].ndim else jnp.maximum(jnp.where(jnp.isfinite(x), jnp.abs(x), 0), a[0])
            return sign.astype(x.dtype) * s

        def dot_v(xs, sgns, aux):
            return sum(jnp.vdot(a[1].astype(wide), vector(x, sg, a).astype(wide))
                       for x, sg, a in zip(xs, sgns, aux) if a is not None)

        def at(xs, sgns, aux, t, argarr, gv=None):
            """(J, ⟨g, Δ⟩) at θ + t·v; with ``gv`` = ⟨g, v⟩ given, (J, t·⟨g, v⟩)."""
            moved, dots = [], []
            for x, sg, a in zip(xs, sgns, aux):
                if a is None:
                    moved.append(x)
                    continue
                # Explicit casts: strict promotion has no implicit path between dtypes.
                tv = compat.result_type(t.dtype, x.dtype)
                xm = x + (t.astype(tv) * vector(x, sg, a).astype(tv)).astype(x.dtype)
                moved.append(xm)
                if gv is None:
                    dots.append(jnp.vdot(a[1].astype(wide), (xm - x).astype(wide)))
            j = cost(moved, argarr)
            return jnp.stack([j.astype(wide), sum(dots) if gv is None else t.astype(wide) * gv])

        def one(xs, seed, lo, hi, t, ops):
            argarr, aux = ops
            return at(xs, direction(xs, aux, seed, lo, hi), aux, t, argarr)

        def line(xs, rows, walk, total, ops):
            """Step k walks direction dirs[k] at ts[k] (steps[k]: its step along that
            direction); the direction's signs are rebuilt where steps[k] is 0. One loop,
            not one per direction: nested loops copied the parameters into each loop's
            state (5 copies of them alive instead of 2)."""
            argarr, aux = ops
            (seeds, los, his), (ts, dirs, steps) = rows, walk

            def build(d):
                vs = direction(xs, aux, seeds[d], los[d], his[d])
                return vs, (jnp.zeros((), wide) if self.exact_dots else dot_v(xs, vs, aux))

            def step(k, carry):
                vs, gv, out = carry
                d = dirs[k]
                vs, gv = jax.lax.cond(steps[k] == 0, build, lambda _: (vs, gv), d)
                return vs, gv, out.at[k].set(at(xs, vs, aux, ts[k], argarr, None if self.exact_dots else gv))

            vs0, gv0 = build(dirs[0])
            return jax.lax.fori_loop(0, total, step, (vs0, gv0, jnp.zeros((LINE_DIRS * LINE_STEPS, 2), wide)))[2]

        self._call = jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0, None)))
        self.x0, self.operands = list(leaves), (operands, aux)
        if self.shard:
            self.x0, self.operands = self.shard.replicate((self.x0, self.operands))
        else:
            # Through the process's program cache (compiling.Ahead): a later check of the
            # same model and key, as a test suite makes, reuses the compiled screen.
            col = (lambda dtype: jax.ShapeDtypeStruct((self.rows,), dtype))
            if self.lines:
                per = (lambda dtype: jax.ShapeDtypeStruct((LINE_DIRS,), dtype))
                each = (lambda dtype: jax.ShapeDtypeStruct((LINE_DIRS * LINE_STEPS,), dtype))
                self._line = compiling.Ahead(jax.jit(line), self.x0, (per(np.uint32), per(np.int32), per(np.int32)),
                                             (each(self.dtype), each(np.int32), each(np.int32)),
                                             jax.ShapeDtypeStruct((), np.int32), self.operands, background=False)
            else:
                self._call = compiling.Ahead(self._call, self.x0, col(np.uint32), col(np.int32),
                                             col(np.int32), col(self.dtype), self.operands, background=False)

    per_call = LeafEvaluator.per_call

    def __call__(self, seed, lo, hi, t) -> tuple[np.ndarray, np.ndarray]:
        """Return (J, ⟨g, Δ⟩), each of shape (rows,), at θ + t_r·v_r for every row r.

        ``lo``/``hi`` are flat indices over all leaves (see ``offsets``). Norms of g∘v
        and v do not depend on the signs: take them from ``scales`` and ``grads``.
        """
        seed, lo, hi = (np.asarray(a, np.int64).ravel() for a in (seed, lo, hi))
        t = np.asarray(t, self.dtype).ravel()
        if seed.size == 0:
            return np.zeros(0), np.zeros(0)
        cols = (seed.astype(np.uint32), lo.astype(np.int32), hi.astype(np.int32), t)
        if self.lines:
            out = self._run_lines(*cols)
        else:
            out = _run_rows(self, cols, seed.size).astype(np.float64)
        return out[:, 0], out[:, 1]

    def _run_lines(self, seed, lo, hi, t) -> np.ndarray:
        """The line layout: runs of consecutive rows of one direction (same seed and range),
        LINE_STEPS at most each, LINE_DIRS runs per call, dispatched by :func:`_dispatch`."""
        new = np.flatnonzero(np.concatenate([[True], (seed[1:] != seed[:-1]) | (lo[1:] != lo[:-1])
                                             | (hi[1:] != hi[:-1])]))
        runs = []
        for a, b in zip(new, np.append(new[1:], seed.size)):
            runs += [(int(c), int(min(c + LINE_STEPS, b))) for c in range(a, b, LINE_STEPS)]
        calls = []
        size = LINE_DIRS * LINE_STEPS
        for call in (runs[c:c + LINE_DIRS] for c in range(0, len(runs), LINE_DIRS)):
            first = np.asarray([a for a, _ in call] + [call[-1][0]] * (LINE_DIRS - len(call)))
            ts, dirs, steps = np.zeros(size, t.dtype), np.zeros(size, np.int32), np.zeros(size, np.int32)
            k = 0
            for d, (a, b) in enumerate(call):
                ts[k:k + b - a], dirs[k:k + b - a], steps[k:k + b - a] = t[a:b], d, np.arange(b - a)
                k += b - a
            calls.append((((seed[first], lo[first], hi[first]), (ts, dirs, steps), np.int32(k)), k))
        # The engine's one dispatch loop and counter (the line layout is never sharded).
        return _dispatch(self, self._line, calls, 1).astype(np.float64)


def signs(i, seed, dtype):
    """±1 from a 32-bit integer hash of (i, seed) (a murmur3-style finaliser).

    The signs only need to be independent of the gradient error being searched for;
    a hash gives reproducible, well-mixed bits at the cost of a few integer ops.
    """
    h = i * jnp.uint32(0x9E3779B1) + seed * jnp.uint32(0x85EBCA77) + jnp.uint32(0xC2B2AE3D)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    h = h ^ (h >> 16)
    return (1 - 2 * (h >> 31).astype(jnp.int32)).astype(dtype)


def actual_steps(x0: np.ndarray, idx: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Return the representable offsets (x_i + δ) − x_i in the leaf's own dtype.

    Rounding θ_i + δ to the leaf's dtype changes the step that was really taken; using
    the representable difference removes that error from the quotient entirely.
    """
    base = x0[idx][:, None]
    return ((base + deltas.astype(x0.dtype)) - base).astype(deltas.dtype)
