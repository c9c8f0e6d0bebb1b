"""Run every benchmark and collect the results into benchmarks/RESULTS.md.

Each benchmark writes its own section under benchmarks/results/ (with its machine
facts and exact command); this script runs them one after another (never in
parallel: they time things) and concatenates the sections, headed by this machine's
facts and the command that made the file.

Run:  python benchmarks/run_all.py            (all, ~30 min on 2 quiet cores)
      python benchmarks/run_all.py --quick    (small sizes, a few minutes)
      python benchmarks/run_all.py --only verdicts optax   (a subset)
      python benchmarks/run_all.py --collect  (rebuild RESULTS.md from the sections only)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name: (script, extra arguments, whether it takes --quick)
BENCHES = {
    "speed": ("bench_speed.py", ["--peer-threads", "1"], True),
    "verdicts": ("bench_verdicts.py", [], True),
    "precision": ("bench_precision.py", [], True),
    "rules": ("bench_rules.py", [], False),
    "rules_found": ("bench_rules.py", ["--found"], False),
    "optax": ("bench_optax.py", [], True),
    "power": ("bench_power.py", [], True),
    "arch": ("bench_arch.py", [], True),
    "compile": ("bench_compile.py", [], False),
    # A test suite's cost: many small checks back to back, jgc next to JAX's checker.
    "suite": ("bench_suite.py", ["--one-direction"], True),
    # The whole harness corpus takes hours on 2 cores: a wall-time budget per x64 setting
    # (round-robin over primitives, so every primitive is covered).
    "harnesses": ("bench_harnesses.py", ["--budget", "1800"], True),
}
# Sections collected into RESULTS.md but not run from here: each needs inputs or time
# this script does not take (JAX's own test files at the installed tag, --jax-tests
# DIR; research-size models, an hour and most of the machine's memory; libraries that
# are not dependencies of jgc, for bench_real_rules.py; other libraries' test suites with
# the rules plugin, for bench_scan.py; an earlier commit's tree, for bench_rules_time.py
# --base COMMIT). Their own header names the command that made them.
COLLECTED_ONLY = ("jax_tests", "big", "real_rules", "scan", "rules_time")


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import jax

    cpu = cpu_name()
    return (f"{cpu}; {os.cpu_count()} cores; Python {platform.python_version()}; "
            f"jax {jax.__version__} ({jax.default_backend()}); {platform.platform()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=None)
    ap.add_argument("--collect", action="store_true", help="run nothing; rebuild RESULTS.md from the sections")
    ns = ap.parse_args(argv)
    names = [] if ns.collect else ns.only or list(BENCHES)
    failed = []
    for name in names:
        script, extra, quick = BENCHES[name]
        cmd = [sys.executable, str(HERE / script), *extra] + (["--quick"] if ns.quick and quick else [])
        print("::", " ".join(cmd), flush=True)
        # A benchmark that misses its own target exits non-zero after writing its
        # section: report it here and go on, so one run still collects everything.
        code = subprocess.run(cmd, check=False).returncode
        if code:
            failed.append(f"{script} exited {code}")
    cmd = "python benchmarks/run_all.py" + (" --quick" if ns.quick else "") + (
        " --only " + " ".join(ns.only) if ns.only else "") + (" --collect" if ns.collect else "")
    parts = [
        "# jgc benchmark results",
        "",
        f"Collected {datetime.date.today().isoformat()} by `{cmd}` on: {machine()}.",
        "Each section below names the exact command that produced it; sections not re-run",
        "by this command keep their earlier numbers (their own header says when and how).",
        "",
    ]
    if failed:
        parts += [f"**Not all benchmarks met their targets in this run: {'; '.join(failed)}** "
                  "(a benchmark exits 1 when a measured ratio is over its target; see its section).", ""]
    for name in (*BENCHES, *COLLECTED_ONLY):
        section = HERE / "results" / f"{name}.md"
        if section.exists():
            text = section.read_text().replace("](speed.png)", "](results/speed.png)")
            parts.append(text.replace("\n# ", "\n## ").replace("# ", "## ", 1))
            if name == "speed" and (HERE / "results" / "speed.png").exists() and "speed.png" not in text:
                parts.append("![full-mode time against n, with the floor](results/speed.png)")
            parts.append("")
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print("wrote", HERE / "RESULTS.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
