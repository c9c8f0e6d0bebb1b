"""The pytest plugin: ``pytest --jgc-rules=PACKAGE`` checks every custom rule of PACKAGE its tests run.

The ``pytest11`` entry point ``jgc`` (the top-level module ``pytest_jgc``) adds the
options in every session and registers this module only when ``--jgc-rules`` is given.
The recording and the checks are :mod:`jgc._src.rules.scan`; this module holds the
hooks: installing the recorder for the session, the test each call
belongs to, the checks when the session ends (per pytest-xdist worker, merged by the
controller), the terminal summary, the JSON report, known failures and the exit status.
"""

from __future__ import annotations

import json
import time

import jax
import pytest

from .rules.scan import (
    Recorder,
    add_not_exercised,
    check_recorded,
    finish,
    merge,
    package_dirs,
    read_known,
    report_json,
    static_rules,
    summary_lines,
    unexpected,
    write_known,
)

_STATE = pytest.StashKey[dict]() if hasattr(pytest, "StashKey") else None


def _state(config) -> dict | None:
    return config.stash.get(_STATE, None) if _STATE is not None else getattr(config, "_jgc_scan", None)


def pytest_configure(config):
    package = config.getoption("--jgc-rules", None)
    if not package:
        return
    try:
        dirs = package_dirs(package)
    except (ValueError, ImportError) as e:
        raise pytest.UsageError(str(e)) from e
    rec = Recorder(package, dirs=dirs)
    state = {"recorder": rec, "dirs": dirs, "workers": [], "results": None, "seconds": 0.0, "notes": []}
    if _STATE is not None:
        config.stash[_STATE] = state
    else:
        config._jgc_scan = state
    rec.install()


def pytest_unconfigure(config):
    state = _state(config)
    if state is not None:
        state["recorder"].restore()  # already done at the end of the session; never twice harmful


def pytest_collection_finish(session):
    state = _state(session.config)
    if state is not None:
        state["recorder"].test_files = {str(getattr(item, "path", None) or item.fspath) for item in session.items}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    state = _state(item.config)
    if state is not None:
        state["recorder"].test = item.nodeid
        state["recorder"].watch_primitives()  # primitives the package registered since (cheap when none)
    try:
        yield
    finally:
        if state is not None:
            state["recorder"].test = ""


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """pytest-xdist: a worker's verdicts, merged by the controller at the end."""
    state = _state(node.config)
    out = getattr(node, "workeroutput", {}).get("jgc_rules")
    if state is not None and out:
        state["workers"].append(json.loads(out))


def _check(config, state) -> tuple[list, float, list]:
    rec = state["recorder"]
    t0 = time.perf_counter()
    # The checks run with JAX's default promotion rules, whatever the tests set.
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        checks = config.getoption("--jgc-checks")
        options = {"checks": [c.strip() for c in checks.split(",") if c.strip()]} if checks else {}
        results = check_recorded(rec, budget=config.getoption("--jgc-budget"),
                                 points=config.getoption("--jgc-points"), options=options)
    notes = [f"recording: {e}" for e in dict.fromkeys(rec.errors)][:5]
    if rec.test_doubles:
        shown = ", ".join(f"{r.name} ({r.where})" for r in rec.test_doubles[:5])
        notes.append(f"{len(rec.test_doubles)} rule(s) defined in the test modules themselves, test doubles "
                     f"rather than rules of the package, were not checked: {shown}")
    return results, time.perf_counter() - t0, notes


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    state = _state(config)
    if state is None:
        return
    state["recorder"].restore()
    results, seconds, notes = _check(config, state)
    if hasattr(config, "workerinput"):  # an xdist worker: the controller reports
        config.workeroutput["jgc_rules"] = json.dumps({"rules": results, "seconds": seconds, "notes": notes})
        return
    for w in state["workers"]:
        seconds = max(seconds, w["seconds"])
        notes += w["notes"]
    results = merge([results] + [w["rules"] for w in state["workers"]])
    results = add_not_exercised(results, static_rules(state["dirs"]))
    known = set()
    if config.getoption("--jgc-known"):
        try:
            known = read_known(config.getoption("--jgc-known"))
        except (OSError, ValueError) as e:
            notes.append(f"known failures not read: {e}")
    results = finish(results, known)
    state.update(results=results, seconds=seconds, notes=notes)
    package = state["recorder"].package
    if config.getoption("--jgc-report"):
        with open(config.getoption("--jgc-report"), "w", encoding="utf-8") as fh:
            json.dump(report_json(results, package=package, seconds=seconds, notes=notes), fh, indent=2)
            fh.write("\n")
    if config.getoption("--jgc-write-known"):
        write_known(config.getoption("--jgc-write-known"), results)
    if unexpected(results) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = _state(config)
    if state is None or state["results"] is None:
        return
    terminalreporter.section("jgc: custom rules")
    for line in summary_lines(state["results"], package=state["recorder"].package, seconds=state["seconds"],
                              notes=state["notes"]):
        terminalreporter.write_line(line)
    bad = unexpected(state["results"])
    if bad:
        terminalreporter.write_line(f"{len(bad)} wrong rule(s) not listed as known failures: the session fails.")
