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
import jax.numpy as jnp
import numpy as np

from . import compat, compiling
from .names import short_name
from .vector_layout import zero_tangent


class NoForwardRule(TypeError):
    """f has no JVP (a ``jax.custom_vjp`` function): only reverse mode can be checked."""


class NoReverseRule(ValueError):
    """f has no VJP (e.g. ``lax.while_loop`` with a dynamic trip count)."""


# How JAX says that f has no reverse-mode derivative: a while_loop with a dynamic trip
# count, an op with a JVP but no transpose (reduce_window with a non-identity init
# value), custom_linear_solve without transpose_solve, a pure_callback in a JVP rule.
NO_REVERSE = ("Reverse-mode differentiation does not work",
              "does not support reverse-mode autodiff",
              "required for backwards mode automatic differentiation",
              "callbacks do not support transpose")


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


def jvp_batch(vp, user_jvp: Callable | None, from_bank: bool = False, broken_as_nan: bool = False):
    """Return g(T) = (J·t for each tangent t in the batch T), as (B, n_out) arrays.

    T is a list of per-leaf tangent batches, or (``from_bank``) an array of bank rows
    (see ``vp.set_bank``), evaluated in chunks. ``user_jvp(primals, tangents) ->
    (primals_out, tangents_out)`` follows ``jax.jvp``'s convention. ``broken_as_nan``:
    see :func:`_run`.
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
    # Runs once or twice a check: compiled without LLVM optimisation (see compiling.fast;
    # on a CPU this halved jgc.check_grads' time on small functions, most of it compiling).
    if from_bank:
        def one(b, bank, dyn, argarr):
            return one_t(vp.tangent_of(b, bank), dyn, argarr)
        vfn = compiling.jit_fast(jax.vmap(one, in_axes=(0, None, None, None)))

        def fn(rows, dyn, argarr):
            return vp.chunked(vfn, np.asarray(rows), vp.bank, dyn, argarr)
        unbatched = _Unbatched(lambda b, dyn, argarr: one(b, vp.bank, dyn, argarr), lambda rows: list(np.asarray(rows)))
    else:
        vfn = compiling.jit_fast(jax.vmap(one_t, in_axes=(0, None, None)))

        def fn(T, dyn, argarr):
            return vfn([jax.device_put(np.asarray(t)) if isinstance(t, np.ndarray) else t for t in T],
                       dyn, argarr)
        unbatched = _Unbatched(one_t, lambda T: [[t[b] for t in T] for b in range(np.shape(T[0])[0])])

    def nan_of(batch):
        return np.full((len(batch) if from_bank else np.shape(batch[0])[0], vp.n_out), np.nan)

    return _run(vp, fn, lambda tout: compat.host(tout).astype(np.float64), kind="JVP",
                user=None if user_jvp is None else "jvp", caught=TypeError, says=("custom_vjp",),
                missing=NoForwardRule, nan_of=nan_of, broken_as_nan=broken_as_nan, unbatched=unbatched)


def vjp_batch(vp, user_vjp: Callable | None, broken_as_nan: bool = False):
    """Return g(C) = per-leaf cotangents (B, *leaf) for a batch C (B, n_out) of real cotangents.

    ``user_vjp(*primals) -> (primals_out, vjp_fn)`` follows ``jax.vjp``'s convention;
    vjp_fn returns one cotangent per primal. ``broken_as_nan``: see :func:`_run`.
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
    # Runs once or twice a check: compiled without LLVM optimisation (see compiling.fast).
    vfn = compiling.jit_fast(jax.vmap(one, in_axes=(0, None, None)))

    def fn(C, dyn, argarr):
        return vfn(jax.device_put(np.asarray(C, vp.out_dtype)), dyn, argarr)
    unbatched = _Unbatched(one, lambda C: [jax.device_put(c) for c in np.asarray(C, vp.out_dtype)])
    def nan_of(C):
        return [np.full((len(C),) + tuple(d.shape), np.nan, d.dtype) for d in vp.dyn]

    return _run(vp, fn, lambda W: [compat.host(w) for w in W], kind="VJP",
                user=None if user_vjp is None else "vjp", caught=(ValueError, TypeError),
                says=NO_REVERSE, missing=NoReverseRule, nan_of=nan_of, broken_as_nan=broken_as_nan,
                unbatched=unbatched)


class _Unbatched:
    """The batched program's fallback: its rows one at a time, compiled (``jax.jit`` of
    one row), or uncompiled where compiling one row raises too.

    ``one(row, dyn, argarr)`` is the function that the batched program vmaps;
    ``rows_of(batch)`` splits a batch into its rows. Results are stacked as vmap
    stacks them. Used only after the batched program raised and JAX's own rule worked at
    the point (JAX's ``jax_enable_checks`` trips on a vmap of some ``custom_jvp`` rules
    with non-differentiable arguments, ``jax.scipy.special.log_ndtr`` for one).
    """

    def __init__(self, one: Callable, rows_of: Callable):
        self.one, self.rows_of = one, rows_of
        self.jitted = jax.jit(one)
        self.how: str | None = None  # "compiled" or "uncompiled", once chosen

    def __call__(self, batch, dyn, argarr):
        outs = []
        for row in self.rows_of(batch):
            if self.how != "uncompiled":
                try:
                    outs.append(self.jitted(row, dyn, argarr))
                    self.how = "compiled"
                    continue
                except Exception:  # noqa: BLE001 - the uncompiled row decides
                    if self.how == "compiled":
                        raise
                    self.how = "uncompiled"
            outs.append(self.one(row, dyn, argarr))
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)


def _run(vp, fn, finish: Callable, *, kind: str, user: str | None, caught, says: tuple, missing: type,
         nan_of: Callable, broken_as_nan: bool, unbatched: _Unbatched):
    """run(batch): ``fn(batch, dyn, argarr) -> (primal out, result)`` at the point, its
    primal output checked against f(x) (``user`` names the user's rule, None for JAX's),
    then ``finish(result)``.

    Without a user rule, an error of type ``caught`` with a phrase of ``says`` (JAX has
    no rule of this ``kind``) becomes ``missing`` (NoForwardRule, NoReverseRule). For
    any other error, JAX's own ``jax.jvp``/``jax.vjp`` of f is tried at the point
    without jit or vmap. If that raises too, the rule fails at the point: where JAX
    declares it missing ("not implemented", "not supported"), a VJP becomes
    NoReverseRule; otherwise the rule is broken, and with ``broken_as_nan`` its products
    are NaN (``nan_of(batch)``, which the judges call a mismatch wherever f is finite
    around x) with a note that quotes JAX's error. Every other error is raised with a
    note that says what was computed and whether batching or the rule is to blame.
    """
    eager_of = {}  # the error of the unbatched rule, asked once per run
    state = {"fn": fn}  # the batched program, or its fallback once that is needed

    def run(batch):
        try:
            prim, result = state["fn"](batch, vp.dyn, vp.argarr)
        except Exception as e:
            if user is None and isinstance(e, caught) and any(phrase in str(e) for phrase in says):
                raise missing(str(e)) from e
            name = short_name(vp.f)
            if user is None and not _tracing_error(e) and "e" not in eager_of:
                eager_of["e"] = _eager_error(vp, kind)
            eager = eager_of.get("e")
            if eager is _WORKS and state["fn"] is fn:
                try:
                    prim, result = unbatched(batch, vp.dyn, vp.argarr)
                except Exception:  # noqa: BLE001 - the batched program's error is the one to show
                    pass
                else:
                    state["fn"] = unbatched
                    vp.notes.append(
                        f"{kind}s of {name} computed one tangent at a time ({unbatched.how}): batched "
                        f"(jax.vmap) and compiled they raised {_quote(e)}, while JAX's own {kind} of "
                        f"{name} works at the point; the verdict is unchanged, only slower.")
                    vp.check_primal(compat.host(prim)[0], user, label=kind)
                    return finish(result)
            if eager is _WORKS:
                e.add_note(f"{vp.api}: raised while computing {kind}s of {name} batched (jax.vmap) and "
                           f"compiled (jax.jit); JAX's own {kind} of {name} works at the point without "
                           "them, so the error comes from batching or compiling f or its rule (a "
                           "jax.pure_callback without vmap_method, for instance).")
                raise
            if eager is None or _tracing_error(eager):
                e.add_note(f"{vp.api}: raised while computing {kind}s of {name}.")
                raise
            said = f"JAX's own {kind} of {name} raises at the point, eagerly too (no jit, no vmap): {_quote(eager)}"
            if kind == "VJP" and _declared_missing(eager):
                raise missing(str(eager)) from e
            if broken_as_nan and not _declared_missing(eager):
                note = f"{said}. Its {kind}s are taken as NaN, so they fail."
                if note not in vp.notes:  # once per run, not per batch
                    vp.notes.append(note)
                    vp.rule_errors.append(eager)
                return finish(nan_of(batch))
            e.add_note(f"{vp.api}: {said}; " + (f"JAX has no {kind} of f there." if _declared_missing(eager)
                                                 else f"the {kind} of f cannot be computed there."))
            raise
        vp.check_primal(compat.host(prim)[0], user, label=kind)
        return finish(result)
    return run


_WORKS = object()


def _eager_error(vp, kind: str):
    """The error JAX's own ``kind`` ("JVP" or "VJP") of f raises at the point without jit
    or vmap, or ``_WORKS``. Asked after the batched, compiled one raised: an error here
    means the rule itself fails at the point, not its batching or compilation."""
    def F(d):
        return vp.F(d, vp.argarr)

    try:
        if kind == "JVP":
            jax.jvp(F, (vp.dyn,), (jax.tree_util.tree_map(jnp.ones_like, vp.dyn),))
        else:
            out, pull = jax.vjp(F, vp.dyn)
            pull(jnp.ones_like(out))
    except Exception as again:  # noqa: BLE001 - any error of the rule is the question asked
        return again
    return _WORKS


def _tracing_error(e: Exception) -> bool:
    """Not a verdict on a rule: JAX's on f (a tracer turned into a NumPy array or a Python
    bool), or ``jax.debug_nans``/``debug_infs`` stopping at a non-finite value, which the
    user asked to see."""
    return isinstance(e, (jax.errors.JAXTypeError, jax.errors.JAXIndexError, FloatingPointError))


def _declared_missing(e: Exception) -> bool:
    """JAX says it has no such rule (a limitation it declares), rather than a rule that fails."""
    text = str(e).lower()
    return isinstance(e, NotImplementedError) or "not implemented" in text or "not supported" in text


def _quote(e: Exception) -> str:
    """``Type: first line of the message`` (cut at 240 characters)."""
    line = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else ""
    return type(e).__name__ + (f": {line[:240]}" + ("…" if len(line) > 240 else "") if line else "")
