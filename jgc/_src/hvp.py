"""The second-order check: Hessian-vector products and higher directional derivatives.

The function under test is the gradient g(θ) = ∇f(θ, *args) (or, for order k > 2,
the (k−1)-th derivative along k−2 fixed random vectors); its JVP along random
tangents is compared with central differences of g, through the product checks of
``products.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import validate
from .names import function_name, short_name
from .preparation import prepare
from .products import DEFAULT_DIRECTIONS, Plan, run
from .report import Report
from .sampling import rng_from_key


def check_hvp(f: Callable, params: Any, *args, hvp: Callable | None = None, order: int = 2,
              key=None, num_directions: int = DEFAULT_DIRECTIONS, precision: str = "auto",
              rtol: float | None = None, atol: float | None = None, step: float | None = None,
              strict: bool = False, chunk_size: int | None = None, analytic: str = "native") -> Report:
    """Check Hessian-vector products (order=2) or higher directional derivatives of a scalar ``f``.

    With order=2 the function under test is the gradient g(θ) = ∇f(θ, *args); its JVP
    along v is the Hessian-vector product H·v, taken from ``jax.jvp(jax.grad(f))`` or a
    user ``hvp(params, v, *args)``, and compared with central differences of the
    gradient, (g(θ + h·v) − g(θ − h·v)) / 2h, element by element (see
    :func:`check_jvp`). With order=k > 2, g is the (k−1)-th derivative applied to k−2
    fixed random vectors, differentiated by ``jax.jvp``. Only floating leaves of
    ``params`` are differentiated.

    Args:
      f: the scalar cost ``f(params, *args)``.
      params: the point (any pytree).
      *args: data, never perturbed.
      hvp: None for ``jax.jvp(jax.grad(f))``, or ``hvp(params, v, *args)`` returning a
        pytree like params (order=2 only).
      order: 2 (Hessian-vector products) or higher.
      key, num_directions, precision, rtol, atol, step, strict, chunk_size: as in
        :func:`check_jvp`.
      analytic: "native" (default): the Hessian-vector products at the dtypes of
        params and args as given, as the program runs; "reference": at the reference's
        precision, as the finite differences of the gradient.

    Returns:
      A :class:`jgc.Report` with blocks ``grad[leaf] · t[params leaf]`` of shape
      ``(num_directions, *leaf shape)``.

    Example:
      >>> import jax.numpy as jnp, jgc
      >>> f = lambda p: jnp.sum(p ** 3)
      >>> jgc.check_hvp(f, jnp.array([1.0, 2.0]), hvp=lambda p, v: 6 * p * v).ok
      True
    """
    api = "jgc.check_hvp"
    validate.function(api, "f", f, "callable as f(params, *args) -> scalar")
    if not (isinstance(order, int) and not isinstance(order, bool) and order >= 2):
        raise ValueError(f"{api}: order must be an int ≥ 2 (2 checks Hessian-vector products), got {order!r}.")
    if hvp is not None and order != 2:
        raise ValueError(f"{api}: a user hvp can only be checked with order=2, got order={order}.")
    validate.function(api, "hvp", hvp, "a callable hvp(params, v, *args)", optional=True)
    opts = validate.options(api, precision=precision, rtol=rtol, atol=atol, step=step, strict=strict,
                            chunk_size=chunk_size, analytic=analytic)
    # The split of params from the record every check prepares (at the dtypes given).
    # Only params' split and shapes are read here: the data is left to products.run,
    # which prepares it once for the check (no copy of args made here).
    prep = prepare(params, (), widen=False, as_given=True, what=f"{api}: params", names=("parameters", "args"))
    split0, dyn0 = prep.split, prep.given
    rng = rng_from_key(key, api)
    seed = int(rng.integers(2**31))
    # Fixed vectors for the derivatives of order > 2 (drawn inside the trace from
    # constants, so every evaluation sees the same ones).
    fixed = [[np.random.default_rng([seed, j, i]).standard_normal(np.shape(x)) for i, x in enumerate(dyn0)]
             for j in range(order - 2)]

    def dyn_of(p):
        leaves = split0.treedef.flatten_up_to(p)
        return [leaves[i] for i in split0.dynamic_index]

    def as_tree(dl):
        leaves = [None] * len(split0.leaves)
        for pos, v in zip(split0.dynamic_index, dl):
            leaves[pos] = v
        return jax.tree_util.tree_unflatten(split0.treedef, leaves)

    def derivative(p, *a):
        """The (order−1)-th derivative of f along fixed vectors, as a tree like params."""
        def grad_dyn(d):
            return jax.grad(lambda dd: f(split0.combine(dd), *a))(d)

        g = grad_dyn
        for j in range(order - 2):
            def along(d, g=g, j=j):
                vs = [jnp.asarray(v, x.dtype) for v, x in zip(fixed[j], d)]
                return jax.jvp(g, (d,), (vs,))[1]
            g = along
        return as_tree(g(dyn_of(p)))

    user_jvp = None
    if hvp is not None:
        def user_jvp(primals, tangents):
            p, a = primals[0], primals[1:]
            res = hvp(p, tangents[0], *a)
            try:
                dl = dyn_of(res)
            except (ValueError, TypeError) as e:
                raise ValueError(
                    f"{api}: hvp(params, v, *args) must return a pytree shaped like params "
                    f"({split0.treedef}); got {jax.tree_util.tree_structure(res)}."
                ) from e
            return derivative(*primals), as_tree(dl)

    derivative.__qualname__ = f"{short_name(f)} (derivative of order {order - 1})"
    validate.count(api, "num_directions", num_directions)
    plan = Plan(api=api, jvp=True, user_jvp=user_jvp, key=seed, directions=num_directions, options=opts,
                problem={"argnums": 0, "in_label": lambda i: "params", "out_name": "grad"})
    rep = run(derivative, (params, *args), plan)[0]
    return dataclasses.replace(rep, mode=f"hvp (order {order}, {num_directions} directions per leaf)",
                               function=function_name(f))
