"""Convergence of every registered optimizer, through its torch class, on one problem.

A tanh MLP (2-32-32-1) learns the two-spirals classification (400 points, full batch, float32)
with each optimizer's ``agnostic_optim.adapters.torch`` class used as its users would use it:
plain ``backward`` + ``step()``, SAM and L-BFGS with a closure, AdaHessian after
``backward(create_graph=True)``, Sophia with ``update_hessian()`` on labels sampled from the
model every 10 steps, Lookahead around AdamW, K-FAC built on the model. Prints the final loss
and accuracy, the time per step and the loss evaluations per step, and plots the loss against
steps and against time (``--plot FILE``, needs matplotlib).

    python benchmarks/convergence.py --steps 300 --plot benchmarks/convergence.png

The hyperparameters are reasonable, not tuned per optimizer: this compares behaviour, it does
not rank methods.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from demo import two_spirals
from torch import nn

import agnostic_optim as ao
from agnostic_optim.adapters import torch as ours

SOPHIA_EVERY = 10  # steps between Sophia's Hessian estimates (the official default k)


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def recipes(model: nn.Module) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    """How each registered optimizer is built for ``model``."""
    params = model.parameters
    return {
        "sgd": lambda: ours.SGD(params(), lr=0.5, momentum=0.9, nesterov=True),
        "adagrad": lambda: ours.Adagrad(params(), lr=0.1),
        "rmsprop": lambda: ours.RMSprop(params(), lr=3e-3),
        "adam": lambda: ours.Adam(params(), lr=1e-2),
        "adamw": lambda: ours.AdamW(params(), lr=1e-2, weight_decay=1e-4),
        "amsgrad": lambda: ours.AMSGrad(params(), lr=1e-2),
        "sparse_adam": lambda: ours.SparseAdam(params(), lr=1e-2),
        "radam": lambda: ours.RAdam(params(), lr=1e-2),
        "nadam": lambda: ours.NAdam(params(), lr=1e-2),
        "adan": lambda: ours.Adan(params(), lr=1e-2),
        "lion": lambda: ours.Lion(params(), lr=2e-3),
        "lars": lambda: ours.LARS(params(), lr=5.0, momentum=0.9, weight_decay=1e-4),
        "lamb": lambda: ours.LAMB(params(), lr=1e-2),
        "sam": lambda: ours.SAM(params(), ours.SGD, rho=0.05, lr=0.5, momentum=0.9, nesterov=True),
        "lookahead": lambda: ours.Lookahead(ours.AdamW(params(), lr=2e-2, weight_decay=1e-4)),
        "lbfgs": lambda: ours.LBFGS(params(), max_iter=5, history_size=20, line_search_fn="strong_wolfe"),
        "adahessian": lambda: ours.AdaHessian(params(), lr=0.15),
        "sophia": lambda: ours.Sophia(params(), lr=1e-2, rho=0.05, bs=400, weight_decay=1e-4),
        "shampoo": lambda: ours.Shampoo(params(), lr=0.3, momentum=0.9),
        "kfac": lambda: ours.KFAC(
            model, lr=0.05, momentum=0.9, cov_update_frequency=5, inverse_update_frequency=20
        ),
    }


def train(name: str, steps: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """``steps`` steps of ``name``'s class: losses, seconds and loss evaluations per step."""
    model = make_model()
    opt = recipes(model)[name]()
    evaluations = 0

    def closure(create_graph: bool = False) -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        loss.backward(create_graph=create_graph)
        if getattr(opt, "sparse_gradients", None) == "require":  # (SparseAdam, as torch's tests feed it)
            for p in model.parameters():
                p.grad = p.grad.to_sparse()
        return loss

    losses, start = [], time.perf_counter()
    for step in range(steps):
        if name in ("sam", "lbfgs"):
            if name == "sam":
                closure()  # SAM's first gradient, at θ
            losses.append(float(opt.step(closure)))
            continue
        losses.append(float(closure(create_graph=name == "adahessian")))
        opt.step()
        if name == "sophia" and step % SOPHIA_EVERY == SOPHIA_EVERY - 1:
            opt.zero_grad()  # Gauss-Newton-Bartlett: a backward on labels sampled from the model
            logits = model(x)[:, 0]
            sampled = torch.bernoulli(torch.sigmoid(logits.detach()))
            F.binary_cross_entropy_with_logits(logits, sampled).backward()
            opt.update_hessian()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = model(x)[:, 0]
        final = float(F.binary_cross_entropy_with_logits(logits, y))
        accuracy = float(((logits > 0) == (y > 0.5)).float().mean())
    if isinstance(opt, ours.KFAC):
        opt.remove_hooks()
    return dict(
        losses=losses, final=final, accuracy=accuracy, ms=1e3 * seconds / steps, evals=evaluations / steps
    )


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for i, (name, result) in enumerate(results.items()):
        style = dict(label=name, linestyle=("-", "--", ":")[i // 10], linewidth=1.2)
        steps = np.arange(1, len(result["losses"]) + 1)
        by_step.plot(steps, result["losses"], **style)
        by_time.plot(steps * result["ms"] / 1e3, result["losses"], **style)
    by_step.set(xlabel="step", ylabel="training loss (BCE)", yscale="log", title="loss per step")
    by_time.set(xlabel="seconds", yscale="log", title="loss against time (2-core CPU)")
    by_time.legend(ncol=2, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--optimizers", default=",".join(ao.registry()), help="comma-separated names")
    parser.add_argument("--plot", default=None, help="write the loss curves to this image file")
    args = parser.parse_args()
    missing = set(ao.registry()) - set(recipes(make_model()))
    if missing:
        raise SystemExit(f"no recipe for registered optimizers {sorted(missing)}: add them to recipes()")
    torch.set_num_threads(1)
    points, labels = two_spirals(200, np.random.default_rng(0))
    x = torch.tensor(points, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)

    results = {}
    print(f"two spirals, MLP 2-32-32-1, {args.steps} full-batch steps, torch float32, 1 thread\n")
    print(f"{'optimizer':>11} {'final loss':>11} {'accuracy':>9} {'ms/step':>8} {'evals/step':>11}")
    for name in args.optimizers.split(","):
        results[name] = result = train(name, args.steps, x, y)
        print(
            f"{name:>11} {result['final']:11.5f} {result['accuracy']:9.3f} "
            f"{result['ms']:8.2f} {result['evals']:11.2f}"
        )
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
