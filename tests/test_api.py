"""The public surface is pinned: other code and tests depend on these names."""

import inspect

import jgc


# The contract of DESIGN.md plus the documented additions, exactly.
PUBLIC = {
    "check", "numerical_grad", "assert_grads_close", "GradCheckError", "Report",
    "LeafReport",
    "check_taylor",
    "TaylorReport",
    "check_jacobian",
    "check_jvp",
    "check_vjp",
    "check_hvp",
    "check_grads",
    "with_grad_check",
    "check_rules",
    "check_rule",
    "RulesReport",
    "intended",
    "approximate",
}


def test_public_names_are_pinned():
    # Submodules appear in dir(jgc) once imported: jgc.testing (chex-style
    # assertions) is public as a module, jgc.examples is the installed examples/.
    # pytest rewrites the asserts of every package that ships a pytest11 plugin (jgc's
    # is pytest_jgc), which adds "@py_builtins" and "@pytest_ar": not identifiers, and
    # no name a user can reach as jgc.<name>.
    public = {n for n in dir(jgc) if not n.startswith("_") and n.isidentifier()} - {"examples", "testing"}
    assert public == PUBLIC
    assert set(jgc.__all__) == PUBLIC


def test_version_is_a_literal_string():
    assert isinstance(jgc.__version__, str) and jgc.__version__.count(".") == 2


def test_grad_check_error_is_an_assertion_error_with_report():
    assert issubclass(jgc.GradCheckError, AssertionError)
    err = jgc.GradCheckError("msg", report="R")
    assert err.report == "R" and str(err) == "msg"


def test_check_signature():
    sig = inspect.signature(jgc.check)
    names = list(sig.parameters)
    assert names[:3] == ["fn", "params", "args"]
    assert sig.parameters["grad"].default is None
    assert sig.parameters["grad"].kind is inspect.Parameter.KEYWORD_ONLY


def test_check_rules_runs_on_this_jax_or_names_the_oldest_jax_it_reads():
    import jax
    import jax.numpy as jnp
    import pytest

    from jgc._src.rules import OLDEST_JAX, JaxInternalsChanged

    @jax.custom_jvp
    def bad_sin(x):
        return jnp.sin(x)

    bad_sin.defjvp(lambda p, t: (jnp.sin(p[0]), 2 * jnp.cos(p[0]) * t[0]))  # planted factor 2

    @jax.custom_vjp
    def good_sq(x):
        return x * x

    good_sq.defvjp(lambda x: (x * x, x), lambda x, g: (2 * x * g,))

    def loss(w):
        return jnp.sum(bad_sin(w)) + jnp.sum(good_sq(w))

    def release(v):
        return tuple(int(p) for p in v.split(".")[:3])

    w = jnp.array([0.3, -1.2])
    if release(jax.__version__) < release(OLDEST_JAX):
        # Refused with the version it needs, never a report that misses a rule.
        with pytest.raises(JaxInternalsChanged, match=f"JAX {OLDEST_JAX} and later"):
            jgc.check_rules(loss, w)
    else:
        rep = jgc.check_rules(loss, w)
        assert [r.name for r in rep.failing()] == ["bad_sin"] and rep.rule("good_sq").status == "ok"
