"""CPU time of ``jgc.check_rules`` at its defaults, this tree against an earlier commit.

Each run is a fresh process that imports one tree's ``jgc`` (checked by ``jgc.__file__``)
and calls ``jgc.check_rules`` once on every loss of ``benchmarks/bench_rules.py``'s
``found_examples()`` (from the same tree), timing each call with ``time.process_time``:
CPU time, tracing and compilation included, as a user pays it. The two trees alternate
(base, this, base, this, ...) so that a change in the machine's load touches both alike;
the ratio is of the sums. The earlier commit is checked out as a git worktree in a
temporary directory and removed afterwards.

Usage::

    python benchmarks/bench_rules_time.py --base e017996 --rounds 3

writes ``benchmarks/results/rules_time.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The child: one tree's check_rules on its own found examples; prints "name<TAB>cpu" lines.
CHILD = r"""
import importlib.util, os, sys, time
root = sys.argv[1]
sys.path.insert(0, root)
spec = importlib.util.spec_from_file_location("bench_rules", os.path.join(root, "benchmarks", "bench_rules.py"))
br = importlib.util.module_from_spec(spec)
spec.loader.exec_module(br)
import jgc
assert os.path.realpath(jgc.__file__).startswith(os.path.realpath(root)), jgc.__file__
for name, loss, params, args in br.found_examples():
    t = time.process_time()
    rep = jgc.check_rules(loss, params, *args)
    print(f"{name[:60]}\t{time.process_time() - t:.3f}\t{rep.ok}", flush=True)
"""


def _run(tree: Path) -> list[tuple[str, float, str]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, str(tree)], cwd=tempfile.gettempdir(), env=env,
                         capture_output=True, text=True, check=True).stdout
    return [(n, float(s), ok) for n, s, ok in (line.split("\t") for line in out.splitlines() if "\t" in line)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="e017996", help="the earlier commit to compare with")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rules_time.md"))
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), ns.base], check=True)
        try:
            load0 = os.getloadavg()[0]
            rounds = []
            for _ in range(ns.rounds):
                rounds.append((_run(base), _run(ROOT)))
            load1 = os.getloadavg()[0]
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    lines = [
        "# check_rules at its defaults: CPU time against an earlier commit", "",
        f"Command: `python benchmarks/bench_rules_time.py --base {ns.base} --rounds {ns.rounds}` · "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · HEAD {head} · Python {platform.python_version()} · "
        f"{os.cpu_count()} CPU cores · load average {load0:.1f} at the start, {load1:.1f} at the end.", "",
        "CPU seconds of one `jgc.check_rules` call per loss of bench_rules' `found_examples()`, each tree in a "
        "fresh process, the trees alternating; read this script's header for the method.", "",
        "| round | " + f"{ns.base} s | HEAD s | ratio |", "|---:|---:|---:|---:|",
    ]
    tb = th = 0.0
    for i, (b, h) in enumerate(rounds, 1):
        sb, sh = sum(x[1] for x in b), sum(x[1] for x in h)
        tb, th = tb + sb, th + sh
        lines.append(f"| {i} | {sb:.2f} | {sh:.2f} | {sh / sb:.2f} |")
    lines.append(f"| **sum** | **{tb:.2f}** | **{th:.2f}** | **{th / tb:.2f}** |")
    lines += ["", "Per loss, median over the rounds (s):", "", f"| loss | {ns.base} | HEAD | verdict ok (HEAD) |",
              "|---|---:|---:|---|"]
    for j, (name, _, ok) in enumerate(rounds[0][1]):
        mb = sorted(r[0][j][1] for r in rounds)[len(rounds) // 2]
        mh = sorted(r[1][j][1] for r in rounds)[len(rounds) // 2]
        lines.append(f"| {name} | {mb:.2f} | {mh:.2f} | {ok} |")
    Path(ns.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
