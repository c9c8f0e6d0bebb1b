"""The analytic side of a vector-valued check: batched JVPs and VJPs, JAX's or the user's.

The functions here take a prepared :class:`jgc._src.vector.VectorProblem` (``vp``)
and return a batched function on its real view: ``jvp_batch`` maps tangents to J·t,
``vjp_batch`` maps real cotangents to per-leaf cotangents. A user rule follows
``jax.jvp``'s or ``jax.vjp``'s convention; without one, JAX's own rule of f is used.
The primal output of every batch is compared with f(x) (``vp.check_primal``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from . import compat
from .names import short_name
from .vector_layout import zero_tangent


class NoForwardRule(TypeError):
    """f has no JVP (a ``jax.custom_vjp`` function): only reverse mode can be checked."""


class NoReverseRule(ValueError):
    """f has no VJP (e.g. ``lax.while_loop`` with a dynamic trip count)."""


# How JAX says that f has no reverse-mode derivative: a while_loop with a dynamic trip
# count, an op with a JVP but no transpose (reduce_window with a non-identity init
# value), custom_linear_solve without transpose_solve.
NO_REVERSE = ("Reverse-mode differentiation does not work",
              "does not support reverse-mode autodiff",
              "required for backwards mode automatic differentiation")


def tangents_from(vp, tdyn) -> tuple:
    """Full tangent tuple for ``jax.jvp``-style user rules: zeros off the checked leaves."""
    prims = vp.primals_from(vp.dyn, vp.argarr)
    tang = [jax.tree_util.tree_map(zero_tangent, p) for p in prims]
    leaves = [zero_tangent(x) for x in vp.split.leaves]
    for pos, t in zip(vp.split.dynamic_index, tdyn):
        leaves[pos] = t
    tree = jax.tree_util.tree_unflatten(vp.split.treedef, leaves)
    for j, i in enumerate(vp.argnums):
        tang[i] = tree[j]
    return tuple(tang)


def jvp_batch(vp, user_jvp: Callable | None, from_bank: bool = False):
    """Return g(T) = (J·t for each tangent t in the batch T), as (B, n_out) arrays.

    T is a list of per-leaf tangent batches, or (``from_bank``) an array of bank rows
    (see ``vp.set_bank``), evaluated in chunks. ``user_jvp(primals, tangents) ->
    (primals_out, tangents_out)`` follows ``jax.jvp``'s convention.
    """
    if user_jvp is None:
        def one_t(t, dyn, argarr):
            return jax.jvp(lambda d: vp.F(d, argarr), (dyn,), (t,))
    else:
        def one_t(t, dyn, argarr):
            res = user_jvp(tuple(vp.primals_from(dyn, argarr)), tangents_from(vp, t))
            if not (isinstance(res, (tuple, list)) and len(res) == 2):
                raise TypeError(
                    f"{vp.api}: jvp(primals, tangents) must return a pair (primals_out, "
                    f"tangents_out) like jax.jvp, got {type(res).__name__}."
                )
            return vp.vec(res[0]), vp.vec(res[1])
    if from_bank:
        def one(b, bank, dyn, argarr):
            return one_t(vp.tangent_of(b, bank), dyn, argarr)
        vfn = jax.jit(jax.vmap(one, in_axes=(0, None, None, None)))

        def fn(rows, dyn, argarr):
            return vp.chunked(vfn, np.asarray(rows), vp.bank, dyn, argarr)
    else:
        vfn = jax.jit(jax.vmap(one_t, in_axes=(0, None, None)))

        def fn(T, dyn, argarr):
            return vfn([jax.device_put(np.asarray(t)) if isinstance(t, np.ndarray) else t for t in T],
                       dyn, argarr)

    return _run(vp, fn, lambda tout: compat.host(tout).astype(np.float64), kind="JVP",
                user=None if user_jvp is None else "jvp", caught=TypeError, says=("custom_vjp",),
                missing=NoForwardRule)


def vjp_batch(vp, user_vjp: Callable | None):
    """Return g(C) = per-leaf cotangents (B, *leaf) for a batch C (B, n_out) of real cotangents.

    ``user_vjp(*primals) -> (primals_out, vjp_fn)`` follows ``jax.vjp``'s convention;
    vjp_fn returns one cotangent per primal.
    """
    if user_vjp is None:
        def one(c, dyn, argarr):
            out, fn = jax.vjp(lambda d: vp.F(d, argarr), dyn)
            return out, fn(c)[0]
    else:
        def one(c, dyn, argarr):
            res = user_vjp(*vp.primals_from(dyn, argarr))
            if not (isinstance(res, (tuple, list)) and len(res) == 2 and callable(res[1])):
                raise TypeError(
                    f"{vp.api}: vjp(*primals) must return a pair (primals_out, vjp_fn) like "
                    f"jax.vjp, got {type(res).__name__}."
                )
            out, fn = res
            w = fn(vp.unvec_cotangent(c, out))
            w = tuple(w) if isinstance(w, (tuple, list)) else (w,)
            if len(w) != len(vp.primals):
                raise ValueError(
                    f"{vp.api}: vjp_fn returned {len(w)} cotangent(s) for {len(vp.primals)} "
                    "primals; return one per primal, as jax.vjp does."
                )
            per = vp.split.treedef.flatten_up_to(tuple(w[i] for i in vp.argnums))
            return vp.vec(out), [per[pos] for pos in vp.split.dynamic_index]
    vfn = jax.jit(jax.vmap(one, in_axes=(0, None, None)))

    def fn(C, dyn, argarr):
        return vfn(jax.device_put(np.asarray(C, vp.out_dtype)), dyn, argarr)
    return _run(vp, fn, lambda W: [compat.host(w) for w in W], kind="VJP",
                user=None if user_vjp is None else "vjp", caught=(ValueError, TypeError),
                says=NO_REVERSE, missing=NoReverseRule)


def _run(vp, fn, finish: Callable, *, kind: str, user: str | None, caught, says: tuple, missing: type):
    """run(batch): ``fn(batch, dyn, argarr) -> (primal out, result)`` at the point, its
    primal output checked against f(x) (``user`` names the user's rule, None for JAX's),
    then ``finish(result)``.

    Without a user rule, an error of type ``caught`` with a phrase of ``says`` (JAX has
    no rule of this ``kind``) becomes ``missing`` (NoForwardRule, NoReverseRule); other
    such errors get a note.
    """
    def run(batch):
        try:
            prim, result = fn(batch, vp.dyn, vp.argarr)
            vp.check_primal(compat.host(prim)[0], user, label=kind)
            return finish(result)
        except caught as e:
            if user is None and any(phrase in str(e) for phrase in says):
                raise missing(str(e)) from e
            e.add_note(f"{vp.api}: raised while computing {kind}s of {short_name(vp.f)}.")
            raise
    return run
