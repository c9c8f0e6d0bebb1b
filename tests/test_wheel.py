"""The wheel carries the whole package: installed (not editable) into a fresh environment,
jgc works from outside the source tree.

The tests run from the source tree, where every module is importable whether or not the
wheel holds it; a package left out of the wheel shows only in an installed copy. This
builds the wheel from a copy of the sources, installs it into a new virtual environment
that sees this environment's dependencies (``--system-site-packages``, ``--no-deps``: no
download), and runs ``jgc demo`` and ``import jgc`` from an empty directory.

About 30 s on 2 cores (most of it the demo), so marked slow; ``.ci/run`` runs it:
``python -m pytest -m slow tests/test_wheel.py -n 0``.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(cmd, cwd):
    # A clean environment for the installed copy: no PYTHONPATH pointing back at the sources.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # 10 minutes: far above the half minute the whole test takes, so a hung build or demo
    # fails the test instead of stalling CI.
    return subprocess.run([str(c) for c in cmd], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _has_build_backend() -> bool:
    try:
        import setuptools
        import wheel  # noqa: F401
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 68  # pyproject.toml's build-system.requires


def _source_packages() -> set:
    """Every directory under jgc/ that holds Python modules, as a dotted package name."""
    return {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "jgc").rglob("*.py")}


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_and_the_rules_checker(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", ".pytest_cache", ".hypothesis",
        "benchmarks", "tests"))
    # Build with this environment's setuptools where it has what pyproject.toml asks for
    # (no download); otherwise pip builds in an isolated environment of its own.
    isolation = ["--no-build-isolation"] if _has_build_backend() else []
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                  "-w", tmp_path / "dist", src], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("jgc-*.whl")

    with zipfile.ZipFile(wheel) as z:
        # A package by its directory; a top-level module (the pytest plugin's entry point) by its name.
        carried = {n.rsplit("/", 1)[0].replace("/", ".") if "/" in n else n[:-3]
                   for n in z.namelist() if n.endswith(".py")}
    expected = _source_packages() | {"jgc.examples", "pytest_jgc"}
    assert carried == expected, f"left out: {sorted(expected - carried)}; extra: {sorted(carried - expected)}"

    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    bin_ = venv / ("Scripts" if os.name == "nt" else "bin")
    # --ignore-installed: a jgc already in the outer environment must not stand in for the wheel.
    installed = _run([bin_ / "python", "-m", "pip", "install", "--no-deps", "--no-index",
                      "--ignore-installed", "-q", wheel], cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr

    away = tmp_path / "elsewhere"
    away.mkdir()
    # pytest loads the plugin's entry point in every session: it must not import JAX.
    light = _run([bin_ / "python", "-c", "import sys, pytest_jgc; assert 'jax' not in sys.modules, 'jax'; "
                  "print(pytest_jgc.__file__)"], cwd=away)
    assert light.returncode == 0 and str(venv) in light.stdout, light.stderr + light.stdout
    where = _run([bin_ / "python", "-c", "import jgc; jgc.check_rules; print(jgc.__file__)"], cwd=away)
    assert where.returncode == 0, where.stderr
    imported = pathlib.Path(where.stdout.strip())
    assert imported.is_relative_to(venv), f"imported {imported}, not the wheel"

    demo = _run([bin_ / "jgc", "demo", "--steps", "20"], cwd=away)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
