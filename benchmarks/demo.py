"""`make demo`: train a small MLP on the two-spirals problem with several optimizers, on NumPy.

The same core functions (``opt.init`` / ``opt.step``) would run unchanged on PyTorch, JAX or
CuPy arrays. Gradients come from a hand-written backward pass so the demo needs only NumPy.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np

import agnostic_optim as ao


def two_spirals(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved spirals in the plane, labels 0/1, with a little noise."""
    theta = np.sqrt(rng.uniform(0.0, 1.0, n_per_class)) * 3 * np.pi
    arm = np.stack([theta * np.cos(theta), theta * np.sin(theta)], axis=1) / (3 * np.pi)
    x = np.concatenate([arm, -arm]) + 0.02 * rng.standard_normal((2 * n_per_class, 2))
    y = np.concatenate([np.zeros(n_per_class), np.ones(n_per_class)])
    return x, y


def init_mlp(rng: np.random.Generator, sizes: tuple[int, ...]) -> dict[str, np.ndarray]:
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        params[f"w{i}"] = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        params[f"b{i}"] = np.zeros(fan_out)
    return params


def loss_and_grads(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """Binary cross-entropy of a tanh MLP, with its gradients by backpropagation."""
    layers = len(params) // 2
    activations = [x]
    for i in range(layers - 1):
        activations.append(np.tanh(activations[-1] @ params[f"w{i}"] + params[f"b{i}"]))
    logits = (activations[-1] @ params[f"w{layers - 1}"] + params[f"b{layers - 1}"])[:, 0]
    loss = np.mean(np.logaddexp(0.0, logits) - y * logits)
    delta = ((1 / (1 + np.exp(-logits)) - y) / len(y))[:, None]
    grads = {}
    for i in reversed(range(layers)):
        grads[f"w{i}"] = activations[i].T @ delta
        grads[f"b{i}"] = delta.sum(axis=0)
        if i:
            delta = (delta @ params[f"w{i}"].T) * (1 - activations[i] ** 2)
    accuracy = np.mean((logits > 0) == (y > 0.5))
    return loss, accuracy, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=1, help="print the losses every N steps")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x, y = two_spirals(200, rng)
    initial = init_mlp(rng, (2, 32, 32, 1))
    schedule = ao.schedules.warmup_cosine_decay(0.0, 1.0, args.steps // 10, args.steps)
    optimizers = {
        "sgd+nesterov": ao.sgd(lr=0.5, momentum=0.9, nesterov=True),
        "rmsprop": ao.rmsprop(lr=3e-3),
        "adamw": ao.adamw(lr=1e-2, weight_decay=1e-4),
        "adamw+warmup-cosine": ao.adamw(lr=lambda count: 2e-2 * schedule(count), weight_decay=1e-4),
        "adan": ao.adan(lr=1e-2),
        "lion": ao.lion(lr=2e-3),
        "sam(sgd+nesterov)": ao.sam(ao.sgd(lr=0.5, momentum=0.9, nesterov=True), rho=0.05),
        "lookahead(adamw)": ao.lookahead(ao.adamw(lr=2e-2, weight_decay=1e-4), k=5, alpha=0.5),
        "shampoo": ao.shampoo(lr=0.3, momentum=0.9),
    }
    # SAM's second gradient, at the perturbed params
    step_inputs = {"grad_fn": lambda p: loss_and_grads(p, x, y)[2]}
    print(f"two spirals, {len(y)} points, MLP 2-32-32-1, {args.steps} full-batch steps on NumPy\n")
    print("step  " + "  ".join(f"{name:>20}" for name in optimizers))
    states = {name: opt.init(initial) for name, opt in optimizers.items()}
    params = dict.fromkeys(optimizers, initial)
    accuracy = {}
    for step in range(1, args.steps + 1):
        losses = {}
        for name, opt in optimizers.items():
            losses[name], accuracy[name], grads = loss_and_grads(params[name], x, y)
            inputs = {k: v for k, v in step_inputs.items() if k in opt.inputs}
            states[name], params[name] = opt.step(states[name], grads, params[name], **inputs)
        if step == 1 or step % args.every == 0:
            print(f"{step:4d}  " + "  ".join(f"{losses[name]:20.5f}" for name in optimizers))
    print("\nfinal training accuracy:")
    for name in optimizers:
        print(f"  {name:>20}: {loss_and_grads(params[name], x, y)[1]:.3f}")


if __name__ == "__main__":
    main()
