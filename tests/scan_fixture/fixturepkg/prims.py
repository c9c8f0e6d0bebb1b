"""Rules registered on primitives: a wrong JVP rule, and a right JVP rule with a wrong transpose rule."""

import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, mlir

# y = x³; its JVP rule says 2x² where the derivative is 3x².
cube_p = Primitive("fixture_cube")
cube_p.def_impl(lambda x: x ** 3)
cube_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(cube_p, mlir.lower_fun(lambda x: x ** 3, multiple_results=False))


def _cube_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return cube_p.bind(x), 2 * x ** 2 * t


ad.primitive_jvps[cube_p] = _cube_jvp

# y = 2x, linear: its JVP applies it to the tangent (right); its transpose returns 3·ct, not 2·ct.
double_p = Primitive("fixture_double")
double_p.def_impl(lambda x: 2 * x)
double_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(double_p, mlir.lower_fun(lambda x: 2 * x, multiple_results=False))


def _double_jvp(primals, tangents):
    return double_p.bind(*primals), double_p.bind(*tangents)


def _double_transpose(ct, x):
    assert ad.is_undefined_primal(x)
    return [3 * ct]


ad.primitive_jvps[double_p] = _double_jvp
ad.primitive_transposes[double_p] = _double_transpose


def prim_cube(x):
    return cube_p.bind(jnp.asarray(x))


def prim_double(x):
    return double_p.bind(jnp.asarray(x))
