"""Scale-out in torch: every registered optimizer's torch class under DDP and under FSDP2 (two
gloo processes on CPU, each on half of the batch) gives the numbers of one process on the full
batch. One pair of processes runs every optimizer, both wrappings; the references run here."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

import agnostic_optim as ao
from agnostic_optim.conformance.compare import relative_error

torch = pytest.importorskip("torch", reason="torch is not installed")
ours = pytest.importorskip("agnostic_optim.adapters.torch", reason="the torch adapter needs torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

WORLD, STEPS, BATCH = 2, 4, 16
SIZES = (6, 10, 3)  # (uneven shards under FSDP2: 10 rows over 2 ranks is even, 3 is not)


def make_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = [nn.Linear(SIZES[0], SIZES[1], dtype=torch.float32), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(SIZES[1], SIZES[2], dtype=torch.float32))
    return model.double()  # (drawn in float32 whatever the default dtype: the same in every process)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SIZES[0], generator=g, dtype=torch.float64)
    return x, torch.sin(x @ torch.randn(SIZES[0], SIZES[2], generator=g, dtype=torch.float64))


# name -> (build(model, params), how a step runs)
RECIPES: dict[str, tuple[Callable[[nn.Module, Any], torch.optim.Optimizer], str]] = {
    "sgd": (lambda m, p: ours.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3), "plain"),
    "adagrad": (lambda m, p: ours.Adagrad(p, lr=0.1), "plain"),
    "rmsprop": (lambda m, p: ours.RMSprop(p, lr=1e-2, momentum=0.5, centered=True), "plain"),
    "adam": (lambda m, p: ours.Adam(p, lr=1e-2, amsgrad=True), "plain"),
    "adamw": (lambda m, p: ours.AdamW(p, lr=1e-2, weight_decay=0.1), "plain"),
    "amsgrad": (lambda m, p: ours.AMSGrad(p, lr=1e-2), "plain"),
    "radam": (lambda m, p: ours.RAdam(p, lr=1e-2), "plain"),
    "nadam": (lambda m, p: ours.NAdam(p, lr=1e-2), "plain"),
    "adan": (lambda m, p: ours.Adan(p, lr=1e-2, max_grad_norm=1.0), "plain"),
    "lion": (lambda m, p: ours.Lion(p, lr=1e-3, weight_decay=0.1), "plain"),
    "lars": (lambda m, p: ours.LARS(p, lr=1.0, momentum=0.9, weight_decay=1e-4), "plain"),
    "lamb": (lambda m, p: ours.LAMB(p, lr=1e-2, weight_decay=0.01, max_grad_norm=1.0), "plain"),
    "shampoo": (lambda m, p: ours.Shampoo(p, lr=0.1, momentum=0.9), "plain"),
    "sophia": (lambda m, p: ours.Sophia(p, lr=1e-2), "sophia"),
    "adahessian": (lambda m, p: ours.AdaHessian(p, lr=0.1), "adahessian"),
    "sam": (lambda m, p: ours.SAM(p, ours.SGD, rho=0.05, lr=0.1, momentum=0.9), "sam"),
    "lookahead": (lambda m, p: ours.Lookahead(ours.AdamW(p, lr=1e-2), k=2), "plain"),
    "lbfgs": (lambda m, p: ours.LBFGS(p, lr=0.5, max_iter=4), "closure"),
    "kfac": (lambda m, p: ours.KFAC(m, lr=0.05, cov_update_frequency=1, inverse_update_frequency=2), "plain"),
}
# SparseAdam takes sparse gradients only (an embedding's): DDP runs it below; FSDP2 has none
DENSE = sorted(RECIPES)
# what cannot run there, and the error that says so (README, "Scaling out")
UNSUPPORTED = {
    # DDP's reducer itself refuses the double backward (it writes the grads in place)
    ("adahessian", "ddp"): "leaf Variable that requires grad is being used in an in-place operation",
    # FSDP2 reduces the gradients without their graph: no Hessian-vector products are left
    ("adahessian", "fsdp"): "DDP and FSDP2 reduce the gradients without their graph",
}


def train(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    build, kind = RECIPES[name]
    opt = build(model, model.parameters())

    def loss_fn(create_graph: bool = False) -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    for step in range(STEPS):
        if kind == "closure":
            opt.step(loss_fn)
        elif kind == "sam":
            loss_fn()
            opt.step(loss_fn)
        else:
            loss_fn(create_graph=kind == "adahessian")
            opt.step()
            if kind == "sophia" and step % 2 == 1:  # (the estimator's backward: on the targets here)
                loss_fn()
                opt.update_hessian()


def full(model: nn.Module) -> list[torch.Tensor]:
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()
    ]


def _fully_shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model[2])
    return fully_shard(model)


def _worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)  # (as the references run: torch.optim's scalar state too)
    torch.manual_seed(0)  # (AdaHessian's probes: the same on every rank, as in one process)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    x, y = make_data()
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    results: dict[str, Any] = {}
    try:
        for name in DENSE:
            for wrapping, wrap in (("ddp", DistributedDataParallel), ("fsdp", _fully_shard)):
                torch.manual_seed(0)
                model = make_model()
                try:
                    train(name, wrap(model), x[half], y[half])
                    results[f"{name}/{wrapping}"] = full(model)
                except Exception as failure:
                    results[f"{name}/{wrapping}"] = f"{type(failure).__name__}: {failure}"[:400]
        torch.manual_seed(0)
        table = nn.Embedding(12, 4, sparse=True, dtype=torch.float32).double()
        ddp = DistributedDataParallel(table)
        opt = ours.SparseAdam(ddp.parameters(), lr=0.05)
        for step in range(STEPS):
            ids = torch.arange(8).reshape(4, 2)[half.start // 4 : half.stop // 4] + step % 3
            opt.zero_grad()
            ddp(ids).pow(2).sum().backward()
            opt.step()
        results["sparse_adam/ddp"] = [table.weight.detach().clone()]
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out_dir = tmp_path_factory.mktemp("scale_out")
    context = mp.start_processes(
        _worker, args=(str(out_dir),), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo processes did not finish within 300 s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process(name: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = make_model()
    train(name, model, *make_data())
    return [p.detach().clone() for p in model.parameters()]


def test_every_registered_optimizer_is_covered() -> None:
    assert set(RECIPES) | {"sparse_adam"} == set(ao.registry())


@pytest.mark.parametrize("wrapping", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", DENSE)
def test_two_processes_on_half_batches_match_one_on_the_full_batch(
    torch64, runs: list[dict[str, Any]], name: str, wrapping: str
) -> None:
    rank0, rank1 = (run[f"{name}/{wrapping}"] for run in runs)
    if (name, wrapping) in UNSUPPORTED:
        assert isinstance(rank0, str) and UNSUPPORTED[name, wrapping] in rank0, rank0
        return
    assert not isinstance(rank0, str), rank0
    for p, q in zip(rank0, rank1, strict=True):
        assert torch.equal(p, q), "the ranks disagree"
    reference = single_process(name)
    start = [p.detach() for p in make_model().parameters()]
    assert max(float((p - s).abs().max()) for p, s in zip(reference, start)) > 1e-4  # (it trained)
    error = relative_error(
        torch.cat([p.flatten() for p in rank0]).numpy(), torch.cat([p.flatten() for p in reference]).numpy()
    )
    assert error <= 1e-10, f"{name} under {wrapping}: {error:.3e} from the single-process run"


def test_sparse_adam_under_ddp_matches_one_process(torch64, runs: list[dict[str, Any]]) -> None:
    rank0, rank1 = (run["sparse_adam/ddp"] for run in runs)
    assert torch.equal(rank0[0], rank1[0])
    torch.manual_seed(0)
    table = nn.Embedding(12, 4, sparse=True, dtype=torch.float32).double()
    opt = ours.SparseAdam(table.parameters(), lr=0.05)
    for step in range(STEPS):
        opt.zero_grad()
        (table(torch.arange(8).reshape(4, 2) + step % 3).pow(2).sum() / WORLD).backward()
        opt.step()
    torch.testing.assert_close(rank0[0], table.weight.detach(), rtol=1e-12, atol=1e-12)
