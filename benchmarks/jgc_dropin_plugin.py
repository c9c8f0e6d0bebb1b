"""pytest plugin for benchmarks/bench_jax_tests.py: chooses the gradient checker that
JAX's own test files call, and records every test's outcome.

Loaded with ``-p jgc_dropin_plugin`` (benchmarks/ on PYTHONPATH). It is imported before
any test module, so a test file that does ``from jax.test_util import check_grads`` at
import time gets the patched function too.

Environment:

* ``JGC_BENCH_CHECKER``: ``jgc`` puts ``jgc.check_grads`` in place of
  ``jax.test_util.check_grads`` and ``jax._src.test_util.check_grads`` (the one JAX's
  test files reach as ``jtu.check_grads``); ``jax`` keeps JAX's own function. Either way
  the function in place is wrapped by a counter, so each test records how many times it
  called the checker (a test that never calls it should behave the same in both runs).
* ``JGC_BENCH_OUT``: a file to which one JSON line per test is appended: node id,
  outcome (passed, failed, error, skipped, xfailed, xpassed), seconds (setup + call +
  teardown), checker calls, and for a failure its first message line, the innermost
  frame and the innermost frame inside jgc/ (which jgc code path raised).
"""

from __future__ import annotations

import functools
import json
import os
import traceback

import pytest

CHECKER = os.environ.get("JGC_BENCH_CHECKER", "jax")
OUT = os.environ.get("JGC_BENCH_OUT")

_calls = [0]
_state: dict = {}


def _counting(fn):
    @functools.wraps(fn)
    def check_grads(*args, **kwargs):
        _calls[0] += 1
        return fn(*args, **kwargs)

    return check_grads


def _install():
    import jax.test_util
    from jax._src import test_util as jtu

    if CHECKER == "jgc":
        import jgc

        target = jgc.check_grads
    elif CHECKER == "jax":
        target = jax.test_util.check_grads
    else:
        raise ValueError(f"JGC_BENCH_CHECKER must be 'jax' or 'jgc', not {CHECKER!r}")
    wrapped = _counting(target)
    jax.test_util.check_grads = wrapped
    jtu.check_grads = wrapped
    return target


_TARGET = _install()


def pytest_report_header(config):
    mod = getattr(_TARGET, "__module__", "?")
    return f"jgc_dropin_plugin: check_grads is {mod}.{_TARGET.__qualname__} ({CHECKER})"


def _short(path: str) -> str:
    for marker in ("site-packages" + os.sep, os.sep + "jgc" + os.sep, os.sep + "tests" + os.sep):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + len(marker):] if marker.startswith("site") else path[i + 1:]
    return path


def _frame(tb_entries, pred=lambda fs: True):
    for fs in reversed(tb_entries):
        if pred(fs):
            return f"{_short(fs.filename)}:{fs.lineno} in {fs.name}"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if call.excinfo is not None and rep.failed:
        exc = call.excinfo.value
        text = call.excinfo.exconly().strip().splitlines()
        first = next((line for line in text if line.strip()), "")
        entries = traceback.extract_tb(call.excinfo.tb)
        jgc_dir = os.sep + "jgc" + os.sep
        _state.setdefault(item.nodeid, {}).setdefault("failure", {
            "when": call.when,
            "type": type(exc).__name__,
            "message": first[:500],
            "frame": _frame(entries),
            "jgc_frame": _frame(entries, lambda fs: jgc_dir in fs.filename),
        })


def pytest_runtest_logreport(report):
    st = _state.setdefault(report.nodeid, {})
    st["seconds"] = st.get("seconds", 0.0) + (report.duration or 0.0)
    prev = st.get("outcome")
    if hasattr(report, "wasxfail"):
        out = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        out = "failed" if report.when == "call" else "error"
    elif report.skipped:
        out = "skipped"
        if report.longrepr and isinstance(report.longrepr, tuple):
            st.setdefault("skip_reason", str(report.longrepr[2])[:300])
    else:
        out = "passed"
    # The worst phase decides: an error in teardown turns a pass into an error.
    rank = {"passed": 0, "xfailed": 1, "skipped": 1, "xpassed": 2, "failed": 3, "error": 3}
    if prev is None or rank[out] > rank[prev]:
        st["outcome"] = out
    if report.when == "call":
        st["checker_calls"] = _calls[0]


def pytest_runtest_setup(item):
    _calls[0] = 0


def pytest_runtest_logfinish(nodeid, location):
    st = _state.pop(nodeid, {})
    if OUT is None:
        return
    row = {"test": nodeid.split("::", 1)[-1], "nodeid": nodeid, "outcome": st.get("outcome", "unknown"),
           "seconds": round(st.get("seconds", 0.0), 4), "checker_calls": st.get("checker_calls", _calls[0])}
    if "failure" in st:
        row["failure"] = st["failure"]
    if "skip_reason" in st:
        row["skip_reason"] = st["skip_reason"]
    with open(OUT, "a") as f:
        f.write(json.dumps(row) + "\n")
