"""jgc check module:fn: exit codes 0 agree / 1 mismatch / 2 usage or input error."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jgc._src import cli

SOURCE = """
import jax.numpy as jnp

def loss(params, x):
    return jnp.sum(jnp.sin(params["w"] * x)) + params["b"] ** 2

def grad_ok(params, x):
    return {"w": x * jnp.cos(params["w"] * x), "b": 2 * params["b"]}

def grad_bad(params, x):  # element 2 of w is doubled
    g = grad_ok(params, x)
    return {"w": g["w"].at[2].multiply(2.0), "b": g["b"]}

def make_params():
    return {"w": jnp.linspace(0.1, 1.0, 4), "b": jnp.asarray(0.5)}

def make_args():
    return (jnp.arange(1.0, 5.0),)

def make_one_arg():  # not a tuple: passed as the one extra argument
    return jnp.arange(1.0, 5.0)

def needs_a_seed(seed):
    return make_params()

def broken_factory():
    raise RuntimeError("no data on this machine")

PARAMS = {"w": 1.0}
"""


@pytest.fixture
def mod(tmp_path, monkeypatch):
    """A module written into tmp_path and importable by its (unique) name."""
    name = f"cli_case_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(SOURCE))
    (tmp_path / f"{name}_needs_dep.py").write_text("import jgc_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return name


def run(capsys, *argv):
    code = cli.main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_exit_0_when_the_gradients_agree(mod, capsys):
    code, out, err = run(capsys, f"{mod}:loss", "--params", f"{mod}:make_params", "--args", f"{mod}:make_args")
    assert code == 0, err
    assert out.startswith("jgc.check PASS") and "['w']" in out and err == ""


def test_exit_1_on_a_mismatch_with_json_naming_leaf_and_index(mod, capsys):
    code, out, err = run(capsys, f"{mod}:loss", "--params", f"{mod}:make_params", "--args", f"{mod}:make_one_arg",
                         "--grad", f"{mod}:grad_bad", "--json")
    assert code == 1, err
    data = json.loads(out)
    assert data["ok"] is False
    (w,) = [lf for lf in data["leaves"] if lf["path"] == "['w']"]
    assert w["status"] == "mismatch" and w["mismatched_indices"] == [[2]]


def test_sampled_mode_and_a_file_path_spec(mod, tmp_path, capsys):
    code, out, err = run(capsys, f"{tmp_path / (mod + '.py')}:loss", "--params", f"{mod}:make_params",
                         "--args", f"{mod}:make_args", "--grad", f"{mod}:grad_ok", "--mode", "sampled",
                         "--samples", "2", "--seed", "1")
    assert code == 0, err
    assert "mode=sampled" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{m}", "--params", "{m}:make_params"],
         "FN must be written module:name (a module and a name in it, joined by a colon), e.g. "
         "mypkg.losses:loss; got '{m}'."),
        (["no_such_module_xyz:loss", "--params", "{m}:make_params"],
         "FN no_such_module_xyz:loss: cannot import module 'no_such_module_xyz' (No module named "
         "'no_such_module_xyz'). Check the spelling, run jgc from the directory that holds it, or add "
         "that directory to PYTHONPATH"),
        (["{m}_needs_dep:loss", "--params", "{m}:make_params"],
         "module '{m}_needs_dep' was found, but importing it failed: No module named "
         "'jgc_no_such_dependency'. Install the missing package 'jgc_no_such_dependency'"),
        (["{m}:los", "--params", "{m}:make_params"],
         "FN {m}:los: '{m}' has no attribute 'los'. Did you mean loss? Fix the name after the colon."),
        (["{m}:loss", "--params", "{m}:make_parms"],
         "--params {m}:make_parms: '{m}' has no attribute 'make_parms'. Did you mean make_params?"),
        (["{m}:loss", "--params", "{m}:PARAMS"],
         "--params {m}:PARAMS is a dict, not a factory. --params names a function that takes no "
         "arguments and returns the value"),
        (["{m}:loss", "--params", "{m}:needs_a_seed"],
         "--params {m}:needs_a_seed: calling it with no arguments raised TypeError"),
        (["{m}:loss", "--params", "{m}:make_params", "--args", "{m}:broken_factory"],
         "--args {m}:broken_factory: the factory raised RuntimeError: no data on this machine."),
        (["{m}:loss", "--params", "{m}:make_params"],
         "checking {m}:loss with 0 extra argument(s) raised TypeError"),
        (["{m}:loss", "--params", "{m}:make_params", "--args", "{m}:make_args", "--stencil", "complex",
          "--precision", "native", "--rtol", "-1"],
         "rtol must be a non-negative number or None, got -1.0."),
    ],
    ids=["no-colon", "missing-module", "missing-dependency", "missing-fn", "missing-factory",
         "not-a-factory", "factory-needs-args", "factory-raises", "fn-raises", "bad-option-value"],
)
def test_exit_2_names_the_thing_and_the_fix(mod, capsys, argv, message):
    code, out, err = run(capsys, *[a.format(m=mod) for a in argv])
    assert code == 2
    assert out == ""
    assert err.startswith("jgc check: ")
    assert message.format(m=mod) in err


@pytest.mark.parametrize("argv", [["check"], ["check", "m:f"], ["check", "m:f", "--params", "m:p", "--mode", "fast"]],
                         ids=["no-fn", "no-params", "bad-mode"])
def test_exit_2_on_usage_errors(capsys, argv):
    assert cli.main(argv) == 2
    assert "usage: jgc check" in capsys.readouterr().err


def test_plot_option_writes_a_picture(mod, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is the plot extra (pip install 'jgc[plot]')")
    out_png = tmp_path / "report.png"
    code, _, err = run(capsys, f"{mod}:loss", "--params", f"{mod}:make_params", "--args", f"{mod}:make_args",
                       "--grad", f"{mod}:grad_bad", "--plot", str(out_png))
    assert code == 1, err
    assert out_png.stat().st_size > 10_000


def test_installed_entry_point_exit_codes_via_pythonpath(mod, tmp_path):
    """The real process: python -m jgc, the module found through PYTHONPATH, not sys.path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(cli.__file__).parents[2])]))
    base = [sys.executable, "-m", "jgc", "check", f"{mod}:loss", "--params", f"{mod}:make_params",
            "--args", f"{mod}:make_args", "--grad", f"{mod}:grad_bad"]
    proc = subprocess.run(base, capture_output=True, text=True, env=env, cwd=Path(cli.__file__).parents[2],
                          check=False)
    assert proc.returncode == 1, proc.stderr
    assert "jgc.check FAIL" in proc.stdout and "mismatch" in proc.stdout


def test_without_mode_the_check_chooses_as_jgc_check_does(mod, capsys, monkeypatch):
    from jgc._src import policy, strategies

    argv = (f"{mod}:loss", "--params", f"{mod}:make_params", "--args", f"{mod}:make_args", "--grad", f"{mod}:grad_bad")
    code, out, err = run(capsys, *argv)
    assert code == 1 and "mode=full" in out, err  # a small model: every element
    # A model whose full check would not fit the time budget: screened, as jgc.check does.
    monkeypatch.setattr(strategies, "DEFAULT_BUDGET", 0)
    monkeypatch.setattr(policy, "DEFAULT_TIME_BUDGET", 0.0)
    code, out, err = run(capsys, *argv)
    assert code == 1, err
    assert "mode=default (directional" in out and "mode='full' checks every element" in out.splitlines()[0]
    code, out, err = run(capsys, *argv, "--mode", "full")
    assert code == 1 and "mode=full" in out


FLOAT32_ONLY = """
import jax, jax.numpy as jnp

@jax.custom_jvp
def softplus(x):
    return jnp.logaddexp(x, 0.0)

@softplus.defjvp
def _jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    coef = 1.0 if x.dtype == jnp.float64 else 1.01  # wrong at float32 only
    return softplus(x), jax.nn.sigmoid(x) * coef * t

def loss(w):
    return jnp.sum(softplus(w * 3.0))

def make_params():
    return jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32)
"""


def test_analytic_option_on_the_command_line(tmp_path, monkeypatch, capsys):
    # The gradient runs at the dtypes given by default (a float32-only rule bug fails);
    # --analytic reference evaluates it at the reference's precision, where it is right.
    name = f"cli_f32_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FLOAT32_ONLY))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run(capsys, f"{name}:loss", "--params", f"{name}:make_params")
    assert code == 1 and "mismatch" in out, out + err
    code, out, err = run(capsys, f"{name}:loss", "--params", f"{name}:make_params", "--analytic", "reference")
    assert code == 0, out + err
