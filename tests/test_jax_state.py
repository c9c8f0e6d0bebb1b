"""jgc leaves JAX as it found it: after every public entry point, the user's next lines
give what they give in a fresh process (values, dtypes, config, threads, environment).

Each x64 setting runs in a process of its own (tests/state_worker.py), so the checks'
float64 scope meets a process whose caches hold the user's float32 programs, and the
other way round.
"""

import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "state_worker.py")


@pytest.fixture(scope="module", params=["off", "on"], ids=["x64 off", "x64 on"])
def after_each_entry(request):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    proc = subprocess.run([sys.executable, WORKER, request.param], capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_fresh_battery_runs(after_each_entry):
    # The battery itself is sound: nothing in it raises in a process that ran no check.
    raised = {k: v for k, v in after_each_entry["fresh"].items() if v[0] == "raised"}
    assert not raised


def test_no_entry_point_changes_what_the_user_sees_next(after_each_entry):
    entries = after_each_entry["entries"]
    assert len(entries) >= 18
    problems = {name: r for name, r in entries.items()
                if r["raised"] or r["differs"] or r["threads"] or r["environment"]}
    assert not problems, json.dumps(problems, indent=1)[:6000]
