"""Every example runs, with small settings, and shows what it claims."""

import subprocess
import sys

from examples import lecture_network
from jgc._src import cli


def test_lecture_network_demo():
    out = lecture_network.main(steps=300, verbose=False)
    good, bad, costs = out["good"], out["bad"], out["costs"]
    # The course's 1e-9 is for double precision; the backprop runs in float32 as given.
    assert good.ok and good.normwise < 1e-6
    # The buggy backprop still lowers the cost ...
    assert costs[-1] < costs[0] and all(b <= a + 1e-6 for a, b in zip(costs, costs[1:]))
    # ... but jgc names the leaves and exactly the bias column (index [:, 0]).
    assert not bad.ok
    failing = {lf.path for lf in bad.failing()}
    assert failing == {"['Theta1']", "['Theta2']"}
    for lf in bad.failing():
        assert {idx[1] for idx in lf.elements("mismatch")} == {0}
        assert lf.worst_index[1] == 0


def test_jgc_demo_command_exit_code():
    assert cli.main(["demo", "--steps", "20"]) == 0


def test_module_entry_point_usage_error_exits_2():
    proc = subprocess.run([sys.executable, "-m", "jgc", "no-such-command"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
