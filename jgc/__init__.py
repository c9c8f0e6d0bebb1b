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

__all__ = [
    "GradCheckError",
    "LeafReport",
    "Report",
    "assert_grads_close",
    "check",
    "numerical_grad",
]

# -- Jacobians, JVP/VJP, custom rules, second order, check_grads drop-in (issue 5) --

# -- integrations: optax helper (issue 6) --

__version__ = "0.1.0"
