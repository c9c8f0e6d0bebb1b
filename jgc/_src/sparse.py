"""Evaluate a batch of single-element perturbations of one leaf without copying the leaf.

``jax.vmap`` over θ + δ_k·e_{i_k} treats every perturbed copy of the leaf as a dense
array: a batch of c perturbations of a w×w weight matrix becomes c dense matrices and
c full matrix products, although each copy differs from θ in one entry. This module
evaluates the same batch by interpreting the cost's jaxpr with three kinds of values:

* ``Plain``: the same for every perturbation (computed once per batch, as under vmap);
* ``Batched``: one dense array per perturbation (what vmap would hold);
* ``Sparse``: one shared ``base`` array, and for perturbation k the values ``new[k]``
  at flat positions ``pos[k]`` (s positions each); elsewhere equal to ``base``.

The perturbed leaf enters as a Sparse value with s = 1. Elementwise operations,
reshapes, transposes, broadcasts, static slices and sums keep it Sparse at the cost of
touching the s changed entries. A matrix product of a one-entry Sparse operand with a
Plain one is the product of the bases plus a rank-one correction, δ times one row or
column of the other operand, so the changed entries of ``X @ (W + δ·e_ij)`` are one
column of 64 values, not a 64×w block and a w×w copy; a convolution by a kernel
changed in one entry is the base convolution plus δ times one input window, one output
feature map (``sparse_products.py``). A ``lax.scan`` closing over a Sparse value (an
RNN's weights) runs once for the whole batch, with a Batched carry: its products with
the Sparse weights are one shared product plus rank-one corrections, where vmap would
multiply c different weight copies. Anything else turns the Sparse value into dense
Batched copies and is evaluated as vmap would (the batching rule of
the primitive), so every cost is supported; the sparse rules only make it cheaper.

Numerically the two evaluations differ only in rounding: the shared base is rounded
once, and the correction adds the representable perturbation exactly as a product.
For a two-sided difference this cancels the base's rounding, which only helps.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from . import sparse_products
from .compat import bind
from .jaxprs import interpret
from .sparse_values import (
    DENSE_FRACTION,
    Batched,
    Plain,
    Sparse,
    as_batched,
    at,
    densify,
    ravel,
    trace,
    unravel,
)

# Off switch for A/B measurements and as a safety valve: JGC_SPARSE=0.
ENABLED = os.environ.get("JGC_SPARSE", "1") != "0"

UNARY = {
    "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan",
    "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "abs", "sign", "sqrt",
    "rsqrt", "cbrt", "integer_pow", "square", "erf", "erfc", "erf_inv", "lgamma", "digamma",
    "floor", "ceil", "round", "is_finite", "convert_element_type", "reduce_precision",
    "stop_gradient", "copy", "copy_p", "not", "real", "imag", "conj",
}
NARY = {
    "add", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem", "nextafter",
    "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "select_n", "clamp", "add_any",
}
SHAPE_ONLY = {"reshape", "squeeze", "expand_dims"}
CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
         "remat", "checkpoint"}


def _expand(x: Sparse, out_shape, dims):
    """Broadcast a Sparse value to ``out_shape``; operand dim d goes to output dim dims[d].

    Output dims not in ``dims``, and operand dims of size 1 stretched to a larger size,
    enumerate every coordinate: each changed entry becomes prod(sizes) changed entries.
    """
    index = unravel(x.pos, x.shape)
    fixed = {}
    for d, o in enumerate(dims):
        if x.shape[d] == out_shape[o]:
            fixed[o] = index[d]
    free = [o for o in range(len(out_shape)) if o not in fixed]
    k = int(np.prod([out_shape[o] for o in free])) if free else 1
    c, s = x.pos.shape
    if s * k > DENSE_FRACTION * max(1, int(np.prod(out_shape))):
        return None
    grids = np.indices([out_shape[o] for o in free]).reshape(len(free), -1) if free else np.zeros((0, 1), np.int32)
    out_index = []
    for o in range(len(out_shape)):
        if o in fixed:
            out_index.append(jnp.broadcast_to(fixed[o][:, :, None], (c, s, k)))
        else:
            g = jnp.asarray(grids[free.index(o)], jnp.int32)
            out_index.append(jnp.broadcast_to(g[None, None, :], (c, s, k)))
    pos = ravel(out_index, out_shape).reshape(c, s * k)
    new = jnp.broadcast_to(x.new[:, :, None], (c, s, k)).reshape(c, s * k)
    return pos, new


def _nary(eqn, vals):
    """Elementwise op with Sparse operands sharing their positions and Plain ones."""
    out_shape = tuple(eqn.outvars[0].aval.shape)
    pos = None
    expanded = []
    for v in vals:
        if isinstance(v, Sparse):
            if v.shape == out_shape:
                expanded.append((v.pos, v.new))
            else:
                pad = len(out_shape) - len(v.shape)
                e = _expand(v, out_shape, tuple(range(pad, len(out_shape))))
                if e is None:
                    return None
                expanded.append(e)
        else:
            expanded.append(None)
    for e in expanded:
        if e is not None:
            if pos is None:
                pos = e[0]
            elif e[0] is not pos:
                return None  # different positions: no shared sparsity
    if pos is None or any(isinstance(v, Batched) for v in vals):
        return None
    bases, news = [], []
    for v, e in zip(vals, expanded):
        if isinstance(v, Sparse):
            bases.append(v.base)
            news.append(e[1])
        else:
            bases.append(v.v)
            # Scalars (weakly typed literals included) are passed as they are, so the
            # primitive sees the same operand types as in the jaxpr.
            news.append(v.v if np.ndim(v.v) == 0 else at(jnp.broadcast_to(v.v, out_shape), pos))
    base = bind(eqn, *bases)
    new = bind(eqn, *news)
    return Sparse(base, pos, new)


def _scan(eqn, vals):
    """lax.scan closing over a Sparse value (the perturbed leaf is a constant of the body).

    Under vmap every row would carry its own dense copy of the leaf into the loop, and
    each step would multiply c different matrices by c hidden states. Here the loop
    runs once for the whole batch: its carry is Batched (c rows), the leaf stays Sparse
    inside the body, and its products take the sparse rules (one shared base product
    plus rank-one corrections, see ``sparse_products.dot_general``).
    """
    prm = eqn.params
    nc, nk = prm["num_consts"], prm["num_carry"]
    consts, init, xs = vals[:nc], vals[nc:nc + nk], vals[nc + nk:]
    sparse = [v for v in consts if isinstance(v, Sparse)]
    if not sparse:
        return None
    c = sparse[0].pos.shape[0]
    body = prm["jaxpr"]
    in_avals = [v.aval for v in body.jaxpr.invars]
    out_avals = [v.aval for v in body.jaxpr.outvars]
    carry0 = [as_batched(v, c, a) for v, a in zip(init, in_avals[nc:nc + nk])]
    plain_x = [isinstance(v, Plain) for v in xs]
    # Batched xs: the row axis goes second, so that the scan slices time, not rows.
    xs_in = [v.v if isinstance(v, Plain) else jnp.moveaxis(as_batched(v, c, a.update(
        shape=(prm["length"],) + tuple(a.shape))), 0, 1)
             for v, a in zip(xs, in_avals[nc + nk:])]

    def step(carry, x):
        xv = [Plain(xi) if p else Batched(xi) for xi, p in zip(x, plain_x)]
        outs = evaluate(body.jaxpr, [Plain(k) for k in body.consts], list(consts) + [Batched(h) for h in carry] + xv)
        new = [as_batched(o, c, a) for o, a in zip(outs[:nk], out_avals[:nk])]
        ys = [as_batched(o, c, a) for o, a in zip(outs[nk:], out_avals[nk:])]
        return new, ys

    carry, ys = jax.lax.scan(step, carry0, xs_in, length=prm["length"], reverse=prm["reverse"],
                             unroll=prm["unroll"])
    return [Batched(h) for h in carry] + [Batched(jnp.moveaxis(y, 0, 1)) for y in ys]


def _reduce_sum(eqn, x: Sparse):
    if x.pos.shape[1] != 1:
        return None
    axes = tuple(eqn.params["axes"])
    base = bind(eqn, x.base)
    index = unravel(x.pos, x.shape)
    keep = [d for d in range(len(x.shape)) if d not in axes]
    pos = ravel([index[d] for d in keep], base.shape) if keep else jnp.zeros_like(x.pos)
    old = at(x.base, x.pos)
    new = at(base, pos) + (x.new - old).astype(base.dtype)
    return Sparse(base, pos, new)


def _transpose(eqn, x: Sparse):
    perm = tuple(eqn.params["permutation"])
    base = bind(eqn, x.base)
    index = unravel(x.pos, x.shape)
    return Sparse(base, ravel([index[p] for p in perm], base.shape), x.new)


def _slice(eqn, x: Sparse):
    if x.pos.shape[1] != 1 or eqn.params.get("strides") not in (None, (1,) * len(x.shape)):
        return None
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    base = bind(eqn, x.base)
    index = unravel(x.pos, x.shape)
    inside = jnp.ones(x.pos.shape, bool)
    local = []
    for a, lo, hi in zip(index, start, limit):
        inside = inside & (a >= lo) & (a < hi)
        local.append(jnp.clip(a - lo, 0, max(hi - lo - 1, 0)))
    pos = jnp.where(inside, ravel(local, base.shape), 0)
    # Outside the slice the entry is a no-op: position 0 keeps its base value.
    new = jnp.where(inside, x.new, base.reshape(-1)[0]) if base.size else x.new
    return Sparse(base, pos, new)


def _broadcast(eqn, x: Sparse):
    out_shape = tuple(eqn.params["shape"])
    e = _expand(x, out_shape, tuple(eqn.params["broadcast_dimensions"]))
    if e is None:
        return None
    return Sparse(bind(eqn, x.base), *e)


def _call_jaxpr(eqn):
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(name)
        if isinstance(j, jcore.ClosedJaxpr):
            return j
    return None


def _generic(eqn, vals):
    """What vmap does: dense copies for Sparse inputs, the primitive's batching rule."""
    vals = [densify(v) if isinstance(v, Sparse) else v for v in vals]
    batched = [isinstance(v, Batched) for v in vals]
    args = [v.v for v in vals]
    prim = eqn.primitive
    if not any(batched):
        out = bind(eqn, *args)
        return [Plain(o) for o in out] if prim.multiple_results else [Plain(out)]
    fun = lambda *a: bind(eqn, *a)
    out = jax.vmap(fun, in_axes=[0 if b else None for b in batched])(*args)
    return [Batched(o) for o in out] if prim.multiple_results else [Batched(out)]


def _rule(eqn, vals):
    name = eqn.primitive.name
    if name in CALLS and not all(isinstance(v, Plain) for v in vals):
        # Inline calls (jit, custom_jvp/vjp: only the primal is evaluated here) so that
        # their insides see Sparse values too.
        inner = _call_jaxpr(eqn)
        if inner is not None and len(inner.jaxpr.invars) == len(vals):
            return evaluate(inner.jaxpr, [Plain(c) for c in inner.consts], vals)
    sp = [v for v in vals if isinstance(v, Sparse)]
    if not sp:
        return None
    if name == "scan":
        return _scan(eqn, vals)
    if name in UNARY and len(vals) == 1:
        x = vals[0]
        return [Sparse(bind(eqn, x.base), x.pos,
                       bind(eqn, x.new))]
    if name in NARY:
        r = _nary(eqn, vals)
        return None if r is None else [r]
    if name in SHAPE_ONLY and len(vals) == 1:
        x = vals[0]
        return [Sparse(bind(eqn, x.base), x.pos, x.new)]
    r = None
    if name == "dot_general" and len(vals) == 2 and len(sp) == 1:
        r = sparse_products.dot_general(eqn, *vals)
        return None if r is None else [r]
    elif name == "conv_general_dilated" and len(vals) == 2:
        r = sparse_products.conv(eqn, *vals)
    elif name == "reduce_sum" and len(vals) == 1:
        r = _reduce_sum(eqn, vals[0])
    elif name == "transpose":
        r = _transpose(eqn, vals[0])
    elif name == "slice":
        r = _slice(eqn, vals[0])
    elif name == "broadcast_in_dim" and len(vals) == 1:
        r = _broadcast(eqn, vals[0])
    return None if r is None else [r]


def evaluate(jaxpr, consts, args):
    """Interpret ``jaxpr`` on Plain/Batched/Sparse values; return its outputs."""

    def apply(eqn, vals):
        outs = _rule(eqn, vals)
        outs = _generic(eqn, vals) if outs is None else [_tidy(o) for o in outs]
        for o in outs:
            if isinstance(o, Batched) and o.v.ndim:
                trace.dense_row = max(getattr(trace, "dense_row", 0), int(o.v[0].size))
        return outs

    return interpret(jaxpr, consts, args, apply, literal=Plain)


def _tidy(x):
    """Keep a Sparse value only while it is much sparser than dense."""
    if isinstance(x, Sparse) and x.pos.shape[1] > DENSE_FRACTION * max(1, x.base.size):
        return densify(x)
    return x


def batched_single_entry(cost: Callable, x0, operands) -> Callable:
    """Return ``f(x, i, d, ops)`` = [cost(x.at[i_k].set(x[i_k] + d_k), ops) for k].

    Equivalent to ``jax.vmap(lambda x, i, d, ops: cost(x.at[i].set(x[i] + d), ops),
    in_axes=(None, 0, 0, None))`` for a flat leaf ``x`` (see the module docstring).
    """
    closed, out_shape = jax.make_jaxpr(cost, return_shape=True)(x0, operands)
    jaxpr, consts = closed.jaxpr, closed.consts
    out_tree = jax.tree_util.tree_structure(out_shape)

    def run(x, i, d, ops):
        c = i.shape[0]
        new = (x[i] + d.astype(x.dtype)).reshape(c, 1)
        leaves = jax.tree_util.tree_leaves(ops)
        args = [Sparse(x, i.astype(jnp.int32).reshape(c, 1), new)] + [Plain(a) for a in leaves]
        trace.densified = trace.dense_row = 0
        outs = evaluate(jaxpr, [Plain(v) for v in consts], args)
        run.densified, run.dense_row = trace.densified, trace.dense_row
        res = []
        for o, var in zip(outs, jaxpr.outvars):
            if isinstance(o, Sparse):
                o = densify(o)
            if isinstance(o, Plain):
                o = Batched(jnp.broadcast_to(o.v, (c,) + tuple(var.aval.shape)))
            res.append(o.v)
        return jax.tree_util.tree_unflatten(out_tree, res)

    run.out_shape = out_shape  # the cost's output for one row (from the jaxpr's trace)
    # Set by each trace of ``run``: the largest one-entry change it copied densely per row.
    # One as large as the leaf means the perturbation met an op without a sparse rule (a
    # scan carrying the leaf, a convolution by it) before it spread: every row then holds
    # a dense copy of the leaf, as under vmap.
    run.densified = 0
    # Also set by each trace: the largest value that went dense, in elements per row (rows
    # downstream of a layer that mixes the perturbed entry into every unit).
    run.dense_row = 0
    return run
