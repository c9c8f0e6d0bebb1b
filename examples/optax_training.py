"""Train a small MLP with optax, checking the gradient once at step 0 and after a burn-in.

The lecture's rule — check the gradient, then turn the check off because it is slow —
as one line around the training step::

    step = jgc.with_grad_check(step, loss, at_steps=(0, burn_in))

The model is a 2-16-16-2 MLP (``hidden`` and ``depth`` set its shape) with a hand-written
``custom_vjp`` softplus, trained with Adam on two interleaved half-moons. With a buggy
rule, the softplus returns the derivative of relu instead (a plausible copy-paste
slip): training still lowers the loss, but the check at step 0 reports the mismatch
and names the leaves.

Run: ``python -m jgc.examples.optax_training`` (or ``python examples/optax_training.py``).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jgc


def make_softplus(buggy: bool):
    @jax.custom_vjp
    def softplus(x):
        return jnp.logaddexp(x, 0.0)

    def fwd(x):
        return softplus(x), x

    def bwd(x, g):
        slope = (x > 0).astype(x.dtype) if buggy else jax.nn.sigmoid(x)  # d/dx log(1+eˣ) = σ(x)
        return (g * slope,)

    softplus.defvjp(fwd, bwd)
    return softplus


def moons(n: int, seed: int = 0):
    """Two interleaved half-circles with noise: labels 0 and 1."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, np.pi, n)
    y = rng.integers(0, 2, n)
    x = np.stack([np.cos(t) + y * 1.0 - 0.5 * y, np.sin(t) * (1 - 2 * y) + 0.25 * y], axis=1)
    x = x + rng.normal(scale=0.1, size=x.shape)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def init_params(key, sizes=(2, 16, 16, 2)):
    params = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"layer{i}"] = {
            "w": jax.random.normal(sub, (m, n), jnp.float32) * jnp.sqrt(2.0 / m),
            "b": jnp.zeros((n,), jnp.float32),  # zero biases: jgc still gives them a step
        }
    return params


def make_forward(buggy: bool = False):
    """The MLP: softplus hidden layers (our custom_vjp), linear output logits."""
    softplus = make_softplus(buggy)

    def forward(params, x):
        layers = list(params.values())
        h = x
        for layer in layers[:-1]:
            h = softplus(h @ layer["w"] + layer["b"])
        return h @ layers[-1]["w"] + layers[-1]["b"]

    return forward


def loss(params, x, y, buggy: bool = False):
    """Mean cross-entropy of the MLP on a batch: the J that the training step differentiates."""
    logits = make_forward(buggy)(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# Factories for the command line (no arguments):
#   jgc check examples.optax_training:loss --params examples.optax_training:example_params \
#       --args examples.optax_training:example_batch
def example_params():
    return init_params(jax.random.key(0), (2, 8, 2))


def example_batch():
    return moons(64)


def train(buggy: bool, steps: int, burn_in: int, hidden: int = 16, depth: int = 2, batch: int = 32,
          on_failure: str = "raise", seed: int = 0) -> dict:
    forward = make_forward(buggy)

    def loss_fn(params, x, y):
        return loss(params, x, y, buggy)

    x_all, y_all = moons(512, seed)
    params = init_params(jax.random.key(seed), (2,) + (hidden,) * depth + (2,))
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    # The one line: check on the real params and batch at step 0 and after burn-in.
    step = jgc.with_grad_check(step, loss_fn, at_steps=(0, burn_in), on_failure=on_failure)

    losses = []
    for i in range(steps):
        j = (i * batch) % (x_all.shape[0] - batch)
        params, opt_state, value = step(params, opt_state, x_all[j:j + batch], y_all[j:j + batch])
        losses.append(float(value))
    accuracy = float(jnp.mean(jnp.argmax(forward(params, x_all), -1) == y_all))
    return {"params": params, "losses": losses, "reports": step.reports, "accuracy": accuracy}


def main(steps: int = 300, burn_in: int = 50, hidden: int = 16, depth: int = 2,
         verbose: bool = True) -> dict:
    say = print if verbose else (lambda *a, **k: None)
    say(f"1) Correct custom_vjp: {steps} Adam steps, gradient checked at steps 0 and {burn_in}.")
    good = train(False, steps, burn_in, hidden, depth)
    for i, rep in good["reports"]:
        say(f"   step {i}: {'PASS' if rep.ok else 'FAIL'} ({rep.checked} elements, "
            f"normwise {rep.normwise:.1e}, {rep.seconds:.1f}s)")
    say(f"   loss {good['losses'][0]:.3f} -> {good['losses'][-1]:.3f}, "
        f"accuracy {good['accuracy']:.2f}\n")

    say("2) Buggy custom_vjp (relu's derivative in softplus), on_failure='warn':")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad = train(True, steps, burn_in, hidden, depth, on_failure="warn")
    first = bad["reports"][0][1]
    say(f"   loss {bad['losses'][0]:.3f} -> {bad['losses'][-1]:.3f}: training goes on, but "
        f"{len(caught)} warning(s) were raised. The step-0 report:")
    say(first)
    return {"good": good, "bad": bad, "warnings": [str(w.message) for w in caught]}


if __name__ == "__main__":
    main()
