"""Command line: ``jgc demo``, ``jgc check module:fn --params module:factory`` and ``jgc rules``.

Exit codes: 0 the derivatives agree, 1 a mismatch was found, 2 usage or input error.
``jgc rules`` takes the same FN, ``--params`` and ``--args`` and runs ``jgc.check_rules``.
``jgc rule module:f --args module:factory`` runs ``jgc.check_rule(f, *args)`` on one rule.
``jgc scan PACKAGE [pytest args]`` runs the package's tests under ``pytest --jgc-rules=PACKAGE``.

``jgc check`` imports ``fn`` from ``module:fn`` (``module`` is a dotted module name,
importable from the current directory or PYTHONPATH, or a path to a ``.py`` file),
calls the factories named by ``--params`` (and ``--args``) with no arguments, and runs
``jgc.check(fn, params, *args)`` (with ``--has-aux``, ``fn`` returns ``(cost, aux)``).
Every input error is reported in one sentence that names the thing and the fix, with
exit code 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from .api import check
from .preparation import PRECISIONS, OutputFormError, drop_aux
from .rules import check_rule, check_rules

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2


class InputError(Exception):
    """Bad input to ``jgc check``: printed as ``jgc check: <message>``, exit code 2."""


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


# -- jgc check: resolving module:name ------------------------------------------------
def _split_spec(spec: str, option: str) -> tuple[str, str]:
    module, sep, attr = spec.rpartition(":")
    # A Windows drive letter ("C:\\x.py") is not a separator.
    if not sep or not module or not attr or (len(module) == 1 and attr.startswith(("\\", "/"))):
        example = "mypkg.losses:loss" if option == "FN" else "mypkg.losses:make_params"
        raise InputError(
            f"{option} must be written module:name (a module and a name in it, joined by a "
            f"colon), e.g. {example}; got {spec!r}."
        )
    return module, attr


def _import_module(module: str, option: str, spec: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise InputError(
                f"{option} {spec}: there is no file {str(path)!r} (looked in {os.getcwd()}). "
                "Check the path, or use a dotted module name importable from PYTHONPATH."
            )
        name = f"_jgc_cli_{path.stem}"
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = mod
        try:
            loader_spec.loader.exec_module(mod)
        except Exception as e:
            del sys.modules[name]
            raise InputError(
                f"{option} {spec}: importing {str(path)!r} raised {type(e).__name__}: {e}. "
                "Fix the error in that file (run python on it to see the traceback)."
            ) from e
        return mod
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.split(".")[: len(e.name.split("."))] == e.name.split("."):
            raise InputError(
                f"{option} {spec}: cannot import module {module!r} ({e}). Check the spelling, "
                "run jgc from the directory that holds it, or add that directory to "
                "PYTHONPATH (e.g. PYTHONPATH=src jgc check ...)."
            ) from e
        raise InputError(
            f"{option} {spec}: module {module!r} was found, but importing it failed: {e}. "
            f"Install the missing package {e.name!r} or fix the import in {module}."
        ) from e
    except Exception as e:
        raise InputError(
            f"{option} {spec}: importing module {module!r} raised {type(e).__name__}: {e}. "
            f"Fix the error in {module} (python -c 'import {module}' shows the traceback)."
        ) from e


def resolve(spec: str, option: str):
    """Return the object named by ``module:name`` (dots in name walk attributes)."""
    module, attr = _split_spec(spec, option)
    obj = _import_module(module, option, spec)
    where = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" Did you mean {close[0]}?" if close else (
                f" It defines: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}."
                if names else "")
            raise InputError(
                f"{option} {spec}: {where!r} has no attribute {part!r}.{hint} Fix the name "
                "after the colon."
            )
        obj = getattr(obj, part)
        where = f"{where}.{part}"
    return obj


def _a(obj) -> str:
    name = type(obj).__name__
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def _call_factory(spec: str, option: str):
    factory = resolve(spec, option)
    if not callable(factory):
        raise InputError(
            f"{option} {spec} is {_a(factory)}, not a factory. {option} names a "
            "function that takes no arguments and returns the value, e.g. "
            "def make_params(): return {'w': jnp.ones(3)}."
        )
    try:
        return factory()
    except TypeError as e:
        raise InputError(
            f"{option} {spec}: calling it with no arguments raised TypeError: {e}. A factory "
            "takes no arguments; wrap yours, e.g. def make_params(): return init(key, shape)."
        ) from e
    except Exception as e:
        raise InputError(f"{option} {spec}: the factory raised {type(e).__name__}: {e}.") from e


def _inputs(ns) -> tuple:
    """(fn, params, args) from FN, --params and --args (shared by ``jgc check`` and ``jgc rules``)."""
    # Like `python -m`, import from the working directory first.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    fn = resolve(ns.fn, "FN")
    if not callable(fn):
        raise InputError(
            f"FN {ns.fn} is {_a(fn)}, not a function. Name the cost "
            "fn(params, *args) -> scalar."
        )
    params = _call_factory(ns.params, "--params")
    args = ()
    if ns.args is not None:
        args = _call_factory(ns.args, "--args")
        # A tuple is the argument list; anything else is the one extra argument.
        args = args if isinstance(args, tuple) else (args,)
    return fn, params, args


def _run(command: str, ns, make_report) -> int:
    """Run one subcommand: bad input exits 2, a failed check 1, a passed one 0."""
    try:
        report = make_report(ns)
    except InputError as e:
        print(f"jgc {command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(report.to_json(indent=2) if ns.json else report)
    return EXIT_OK if report.ok else EXIT_MISMATCH


def _options(ns, names) -> dict:
    """The options given on the command line among ``names``, and --seed as ``key``."""
    options = {k: getattr(ns, k) for k in names if getattr(ns, k) is not None}
    if ns.seed is not None:
        options["key"] = ns.seed
    return options


def _check(ns):
    fn, params, args = _inputs(ns)
    grad = None
    if ns.grad is not None:
        grad = resolve(ns.grad, "--grad")
        if not callable(grad):
            raise InputError(f"--grad {ns.grad} is {_a(grad)}; name a function "
                             "grad(params, *args) returning a pytree like params.")
    options = _options(ns, ("stencil", "precision", "analytic", "rtol", "atol", "step", "samples", "budget",
                            "directions"))
    try:
        report = check(fn, params, *args, grad=grad, has_aux=ns.has_aux, mode=ns.mode,
                           strict=ns.strict, **options)
    except Exception as e:  # bad input or an error in the user's function: exit 2, not 1
        notes = " ".join(getattr(e, "__notes__", ()))
        hint = " On the command line that is --has-aux." if (
            isinstance(e, OutputFormError) and not ns.has_aux) else ""
        raise InputError(
            f"checking {ns.fn} with {len(args)} extra argument(s) raised "
            f"{type(e).__name__}: {e}{' (' + notes + ')' if notes else ''}{hint}"
        ) from e
    if ns.plot is not None:
        cost = fn
        if ns.has_aux:  # the step-size curve differences the cost alone
            def cost(p, *a):
                return drop_aux(fn(p, *a), True, api="jgc check --plot", fn=fn)
        try:
            report.plot(ns.plot, fn=cost, params=params, args=args)
        except ImportError as e:
            raise InputError(f"--plot {ns.plot}: {e}") from e
        except OSError as e:
            raise InputError(
                f"--plot {ns.plot}: cannot write the picture ({e}). Choose a writable path "
                "ending in .png, .pdf or .svg."
            ) from e
    return report


def _rules(ns):
    fn, params, args = _inputs(ns)
    options = _options(ns, ("precision", "rtol", "atol", "step"))
    try:
        return check_rules(fn, params, *args, **options)
    except Exception as e:  # bad input or an error in the user's function: exit 2, not 1
        raise InputError(f"checking the rules of {ns.fn} with {len(args)} extra argument(s) raised "
                         f"{type(e).__name__}: {e}") from e


def _rule(ns):
    if os.getcwd() not in sys.path and "" not in sys.path:  # as _inputs: the working directory first
        sys.path.insert(0, os.getcwd())
    f = resolve(ns.fn, "F")
    if not callable(f):
        raise InputError(f"F {ns.fn} is {_a(f)}, not a function. Name the rule: a custom_jvp / custom_vjp "
                         "function called as f(*args).")
    args = _call_factory(ns.args, "--args")
    args = args if isinstance(args, tuple) else (args,)
    options = {k: getattr(ns, k) for k in ("precision", "rtol", "atol", "step", "seed", "checks")
               if getattr(ns, k) is not None}
    try:
        return check_rule(f, *args, nondiff_argnums=tuple(ns.nondiff_argnums or ()), explore=ns.explore,
                          **options)
    except Exception as e:  # bad input or an error in the user's function: exit 2, not 1
        raise InputError(f"checking the rule {ns.fn} at {len(args)} argument(s) raised "
                         f"{type(e).__name__}: {e}") from e


def _test_modules_in(package: str) -> list[str]:
    """The package's directories when it ships test modules (``*_test.py``, ``test_*.py``), else none."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise InputError(f"there is no importable package {package!r}. Name the package whose rules to check "
                         "as you would import it, e.g. jgc scan mylib.")
    out = []
    for d in spec.submodule_search_locations or ():
        for _root, _dirs, names in os.walk(d):
            if any(n.endswith("_test.py") or (n.startswith("test_") and n.endswith(".py")) for n in names):
                out.append(d)
                break
    return out


def _scan(ns) -> int:
    """Run the package's tests (or the paths given) with the jgc pytest plugin on; pytest's exit code."""
    extra = list(ns.pytest_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    # jgc's own options may also come after PACKAGE, among pytest's.
    own = argparse.ArgumentParser(add_help=False)
    for opt in ("--budget", "--report", "--known", "--write-known"):
        own.add_argument(opt, type=float if opt == "--budget" else str,
                         default=getattr(ns, opt[2:].replace("-", "_")))
    ns_own, extra = own.parse_known_args(extra)
    for k, v in vars(ns_own).items():
        setattr(ns, k, v)
    given = [a for a in extra if not a.startswith("-") and os.path.exists(a.split("::")[0])]
    try:
        paths = [] if given else _test_modules_in(ns.package)
    except (InputError, ImportError, ValueError) as e:
        print(f"jgc scan: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not given and not paths:
        print(f"jgc scan: {ns.package} ships no test modules (*_test.py, test_*.py) inside the package. Give the "
              "path of its tests, e.g. jgc scan mylib tests/.", file=sys.stderr)
        return EXIT_USAGE
    # The plugin by module name, with the entry point of the same plugin turned off so it
    # is not registered twice (a checkout that is not installed has no entry point).
    cmd = [sys.executable, "-m", "pytest", "-p", "no:jgc", "-p", "pytest_jgc", f"--jgc-rules={ns.package}",
           *([f"--jgc-budget={ns.budget:g}"] if ns.budget is not None else []),
           *(["--jgc-report", ns.report] if ns.report else []),
           *(["--jgc-known", ns.known] if ns.known else []),
           *(["--jgc-write-known", ns.write_known] if ns.write_known else []),
           *(["-p", "no:cacheprovider"] if paths else []), *paths, *extra]
    print("::", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=False).returncode


def _add_inputs(parser) -> None:
    """FN, --params and --args: how both subcommands load the cost and its inputs."""
    parser.add_argument("fn", metavar="FN", help="the cost as module:function, fn(params, *args) -> scalar")
    parser.add_argument("--params", required=True, metavar="MODULE:FACTORY",
                        help="a function of no arguments returning the params pytree")
    parser.add_argument("--args", metavar="MODULE:FACTORY",
                        help="a function of no arguments returning the tuple of extra arguments "
                             "(anything but a tuple is passed as the one extra argument)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jgc", description="Gradient checking for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the lecture's network: a correct and a buggy backprop")
    demo.add_argument("--steps", type=int, default=300, help="gradient-descent steps to show")
    demo.set_defaults(run=_demo)

    chk = sub.add_parser(
        "check", help="check the gradient of fn(params, *args) against finite differences",
        description="Check jax.grad of FN (or --grad) against finite differences. Exit code 0: "
        "the derivatives agree; 1: a mismatch; 2: usage or input error.",
        epilog="example: jgc check mymodel:loss --params mymodel:init_params --args mymodel:batch",
    )
    _add_inputs(chk)
    chk.add_argument("--grad", metavar="MODULE:FUNCTION",
                     help="a hand-written gradient grad(params, *args) to check instead of jax.grad")
    chk.add_argument("--has-aux", action="store_true",
                     help="FN returns (cost, aux), as for jax.grad(fn, has_aux=True); aux is ignored")
    chk.add_argument("--mode", default=None, choices=("full", "sampled", "directional", "auto"),
                     help="default: as jgc.check without mode=, full when its estimated time fits "
                          "a minute, else directional screening plus a sample (the report says which)")
    chk.add_argument("--samples", type=int, help="elements per leaf (mode sampled / auto)")
    chk.add_argument("--budget", type=int, help="evaluation budget (mode auto / sampled)")
    chk.add_argument("--directions", type=int, help="random directions per leaf (mode directional)")
    chk.add_argument("--seed", type=int, help="seed of the sampled / random directions")
    chk.add_argument("--stencil", choices=("central", "forward", "central4", "richardson", "complex"))
    chk.add_argument("--precision", choices=PRECISIONS)
    chk.add_argument("--analytic", choices=("native", "reference"),
                     help="where the gradient runs: at the dtypes given (default) or at the reference's precision")
    chk.add_argument("--rtol", type=float)
    chk.add_argument("--atol", type=float)
    chk.add_argument("--step", type=float, help="relative step h/s")
    chk.add_argument("--strict", action="store_true", help="also fail on inconclusive / non-finite")
    chk.add_argument("--json", action="store_true", help="print the report as JSON")
    chk.add_argument("--plot", metavar="OUT.png", help="draw the report (needs matplotlib)")
    chk.set_defaults(run=lambda ns: _run("check", ns, _check))

    rls = sub.add_parser(
        "rules", help="check every custom_jvp / custom_vjp rule inside fn on the inputs it receives",
        description="Find every custom derivative rule inside FN, capture its inputs at these params and "
        "args, and check each rule against finite differences of its primal. Exit code 0: every rule "
        "agrees; 1: a rule is wrong; 2: usage or input error.",
        epilog="example: jgc rules mymodel:loss --params mymodel:init_params --args mymodel:batch",
    )
    _add_inputs(rls)
    rls.add_argument("--precision", choices=PRECISIONS)
    rls.add_argument("--rtol", type=float)
    rls.add_argument("--atol", type=float)
    rls.add_argument("--step", type=float, help="relative step h/s")
    rls.add_argument("--seed", type=int, help="seed of the random directions for large operands")
    rls.add_argument("--json", action="store_true", help="print the report as JSON")
    rls.set_defaults(run=lambda ns: _run("rules", ns, _rules))

    one = sub.add_parser(
        "rule", help="check one custom_jvp / custom_vjp / custom_vmap rule every way at the args given",
        description="Check one custom derivative rule F at the arguments --args returns: its primal "
        "output, its JVP or VJP against finite differences, the dot-product identity, linearity, vmap, "
        "order 2 and symbolic zeros. Exit code 0: every check passes; 1: a check fails; 2: usage or "
        "input error.",
        epilog="example: jgc rule mylib:softplus --args mylib:example_inputs --explore",
    )
    one.add_argument("fn", metavar="F", help="the rule as module:function, called as f(*args)")
    one.add_argument("--args", required=True, metavar="MODULE:FACTORY",
                     help="a function of no arguments returning the tuple of arguments (anything but a "
                          "tuple is the one argument)")
    one.add_argument("--nondiff-argnums", type=int, nargs="+", metavar="N", help="arguments held fixed")
    one.add_argument("--checks", nargs="+", metavar="CHECK",
                     help="the checks to run (default all): primal jvp vjp dot-product linearity batching "
                          "'order 2' 'symbolic zeros'")
    one.add_argument("--explore", action="store_true", help="also check at −x, 10⁻²·x, 10²·x, 0, ±1 and sweeps of the domain")
    one.add_argument("--seed", type=int, help="seed of every random tangent, cotangent and lane")
    one.add_argument("--precision", choices=PRECISIONS)
    one.add_argument("--rtol", type=float)
    one.add_argument("--atol", type=float)
    one.add_argument("--step", type=float, help="relative step h/s")
    one.add_argument("--json", action="store_true", help="print the report as JSON")
    one.set_defaults(run=lambda ns: _run("rule", ns, _rule))

    scan = sub.add_parser(
        "scan", help="run a package's tests and check every custom rule of the package they run",
        description="Run PACKAGE's tests under pytest with --jgc-rules=PACKAGE: every custom_jvp / "
        "custom_vjp / custom_vmap rule defined under PACKAGE that a test runs is captured and checked with "
        "jgc.check_rule after the session. The tests are those shipped inside the package (*_test.py, "
        "test_*.py), or the paths given among the pytest arguments. Exit code: pytest's (1 when a test or a "
        "rule not listed in --known fails).",
        epilog="example: jgc scan optax -x -q   |   jgc scan mylib tests/ --report rules.json",
    )
    scan.add_argument("package", metavar="PACKAGE", help="the package whose rules to check, as imported")
    scan.add_argument("--budget", type=float,
                      help="seconds for the checks after the tests (pytest --jgc-budget; default 300)")
    scan.add_argument("--report", metavar="PATH.json", help="write the rules' verdicts as JSON")
    scan.add_argument("--known", metavar="PATH.json", help="known failures, which do not fail the run")
    scan.add_argument("--write-known", metavar="PATH.json", help="write the failing rules as known failures")
    scan.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed to pytest (test paths, -k, -x, ...)")
    scan.set_defaults(run=_scan)
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
