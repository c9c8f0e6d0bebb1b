"""Two processes with 2 CPU devices each, joined by jax.distributed on 127.0.0.1.

Each process runs tests/multiprocess_worker.py: full, directional and sparse checks (with
a planted bug), every batch spread over the 4 devices of both processes. Each process
must get the report that one process with 4 devices gets, and a check whose data differ
between the processes must be refused.
"""

import json
import os
import socket
import subprocess
import sys

import multiprocess_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Wall-clock bound of the three processes, against a hang (a peer that never joins): they
# take about 35 s of CPU time in all, 2 minutes of wall time on a 2-core CPU loaded ~10x.
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_ENABLE_X64", None)
    return env


def _run(tmp_path):
    """Start the two joined processes (2 devices each) and one lone process with 4 devices.

    All three run at once; returns their results (process 0, process 1, the lone one).
    """
    port = _free_port()
    runs = [(0, 2, 2), (1, 2, 2), (0, 1, 4)]  # (process id, processes, devices each)
    names = ["process0", "process1", "single"]
    outs = [tmp_path / f"{n}.json" for n in names]
    procs = []
    try:
        for (pid, nproc, ndev), name, out in zip(runs, names, outs):
            with open(tmp_path / f"{name}.log", "w") as log:  # the child keeps its own handle
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(pid), str(nproc),
                     str(port), str(out)], env=_env(ndev), stdout=log, stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:  # nothing is left running, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    text = "\n".join(f"--- {n}\n" + (tmp_path / f"{n}.log").read_text()[-4000:] for n in names)
    assert codes is not None, f"processes did not finish in {TIMEOUT_S} s\n{text}"
    assert codes == [0] * len(runs), text
    return [json.loads(o.read_text()) for o in outs]


def test_two_processes_get_the_single_process_reports(tmp_path):
    *pair, single = _run(tmp_path)
    for r in pair:
        # Every batch was laid on one mesh of the 4 devices of both processes.
        assert r["layout"] == {"processes": 2, "mesh_devices": 4, "mesh_processes": [0, 1]}
    assert single["layout"] == {"processes": 1, "mesh_devices": 4, "mesh_processes": [0]}
    # Each process holds the report of one process with the same 4 devices, bit for bit:
    # verdicts, statuses, worst elements, values, evaluations, notes.
    reports = single["reports"]
    assert sorted(reports) == ["directional_bug", "full", "full_bug", "sparse_bug"]
    assert pair[0]["reports"] == reports
    assert pair[1]["reports"] == reports
    # Data that differ between processes are refused with a clear error, in every process.
    for r in pair:
        assert "differ between processes" in r["differing_data"], r["differing_data"]
    leaf, index = worker.BUG_AT
    assert reports["full"]["ok"]
    for name in ("full_bug", "directional_bug", "sparse_bug"):
        rep = reports[name]
        assert not rep["ok"], name
        bad = [lf for lf in rep["leaves"] if lf["status"] == "mismatch"]
        assert [lf["path"] for lf in bad] == [leaf], name
        assert bad[0]["worst_index"] == list(index) and bad[0]["mismatched_indices"] == [list(index)], name
