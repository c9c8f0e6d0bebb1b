"""jgc's pytest plugin (entry point ``pytest11``: ``jgc``): ``pytest --jgc-rules=PACKAGE``.

Records every custom derivative rule defined under PACKAGE that the tests run and checks
each one with :func:`jgc.check_rule` when the session ends (see docs/readme-scan.md).

pytest loads this module in every session of every project where jgc is installed, so it
stays light: it only adds the options. It imports neither jgc nor JAX, because importing
JAX before a project's conftest sets ``XLA_FLAGS`` or ``JAX_ENABLE_X64`` would change what
its tests see. Only when ``--jgc-rules`` is given does it load the recorder and the checks
(``jgc._src.pytest_plugin``) and register them as a plugin of their own.
"""

from __future__ import annotations

import importlib

# Seconds the checks after the session may take when --jgc-budget is not given: each
# check of a rule at one point compiles a few small programs (seconds on a CPU), so
# five minutes covers a package with tens of rules at a point or more each.
DEFAULT_BUDGET = 300.0
# Distinct captured calls checked per rule (different shapes, dtypes or magnitudes).
DEFAULT_POINTS = 3

_HOOKS = "jgc._src.pytest_plugin"


def pytest_addoption(parser):
    group = parser.getgroup("jgc", "jgc: check the custom derivative rules a package's tests run")
    group.addoption("--jgc-rules", metavar="PACKAGE", default=None,
                    help="record every custom_jvp / custom_vjp / custom_vmap rule defined under PACKAGE that the "
                         "tests run, and check each one after the session (jgc.check_rule)")
    group.addoption("--jgc-budget", metavar="SECONDS", type=float, default=DEFAULT_BUDGET,
                    help=f"wall time for the checks after the session (default {DEFAULT_BUDGET:g})")
    group.addoption("--jgc-points", metavar="N", type=int, default=DEFAULT_POINTS,
                    help=f"distinct captured calls checked per rule (default {DEFAULT_POINTS})")
    group.addoption("--jgc-checks", metavar="CHECK,...", default=None,
                    help="only these checks of jgc.check_rule, comma-separated (default all): primal, jvp, vjp, "
                         "dot-product, linearity, batching, order 2, symbolic zeros")
    group.addoption("--jgc-report", metavar="PATH.json", default=None, help="write the rules' verdicts as JSON")
    group.addoption("--jgc-known", metavar="PATH.json", default=None,
                    help="known failures: rules listed there do not fail the session")
    group.addoption("--jgc-write-known", metavar="PATH.json", default=None,
                    help="write the failing rules as a known-failures file")


def pytest_configure(config):
    if not config.getoption("--jgc-rules", None) or config.pluginmanager.has_plugin(_HOOKS):
        return
    # Registered now, its own pytest_configure runs at once (pytest replays that hook for
    # plugins registered late), and its other hooks take part in the rest of the session.
    config.pluginmanager.register(importlib.import_module(_HOOKS), _HOOKS)
