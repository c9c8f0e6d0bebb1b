"""The analytic side of a scalar check: the gradient from ``jax.grad``, a callable or a given tree.

Whatever its source, the gradient is validated against the checked leaves (tree
structure, shape and dtype, with messages that name the leaf) and returned as one
NumPy array per perturbed leaf.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from collections.abc import Callable
from typing import Any, NamedTuple

from . import compat, compiling, policy, trees
from .preparation import cost_of, prepare
from .problem import Problem


def _is_gradient_tree(grad, split) -> bool:
    """True when a callable ``grad`` is itself a pytree shaped like params.

    An Equinox module of gradients is callable, yet it is a tree of gradients, not a
    gradient function: it is taken as a pytree when its structure matches params.
    """
    structure = jax.tree_util.tree_structure(grad)
    if jax.tree_util.treedef_is_leaf(structure):
        return False
    try:
        split.treedef.flatten_up_to(grad)
    except (ValueError, TypeError):
        return False
    return True


def _reads_as_gradient(tree, problem: Problem) -> bool:
    """True when ``tree`` has the structure of params with an array at every checked leaf."""
    try:
        per_leaf = problem.split.treedef.flatten_up_to(tree)
    except (ValueError, TypeError):
        return False
    return all(isinstance(per_leaf[pos], (np.ndarray, np.generic, jax.Array))
               for pos in problem.split.dynamic_index)


def _drop_grad_aux(tree, problem: Problem):
    """With has_aux, a grad callable returns the gradient or (gradient, aux): tell which.

    A pair whose first element reads as a gradient of params is (gradient, aux), as
    ``jax.grad(fn, has_aux=True)`` returns; anything else is the gradient. A plain
    gradient's first element is the gradient of params' first subtree, one level shallower
    than params, so it reads as a whole gradient only if the gradient holds a subtree
    where params has a non-array leaf.
    """
    if isinstance(tree, (tuple, list)) and len(tree) == 2 and _reads_as_gradient(tree[0], problem):
        return tree[0]
    return tree


def runs_natively(params, args, grad, precision: str) -> bool:
    """True when the analytic side at the dtypes given differs from it at the reference
    precision: some floating leaf of params or args is narrower than 64 bits, and the
    reference widens it (any precision but "native", or a bfloat16/float16 leaf, which
    the reference raises to float32 at least). A given gradient tree is as given anyway.
    """
    if grad is not None and not callable(grad):
        return False
    dtypes = [np.dtype(x.dtype) for x in jax.tree_util.tree_leaves((params, args)) if trees.is_inexact_array(x)]
    narrow = [d for d in dtypes if d != trees.wide_dtype(d)]
    return bool(narrow) and (precision != "native" or any(policy.unit_roundoff(d) > 1e-6 for d in narrow))


def native_gradient(fn: Callable, params, args: tuple, grad, *, has_aux: bool, api: str):
    """The analytic gradient as the user's program computes it: ``jax.grad`` of ``fn`` (or
    the ``grad`` callable) on params and args exactly as given, outside jgc's precision
    scope, so that its dtypes, the casts inside and the x64 setting are the user's own.

    Returns the gradient tree (``grad``'s result as returned; ``jax.grad``'s with the
    unchecked leaves of params in place), to be read by :func:`analytic_gradient`, or
    the exception it raised: the caller raises it once the check's own preparation has
    validated fn (a non-scalar or integer cost gets jgc's message, not jax.grad's).
    """
    try:
        return _native_gradient(fn, params, args, grad, has_aux=has_aux, api=api)
    except Exception as e:  # noqa: BLE001 - handed back, raised after validation
        return e


def _native_gradient(fn: Callable, params, args: tuple, grad, *, has_aux: bool, api: str):
    # The record every check prepares, at the dtypes given (nothing widened or raised):
    # the split, the leaves and data as passed, and each coordinate's scale.
    prep = prepare(params, args, widen=False, as_given=True, what=f"{api}: params", names=("parameters", "args"))
    split, dyn = prep.split, prep.given
    if grad is not None and _is_gradient_tree(grad, split):
        return None  # a given gradient tree (that happens to be callable): as given
    rebuild_args, argarr = prep.rebuild_args, prep.argarr

    def cost(d, a):
        return cost_of(fn(split.combine(d), *rebuild_args(a)), has_aux, api=api, fn=fn)

    # Runs once: compiled without LLVM optimisation, through the process's program
    # cache (compiling.Ahead), and called here, before the reference's scope. Under
    # debug_nans/debug_infs jax.jit itself runs it, and reports a non-finite gradient
    # as the FloatingPointError the user asked for.
    program = jax.jit(jax.value_and_grad(cost) if grad is None else cost)
    if not compat.float_checks_on():
        program = compiling.Ahead(program, dyn, argarr, options=compiling.fast())
    try:
        out = program(dyn, argarr)
    except Exception as e:
        e.add_note(f"{api}: raised while evaluating fn at the dtypes given.")
        raise
    u = max(policy.unit_roundoff(x.dtype) for x in jax.tree_util.tree_leaves((params, args))
            if trees.is_inexact_array(x))
    if grad is None:
        value, g0 = out[0], [compat.host(g) for g in out[1]]
        tree = split.combine(g0)

        def gradient_at(d):
            return list(program(d, argarr)[1])
    else:
        value = out
        try:
            tree = grad(params, *args)
        except Exception as e:
            e.add_note(f"{api}: raised while calling grad(params, *args).")
            raise

        def gradient_at(d):
            got = grad(split.combine(d), *args)
            if has_aux and isinstance(got, (tuple, list)) and len(got) == 2 and _same_structure(got[0], split):
                got = got[0]
            per = split.treedef.flatten_up_to(got)
            return [per[pos] for pos in split.dynamic_index]
        try:
            g0 = [compat.host(g) for g in gradient_at(dyn)]
            malformed = any(not np.issubdtype(np.asarray(g).dtype, np.inexact) or np.shape(g) != np.shape(x)
                            for g, x in zip(g0, dyn))
        except Exception:  # noqa: BLE001 - a malformed gradient: analytic_gradient says how
            malformed = True
        if malformed:
            return NativeSide(tree, float(np.real(compat.host(value))), u)
    spread = _spread(gradient_at, dyn, g0, prep.scales)
    return NativeSide(tree, float(np.real(compat.host(value))), u, spread, g0)


def _same_structure(tree, split) -> bool:
    try:
        split.treedef.flatten_up_to(tree)
    except (ValueError, TypeError):
        return False
    return True


def _spread(gradient_at: Callable, dyn: list, g0: list, scales) -> list | None:
    """Per checked leaf, the largest deviation of the gradient over a few nudged points
    (see policy.ANALYTIC_PROBES): a sample of its own rounding at the dtypes given.

    A nudge moves each coordinate by ANALYTIC_PROBE_ULPS round-offs of its scale
    ``scales`` (max(|θ_i|, rms of the leaf), the record's) in the leaf's own dtype. A deviation beyond
    ANALYTIC_JUMP·u times the largest |g| crossed a kink, not a rounding: 0 there.
    None for complex leaves (no nudge is defined here) or a gradient that raised.
    """
    if any(np.iscomplexobj(g) for g in g0):
        return None
    rng = np.random.default_rng(0)
    hosts = [compat.host(x) for x in dyn]
    us = [policy.unit_roundoff(x.dtype) for x in hosts]
    # In the gradient's own dtype (a float32 difference of two nearby float32 values is
    # exact): one copy of the parameters, not two at float64, on a research-size model.
    spread = [np.zeros(np.shape(g), np.result_type(g.dtype, np.float32)) for g in g0]
    for _ in range(policy.ANALYTIC_PROBES):
        moved = []
        for x, sc, u in zip(hosts, scales, us):
            nudge = policy.ANALYTIC_PROBE_ULPS * u * sc.reshape(x.shape) * rng.choice([-1.0, 1.0], x.shape)
            moved.append(jax.device_put((x.astype(np.float64) + nudge).astype(x.dtype)))
        try:
            g = gradient_at(moved)
        except Exception:  # noqa: BLE001 - no sample: judged without the analytic bar
            return None
        for k, (gk, g0k) in enumerate(zip(g, g0)):
            d = np.abs(compat.host(gk).astype(spread[k].dtype) - g0k.astype(spread[k].dtype))
            np.maximum(spread[k], np.where(np.isfinite(d), d, np.inf), out=spread[k])
    g_all = max((float(np.max(np.abs(g[np.isfinite(g)]), initial=0.0)) for g in g0), default=0.0)
    return [np.where(sp <= policy.ANALYTIC_JUMP * u * g_all, sp, 0.0) for sp, u in zip(spread, us)]


class NativeSide(NamedTuple):
    """The analytic side at the dtypes given: the gradient tree and the cost J there."""

    tree: Any
    value: float
    u: float  # unit round-off of the coarsest floating dtype among params and args
    # Per checked leaf, the gradient's own measured rounding (see _spread), or None.
    spread: list | None = None
    leaves: list | None = None  # the gradient per checked leaf (None: malformed, judged later)


def twin_differs(native: NativeSide, problem: Problem) -> str | None:
    """Why the reference's program is not the user's (a note), or None when it is.

    The reference evaluates the same code at another precision. Code whose values
    depend on x64 itself, not only on rounding (random bits drawn at the default float
    dtype, as dropout draws them; arrays created at the default dtype), computes another
    cost there: its gradient cannot be compared with the user's. Told apart by J at the
    point: a rounding difference stays within 2e3·u of the user's coarsest dtype
    (capped at 1e-2 relative: bfloat16 code rounds J by a few 1e-3) of the size of the
    terms J rounds at, plus 64σ of the reference's measured noise; another cost does
    not. Those terms are max(|J|, σ/u_ref): J = x₀ − logsumexp(x) is 6e-9 at a confident
    logit of 20, a difference of terms of 20 that float32 rounds to 0, and the
    reference's noise σ ≈ u_ref·|terms| measures them.
    """
    j_ref = float(np.real(problem.j0))
    terms = max(abs(j_ref), abs(native.value), float(problem.sigma) / problem.u)
    allowed = min(2e3 * native.u, 1e-2) * terms + 64.0 * float(problem.sigma)
    if not abs(native.value - j_ref) > allowed:  # NaN on either side: no verdict here
        return None
    return (f"the cost differs between the dtypes given and the reference's precision (J = "
            f"{native.value:.6g} against {j_ref:.6g}: randomness or arrays at the default dtype "
            "depend on x64), so the analytic side was evaluated at the reference's precision too, "
            "as with analytic='reference'.")


def analytic_scale(native: NativeSide | None, problem: Problem) -> float:
    """The scale of the terms the native gradient is summed from, in units of J: its
    absolute tolerance is 32·u of the dtype given times this, per unit of a coordinate's
    scale (see judge_leaf). 0 without a native side.

    The stand-in is the largest change of J per relative unit change of any coordinate,
    max_j |g_j|·s_j (scale-free). A cost that is a small difference of large terms has a
    second, per-element allowance: see :func:`cost_cancellation`.
    """
    if native is None or native.leaves is None:
        return 0.0
    # |g| in float64 first: NumPy 1.26 has no common dtype of bfloat16 and a Python float.
    mags = (np.where(np.isfinite(a), np.abs(a).astype(np.float64), 0.0) for a in native.leaves)
    return max((float(np.max(m.ravel() * s, initial=0.0)) for m, s in zip(mags, problem.scales)), default=0.0)


def cost_cancellation(native: NativeSide | None, problem: Problem) -> float:
    """How many times the terms the cost rounds at the dtypes given exceed the cost: at
    least 1, else |J_native − J_ref| / (u·|J_ref|).

    A confident cross-entropy J = 4e-9 is 1 − (1 − 4e-9) in float32, rounded to 0 from
    terms of 1 (a factor of about 1e7), and its float32 gradient pr − onehot, of 1e-8,
    rounds from the same terms: precision lost within the dtype's absolute scale
    (imprecise), not a wrong gradient. The judge lets each element lose this factor
    times 32·u of its own reference value, so the allowance follows the element: an
    absolute allowance from the whole cost's terms would cover every small element of a
    large model (whose J sums millions of terms) and hide a 1 % error in it.
    """
    if native is None:
        return 1.0
    j_ref = abs(float(np.real(problem.j0)))
    factor = abs(native.value - float(np.real(problem.j0))) / (native.u * j_ref) if j_ref > 0 else 1.0
    return max(1.0, factor) if math.isfinite(factor) else 1.0


def analytic_gradient(problem: Problem, grad, native=None) -> list:
    """Return the analytic gradient of every perturbed leaf, as NumPy arrays.

    ``native``: the gradient tree from :func:`native_gradient` (the analytic side as the
    user's program runs), used in place of ``jax.grad`` or a call of ``grad`` here.
    """
    api, split = problem.api, problem.split
    if grad is None and native is None:
        return [compat.host(x) for x in problem.gradient()]
    if grad is None:
        tree, what = native.tree, "jax.grad(fn)"
    elif callable(grad) and not _is_gradient_tree(grad, split):
        if native is not None:
            tree = native.tree
        else:
            try:
                tree = grad(split.combine(problem.dyn), *problem.rebuild_args(problem.argarr))
            except Exception as e:
                e.add_note(f"{api}: raised while calling grad(params, *args).")
                raise
        what = "grad(params, *args)"
        if problem.has_aux:
            tree = _drop_grad_aux(tree, problem)
    else:
        tree, what = grad, "grad"
    try:
        per_leaf = split.treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        got = jax.tree_util.tree_structure(tree)
        raise ValueError(
            f"{api}: {what} must have the tree structure of params.\n  params: "
            f"{split.treedef}\n  {what}: {got}\nReturn a pytree shaped like params "
            "(e.g. the same dict keys, list lengths and NamedTuple fields)"
            + (", or a pair (gradient, aux) with has_aux=True." if what != "grad" and problem.has_aux
               else ".")
        ) from e
    out = []
    for k, pos in enumerate(split.dynamic_index):
        path, x = problem.paths[k], problem.dyn[k]
        g = per_leaf[pos]
        if not isinstance(g, (np.ndarray, np.generic, jax.Array)):
            raise TypeError(
                f"{api}: {what} has {type(g).__name__} at leaf {path}, where params has a "
                f"{problem.orig_dtypes[k].name}{list(x.shape)} array; return an array of that shape."
            )
        if tuple(g.shape) != tuple(x.shape):
            raise ValueError(
                f"{api}: {what} at leaf {path} has shape {tuple(g.shape)}, but the parameter "
                f"has shape {tuple(x.shape)}. A gradient has the shape of its parameter "
                "(check for a transpose or a missing sum over the batch)."
            )
        gd = np.dtype(g.dtype)
        if gd not in (problem.orig_dtypes[k], problem.eval_dtypes[k]):
            raise TypeError(
                f"{api}: {what} at leaf {path} has dtype {gd.name}, but the parameter is "
                f"{problem.orig_dtypes[k].name}"
                + (f" (evaluated as {problem.eval_dtypes[k].name})" if problem.widen else "")
                + ". Return gradients in the parameter's dtype."
            )
        out.append(compat.host(g))
    return out

