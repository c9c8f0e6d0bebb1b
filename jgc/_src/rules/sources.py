"""Where a Python function is defined: file:line, seen through JAX's and Equinox's wrappers.

The custom rules of a traced program name their functions by ``debug_info``
(``"name at file:line"``); where that names a wrapper (JAX's custom-derivative
machinery, Equinox's filtered rules), the user's function is found in the wrapper's
closures. Paths are shown from the package directory on for installed packages and
relative to the working directory for the user's files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import linecache
import os
import re
import types

from ..names import short_name


@dataclasses.dataclass(frozen=True)
class Where:
    """A Python function and where it is: name, file, line (0 when unknown)."""

    name: str
    file: str
    line: int

    def __str__(self) -> str:
        file = _display_path(self.file)
        return f"{file}:{self.line}" if self.line else file or "?"


def _display_path(path: str) -> str:
    """Installed packages from their package directory on, files under the working directory relative to it."""
    if not path:
        return path
    marker = f"site-packages{os.sep}"
    if marker in path:
        return path.split(marker, 1)[1]
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            return rel
    return path


def _pkg_dir(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except ImportError:
        return None
    return os.path.dirname(os.path.abspath(m.__file__)) + os.sep


_JAX, _EQX = _pkg_dir("jax"), _pkg_dir("equinox")
# Modules whose functions wrap the user's rule: JAX's custom-derivative and tracing
# machinery (defjvps, flattening, memoised thunks) and Equinox's filtered rules.
_WRAPPER_FILES = tuple(os.path.join(d, *f.split("/")) for d, f in (
    (_JAX, "_src/custom_derivatives.py"), (_JAX, "_src/linear_util.py"), (_JAX, "_src/api_util.py"),
    (_JAX, "_src/interpreters/partial_eval.py"), (_JAX, "_src/interpreters/ad.py"),
    (_JAX, "_src/interpreters/batching.py"), (_EQX, "_ad.py")) if d)


# The module that watches custom-rule calls while the loss is traced (rules.hidden): its
# frame sits between the user's call and JAX's, and is never the user's call site.
_RECORDER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hidden.py")


def _is_recorder_file(path: str) -> bool:
    return os.path.abspath(path) == _RECORDER_FILE


def _is_wrapper_file(path: str) -> bool:
    """Files whose functions wrap the user's (JAX's custom-derivative machinery, Equinox's filtered rules)."""
    return os.path.abspath(path) in _WRAPPER_FILES


def _parse_src_info(info: str | None) -> Where:
    """Parse debug_info.func_src_info: "name at file:line"."""
    if not info:
        return Where("?", "", 0)
    name, _, loc = info.rpartition(" at ")
    if not name:
        return Where(info, "", 0)
    file, _, line = loc.rpartition(":")
    return Where(name, file, int(line)) if line.isdigit() else Where(name, loc, 0)


def _where_fn(fn) -> Where | None:
    fn = inspect_unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return Where(getattr(fn, "__qualname__", short_name(fn)), code.co_filename, code.co_firstlineno)


def inspect_unwrap(fn):
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif hasattr(fn, "__wrapped__") and not isinstance(fn, type):
            fn = fn.__wrapped__
        else:
            return fn


def _functions_in(obj, depth: int = 0, seen: set | None = None):
    """Python functions reachable from a rule object: the functions themselves, then what they
    close over, partials (function, then arguments), bound methods, tuples and lists, JAX's
    WrappedFun (``.f``) and decorated functions (``__wrapped__``), depth first, each once."""
    seen = set() if seen is None else seen
    if obj is None or id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, types.FunctionType):
        yield obj
        for cell in obj.__closure__ or ():
            try:
                v = cell.cell_contents
            except ValueError:  # a cell not filled yet
                continue
            yield from _functions_in(v, depth + 1, seen)
    elif isinstance(obj, functools.partial):
        yield from _functions_in(obj.func, depth + 1, seen)
        for a in (*obj.args, *obj.keywords.values()):
            yield from _functions_in(a, depth + 1, seen)
    elif isinstance(obj, types.MethodType):
        yield from _functions_in(obj.__func__, depth + 1, seen)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _functions_in(x, depth + 1, seen)
    elif type(obj).__name__ == "WrappedFun":
        yield from _functions_in(getattr(obj, "f", None), depth + 1, seen)
    elif hasattr(obj, "__wrapped__"):
        yield from _functions_in(obj.__wrapped__, depth + 1, seen)


def _closure(fn) -> dict:
    out = {}
    for nm, cell in zip(getattr(getattr(fn, "__code__", None), "co_freevars", ()), fn.__closure__ or ()):
        with contextlib.suppress(ValueError):
            out[nm] = cell.cell_contents
    return out


def _see_through(wrapped, prefer: str) -> Where | None:
    """The user's function behind a wrapper (Equinox keeps it in a closure or on ``self``)."""
    for fn in _functions_in(wrapped):
        if not _is_wrapper_file(fn.__code__.co_filename):
            return _where_fn(fn)
        cl = _closure(fn)
        target = cl.get(prefer)
        if target is None and prefer in ("fn_bwd", "fn_fwd", "fn") and cl.get("self") is not None:
            target = getattr(cl["self"], prefer, None)
        if callable(target):
            return _where_fn(target)
    return None


def _primal_of_rule(rule_fun) -> Where | None:
    """The primal of an Equinox ``filter_custom_jvp`` found from its JVP rule.

    Equinox keeps the primal on the ``filter_custom_jvp`` object, which the traced
    program does not hold; when that object is a module-level name beside its rule (as
    in Equinox's own runtime checks), it is found among the rule's globals.
    """
    for fn in _functions_in(rule_fun):
        if _is_wrapper_file(fn.__code__.co_filename) and "equinox" not in fn.__code__.co_filename:
            continue
        for obj in list(getattr(fn, "__globals__", {}).values()):
            inner = getattr(obj, "fn", None)  # the jax.custom_jvp the Equinox object holds
            jvp, fun = getattr(inner, "jvp", None), getattr(inner, "fun", None)
            if callable(jvp) and callable(fun) and _closure(jvp).get("fn_jvp") is fn:
                primal = _closure(fun).get("fn")
                return _where_fn(primal) if callable(primal) else None
    return None


def _def_line(file: str, name: str, line: int) -> int:
    """The line of ``def name`` at or above ``line`` (a body line from a traceback)."""
    short = name.rsplit(".", 1)[-1]
    pat = re.compile(rf"^\s*(async\s+)?def\s+{re.escape(short)}\b")
    for ln in range(line, max(0, line - 400), -1):
        if pat.match(linecache.getline(file, ln)):
            return ln
    return line



def _code_span(fn) -> tuple[str, int, int] | None:
    code = getattr(inspect_unwrap(fn), "__code__", None)
    if code is None:
        return None
    lines = [ln for _, _, ln in code.co_lines() if ln is not None]
    return code.co_filename, code.co_firstlineno, max(lines, default=code.co_firstlineno)


def _primal_function(obj):
    """The user's primal function behind a custom_jvp/custom_vjp object (or Equinox's)."""
    fun = getattr(obj, "fun", None)  # jax.custom_jvp / jax.custom_vjp
    if fun is not None:
        return fun
    inner = getattr(obj, "fn", None)  # equinox.filter_custom_jvp (a custom_jvp) / _vjp (the fn)
    if inner is not None:
        fun = getattr(inner, "fun", None)
        if fun is not None:
            return _closure(fun).get("fn", fun)
        return inner
    return obj
