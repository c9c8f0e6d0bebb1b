"""PRNG keys and model state as users hold them.

Keys of both kinds (typed ``jax.random.key`` arrays and raw uint32 ``PRNGKey``s) may
sit anywhere in ``params`` or ``args``: they reach the function as keys, are never
perturbed, and keys in params are listed as skipped. Model state (NNX Dropout and
BatchNorm, Linen ``batch_stats`` and dropout rngs, Equinox ``eqx.nn.State``, Haiku
``transform_with_state``) is checked in one call, as the README shows, and the
caller's model and state are left as they were. Each library test skips (with the
reason) where its library is missing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jgc

X = jax.random.normal(jax.random.key(0), (6, 3))
Y = jnp.sin(X).sum(-1)


def snapshot(tree):
    """Host copies of every array leaf (a typed key as its key data, tagged as a key)."""
    out = []
    for x in jax.tree_util.tree_leaves(tree):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            out.append(("key", str(x.dtype), np.array(jax.random.key_data(x))))
        elif isinstance(x, (jax.Array, np.ndarray)):
            out.append(("array", str(x.dtype), np.array(x)))
    return out


def assert_unchanged(before, tree):
    after = snapshot(tree)
    assert [(kind, dtype) for kind, dtype, _ in after] == [(kind, dtype) for kind, dtype, _ in before]
    for (_, _, a), (_, _, b) in zip(before, after):
        np.testing.assert_array_equal(a, b)


# -- PRNG keys anywhere ---------------------------------------------------------------
PARAMS = {"w": jnp.array([0.3, -1.2, 0.7]),
          "keys": {"typed": jax.random.split(jax.random.key(1), 2), "raw": jax.random.PRNGKey(2)}}
BATCH = {"x": np.array([1.0, 2.0, -0.5], np.float32),
         "rng": {"typed": jax.random.key(3), "raw": jax.random.PRNGKey(4)}}
KEYS_SKIPPED = {"['keys']['raw']": "uint32[2]", "['keys']['typed']": "key<fry>[2]"}


def noisy_loss(p, batch):
    """Draws from every key it is given: any key converted to something else fails here.

    The draws are float32 whether or not x64 is on, so J is the same function of w
    inside the check (float64) and outside it.
    """
    f32 = jnp.float32
    noise = (jax.random.normal(batch["rng"]["typed"], (3,), f32) + jax.random.uniform(batch["rng"]["raw"], (3,), f32)
             + jax.random.normal(p["keys"]["typed"][1], (3,), f32) * jax.random.uniform(p["keys"]["raw"], (), f32))
    return jnp.sum(jnp.sin(p["w"]) * noise * batch["x"])


def test_keys_in_params_are_skipped_and_listed_with_their_path():
    before = snapshot((PARAMS, BATCH))
    rep = jgc.check(noisy_loss, PARAMS, BATCH)
    assert rep.ok and [lf.path for lf in rep.leaves] == ["['w']"]
    assert dict(rep.skipped) == KEYS_SKIPPED
    assert "['keys']['typed']  skipped      (not a floating array: key<fry>[2])" in str(rep)
    assert rep.to_dict()["skipped"] == [{"path": p, "leaf": d} for p, d in rep.skipped]
    assert_unchanged(before, (PARAMS, BATCH))


def test_a_wrong_gradient_is_still_caught_next_to_keys():
    good = jax.grad(lambda w: noisy_loss({**PARAMS, "w": w}, BATCH))(PARAMS["w"])
    bad = {"w": good.at[1].multiply(1.05), "keys": {"typed": None, "raw": None}}
    rep = jgc.check(noisy_loss, PARAMS, BATCH, grad=bad)
    assert not rep.ok and rep.leaf("['w']").elements("mismatch") == [(1,)]


def _with_grad_check():
    opt = optax.sgd(0.1)
    params = {"w": PARAMS["w"]}
    loss = lambda p, batch: noisy_loss({**PARAMS, "w": p["w"]}, batch)

    def step(p, state, batch):
        updates, state = opt.update(jax.grad(loss)(p, batch), state)
        return optax.apply_updates(p, updates), state

    step = jgc.with_grad_check(jax.jit(step), loss, on_failure="raise")
    step(params, opt.init(params), BATCH)
    [(_, rep)] = step.reports
    return rep


FRONT_DOORS = {
    "check": lambda: jgc.check(noisy_loss, PARAMS, BATCH),
    "assert_grads_close": lambda: jgc.assert_grads_close(noisy_loss, PARAMS, BATCH),
    "sampled": lambda: jgc.check(noisy_loss, PARAMS, BATCH, mode="sampled", samples=2),
    "directional": lambda: jgc.check(noisy_loss, PARAMS, BATCH, mode="directional"),
    "check_taylor": lambda: jgc.check_taylor(noisy_loss, PARAMS, BATCH),
    "with_grad_check": _with_grad_check,
}


@pytest.mark.parametrize("door", list(FRONT_DOORS))
def test_every_front_door_carries_keys_in_params_and_args(door):
    before = snapshot((PARAMS, BATCH))
    rep = FRONT_DOORS[door]()
    assert rep.ok
    if door not in ("with_grad_check", "check_taylor"):  # no skipped listing / a loss of w only
        assert dict(rep.skipped) == KEYS_SKIPPED
    assert_unchanged(before, (PARAMS, BATCH))


def test_numerical_grad_with_keys_matches_jax_grad_and_leaves_keys_out():
    num = jgc.numerical_grad(noisy_loss, PARAMS, BATCH)
    assert num["keys"] == {"typed": None, "raw": None}
    ref = jax.grad(lambda w: noisy_loss({**PARAMS, "w": w}, BATCH))(PARAMS["w"])
    np.testing.assert_allclose(num["w"], ref, rtol=1e-5)


def test_check_jacobian_skips_keys_in_primals_and_in_outputs():
    f = lambda w, key: {"y": jnp.sin(w) * jax.random.normal(key, (2,), jnp.float32),
                        "key": jax.random.split(key)[0]}
    rep = jgc.check_jacobian(f, jnp.array([0.1, 0.2]), jax.random.key(0))
    assert rep.ok and dict(rep.skipped) == {"args[1]": "key<fry>[]", "out['key']": "output key<fry>[]"}


# -- float data next to float64 parameters ----------------------------------------------
def test_float32_data_is_widened_with_the_parameters():
    """A scan carry started from float32 data meets float64 values computed from params."""
    xs = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    seen = []

    def loss(w, xs):
        seen.append(xs.dtype)

        def body(h, x):
            return jnp.tanh(h * w + x), None

        h, _ = jax.lax.scan(body, xs[0], xs[1:])
        return jnp.sum(h**2)

    w = jnp.array([0.5, -0.3, 0.8], jnp.float32)
    rep = jgc.check(loss, w, xs)
    # The reference saw float64 data only; the analytic side ran once at the dtypes given.
    assert rep.ok and rep.precision == "float64" and set(seen) == {np.dtype(np.float64), np.dtype(np.float32)}
    seen.clear()
    rep = jgc.check(loss, w, xs, analytic="reference")
    assert rep.ok and rep.precision == "float64" and set(seen) == {np.dtype(np.float64)}
    assert any("float32 arrays in args were evaluated in float64" in n for n in rep.notes)
    assert xs.dtype == np.float32  # the caller's array is not cast
    seen.clear()
    native = jgc.check(loss, w, xs, precision="native")
    assert native.ok and set(seen) == {np.dtype(np.float32)}
    assert not any("args" in n for n in native.notes)


# -- Flax NNX -------------------------------------------------------------------------
def _nnx_net():
    nnx = pytest.importorskip("flax.nnx", reason="Flax is in the test extra (pip install flax)")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(3, 4, use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)  # an RngState: a key<fry> and a count
            self.head = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, x):
            return self.head(self.drop(jnp.tanh(self.bn(self.dense(x)))))[..., 0]

    return nnx, Net(nnx.Rngs(0))


def mse(pred, y):
    return jnp.mean((pred - y) ** 2)


@pytest.mark.parametrize("route", ["split", "state", "module"])
def test_flax_nnx_with_dropout_and_batchnorm(route):
    nnx, model = _nnx_net()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    before = snapshot(model)
    if route == "split":  # Params checked; batch stats and rng state are data
        rep = jgc.check(lambda p, rest, x, y: mse(nnx.merge(graphdef, p, rest)(x), y), params, rest, X, Y)
    elif route == "state":  # the whole State: batch statistics are checked too
        graphdef, state = nnx.split(model)
        rep = jgc.check(lambda s, x, y: mse(nnx.merge(graphdef, s)(x), y), state, X, Y)
    else:  # the module itself
        rep = jgc.check(lambda m, x, y: mse(m(x), y), model, X, Y)
    assert rep.ok and rep.precision == "float64"
    skipped = dict(rep.skipped)
    if route == "split":
        assert skipped == {} and {lf.path for lf in rep.leaves} == {
            jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    else:
        [key_path] = [p for p in skipped if "drop" in p and "key" in p]
        assert skipped[key_path] == "key<fry>[]"
    # The model's own Dropout and BatchNorm calls inside the check left it untouched.
    assert_unchanged(before, model)
    assert int(model.drop.rngs.count[...]) == 0


# -- Flax Linen -----------------------------------------------------------------------
def test_flax_linen_batch_stats_mutable_and_a_dropout_key_in_args():
    nn = pytest.importorskip("flax.linen", reason="Flax is in the test extra (pip install flax)")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Dense(4, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.Dropout(0.3, deterministic=not train)(jnp.tanh(x))
            return nn.Dense(1)(x)[..., 0]

    model = Net()
    variables = model.init(jax.random.key(1), X, train=False)

    def loss(params, batch_stats, x, y, key):
        pred, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                              mutable=["batch_stats"], rngs={"dropout": key})
        return mse(pred, y)

    before = snapshot(variables)
    rep = jgc.check(loss, variables["params"], variables["batch_stats"], X, Y, jax.random.key(2))
    assert rep.ok and rep.precision == "float64" and rep.skipped == ()
    assert {lf.path for lf in rep.leaves} == {
        "['Dense_0']['kernel']", "['BatchNorm_0']['scale']", "['BatchNorm_0']['bias']",
        "['Dense_1']['kernel']", "['Dense_1']['bias']"}
    assert_unchanged(before, variables)


# -- Equinox --------------------------------------------------------------------------
def test_equinox_batchnorm_state_in_args():
    eqx = pytest.importorskip("equinox", reason="Equinox is in the test extra (pip install equinox)")

    class Net(eqx.Module):
        lin: eqx.nn.Linear
        bn: eqx.nn.BatchNorm
        drop: eqx.nn.Dropout
        head: eqx.nn.Linear

        def __init__(self, key):
            k1, k2 = jax.random.split(key)
            self.lin = eqx.nn.Linear(3, 4, use_bias=False, key=k1)
            self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="ema")
            self.drop = eqx.nn.Dropout(0.3)
            self.head = eqx.nn.Linear(4, "scalar", key=k2)

        def __call__(self, x, state, key):
            h, state = self.bn(self.lin(x), state)  # State.set checks the new dtypes
            return self.head(self.drop(jnp.tanh(h), key=key)), state

    model, state = eqx.nn.make_with_state(Net)(jax.random.key(1))

    def loss(model, state, x, y, key):
        keys = jax.random.split(key, x.shape[0])
        pred, _ = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))(x, state, keys)
        return mse(pred, y)

    before = snapshot((model, state))
    rep = jgc.check(loss, model, state, X, Y, jax.random.key(2))
    assert rep.ok and rep.precision == "float64"
    assert any("float32 arrays in args were evaluated in float64" in n for n in rep.notes)
    assert_unchanged(before, (model, state))

    # The Jacobian and rule checks widen the data the same way (State.set sees float64).
    def outputs(model, state, x, key):
        keys = jax.random.split(key, x.shape[0])
        return jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))(x, state, keys)[0]

    assert jgc.check_jacobian(outputs, model, state, X, jax.random.key(2), argnums=0).ok
    assert jgc.check_rules(loss, model, state, X, Y, jax.random.key(2)).ok
    assert_unchanged(before, (model, state))


# -- Haiku ----------------------------------------------------------------------------
def test_haiku_transform_with_state_and_an_rng_key():
    hk = pytest.importorskip("haiku", reason="dm-haiku is in the test extra (pip install dm-haiku)")

    def forward(x, is_training):
        h = hk.BatchNorm(True, True, 0.9)(hk.Linear(4, with_bias=False)(x), is_training)
        h = hk.dropout(hk.next_rng_key(), 0.3, jnp.tanh(h)) if is_training else jnp.tanh(h)
        return hk.Linear(1)(h)[..., 0]

    model = hk.transform_with_state(forward)
    params, state = model.init(jax.random.key(1), X, is_training=True)

    def loss(params, state, key, x, y):
        pred, _ = model.apply(params, state, key, x, is_training=True)
        return mse(pred, y)

    before = snapshot((params, state))
    rep = jgc.check(loss, params, state, jax.random.key(2), X, Y)
    assert rep.ok and rep.precision == "float64"
    assert "['linear']['w']" in {lf.path for lf in rep.leaves}
    assert_unchanged(before, (params, state))
