"""jgc: gradient checking for JAX that points at the wrong element.

``jgc.check(loss_fn, params, *args)`` compares the gradient your code computes with
two-sided finite differences of every parameter, vectorised and compiled, and returns
a report that names the leaf and index of anything that disagrees.
"""

from ._src.check import assert_grads_close as assert_grads_close
from ._src.check import check as check
from ._src.check import numerical_grad as numerical_grad
from ._src.errors import GradCheckError as GradCheckError
from ._src.report import LeafReport as LeafReport
from ._src.report import Report as Report
from ._src.taylor import TaylorReport as TaylorReport
from ._src.taylor import check_taylor as check_taylor

__all__ = [
    "GradCheckError",
    "LeafReport",
    "Report",
    "TaylorReport",
    "assert_grads_close",
    "check",
    "check_taylor",
    "numerical_grad",
]

# -- Jacobians, JVP/VJP, custom rules, second order, check_grads drop-in (issue 5) --
from ._src.jacobian import check_hvp as check_hvp  # noqa: E402
from ._src.jacobian import check_jacobian as check_jacobian  # noqa: E402
from ._src.jacobian import check_jvp as check_jvp  # noqa: E402
from ._src.jacobian import check_vjp as check_vjp  # noqa: E402
from ._src.test_util import check_grads as check_grads  # noqa: E402

__all__ += ["check_grads", "check_hvp", "check_jacobian", "check_jvp", "check_vjp"]

# -- integrations: optax helper (issue 6) --
from ._src.training import with_grad_check as with_grad_check

__all__ += ["with_grad_check"]

# -- custom rules inside a loss --
from ._src.rules import check_rules as check_rules  # noqa: E402
from ._src.rules import intended as intended  # noqa: E402
from ._src.rules_report import RulesReport as RulesReport  # noqa: E402

__all__ += ["RulesReport", "check_rules", "intended"]

__version__ = "0.1.0"
