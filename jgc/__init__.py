"""jgc: gradient checking for JAX that points at the wrong element.

``jgc.check(loss_fn, params, *args)`` compares the gradient your code computes with
two-sided finite differences of every parameter, vectorised and compiled, and returns
a report that names the leaf and index of anything that disagrees.
"""

# Scalar costs: the gradient against finite differences.
from ._src.api import assert_grads_close as assert_grads_close
from ._src.api import check as check
from ._src.check import numerical_grad as numerical_grad

# Jacobians, JVP/VJP, Hessian-vector products and the check_grads drop-in.
from ._src.check_grads import check_grads as check_grads
from ._src.errors import GradCheckError as GradCheckError
from ._src.hvp import check_hvp as check_hvp
from ._src.jacobian import check_jacobian as check_jacobian
from ._src.products import check_jvp as check_jvp
from ._src.products import check_vjp as check_vjp
from ._src.report import LeafReport as LeafReport
from ._src.report import Report as Report

# Custom derivative rules inside a loss, each checked on the inputs it receives.
from ._src.rules import check_rule as check_rule
from ._src.rules import approximate as approximate
from ._src.rules import check_rules as check_rules
from ._src.rules import intended as intended
from ._src.rules import RulesReport as RulesReport
from ._src.taylor import TaylorReport as TaylorReport
from ._src.taylor import check_taylor as check_taylor

# Training loops: check at chosen steps, then the plain step.
from ._src.training import with_grad_check as with_grad_check

__all__ = [
    "GradCheckError",
    "LeafReport",
    "Report",
    "RulesReport",
    "TaylorReport",
    "approximate",
    "assert_grads_close",
    "check",
    "check_grads",
    "check_hvp",
    "check_jacobian",
    "check_jvp",
    "check_rule",
    "check_rules",
    "check_taylor",
    "check_vjp",
    "intended",
    "numerical_grad",
    "with_grad_check",
]

__version__ = "0.1.0"
