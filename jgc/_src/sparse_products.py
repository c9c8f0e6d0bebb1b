"""Sparse rules for products: matrix products and convolutions with a perturbed operand.

Part of the sparse evaluator (``sparse.py``). A product with one operand that differs
from its base in one entry per row is the base product plus that entry's contribution,
δ times a slab of the other operand: one row or column for a matrix product, one input
window for a convolution. Each rule returns None where it does not apply, and the
evaluator falls back to dense rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .compat import bind
from .sparse_values import DENSE_FRACTION, Batched, Plain, Sparse, at, ravel, unravel


def dot_general(eqn, lhs, rhs):
    """dot_general of a Sparse operand and a Plain or Batched one: base product plus corrections.

    Each changed entry (δ = new − old at batch/contraction/free coordinates a) adds δ
    times the other operand's slab at (a_batch, a_contraction) to the output at
    (a_batch, a_free, every free coordinate of the other operand). With a Plain other
    operand and one entry the result stays Sparse; with several, entries may hit the
    same outputs, so the corrections are scatter-added into dense copies of the base
    product. With a Batched other operand (an RNN's perturbed recurrent matrix times its
    per-row hidden states) the base is multiplied with every row's operand in one large
    product, not c small ones, and each row's corrections use its own operand's slab.
    """
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    sp_is_lhs = isinstance(lhs, Sparse)
    sp, other = (lhs, rhs) if sp_is_lhs else (rhs, lhs)
    if not isinstance(other, (Plain, Batched)):
        return None
    batched = isinstance(other, Batched)
    sc, oc = (lc, rc) if sp_is_lhs else (rc, lc)
    sb, ob = (lb, rb) if sp_is_lhs else (rb, lb)
    o = jnp.asarray(other.v)  # Batched: (c, *operand)
    lead = 1 if batched else 0
    size = [o.shape[lead + d] for d in range(o.ndim - lead)]
    ofree = [d for d in range(len(size)) if d not in oc and d not in ob]
    sfree = [d for d in range(len(sp.shape)) if d not in sc and d not in sb]
    c, s = sp.pos.shape
    k = int(np.prod([size[d] for d in ofree])) if ofree else 1
    out_shape = tuple(eqn.outvars[0].aval.shape)
    out_size = int(np.prod(out_shape))
    contraction = int(np.prod([size[d] for d in oc])) if oc else 1
    if not batched and s == 1 and k > DENSE_FRACTION * max(1, out_size):
        return None
    if (batched or s > 1) and s * k > out_size * contraction // 4:
        return None  # corrections would cost about as much as dense products

    def product(r):
        return bind(eqn, sp.base, r) if sp_is_lhs else bind(eqn, r, sp.base)

    base_out = jax.vmap(product)(o) if batched else product(o)
    index = unravel(sp.pos, sp.shape)  # each (c, s)
    delta = (sp.new - at(sp.base, sp.pos)).astype(base_out.dtype)
    # The other operand's slab at each entry's batch and contraction coordinates.
    ot = jnp.transpose(o, list(range(lead)) + [lead + d for d in list(ob) + list(oc) + ofree])
    rows = (jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[:, None], (c, s)),) if batched else ()
    slab = ot[rows + tuple(index[d] for d in sb) + tuple(index[d] for d in sc)]  # (c, s, *ofree)
    corr = (delta.reshape((c, s) + (1,) * len(ofree)) * slab.astype(base_out.dtype)).reshape(c, s * k)
    grids = np.indices([size[d] for d in ofree]).reshape(len(ofree), -1) if ofree else np.zeros((0, 1))
    fixed_b = [jnp.broadcast_to(index[d][:, :, None], (c, s, k)) for d in sb]
    fixed_f = [jnp.broadcast_to(index[d][:, :, None], (c, s, k)) for d in sfree]
    enum = [jnp.broadcast_to(jnp.asarray(g, jnp.int32)[None, None, :], (c, s, k)) for g in grids]
    out_index = fixed_b + (fixed_f + enum if sp_is_lhs else enum + fixed_f)
    pos = ravel(out_index, out_shape).reshape(c, s * k)
    if not batched and s == 1:
        return Sparse(base_out, pos, at(base_out, pos) + corr)
    dense = base_out.reshape(c, -1) if batched else jnp.broadcast_to(base_out.reshape(-1), (c, out_size))
    dense = dense.at[jnp.arange(c, dtype=jnp.int32)[:, None], pos].add(corr)
    return Batched(dense.reshape((c,) + out_shape))


def conv(eqn, lhs, rhs):
    """conv_general_dilated of Plain input by a one-entry Sparse kernel: the base
    convolution plus, per row, δ times the input window that the changed kernel entry
    (output feature o, input feature i, offset k) meets, one output feature map. Sparse."""
    prm = eqn.params
    dn = prm["dimension_numbers"]
    if (not isinstance(rhs, Sparse) or not isinstance(lhs, Plain) or rhs.pos.shape[1] != 1
            or prm["feature_group_count"] != 1 or prm["batch_group_count"] != 1
            or any(d != 1 for d in prm["lhs_dilation"]) or any(lo < 0 or hi < 0 for lo, hi in prm["padding"])):
        return None
    c = rhs.pos.shape[0]
    base_out = bind(eqn, lhs.v, rhs.base)
    out_shape = base_out.shape
    index = [a[:, 0] for a in unravel(rhs.pos, rhs.shape)]  # each (c,)
    o_k, i_k = index[dn.rhs_spec[0]], index[dn.rhs_spec[1]]
    k_sp = [index[d] for d in dn.rhs_spec[2:]]
    x = jnp.transpose(lhs.v, dn.lhs_spec)  # (N, C, *spatial)
    x = jnp.pad(x, [(0, 0), (0, 0)] + [tuple(p) for p in prm["padding"]])
    out_sp = [out_shape[d] for d in dn.out_spec[2:]]
    strides, dil = prm["window_strides"], prm["rhs_dilation"]

    def window(i, ks):
        xi = jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)  # (N, *spatial)
        start = [jnp.zeros((), jnp.int32)] + [k * d for k, d in zip(ks, dil)]
        size = [x.shape[0]] + [(n - 1) * st + 1 for n, st in zip(out_sp, strides)]
        w = jax.lax.dynamic_slice(xi, start, size)
        return w[(slice(None),) + tuple(slice(None, None, st) for st in strides)]  # (N, *out_sp)

    windows = jax.vmap(window)(i_k, jnp.stack(k_sp, axis=1) if k_sp else jnp.zeros((c, 0), jnp.int32))
    delta = (rhs.new[:, 0] - at(rhs.base, rhs.pos[:, 0])).astype(base_out.dtype)
    corr = (delta.reshape((c,) + (1,) * (windows.ndim - 1)) * windows.astype(base_out.dtype)).reshape(c, -1)
    grid = np.indices([out_shape[dn.out_spec[0]]] + out_sp).reshape(1 + len(out_sp), -1)
    m = grid.shape[1]
    out_index = [None] * len(out_shape)
    out_index[dn.out_spec[0]] = jnp.broadcast_to(jnp.asarray(grid[0], jnp.int32), (c, m))
    out_index[dn.out_spec[1]] = jnp.broadcast_to(o_k[:, None], (c, m))
    for j, d in enumerate(dn.out_spec[2:]):
        out_index[d] = jnp.broadcast_to(jnp.asarray(grid[1 + j], jnp.int32), (c, m))
    pos = ravel(out_index, out_shape)
    return Sparse(base_out, pos, at(base_out, pos) + corr)
