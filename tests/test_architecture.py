"""The package's shape: layers, wings, private names, import depth, and the page that draws them.

The layers and the import graph come from docs/gen_architecture.py, which reads the code of
jgc/ (it never imports it) and generates the picture and table in docs/architecture.md. A
unit is a module directly in jgc/_src or a sub-package of it (a wing); every unit has a
layer and imports only downwards, a wing's inside has its own order, private names stay
inside their wing, no import of jgc's own modules hides inside a function, and the page
shows what the code does.
"""

import ast
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_architecture", ROOT / "docs" / "gen_architecture.py")
arch = sys.modules["gen_architecture"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arch)

# Modules a `python -m jgc` run imports in a row at most, __main__ included: the
# longest chain measured 16 before the layers were flattened, 12 after. A longer chain
# is a shell or front door reaching down through a module it does not need.
MAX_CHAIN = 12

LAYER_INDEX = {u: i for i, us in enumerate(arch.LAYERS.values()) for u in us}


def _src_modules():
    return [m for m in arch.modules() if arch.unit_of(m) is not None]


def test_every_unit_has_one_layer():
    listed = [u for us in arch.LAYERS.values() for u in us]
    twice = sorted({u for u in listed if listed.count(u) > 1})
    assert not twice, f"listed twice: {twice}"
    units = {arch.unit_of(m) for m in _src_modules()}
    assert units == set(listed), (
        f"without a layer: {sorted(units - set(listed))}; listed but gone: {sorted(set(listed) - units)}")


def test_every_wing_lists_its_inside():
    for wing in {arch.wing_of(m) for m in _src_modules()} - {None}:
        inside = set(arch.wing_inside(wing)) - {"__init__"}
        assert wing in arch.WINGS and inside == set(arch.WINGS[wing]), (
            f"the inside of {wing}/ is {sorted(inside)}; WINGS lists {arch.WINGS.get(wing)}")
    homeless = sorted(set(arch.WINGS) - set(LAYER_INDEX))
    assert not homeless, f"wings without a layer: {homeless}"


def test_imports_go_downwards_only():
    upward = [f"{u} ({list(arch.LAYERS)[LAYER_INDEX[u]]}) imports {d} ({list(arch.LAYERS)[LAYER_INDEX[d]]})"
              for u, deps in arch.units().items() for d in deps if LAYER_INDEX[d] > LAYER_INDEX[u]]
    assert not upward, upward


def test_a_wing_imports_downwards_inside():
    upward = []
    for wing, order in arch.WINGS.items():
        for m, deps in arch.wing_inside(wing).items():
            if m in order:  # a module missing from WINGS fails test_every_wing_lists_its_inside
                upward += [f"{wing}/{m} imports {wing}/{d}" + ("" if d in order or d == "__init__" else " (not in WINGS)")
                           for d in deps if d not in order or order.index(d) >= order.index(m)]
    assert not upward, upward


def test_no_import_cycles():
    graph, state, cycles = arch.graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_private_names_stay_inside_their_wing():
    """``from .x import _name`` only between two modules of one wing (a sub-package of jgc/_src)."""
    crossing = [f"{i.where}: {i.importer} takes {i.name} from {i.target}"
                for m in arch.modules() for i in arch.imports(m)
                if i.name.startswith("_") and not i.name.startswith("__")
                and not (arch.wing_of(i.importer) is not None
                         and arch.wing_of(i.importer) == arch.wing_of(i.target))]
    assert not crossing, crossing


def test_no_import_of_jgc_inside_a_function():
    """Every import of jgc's own modules sits at the top of its module, where the graph shows it."""
    hidden = [f"{i.where}: {i.importer} imports {i.target}" for m in arch.modules() for i in arch.imports(m)
              if i.in_function]
    assert not hidden, hidden


def test_the_longest_import_chain_is_short():
    chain = arch.longest_chain("jgc.__main__")
    assert len(chain) <= MAX_CHAIN, f"{len(chain)} modules: {' -> '.join(chain)}"


def test_the_graph_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The reader the tests rely on finds relative, absolute, nested and private imports."""
    pkg = tmp_path / "jgc"
    (pkg / "_src" / "wing").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from ._src.a import f\n")
    (pkg / "__main__.py").write_text("from jgc._src.b import g\n")
    (pkg / "_src" / "a.py").write_text("def f():\n    from . import c\n")
    (pkg / "_src" / "c.py").write_text("")
    (pkg / "_src" / "b.py").write_text("from .a import _h\nfrom .wing import x\n")
    (pkg / "_src" / "wing" / "__init__.py").write_text("from .inner import _y as x\n")
    (pkg / "_src" / "wing" / "inner.py").write_text("from ..a import f\n_y = 1\n")
    monkeypatch.setattr(arch, "ROOT", tmp_path)
    monkeypatch.setattr(arch, "PACKAGE", pkg)
    arch.modules.cache_clear()
    arch.imports.cache_clear()
    try:
        seen = {(i.importer, i.target, i.name, i.in_function)
                for m in arch.modules() for i in arch.imports(m)}
        assert seen == {
            ("jgc", "jgc._src.a", "f", False), ("jgc.__main__", "jgc._src.b", "g", False),
            ("jgc._src.a", "jgc._src.c", "", True), ("jgc._src.b", "jgc._src.a", "_h", False),
            ("jgc._src.b", "jgc._src.wing", "x", False),
            ("jgc._src.wing", "jgc._src.wing.inner", "_y", False),
            ("jgc._src.wing.inner", "jgc._src.a", "f", False),
        }
        assert arch.wing_of("jgc._src.wing.inner") == "wing" and arch.wing_of("jgc._src.b") is None
        assert arch.longest_chain() == ["jgc.__main__", "jgc._src.b", "jgc._src.wing", "jgc._src.wing.inner",
                                        "jgc._src.a", "jgc._src.c"]
    finally:
        arch.modules.cache_clear()
        arch.imports.cache_clear()


def test_the_architecture_page_is_generated_from_the_code():
    assert arch.current(), f"docs/architecture.md lacks the markers {arch.BEGIN!r} and {arch.END!r}"
    assert arch.current() == arch.generated(), (
        "docs/architecture.md is stale: run python docs/gen_architecture.py")


def test_each_module_states_its_concept():
    for p in arch.SRC.rglob("*.py"):
        doc = ast.get_docstring(ast.parse(p.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{p.relative_to(ROOT)} states no concept in a docstring"


def test_functions_take_few_positional_parameters():
    """At most 6 positional parameters a function: more are passed by keyword.

    The one exception is ``check_grads``, whose positional signature is JAX's
    ``jax.test_util.check_grads(f, args, order, modes, atol, rtol, eps)``: a drop-in
    keeps it.
    """
    wide = []
    for p in arch.SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                n = len(node.args.posonlyargs) + len(node.args.args)
                if n > 6 and (p.stem, getattr(node, "name", "")) != ("check_grads", "check_grads"):
                    name = getattr(node, "name", "lambda")
                    wide.append(f"{p.relative_to(ROOT)}:{node.lineno} {name} ({n})")
    assert not wide, wide


# Modules outside the runtime layer that call jax.vmap, and why: none of them batches the
# checked function off the point (that is the runtime layer's, engine.py's, work).
VMAP_ELSEWHERE = {
    # JVPs and VJPs of f at the point itself, batched over tangents or cotangents: the
    # analytic side of a vector check, not evaluations of f at perturbed points.
    "vector_analytic",
    # A custom rule's primitive over the call sites that share it (one input of the
    # function that check_jacobian/check_jvp then perturb through the engine).
    "rules/check",
    # The batching identity: whether a rule under jax.vmap gives what one call per lane
    # gives. vmap is what is checked there.
    "rules/identities",
    # The report picture's step curve: fn at one element ± h for a range of h, outside
    # any check (no count, no verdict). The engine there would hang the runtime layer
    # under report → plot, and `python -m jgc`'s import chain would pass 12 modules
    # (test_the_longest_import_chain_is_short).
    "plot",
}


def test_the_checked_function_is_vmapped_only_in_the_runtime_layer():
    """Every batch of the checked function at perturbed points goes through the runtime
    layer (engine's coordinate and line rows): a faster evaluation is a change there only."""
    runtime = set(arch.LAYERS["runtime"])
    found = set()
    for p in arch.SRC.rglob("*.py"):
        name = str(p.relative_to(arch.SRC).with_suffix(""))
        if name in runtime:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "vmap")
                    or (isinstance(node.func, ast.Name) and node.func.id == "vmap")):
                found.add(name)
    assert found <= VMAP_ELSEWHERE, sorted(found - VMAP_ELSEWHERE)
    # Every entry still calls vmap: an allowance is not kept for code that is gone.
    assert found == VMAP_ELSEWHERE, sorted(VMAP_ELSEWHERE - found)


def _calls(module: str) -> set[str]:
    """Every call in jgc/_src/<module>.py as its dotted source text (``trees.split_params``)."""
    tree = ast.parse((arch.SRC / f"{module}.py").read_text())
    return {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}


def _methods(module: str) -> dict[str, set[str]]:
    """Class name -> the names of the methods it defines, in jgc/_src/<module>.py."""
    tree = ast.parse((arch.SRC / f"{module}.py").read_text())
    return {c.name: {f.name for f in c.body if isinstance(f, ast.FunctionDef)}
            for c in ast.walk(tree) if isinstance(c, ast.ClassDef)}


def test_both_problems_prepare_through_one_record_one_probe_and_one_steps():
    """Problem and VectorProblem make their prepared state with preparation.prepare (no
    split, cast or scales of their own), measure noise with noise.probe (not noise.finest
    directly) and take steps from steps.Steps (not policy.relative_step)."""
    own = {"trees.split_params", "trees.split_args", "split_params", "split_args", "evaluation_leaves",
           "step_scales", "precision_scope", "noise.finest", "policy.relative_step"}
    for module in ("problem", "vector"):
        calls = _calls(module)
        assert not calls & own, (module, sorted(calls & own))
        assert "self._prepared" in calls, module
    assert "noise.probe" in _calls("vector") and "probe" in _calls("noise")
    assert "Steps" in _calls("vector")
    assert "prepare" in _calls("vector") and "retried" in _calls("vector")
    # The analytic side at the dtypes given and check_hvp split params through the record too.
    for module in ("analytic", "hvp"):
        calls = _calls(module)
        assert "prepare" in calls and not calls & own, (module, sorted(calls & own))


def test_one_problem_class_prepares_estimates_and_checks_determinism_for_both_layouts():
    """vector.Prepared alone prepares (the record, the retry), keeps the evaluator table,
    builds a leaf's evaluator, estimates on coordinates, evaluates f afresh at the point
    and bounds two compilations' difference; the scalar and vector problems lay the
    output out (what is evaluated, its value at the point, its noise) and nothing more."""
    shared = {"_prepared", "__enter__", "evaluator", "leaf_function", "estimate", "_fresh_value",
              "primal_bound", "_differs", "coordinates", "relative_step"}
    assert shared <= _methods("vector")["Prepared"]
    assert not (_methods("problem")["Problem"] & (shared - {"evaluator"}))
    assert not (_methods("vector")["VectorProblem"] & shared)
    for module in ("problem", "vector"):
        assigned = {ast.unparse(t) for node in ast.walk(ast.parse((arch.SRC / f"{module}.py").read_text()))
                    if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])}
        assert module == "vector" or "self._evaluators" not in assigned, module
    assert "Prepared" not in _methods("preparation") and "Prepared" not in _methods("problem")
