"""A zoo of realistic models with hand-written backprop, and realistic bugs in it.

Each ``make_*`` returns a :class:`Case`: the cost, params, data, the correct
hand-derived gradient and a dict of buggy gradients with where the bug lives. Used by
``tests/test_verdicts.py`` (no false alarm, every bug caught and located) and by
``benchmarks/bench_verdicts.py`` (the same against peers).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Bug:
    grad: Callable
    leaf: str  # keystr path of the leaf that is wrong
    index: tuple | None = None  # the one wrong element, when the bug is a single element


@dataclasses.dataclass
class Case:
    name: str
    cost: Callable
    params: dict
    args: tuple
    grad: Callable
    bugs: dict


def _rng(seed):
    return np.random.default_rng(seed)


def _arr(x, dtype):
    return jnp.asarray(np.asarray(x), dtype)


def _single(grad, leaf, index, rel):
    def bad(p, *a):
        g = dict(grad(p, *a))
        g[leaf] = g[leaf].at[index].multiply(1 + rel)
        return g

    return Bug(bad, f"['{leaf}']", index)


def _median_index(grad, params, args, leaf):
    g = np.abs(np.asarray(grad(params, *args)[leaf]))
    flat = int(np.argsort(g.ravel())[g.size // 2])
    return tuple(int(i) for i in np.unravel_index(flat, g.shape))


# -- MLP -----------------------------------------------------------------------------
def make_mlp(dtype, seed=0, lam=1e-2):
    r = _rng(seed)
    p = {"W1": _arr(r.normal(size=(6, 8)) / 2.5, dtype), "b1": _arr(r.normal(size=8) * 0.1, dtype),
         "W2": _arr(r.normal(size=(8, 3)) / 3, dtype), "b2": jnp.zeros(3, dtype)}
    x, y = _arr(r.normal(size=(10, 6)), dtype), _arr(r.normal(size=(10, 3)), dtype)

    def cost(p, x, y):
        h = jnp.tanh(x @ p["W1"] + p["b1"])
        o = h @ p["W2"] + p["b2"]
        return 0.5 * jnp.mean(jnp.sum((o - y) ** 2, 1)) + 0.5 * lam * jnp.sum(p["W1"] ** 2)

    def grad(p, x, y, *, reg=True, act=True):
        n = x.shape[0]
        h = jnp.tanh(x @ p["W1"] + p["b1"])
        o = h @ p["W2"] + p["b2"]
        do = (o - y) / n
        dh = do @ p["W2"].T
        dz = dh * (1 - h**2) if act else dh
        return {"W1": x.T @ dz + (lam * p["W1"] if reg else 0), "b1": dz.sum(0),
                "W2": h.T @ do, "b2": do.sum(0)}

    bugs = {
        "missing L2 term": Bug(lambda p, x, y: grad(p, x, y, reg=False), "['W1']"),
        "missing tanh derivative": Bug(lambda p, x, y: grad(p, x, y, act=False), "['W1']"),
        "2x factor on W2": Bug(lambda p, x, y: dict(grad(p, x, y), W2=2 * grad(p, x, y)["W2"]), "['W2']"),
    }
    return Case("mlp", cost, p, (x, y), grad, bugs)


# -- layer norm ------------------------------------------------------------------------
def make_layernorm(dtype, seed=1, eps=1e-5):
    r = _rng(seed)
    p = {"x": _arr(r.normal(size=(4, 7)) * 2 + 1, dtype), "gamma": _arr(1 + 0.1 * r.normal(size=7), dtype),
         "beta": _arr(0.1 * r.normal(size=7), dtype)}
    t = _arr(r.normal(size=(4, 7)), dtype)

    def cost(p, t):
        mu = p["x"].mean(-1, keepdims=True)
        var = ((p["x"] - mu) ** 2).mean(-1, keepdims=True)
        y = (p["x"] - mu) / jnp.sqrt(var + eps) * p["gamma"] + p["beta"]
        return jnp.sum(y * t) + 0.5 * jnp.sum(y**2)

    def grad(p, t, *, mean_term=True, var_term=True):
        x = p["x"]
        d = x.shape[-1]
        mu = x.mean(-1, keepdims=True)
        xc = x - mu
        var = (xc**2).mean(-1, keepdims=True)
        inv = 1 / jnp.sqrt(var + eps)
        xh = xc * inv
        y = xh * p["gamma"] + p["beta"]
        dy = t + y
        dxh = dy * p["gamma"]
        dx = dxh
        if mean_term:
            dx = dx - dxh.mean(-1, keepdims=True)
        if var_term:
            dx = dx - xh * (dxh * xh).mean(-1, keepdims=True)
        dx = dx * inv
        del d
        return {"x": dx, "gamma": (dy * xh).sum(0), "beta": dy.sum(0)}

    bugs = {
        "missing mean term": Bug(lambda p, t: grad(p, t, mean_term=False), "['x']"),
        "missing variance term": Bug(lambda p, t: grad(p, t, var_term=False), "['x']"),
    }
    return Case("layernorm", cost, p, (t,), grad, bugs)


# -- batch norm (training mode, statistics over the batch) -------------------------------
def make_batchnorm(dtype, seed=2, eps=1e-5):
    r = _rng(seed)
    p = {"W": _arr(r.normal(size=(5, 4)) / 2, dtype), "gamma": _arr(1 + 0.1 * r.normal(size=4), dtype),
         "beta": _arr(0.1 * r.normal(size=4), dtype)}
    x, t = _arr(r.normal(size=(12, 5)), dtype), _arr(r.normal(size=(12, 4)), dtype)

    def cost(p, x, t):
        z = x @ p["W"]
        mu, var = z.mean(0), z.var(0)
        y = (z - mu) / jnp.sqrt(var + eps) * p["gamma"] + p["beta"]
        return jnp.mean(jnp.tanh(y) * t)

    def grad(p, x, t, *, var_term=True):
        z = x @ p["W"]
        n = z.shape[0]
        mu, var = z.mean(0), z.var(0)
        inv = 1 / jnp.sqrt(var + eps)
        zh = (z - mu) * inv
        y = zh * p["gamma"] + p["beta"]
        dy = t * (1 - jnp.tanh(y) ** 2) / t.size
        dzh = dy * p["gamma"]
        dz = dzh - dzh.mean(0)
        if var_term:
            dz = dz - zh * (dzh * zh).mean(0)
        dz = dz * inv
        del n
        return {"W": x.T @ dz, "gamma": (dy * zh).sum(0), "beta": dy.sum(0)}

    bugs = {"missing variance term": Bug(lambda p, x, t: grad(p, x, t, var_term=False), "['W']")}
    return Case("batchnorm", cost, p, (x, t), grad, bugs)


# -- single-head attention -------------------------------------------------------------
def make_attention(dtype, seed=3):
    r = _rng(seed)
    d = 4
    p = {k: _arr(r.normal(size=(5, d)) / 2, dtype) for k in ("Wq", "Wk", "Wv")}
    x, t = _arr(r.normal(size=(6, 5)), dtype), _arr(r.normal(size=(6, d)), dtype)

    def cost(p, x, t):
        q, k, v = x @ p["Wq"], x @ p["Wk"], x @ p["Wv"]
        a = jax.nn.softmax(q @ k.T / np.sqrt(d), axis=-1)
        return 0.5 * jnp.sum((a @ v - t) ** 2)

    def grad(p, x, t, *, scale_k=True, softmax_t=False):
        q, k, v = x @ p["Wq"], x @ p["Wk"], x @ p["Wv"]
        s = q @ k.T / np.sqrt(d)
        a = jax.nn.softmax(s, axis=-1)
        o = a @ v
        do = o - t
        da = do @ v.T
        dv = a.T @ do
        if softmax_t:  # the bug: softmax Jacobian applied along the wrong axis
            ds = a * (da - (da * a).sum(0, keepdims=True))
        else:
            ds = a * (da - (da * a).sum(-1, keepdims=True))
        dq = ds @ k / np.sqrt(d)
        dk = ds.T @ q / (np.sqrt(d) if scale_k else 1.0)
        return {"Wq": x.T @ dq, "Wk": x.T @ dk, "Wv": x.T @ dv}

    bugs = {
        "missing 1/sqrt(d) in dWk": Bug(lambda p, x, t: grad(p, x, t, scale_k=False), "['Wk']"),
        "softmax backward on the wrong axis": Bug(lambda p, x, t: grad(p, x, t, softmax_t=True), "['Wq']"),
    }
    return Case("attention", cost, p, (x, t), grad, bugs)


# -- vanilla RNN with BPTT ------------------------------------------------------------
def make_rnn(dtype, seed=4, steps=6):
    r = _rng(seed)
    p = {"W": _arr(r.normal(size=(5, 5)) / 2.5, dtype), "U": _arr(r.normal(size=(3, 5)) / 2, dtype),
         "h0": _arr(0.1 * r.normal(size=5), dtype)}
    xs, ys = _arr(r.normal(size=(steps, 3)), dtype), _arr(r.normal(size=(steps, 5)), dtype)

    def cost(p, xs, ys):
        def step(h, xy):
            x, y = xy
            h = jnp.tanh(h @ p["W"] + x @ p["U"])
            return h, 0.5 * jnp.sum((h - y) ** 2)

        _, losses = jax.lax.scan(step, p["h0"], (xs, ys))
        return losses.sum()

    def grad(p, xs, ys, *, truncate=False):
        hs = [p["h0"]]
        for x in xs:
            hs.append(jnp.tanh(hs[-1] @ p["W"] + x @ p["U"]))
        dW, dU = jnp.zeros_like(p["W"]), jnp.zeros_like(p["U"])
        dh_next = jnp.zeros_like(p["h0"])
        for t in reversed(range(len(xs))):
            dh = hs[t + 1] - ys[t] + (0 if (truncate and t == len(xs) - 2) else dh_next)
            dz = dh * (1 - hs[t + 1] ** 2)
            dW = dW + jnp.outer(hs[t], dz)
            dU = dU + jnp.outer(xs[t], dz)
            dh_next = dz @ p["W"].T
        return {"W": dW, "U": dU, "h0": dh_next}

    bugs = {"BPTT drops one step's carried gradient": Bug(lambda p, xs, ys: grad(p, xs, ys, truncate=True), "['W']")}
    return Case("rnn", cost, p, (xs, ys), grad, bugs)


# -- implicit layer (fixed point z = tanh(W z + x)) ----------------------------------------
def make_implicit(dtype, seed=5, iters=200):
    r = _rng(seed)
    p = {"W": _arr(r.normal(size=(4, 4)) * 0.15, dtype), "x": _arr(r.normal(size=4), dtype)}
    t = _arr(r.normal(size=4), dtype)

    def solve(W, x):
        z = jnp.zeros_like(x)
        z = jax.lax.fori_loop(0, iters, lambda i, z: jnp.tanh(W @ z + x), z)
        return z

    def cost(p, t):
        z = solve(p["W"], p["x"])
        return 0.5 * jnp.sum((z - t) ** 2)

    def grad(p, t, *, implicit=True):
        z = solve(p["W"], p["x"])
        d = 1 - z**2  # tanh' at the fixed point
        dz = z - t
        # Implicit function theorem: (I − diag(d) W)ᵀ u = dz, then grads through diag(d).
        A = jnp.eye(z.size, dtype=z.dtype) - d[:, None] * p["W"]
        u = jnp.linalg.solve(A.T, dz) if implicit else dz
        v = u * d
        return {"W": jnp.outer(v, z), "x": v}

    bugs = {"drops the (I − J)⁻¹ term": Bug(lambda p, t: grad(p, t, implicit=False), "['W']")}
    return Case("implicit", cost, p, (t,), grad, bugs)


# -- confident softmax: tiny gradients ----------------------------------------------------
def make_confident_softmax(dtype, seed=6):
    r = _rng(seed)
    p = {"W": _arr(r.normal(size=(4, 3)), dtype)}
    x = _arr(r.normal(size=(5, 4)), dtype)
    labels = np.asarray(jnp.argmax(x @ p["W"], 1))
    scale = 12.0  # margins of ~10+: probabilities of wrong classes ~1e-5..1e-9

    def cost(p, x):
        logits = scale * (x @ p["W"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), labels])

    def grad(p, x, *, sign=1.0):
        logits = scale * (x @ p["W"])
        pr = jax.nn.softmax(logits)
        onehot = jax.nn.one_hot(labels, 3, dtype=pr.dtype)
        dl = sign * (pr - onehot) * scale / x.shape[0]
        return {"W": x.T @ dl}

    bugs = {"sign error": Bug(lambda p, x: grad(p, x, sign=-1.0), "['W']")}
    return Case("confident_softmax", cost, p, (x,), grad, bugs)


# -- saturated tanh layer: gradients 1e-6..1e-10, bug visible only there --------------------
def make_saturated(dtype, seed=7):
    r = _rng(seed)
    p = {"w": _arr(r.uniform(4, 9, size=6) * r.choice([-1, 1], 6), dtype), "v": _arr(r.normal(size=6), dtype)}

    def cost(p):
        return jnp.sum(p["v"] * jnp.tanh(p["w"]))

    def grad(p, *, saturated_sign=1.0):
        s = 1 - jnp.tanh(p["w"]) ** 2
        sat = jnp.abs(p["w"]) > 3
        dw = p["v"] * s * jnp.where(sat, saturated_sign, 1.0)
        return {"w": dw, "v": jnp.tanh(p["w"])}

    bugs = {"sign error only in saturation": Bug(lambda p: grad(p, saturated_sign=-1.0), "['w']")}
    return Case("saturated", cost, p, (), grad, bugs)


# -- ReLU network with dead units: many exact zeros ---------------------------------------
def make_relu(dtype, seed=8):
    r = _rng(seed)
    p = {"W1": _arr(r.normal(size=(5, 12)), dtype), "b1": _arr(r.normal(size=12) - 1.0, dtype),
         "W2": _arr(r.normal(size=(12, 2)) / 3, dtype)}
    x, y = _arr(r.normal(size=(8, 5)), dtype), _arr(r.normal(size=(8, 2)), dtype)

    def cost(p, x, y):
        h = jax.nn.relu(x @ p["W1"] + p["b1"])
        return 0.5 * jnp.mean((h @ p["W2"] - y) ** 2)

    def grad(p, x, y, *, leak=0.0):
        z = x @ p["W1"] + p["b1"]
        h = jax.nn.relu(z)
        do = (h @ p["W2"] - y) / y.size
        dz = (do @ p["W2"].T) * jnp.where(z > 0, 1.0, leak).astype(z.dtype)
        return {"W1": x.T @ dz, "b1": dz.sum(0), "W2": h.T @ do}

    bugs = {"leaky derivative for a plain ReLU": Bug(lambda p, x, y: grad(p, x, y, leak=0.01), "['W1']")}
    return Case("relu", cost, p, (x, y), grad, bugs)


# -- mixed parameter scales: 1e4 and 1e-6 --------------------------------------------------
def make_mixed_scales(dtype, seed=9):
    r = _rng(seed)
    p = {"big": _arr(1e4 * (1 + 0.1 * r.normal(size=3)), dtype),
         "small": _arr(1e-6 * (1 + 0.1 * r.normal(size=3)), dtype)}
    x = _arr(r.normal(size=(7, 3)), dtype)

    def cost(p, x):
        z = x @ (p["big"] * 1e-4) + x @ (p["small"] * 1e6)
        return jnp.sum(jnp.sin(z)) + jnp.sum(jnp.log1p((p["small"] * 1e6) ** 2))

    def grad(p, x, *, small_factor=1e6):
        z = x @ (p["big"] * 1e-4) + x @ (p["small"] * 1e6)
        c = jnp.cos(z)
        s = p["small"] * 1e6
        return {"big": x.T @ c * 1e-4, "small": x.T @ c * small_factor + 2 * s / (1 + s**2) * 1e6}

    bugs = {"wrong scale factor in one leaf": Bug(lambda p, x: grad(p, x, small_factor=1.01e6), "['small']")}
    return Case("mixed_scales", cost, p, (x,), grad, bugs)


# -- a float64 model whose forward runs in float32 --------------------------------------------
def make_f32_forward(dtype, seed=10):
    r = _rng(seed)
    p = {"W": _arr(r.normal(size=(6, 4)) / 2, dtype), "b": _arr(0.1 * r.normal(size=4), dtype)}
    x = _arr(r.normal(size=(9, 6)), dtype)

    def cost(p, x):
        z = (x.astype(jnp.float32) @ p["W"].astype(jnp.float32)) + p["b"].astype(jnp.float32)
        return jnp.sum(jax.nn.softplus(z)).astype(p["W"].dtype)

    def grad(p, x, *, bias_factor=1.0):
        z = x @ p["W"] + p["b"]
        s = jax.nn.sigmoid(z)
        return {"W": x.T @ s, "b": s.sum(0) * bias_factor}

    bugs = {"5% error in the bias gradient": Bug(lambda p, x: grad(p, x, bias_factor=1.05), "['b']")}
    return Case("f32_forward", cost, p, (x,), grad, bugs)


MAKERS = [make_mlp, make_layernorm, make_batchnorm, make_attention, make_rnn, make_implicit,
          make_confident_softmax, make_saturated, make_relu, make_mixed_scales, make_f32_forward]


def single_element_bug(case: Case, leaf: str, rel: float) -> Bug:
    """Corrupt the median-magnitude element of ``leaf`` by a relative ``rel``."""
    idx = _median_index(case.grad, case.params, case.args, leaf)
    return _single(case.grad, leaf, idx, rel)


def cases(dtype):
    """Build every case at ``dtype`` (call inside jax.enable_x64 for float64)."""
    return [make(dtype) for make in MAKERS]
