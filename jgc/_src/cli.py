"""Command line: ``jgc demo`` and ``jgc check module:fn --params module:factory``.

Exit codes: 0 the derivatives agree, 1 a mismatch was found, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path


def load_example(name: str):
    """Import ``examples/<name>.py``: installed as ``jgc.examples``, or from a checkout."""
    try:
        return importlib.import_module(f"jgc.examples.{name}")
    except ModuleNotFoundError:
        path = Path(__file__).resolve().parents[2] / "examples" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"jgc_example_{name}", path)
        if spec is None or not path.exists():
            raise
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def _demo(ns) -> int:
    out = load_example("lecture_network").main(steps=ns.steps)
    good, bad = out["good"], out["bad"]
    # The demo succeeds when the correct backprop passes and the bug is caught.
    return 0 if (good.ok and not bad.ok) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jgc", description="Gradient checking for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the lecture's network: a correct and a buggy backprop")
    demo.add_argument("--steps", type=int, default=300, help="gradient-descent steps to show")
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits with 2 on usage errors already
        return int(e.code or 0)
    return ns.run(ns)


if __name__ == "__main__":
    sys.exit(main())
