"""Real models from Flax (NNX and Linen), Equinox and Haiku: checked as they are.

For each library: jax.grad of a small real model passes, a gradient wrong in one
element fails at exactly that leaf and index, non-array leaves are skipped, and the
caller's model is not modified. The libraries are in the ``test`` extra, not in jgc's
dependencies, so each test skips (with the reason) where its library is missing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgc

X = jax.random.normal(jax.random.key(0), (6, 3))
Y = jnp.sin(X).sum(-1)


def wrong_at(grads, path: str, index: tuple):
    """``grads`` with element ``index`` of the leaf at ``path`` increased by 10% (+0.01)."""
    hits = []

    def bump(p, g):
        if jax.tree_util.keystr(p) != path:
            return g
        hits.append(p)
        return g.at[index].set(g[index] * 1.1 + 0.01)

    out = jax.tree_util.tree_map_with_path(bump, grads)
    assert len(hits) == 1, f"no leaf {path} in the gradient tree"
    return out


def snapshot(tree):
    return [np.array(x) for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)]


def assert_unchanged(before, tree):
    after = snapshot(tree)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def assert_mutation_caught(report, path, index):
    assert not report.ok
    assert [lf.path for lf in report.failing()] == [path]
    leaf = report.leaf(path)
    assert leaf.elements("mismatch") == [index] and leaf.worst_index == index


# -- Flax NNX -----------------------------------------------------------------------
def test_flax_nnx_module_directly_and_through_split():
    nnx = pytest.importorskip("flax.nnx", reason="Flax is in the test extra (pip install flax)")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, rngs=rngs)
            self.head = nnx.Linear(4, 1, rngs=rngs)
            self.activation = nnx.relu  # static attributes: a function and an int
            self.repeats = 2

        def __call__(self, x):
            h = self.activation(self.dense(x)) * self.repeats
            return self.head(h)[..., 0]

    model = Net(nnx.Rngs(0))

    def loss(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    before = snapshot(model)
    # In this Flax version an nnx.Module is a pytree: check it as it is.
    direct = jgc.check(loss, model, X, Y)
    assert direct.ok and direct.size == 3 * 4 + 4 + 4 + 1
    assert_unchanged(before, model)
    assert model.repeats == 2 and model.activation is nnx.relu

    # The nnx.split route (works in every NNX version): a State of Params.
    graphdef, state = nnx.split(model, nnx.Param)
    path = "['dense']['kernel'].value"
    grads = jax.grad(lambda s: loss(nnx.merge(graphdef, s), X, Y))(state)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]]
    if path not in paths:  # the Variable's key path differs between Flax versions
        path = next(p for p in paths if "dense" in p and "kernel" in p)
    bad = jgc.check(lambda s, x, y: loss(nnx.merge(graphdef, s), x, y), state, X, Y,
                    grad=wrong_at(grads, path, (2, 1)))
    assert_mutation_caught(bad, path, (2, 1))


# -- Flax Linen ---------------------------------------------------------------------
def test_flax_linen_params_with_batch_stats_closed_over():
    nn = pytest.importorskip("flax.linen", reason="Flax is in the test extra (pip install flax)")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4)(x)
            x = nn.BatchNorm(use_running_average=True, use_scale=False, use_bias=False)(x)
            return nn.Dense(1)(nn.tanh(x))[..., 0]

    model = Net()
    variables = model.init(jax.random.key(1), X)
    assert set(variables) == {"params", "batch_stats"}

    def loss(params, x, y):
        # Only the trainable collection is checked; batch statistics are closed over.
        out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
        return jnp.mean((out - y) ** 2)

    params = variables["params"]
    before = snapshot(variables)
    good = jgc.check(loss, params, X, Y)
    assert good.ok and {lf.path for lf in good.leaves} == {
        "['Dense_0']['kernel']", "['Dense_0']['bias']", "['Dense_1']['kernel']", "['Dense_1']['bias']"}
    grads = jax.grad(loss)(params, X, Y)
    bad = jgc.check(loss, params, X, Y, grad=wrong_at(grads, "['Dense_1']['kernel']", (3, 0)))
    assert_mutation_caught(bad, "['Dense_1']['kernel']", (3, 0))
    assert_unchanged(before, variables)


# -- Equinox ------------------------------------------------------------------------
def test_equinox_module_holding_functions_and_ints():
    eqx = pytest.importorskip("equinox", reason="Equinox is in the test extra (pip install equinox)")

    class Net(eqx.Module):
        mlp: eqx.nn.MLP
        activation: object  # a plain field holding jax.nn.relu: a non-array leaf
        scale: int  # an int leaf
        mix: jax.Array

        def __call__(self, x):
            return self.scale * self.mlp(self.activation(x + self.mix)).sum()

    model = Net(eqx.nn.MLP(3, 2, 4, 1, activation=jax.nn.softplus, key=jax.random.key(2)),
                jax.nn.relu, 3, jnp.array([0.1, -0.2, 0.3]))

    def loss(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    before = snapshot(model)
    good = jgc.check(loss, model, X, Y)
    assert good.ok
    skipped = dict(good.skipped)
    assert skipped[".activation"] == "callable relu" and skipped[".scale"] == "int"
    assert ".mix" in {lf.path for lf in good.leaves}
    # Equinox's own gradient (None for the non-array leaves) is accepted as it is. It is
    # passed as a function: an eqx.Module of gradients is itself callable.
    grads = eqx.filter_grad(loss)(model, X, Y)
    bad = jgc.check(loss, model, X, Y, grad=lambda *_: wrong_at(grads, ".mix", (1,)))
    assert_mutation_caught(bad, ".mix", (1,))
    assert_unchanged(before, model)
    assert model.activation is jax.nn.relu and model.scale == 3


# -- Haiku --------------------------------------------------------------------------
def test_haiku_params_tree():
    hk = pytest.importorskip("haiku", reason="dm-haiku is in the test extra (pip install dm-haiku)")
    model = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([4, 1], activation=jnp.tanh)(x)[..., 0]))
    params = model.init(jax.random.key(3), X)

    def loss(params, x, y):
        return jnp.mean((model.apply(params, x) - y) ** 2)

    before = snapshot(params)
    good = jgc.check(loss, params, X, Y)
    assert good.ok and "['mlp/~/linear_0']['w']" in {lf.path for lf in good.leaves}
    # Haiku initialises biases to zero: they still get a non-zero step and are checked.
    assert good.leaf("['mlp/~/linear_0']['b']").checked == 4
    grads = jax.grad(loss)(params, X, Y)
    bad = jgc.check(loss, params, X, Y, grad=wrong_at(grads, "['mlp/~/linear_0']['b']", (2,)))
    assert_mutation_caught(bad, "['mlp/~/linear_0']['b']", (2,))
    assert_unchanged(before, params)
