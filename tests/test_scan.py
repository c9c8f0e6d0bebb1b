"""`pytest --jgc-rules=PACKAGE` and `jgc scan`: every rule a package's own tests run, checked after them.

The fixture package tests/scan_fixture/fixturepkg plants five wrong rules (a plain wrong
JVP, one wrong for its second argument, one wrong at order 2 only, a VJP nonlinear in
its cotangent, a custom_vmap wrong only under vmap) beside a right rule, an intended
straight-through estimator and a rule no test runs; its own tests
(tests/scan_fixture/fixture_rules.py) pass and never look at derivatives' values.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgc._src.rules import scan

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "scan_fixture"
RULES_PY = FIXTURE / "fixturepkg" / "rules.py"
WRONG = {"cube": "jvp", "mul_sin": "jvp", "softplus": "order 2", "tanh_clipped_vjp": "linearity",
         "scaled_sin": "batching"}


def defined_at(name: str) -> str:
    """fixturepkg/rules.py:LINE of the first decorator above ``def name`` (read from the source)."""
    lines = RULES_PY.read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if re.match(rf"def {name}\(", ln))
    while at > 0 and lines[at - 1].startswith("@"):
        at -= 1
    return f"fixturepkg/rules.py:{at + 1}"


def run_fixture(tmp_path, *args, via_cli=False):
    """The fixture's tests with the plugin, in a subprocess at the fixture's directory: (exit code, output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(FIXTURE)]), JAX_PLATFORMS="cpu")
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    if via_cli:
        cmd = [sys.executable, "-m", "jgc", "scan", "fixturepkg", "fixture_rules.py", *args]
    else:
        cmd = [sys.executable, "-m", "pytest", "-p", "no:jgc", "-p", "pytest_jgc", "--jgc-rules=fixturepkg",
               "fixture_rules.py", *args]
    p = subprocess.run(cmd, check=False, cwd=FIXTURE, env=env, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def by_name(report_path) -> dict:
    return {r["name"]: r for r in json.loads(Path(report_path).read_text())["rules"]}


# -- the acceptance run: every planted rule, then the same with the known failures -----------------
@pytest.mark.slow
def test_the_plugin_names_every_wrong_rule_and_only_those(tmp_path):
    report, known = tmp_path / "rules.json", tmp_path / "known.json"
    code, out = run_fixture(tmp_path, f"--jgc-report={report}", f"--jgc-write-known={known}", "--jgc-points=1")
    assert code == 1, out
    assert "9 passed" in out, out  # the tests themselves pass with the plugin on
    rules = by_name(report)
    for name, check in WRONG.items():
        r = rules[name]
        assert (r["status"], r["defined_at"], r["worst"]["check"]) == ("mismatch", defined_at(name), check), r
        assert f"{defined_at(name)}" in out
    assert "operand y" in rules["mul_sin"]["worst"]["element"]  # the second argument is the wrong one
    assert rules["smooth_relu"]["status"] == "ok" and rules["smooth_relu"]["points"]
    assert rules["ste_round"]["status"] == "intended"
    assert rules["ignored"]["status"] == "not exercised"
    assert rules["ignored"]["defined_at"] == defined_at("ignored")
    assert set(rules) == set(WRONG) | {"smooth_relu", "ste_round", "ignored"}
    # Failing first in the summary.
    lines = out[out.index("jgc: custom rules"):].splitlines()
    statuses = [ln.split()[0] for ln in lines[2:] if ln and not ln.startswith((" ", "not exercised:", "note"))
                and ln.split()[0] in scan.STATUSES]
    assert statuses == sorted(statuses, key=scan.STATUSES.index), statuses
    listed = {e["name"] for e in json.loads(known.read_text())["known_failures"]}
    assert listed == set(WRONG)

    code, out = run_fixture(tmp_path, f"--jgc-known={known}", "--jgc-points=1")
    assert code == 0, out
    assert "mismatch (known)" in out


# -- a fast run of part of the fixture, through `jgc scan` ---------------------------------------------
def test_jgc_scan_flags_a_wrong_jvp_and_passes_an_intended_rule(tmp_path):
    report = tmp_path / "rules.json"
    # Two tests, one check each (jgc.check_rule's first-order check): seconds, not minutes.
    code, out = run_fixture(tmp_path, "--report", str(report), "-q", "-k", "cube_values or ste_round",
                            "--jgc-checks=jvp", via_cli=True)
    assert code == 1, out
    assert "2 passed" in out, out
    rules = by_name(report)
    assert rules["cube"]["status"] == "mismatch" and rules["cube"]["defined_at"] == defined_at("cube")
    assert rules["cube"]["worst"]["check"] == "jvp" and list(rules["cube"]["checks"]) == ["jvp"]
    assert rules["cube"]["tests"] == ["fixture_rules.py::test_cube_values"]
    assert rules["ste_round"]["status"] == "intended"
    for name in ("smooth_relu", "mul_sin", "softplus", "tanh_clipped_vjp", "scaled_sin", "ignored"):
        assert rules[name]["status"] == "not exercised", rules[name]


@pytest.mark.slow
def test_under_xdist_the_controller_merges_the_workers_rules(tmp_path):
    pytest.importorskip("xdist", reason="pytest-xdist runs the workers")
    report = tmp_path / "rules.json"
    code, out = run_fixture(tmp_path, "-n", "2", "-k", "cube_values or ste_round", "--jgc-checks=jvp",
                            f"--jgc-report={report}")
    assert code == 1, out
    rules = by_name(report)
    assert rules["cube"]["status"] == "mismatch" and rules["cube"]["tests"] == ["fixture_rules.py::test_cube_values"]
    assert rules["ste_round"]["status"] == "intended"


# -- the recorder in this process: what it captures, and that it leaves everything as it was --------------
def _fixture_module():
    sys.path.insert(0, str(FIXTURE))
    try:
        import fixturepkg
    finally:
        sys.path.remove(str(FIXTURE))
    return fixturepkg


def test_the_recorder_restores_every_original_object():
    from jax._src import api
    from jax._src import custom_derivatives as cd

    def now():
        return (cd.custom_jvp.__call__, cd.custom_vjp.__call__, jax.grad, jax.vjp, jax.jacrev, jax.hessian, api.jvp,
                api.vjp)

    before = now()
    rec = scan.Recorder("fixturepkg", dirs=[str(FIXTURE / "fixturepkg") + os.sep])
    rec.install()
    assert jax.grad is not before[2] and api.vjp is not before[-1]
    rec.restore()
    assert all(a is b for a, b in zip(now(), before))


def test_the_recorder_captures_eager_grad_vmap_and_jit_calls_and_changes_no_result():
    fp = _fixture_module()
    x = jnp.array([0.5, -1.5, 2.0])

    def run():
        return (fp.cube(x), jax.grad(lambda v: jnp.sum(fp.softplus(v)))(x),
                jax.vmap(fp.scaled_sin)(jnp.stack([x, 2 * x])),
                jax.grad(jax.jit(lambda v: jnp.sum(fp.smooth_relu(v) ** 2)))(x),
                jax.value_and_grad(lambda v: jnp.sum(fp.tanh_clipped_vjp(v)))(x))

    plain = run()
    rec = scan.Recorder("fixturepkg", dirs=[str(FIXTURE / "fixturepkg") + os.sep])
    rec.install()
    try:
        rec.test = "t"
        recorded = run()
    finally:
        rec.restore()
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(recorded)):
        np.testing.assert_array_equal(a, b)
    seen = {r.name: r for r in rec.rules.values()}
    assert set(seen) == {"cube", "softplus", "scaled_sin", "smooth_relu", "tanh_clipped_vjp"}
    np.testing.assert_array_equal(seen["cube"].points[0].args[0], x)  # the eager call's array
    np.testing.assert_array_equal(seen["softplus"].points[0].args[0], x)  # the primal under grad's tracer
    np.testing.assert_array_equal(seen["scaled_sin"].points[0].args[0], x)  # lane 0 under vmap
    # Inside jit: no operand seen during the test, the outer grad call kept, operands found after it.
    assert not seen["smooth_relu"].points and len(rec.outer) == 1
    rec.capture_outer(deadline=float("inf"))
    (p,) = seen["smooth_relu"].points
    np.testing.assert_allclose(p.args[0], x)
    assert seen["cube"].tests == {"t": None}


def test_rules_registered_on_primitives_are_recorded_and_checked():
    # fixturepkg/prims.py: fixture_cube's JVP rule is wrong (2x² for 3x²); fixture_double's JVP
    # rule is right and its transpose rule wrong (3·ct for 2·ct). The module is imported
    # after the recorder is installed, as a package's tests import it.
    rec = scan.Recorder("fixturepkg", dirs=[str(FIXTURE / "fixturepkg") + os.sep])
    rec.install()
    try:
        sys.path.insert(0, str(FIXTURE))
        from fixturepkg import prims
    finally:
        sys.path.remove(str(FIXTURE))
    x = jnp.array([0.5, -1.5, 2.0])
    try:
        rec.watch_primitives()
        rec.test = "t"
        cubed = prims.prim_cube(x)  # eager
        g = jax.grad(jax.jit(lambda v: jnp.sum(jnp.tanh(prims.prim_double(v)))))(x)  # inside jit, under grad
    finally:
        rec.restore()
    assert "bind" not in vars(prims.cube_p) and "bind" not in vars(prims.double_p)
    np.testing.assert_array_equal(cubed, x ** 3)
    # The wrong transpose's gradient, as without the recorder (float32 tanh: results ~2e-5 apart).
    np.testing.assert_allclose(g, 3 * (1 - jnp.tanh(2 * x) ** 2), rtol=1e-4)
    results = {(d["name"], d["kind"]): d for d in scan.check_recorded(rec, budget=120, points=1)}
    cube = results[("fixture_cube", "primitive jvp")]
    assert cube["status"] == "mismatch" and cube["worst"]["check"] == "jvp", cube
    assert cube["defined_at"] == f"{RULES_PY.parent.relative_to(ROOT) / 'prims.py'}:{_line_of('def _cube_jvp')}"
    assert "rule 8 vs finite differences 12" in cube["worst"]["element"]  # at x = 2: 2·4 against 3·4
    assert results[("fixture_double", "primitive jvp")]["status"] == "ok"
    tr = results[("fixture_double", "primitive transpose")]
    assert tr["status"] == "mismatch" and tr["defined_at"].endswith(f"prims.py:{_line_of('def _double_transpose')}")
    assert cube["tests"] == ["t"] and tr["tests"] == ["t"]


def _line_of(text: str) -> int:
    lines = (RULES_PY.parent / "prims.py").read_text().splitlines()
    return next(i + 1 for i, ln in enumerate(lines) if ln.startswith(text))


def test_a_primal_that_reads_state_outside_its_arguments_is_not_checked():
    calls = [0]

    @jax.custom_jvp
    def drifting(x):  # a new value at each call, as a parameter drawn during Flax's init
        calls[0] += 1
        return x + calls[0]

    drifting.defjvp(lambda p, t: (drifting(p[0]), t[0]))
    r = scan._Seen("drifting", "custom_jvp", scan.Where("drifting", __file__, 1))
    out = scan._check_point(r, scan._Point(drifting, (jnp.ones(2),), "concrete call", "float32[2]"), {})
    assert out["status"] == "not checked" and "called twice" in out["reason"], out


def test_rules_defined_in_the_test_modules_are_set_aside_as_test_doubles():
    @jax.custom_jvp
    def double(x):  # a test double: its rule raises, as optax's test_fun_derivative_not_used's does
        return x

    double.defjvp(lambda p, t: (_ for _ in ()).throw(AssertionError("never called")))
    rec = scan.Recorder("tests", dirs=[str(ROOT / "tests") + os.sep])
    rec.install()
    try:
        double(jnp.ones(2))
    finally:
        rec.restore()
    rec.test_files = {__file__}
    checked = scan.check_recorded(rec, budget=60, points=1)
    assert [d for d in checked if not d["kind"].startswith("primitive")] == []  # (fixture primitives: not run)
    assert [r.name for r in rec.test_doubles] == [
        "test_rules_defined_in_the_test_modules_are_set_aside_as_test_doubles.<locals>.double"]


def test_operands_of_an_extended_dtype_are_described_and_not_checked():
    fp8_ops = pytest.importorskip("flax.linen.fp8_ops", reason="Flax's fp8_meta32, an extended dtype")
    meta = jax.lax.convert_element_type(jnp.ones(3), fp8_ops.fp32_max_grad)
    scale = jax.lax.convert_element_type(jnp.ones(1), fp8_ops.fp32_max_grad)
    assert scan._describe([jnp.ones(1), meta]) == "float32[1], fp8_meta32[3]"
    r = scan._Seen("in_qdq", "custom_vjp", scan.Where("in_qdq", fp8_ops.__file__, 1))
    out = scan._check_point(r, scan._Point(fp8_ops.in_qdq, (jnp.float32, jnp.float8_e4m3fn, jnp.ones(1), scale, meta),
                                                 "concrete call", ""), {})
    assert out["status"] == "not checked" and "fp8_meta32" in out["reason"], out
    assert not scan._is_extended(jax.random.key(0))  # typed PRNG keys are held as before, not refused


def test_a_rule_lifted_by_flax_belongs_to_the_module_that_defines_its_backward_pass():
    nn = pytest.importorskip("flax.linen", reason="Flax's lifted custom_vjp")

    class SignGrad(nn.Module):
        @nn.compact
        def __call__(self, x):
            def f(mdl, x):
                return mdl(x)

            def bwd(vjp_fn, y_t):
                params_t, input_t = vjp_fn(y_t)
                return jax.tree_util.tree_map(jnp.sign, params_t), input_t

            return nn.custom_vjp(f, forward_fn=lambda mdl, x: nn.vjp(f, mdl, x), backward_fn=bwd)(nn.Dense(1), x)

    x = jnp.ones((2,))
    seen = {}
    for package, dirs in (("flax", scan.package_dirs("flax")), ("tests", [str(ROOT / "tests") + os.sep])):
        rec = scan.Recorder(package, dirs=dirs)
        rec.install()
        try:
            variables = SignGrad().init(jax.random.key(0), x)
            jax.grad(lambda v: jnp.sum(SignGrad().apply(v, x)))(variables)
        finally:
            rec.restore()
        seen[package] = [(r.name, r.where.file) for r in rec.rules.values()]
    assert seen["flax"] == []  # flax/core/lift.py only passes the rule on
    name = "test_a_rule_lifted_by_flax_belongs_to_the_module_that_defines_its_backward_pass.<locals>.SignGrad."
    assert seen["tests"] == [(name + "__call__.<locals>.bwd", __file__)]


def test_points_are_kept_per_new_shape_or_magnitude_only():
    fp = _fixture_module()
    rec = scan.Recorder("fixturepkg", dirs=[str(FIXTURE / "fixturepkg") + os.sep])
    rec.install()
    try:
        for x in (jnp.ones(3), 2 * jnp.ones(3), 1e3 * jnp.ones(3), jnp.ones((2, 2)), jnp.ones(3, jnp.int32) * 1.0):
            fp.cube(x)
    finally:
        rec.restore()
    (r,) = rec.rules.values()
    assert r.calls == 5
    assert [p.shapes for p in r.points] == ["float32[3]", "float32[3]", "float32[2, 2]"]


def test_the_static_scan_lists_module_level_rules_with_their_first_decorator_line():
    found = {d["name"]: d for d in scan.static_rules([str(FIXTURE / "fixturepkg") + os.sep])}
    assert set(found) == set(WRONG) | {"smooth_relu", "ste_round", "ignored"}
    for name, d in found.items():
        assert f"fixturepkg/rules.py:{d['line']}" == defined_at(name)
    assert found["scaled_sin"]["kind"] == "custom_vmap" and found["tanh_clipped_vjp"]["kind"] == "custom_vjp"


def test_known_failures_do_not_fail_the_session(tmp_path):
    results = [{"name": "cube", "defined_at": "pkg/a.py:3", "status": "mismatch", "worst": {"check": "jvp"}},
               {"name": "sq", "defined_at": "pkg/a.py:9", "status": "mismatch", "worst": {"check": "vjp"}},
               {"name": "ok", "defined_at": "pkg/a.py:20", "status": "ok", "worst": None}]
    path = tmp_path / "known.json"
    assert scan.write_known(str(path), results[:1]) == 1
    # Known by file and name: a line that moved keeps the rule known.
    moved = [dict(results[0], defined_at="pkg/a.py:5")] + results[1:]
    done = scan.finish(moved, scan.read_known(str(path)))
    assert [d["name"] for d in scan.unexpected(done)] == ["sq"]
    assert [d["known"] for d in done] == [False, True, False]  # failing first, the unexpected one on top
    (tmp_path / "bad.json").write_text('{"known_failures": [{"name": "x"}]}')
    with pytest.raises(ValueError, match="defined_at"):
        scan.read_known(str(tmp_path / "bad.json"))


def test_the_entry_point_pytest_loads_everywhere_imports_neither_jgc_nor_jax():
    # pytest imports the pytest11 entry point in every session of every project where jgc
    # is installed; importing JAX there would fix its flags before the project's conftest.
    code = ("import sys, pytest_jgc; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'jgc')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
