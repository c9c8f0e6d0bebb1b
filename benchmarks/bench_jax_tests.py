"""Question: is ``jgc.check_grads`` a drop-in for ``jax.test_util.check_grads`` in JAX's
own test suite? Which of JAX's tests that pass with JAX's checker fail with jgc's (and
the other way round), and what does each checker cost in wall time?

Corpus: three of JAX's test files, at the tag of the installed JAX (``jax-v`` +
``jax.__version__``): ``tests/nn_test.py``, ``tests/lax_scipy_special_functions_test.py``
and ``tests/lax_scipy_test.py`` (they call ``check_grads`` as ``jtu.check_grads`` from
``jax._src.test_util``, or import it from ``jax.test_util``). JAX's test files are not
kept in this repository; get them with (any scratch directory will do):

    git clone --filter=blob:none --no-checkout https://github.com/jax-ml/jax /tmp/jax-src
    mkdir -p /tmp/jax-tests-0.10.2
    git -C /tmp/jax-src archive jax-v0.10.2 conftest.py pyproject.toml jax/version.py \\
        tests/nn_test.py tests/lax_scipy_special_functions_test.py tests/lax_scipy_test.py \\
        | tar -x -C /tmp/jax-tests-0.10.2

(or unpack https://github.com/jax-ml/jax/archive/refs/tags/jax-v0.10.2.tar.gz and pass its
top directory). ``jax/version.py`` comes along so that the script can check the files
are those of the installed JAX's release.

Method. Each file runs under pytest twice, back to back, each time in a fresh
subprocess: once with JAX's checker, once with jgc's. The only difference is the
plugin ``benchmarks/jgc_dropin_plugin.py`` (``-p jgc_dropin_plugin``), which in the jgc
run puts ``jgc.check_grads`` in place of both ``jax.test_util.check_grads`` and
``jax._src.test_util.check_grads`` before any test module is imported; in both runs it
counts the checker's calls per test and records each test's outcome (one JSON line per
test: outcome, seconds, the first line of a failure, the innermost frame and the
innermost frame inside jgc/).

JAX's tests run as JAX's CI runs them with pytest (``ci/run_pytest_cpu.sh``): JAX's own
``conftest.py`` and ``[tool.pytest.ini_options]`` (``filterwarnings = error``,
``--import-mode=importlib``) from the extracted directory (``--rootdir`` and ``-c``
point there, the working directory is a scratch directory so the source tree's ``jax/``
is never imported), ``JAX_SKIP_SLOW_TESTS=true``, ``JAX_ENABLE_X64`` as CI's default (0;
``--x64`` turns it on), ``--tb=short``. The test files' own configuration stays as is:
``JaxTestCase`` turns on ``jax_enable_checks``, strict dtype promotion, rank promotion
"raise" for every test, and ``parse_flags_with_absl`` reads any ``--jax_*`` flag. One
difference: CI uses ``-n auto``; here there is one process (``-p no:xdist``), since the
machine is shared. Also ``-p no:cacheprovider`` (nothing written into the JAX directory).

Outcomes: passed, failed, error (setup/teardown), skipped, xfailed, xpassed. A test
"fails" for the comparison when it is failed or error. Wall time is the subprocess's,
start to end (import, collection and every test); the machine is shared, so the load
average is written next to it.

Run from the repository root (the whole run takes long on 2 cores; nice it):

    nice -n 19 python benchmarks/bench_jax_tests.py --jax-tests /tmp/jax-tests-0.10.2
    python benchmarks/bench_jax_tests.py --jax-tests DIR --only nn_test.py -k Softplus

Writes benchmarks/results/jax_tests.md and jax_tests.jsonl (one line per test and
checker, after a first line of machine facts; ``--report-only`` makes the table again
from it). A run with ``--only``, ``-k`` or ``--checker`` prints its table and writes
nothing unless ``--write`` is given; then its (file, checker) pairs replace theirs in
jax_tests.jsonl, the others are kept, and jax_tests.md is made again from all of them
(the "command" line then names the last run; each run's own command is in the jsonl).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
JSONL = RESULTS / "jax_tests.jsonl"
MD = RESULTS / "jax_tests.md"

FILES = ("nn_test.py", "lax_scipy_special_functions_test.py", "lax_scipy_test.py")
CHECKERS = ("jax", "jgc")
FAILING = ("failed", "error")


def expected_tag() -> str:
    import jax

    return f"jax-v{jax.__version__}"


def how_to_get(tag: str, where: str) -> str:
    files = " ".join(f"tests/{f}" for f in FILES)
    return (
        f"JAX's test files at {tag} are needed (they are not kept in this repository).\n"
        f"Get them from JAX's public repository, e.g.:\n\n"
        f"  git clone --filter=blob:none --no-checkout https://github.com/jax-ml/jax /tmp/jax-src\n"
        f"  mkdir -p {where}\n"
        f"  git -C /tmp/jax-src archive {tag} conftest.py pyproject.toml jax/version.py \\\n"
        f"      {files} | tar -x -C {where}\n\n"
        f"(or unpack https://github.com/jax-ml/jax/archive/refs/tags/{tag}.tar.gz), then run\n\n"
        f"  nice -n 19 python benchmarks/bench_jax_tests.py --jax-tests {where}\n"
    )


def check_jax_tests(d: Path | None, tag: str) -> Path:
    default = f"/tmp/jax-tests-{tag.removeprefix('jax-v')}"
    if d is None:
        sys.exit("bench_jax_tests: no --jax-tests DIR given.\n\n" + how_to_get(tag, default))
    d = d.resolve()
    missing = [p for p in ("conftest.py", "pyproject.toml", "jax/version.py", *(f"tests/{f}" for f in FILES))
               if not (d / p).is_file()]
    if missing:
        sys.exit(f"bench_jax_tests: {d} lacks {', '.join(missing)}.\n\n" + how_to_get(tag, str(d)))
    m = re.search(r'^_version\s*(?::\s*str\s*)?=\s*"([^"]+)"', (d / "jax/version.py").read_text(), re.M)
    found = f"jax-v{m.group(1)}" if m else "unknown"
    if found != tag:
        sys.exit(f"bench_jax_tests: the test files in {d} are from {found}, the installed JAX is {tag}.\n"
                 f"Run the tests of the installed release:\n\n" + how_to_get(tag, default))
    return d


def jgc_state() -> str:
    """The commit of jgc/ this run imported, and whether jgc/ had local changes."""
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "jgc"], capture_output=True,
                               text=True).stdout.strip()
        return rev + (" + uncommitted jgc/ changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_one(d: Path, fname: str, checker: str, ns, scratch: Path) -> dict:
    out = scratch / f"{fname}.{checker}.jsonl"
    out.unlink(missing_ok=True)
    log = scratch / f"{fname}.{checker}.log"
    cmd = [sys.executable, "-m", "pytest", str(d / "tests" / fname), "--rootdir", str(d),
           "-c", str(d / "pyproject.toml"), "-p", "no:xdist", "-p", "no:cacheprovider",
           "-p", "jgc_dropin_plugin", "--tb=short", "-q", "-rfE"]
    if ns.k:
        cmd += ["-k", ns.k]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), env.get("PYTHONPATH", "")) if p)
    env.update(JGC_BENCH_CHECKER=checker, JGC_BENCH_OUT=str(out), JAX_SKIP_SLOW_TESTS="true",
               JAX_ENABLE_X64="1" if ns.x64 else "0", TF_CPP_MIN_LOG_LEVEL="0")
    started = datetime.datetime.now(datetime.timezone.utc)
    load0 = os.getloadavg()[0]
    state = jgc_state()
    print(f"[{started:%H:%M:%S}] {fname} with {checker}'s checker ...", flush=True)
    t0 = time.perf_counter()
    timed_out = False
    samples, stop = [load0], threading.Event()

    def sample():  # the 1-minute load average every 15 s while the tests run
        while not stop.wait(15.0):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with open(log, "w") as lf:
        try:
            proc = subprocess.run(cmd, cwd=scratch, env=env, stdout=lf, stderr=subprocess.STDOUT,
                                  timeout=ns.run_timeout or None)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    tests = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
    run = {"kind": "run", "file": fname, "checker": checker, "rc": rc, "timed_out": timed_out,
           "wall_s": round(wall, 1), "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
           "load_mean": round(sum(samples) / len(samples), 2),
           "started": started.isoformat(timespec="seconds"), "jgc": state if checker == "jgc" else None,
           "x64": ns.x64, "k": ns.k, "summary": tail[0] if tail else "",
           "checker_calls": sum(t.get("checker_calls", 0) for t in tests),
           "command": " ".join(shlex.quote(c) for c in cmd)}
    print(f"    {wall:.0f} s, rc {rc}: {run['summary']}", flush=True)
    if rc not in (0, 1, 5):
        print(f"    pytest log: {log}", flush=True)
    for t in tests:
        t.update(kind="test", file=fname, checker=checker)
    return {"run": run, "tests": tests}


def counts(tests) -> dict:
    c: dict = {}
    for t in tests:
        c[t["outcome"]] = c.get(t["outcome"], 0) + 1
    return c


def first_line(t) -> str:
    f = t.get("failure")
    if not f:
        return ""
    return f"{f['type']}: {f['message']}".replace("|", "\\|")[:240]


def md_table(runs, tests, facts, command) -> str:
    by = {}
    for t in tests:
        by.setdefault((t["file"], t["checker"]), {})[t["test"]] = t
    files = [f for f in FILES if any(r["file"] == f for r in runs)]
    L = ["# JAX's own tests with jgc.check_grads in place of JAX's", "",
         "Method: benchmarks/bench_jax_tests.py (module docstring). Each file runs twice, back to back, "
         "in fresh pytest processes under JAX's own conftest.py and pytest settings; the jgc run differs only "
         "by `jgc.check_grads` patched over `jax.test_util.check_grads` and `jax._src.test_util.check_grads`.", "",
         f"Machine: {facts['cpu']}, {facts['cores']} cores (shared); Python {facts['python']}, jax {facts['jax']}, "
         f"jaxlib {facts['jaxlib']}, numpy {facts['numpy']}, scipy {facts['scipy']}, pytest {facts['pytest']}; "
         f"JAX tests at {facts['tag']}; JAX_ENABLE_X64={int(facts['x64'])}, JAX_SKIP_SLOW_TESTS=true. "
         f"Load average at the start {facts['load_start']}, at the end {facts['load_end']}. "
         f"Finished {facts['finished']}.", "",
         *_commands(runs, command), "",
         "Columns: outcomes per test; \"checker calls\" counts calls of check_grads over the file; \"wall s\" is "
         "the pytest process from start to end; \"s in checker tests\" sums pytest's setup+call+teardown "
         "seconds of the tests that called check_grads at least once (the other tests run the same code "
         "in both runs). \"jgc\" is the commit jgc was imported from.", "",
         "| file | checker | passed | failed | error | skipped | other | checker calls | wall s "
         "| s in checker tests | load (start→end; mean) | jgc |",
         "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"]
    for f in files:
        for ch in CHECKERS:
            r = next((r for r in runs if r["file"] == f and r["checker"] == ch), None)
            if r is None:
                continue
            c = counts(by.get((f, ch), {}).values())
            in_checker = sum(t["seconds"] for t in by.get((f, ch), {}).values() if t.get("checker_calls"))
            other = sum(v for k, v in c.items() if k not in ("passed", "failed", "error", "skipped"))
            wall = f"{r['wall_s']:.0f}" + (" (timed out)" if r["timed_out"] else "")
            L.append(f"| {f} | {ch} | {c.get('passed', 0)} | {c.get('failed', 0)} | {c.get('error', 0)} | "
                     f"{c.get('skipped', 0)} | {other} | {r['checker_calls']} | {wall} | {in_checker:.0f} | "
                     f"{r['load_start']}→{r['load_end']}{load_mean(r)} | {r['jgc'] or ''} |")
    L.append("")
    for f in files:
        a, b = by.get((f, "jax"), {}), by.get((f, "jgc"), {})
        jgc_only = sorted(n for n in b if b[n]["outcome"] in FAILING and a.get(n, {}).get("outcome") == "passed")
        jax_only = sorted(n for n in a if a[n]["outcome"] in FAILING and b.get(n, {}).get("outcome") == "passed")
        both = sorted(n for n in a if a[n]["outcome"] in FAILING and b.get(n, {}).get("outcome") in FAILING)
        other = sorted(n for n in set(a) | set(b)
                       if n not in jgc_only + jax_only + both
                       and a.get(n, {}).get("outcome") != b.get(n, {}).get("outcome"))
        L.append(f"## {f}")
        L.append("")
        for title, names, src in (("Fail with jgc's checker, pass with JAX's", jgc_only, b),
                                  ("Fail with JAX's checker, pass with jgc's", jax_only, a),
                                  ("Fail with both", both, b)):
            L.append(f"{title}: {len(names)}" + (":" if names else "."))
            if names:
                L.append("")
                for n in names:
                    t = src[n]
                    where = (t.get("failure") or {}).get("jgc_frame") if src is b else None
                    L.append(f"- `{n}` — {first_line(t)}" + (f" (raised in `{where}`)" if where else ""))
            L.append("")
        if other:
            L.append(f"Other differences (outcome with JAX's → with jgc's): {len(other)}:")
            L.append("")
            for n in other:
                L.append(f"- `{n}`: {a.get(n, {}).get('outcome', 'absent')} → {b.get(n, {}).get('outcome', 'absent')}")
            L.append("")
    return "\n".join(L) + "\n"


def _commands(runs, command):
    cmds = list(dict.fromkeys(r.get("bench_command", command) for r in runs)) or [command]
    if len(cmds) == 1:
        return [f"Command: `{cmds[0]}`"]
    return ["Commands (rows merged from several runs, see `bench_command` in jax_tests.jsonl):", "",
            *(f"- `{c}`" for c in cmds)]


def load_mean(r) -> str:
    return f"; {r['load_mean']}" if "load_mean" in r else ""


def machine_facts(tag, x64) -> dict:
    import jax
    import jaxlib
    import numpy
    import pytest
    import scipy

    from run_all import cpu_name  # this folder: the script's own directory is on sys.path

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
            "pytest": pytest.__version__, "tag": tag, "x64": x64,
            "load_start": ", ".join(f"{v:.1f}" for v in os.getloadavg())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jax-tests", type=Path, default=None, metavar="DIR",
                    help="JAX's conftest.py, pyproject.toml, jax/version.py and tests/ at the installed JAX's tag")
    ap.add_argument("--only", nargs="*", default=None, metavar="FILE", help="some of: " + " ".join(FILES))
    ap.add_argument("-k", default=None, metavar="EXPR", help="passed on to pytest -k")
    ap.add_argument("--checker", choices=CHECKERS, nargs="*", default=list(CHECKERS), help="run only these")
    ap.add_argument("--x64", action="store_true", help="JAX_ENABLE_X64=1 (JAX's CI default is 0)")
    ap.add_argument("--run-timeout", type=float, default=0.0, help="seconds per pytest process (0: none)")
    ap.add_argument("--write", action="store_true", help="write results even for --only / -k runs")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: make jax_tests.md again from jax_tests.jsonl")
    ns = ap.parse_args(argv)
    if ns.report_only:
        rows = [json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]
        facts = next(r for r in rows if r["kind"] == "facts")
        runs = [r for r in rows if r["kind"] == "run"]
        MD.write_text(md_table(runs, [r for r in rows if r["kind"] == "test"], facts, facts["command"]))
        print(f"wrote {MD.relative_to(ROOT)}")
        return

    tag = expected_tag()
    d = check_jax_tests(ns.jax_tests, tag)
    files = FILES
    if ns.only:
        bad = [f for f in ns.only if (f if f.endswith(".py") else f + ".py") not in FILES]
        if bad:
            ap.error(f"--only: unknown {bad}; choose from {FILES}")
        files = tuple(f for f in FILES if f in ns.only or f.removesuffix(".py") in ns.only)
    partial = bool(ns.only or ns.k or set(ns.checker) != set(CHECKERS))
    write = ns.write or not partial

    facts = machine_facts(tag, ns.x64)
    command = "nice -n 19 python benchmarks/bench_jax_tests.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    runs, tests = [], []
    with tempfile.TemporaryDirectory(prefix="bench_jax_tests.") as tmp:
        scratch = Path(tmp)
        for f in files:
            for ch in CHECKERS:
                if ch not in ns.checker:
                    continue
                res = run_one(d, f, ch, ns, scratch)
                res["run"]["bench_command"] = command
                runs.append(res["run"])
                tests.extend(res["tests"])
                if write:  # keep what is done so far, a long run may be stopped
                    _write(runs, tests, facts, command, merge=partial)
    facts["load_end"] = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    facts["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = md_table(runs, tests, facts, command)
    if write:
        _write(runs, tests, facts, command, merge=partial)
        print(f"wrote {MD.relative_to(ROOT)} and {JSONL.relative_to(ROOT)}")
    print(text)


def _merge(runs, tests):
    """With --write on a partial run: rows of the (file, checker) pairs run now replace the
    earlier ones in jax_tests.jsonl, the other pairs' rows are kept."""
    if not JSONL.exists():
        return runs, tests
    done = {(r["file"], r["checker"]) for r in runs}
    old = [json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]
    keep = [o for o in old if o["kind"] != "facts" and (o["file"], o["checker"]) not in done]
    order = {f: i for i, f in enumerate(FILES)}
    key = lambda r: (order.get(r["file"], 99), CHECKERS.index(r["checker"]))  # noqa: E731
    return (sorted([o for o in keep if o["kind"] == "run"] + runs, key=key),
            sorted([o for o in keep if o["kind"] == "test"] + tests, key=key))


def _write(runs, tests, facts, command, merge=False):
    if merge:
        runs, tests = _merge(runs, tests)
    facts = dict(facts)
    facts.setdefault("load_end", ", ".join(f"{v:.1f}" for v in os.getloadavg()))
    facts.setdefault("finished", "(still running) " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    MD.write_text(md_table(runs, tests, facts, command))
    with open(JSONL, "w") as fh:
        fh.write(json.dumps(dict(facts, kind="facts", command=command, file="", checker="")) + "\n")
        for r in runs:
            fh.write(json.dumps(r) + "\n")
        for t in tests:
            fh.write(json.dumps(t) + "\n")


if __name__ == "__main__":
    main()
