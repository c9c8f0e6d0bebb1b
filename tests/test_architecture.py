"""The package's layers: every module of jgc/_src belongs to one, and imports only downwards.

docs/architecture.md draws these layers; this test keeps the picture true. A module
may import modules of its own layer or of a lower one, never of a higher one, and the
imports form no cycle.
"""

import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "jgc" / "_src"

# Lowest first; the same lists, in the same order, as in docs/architecture.md.
LAYERS = {
    "base": ["compat", "errors", "names", "noise", "policy", "progress", "statuses", "stencils", "trees",
             "validate", "compare", "jaxprs", "sources"],
    "runtime": ["memory", "compiling", "sharding", "sparse_values", "sparse_products", "sparse", "engine"],
    "problems": ["preparation", "outputs", "problem", "vector_layout", "vector_analytic", "vector", "steps",
                 "analytic"],
    "judging": ["report", "plot", "summary", "judge", "blocks", "messages", "rules_report"],
    "front doors": ["sampling", "screening", "strategies", "check", "jacobian", "products", "hvp",
                    "check_grads", "taylor", "intended", "rule_sites", "rule_eager", "rules"],
    "shells": ["testing", "training", "cli"],
}
LAYER_OF = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}


def imports(module: str) -> set:
    """The jgc/_src modules that ``module`` imports, at any depth of its code (lazy imports too)."""
    out = set()
    for node in ast.walk(ast.parse((SRC / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            out.update(n for n in names if (SRC / f"{n}.py").exists())
    return out


def test_every_module_has_a_layer():
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    assert modules == set(LAYER_OF), (
        f"without a layer: {sorted(modules - set(LAYER_OF))}; gone: {sorted(set(LAYER_OF) - modules)}")


def test_imports_go_downwards_only():
    upward = [f"{m} ({name}) imports {d} ({list(LAYERS)[LAYER_OF[d]]})"
              for name, mods in LAYERS.items() for m in mods for d in imports(m) if LAYER_OF[d] > LAYER_OF[m]]
    assert not upward, upward


def test_no_import_cycles():
    graph = {m: imports(m) for m in LAYER_OF}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_each_module_states_its_concept():
    for p in SRC.glob("*.py"):
        doc = ast.get_docstring(ast.parse(p.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{p.name} has no docstring stating its concept"


def test_modules_stay_readable():
    """At most 450 lines a module and 6 positional parameters a function.

    The one exception is ``check_grads``, whose positional signature is JAX's
    ``jax.test_util.check_grads(f, args, order, modes, atol, rtol, eps)``: a drop-in
    keeps it.
    """
    long = {p.name: n for p in SRC.glob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
    wide = []
    for p in SRC.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                n = len(node.args.posonlyargs) + len(node.args.args)
                if n > 6 and (p.stem, getattr(node, "name", "")) != ("check_grads", "check_grads"):
                    wide.append(f"{p.name}:{node.lineno} {getattr(node, 'name', 'lambda')} ({n})")
    assert not wide, wide
