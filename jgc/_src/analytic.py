"""The analytic side of a scalar check: the gradient from ``jax.grad``, a callable or a given tree.

Whatever its source, the gradient is validated against the checked leaves (tree
structure, shape and dtype, with messages that name the leaf) and returned as one
NumPy array per perturbed leaf.
"""

from __future__ import annotations

import jax
import numpy as np

from . import compat
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


def analytic_gradient(problem: Problem, grad) -> list:
    """Return the analytic gradient of every perturbed leaf, as NumPy arrays."""
    api, split = problem.api, problem.split
    if grad is None:
        return [compat.host(x) for x in problem.gradient()]
    if callable(grad) and not _is_gradient_tree(grad, split):
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
