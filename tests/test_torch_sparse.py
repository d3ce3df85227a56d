"""Sparse gradients, as torch.optim takes them: ``SGD`` and ``Adagrad`` step an
``nn.Embedding(sparse=True)`` as torch.optim's do (on the gradient's rows where a zero gradient
changes nothing, densified where momentum or weight decay move every row), ``SparseAdam``
steps only the rows it is given, and every other class refuses a sparse gradient before
anything changes. References: the torch.optim classes, run side by side."""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
ours = pytest.importorskip("agnostic_optim.adapters.torch", reason="the torch adapter needs torch")

from torch import nn  # noqa: E402

CONFIGS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "maximize": True}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1}),  # (densified: momentum moves every row)
    ("SGD", {"lr": 0.05, "weight_decay": 0.1}),  # (torch refuses: compared with its dense step)
    ("Adagrad", {"lr": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1, "maximize": True}),
    ("SparseAdam", {"lr": 1e-2}),
    ("SparseAdam", {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "maximize": True}),
]


class Recommender(nn.Module):
    """An embedding table (sparse gradients) and a dense head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 8, sparse=True)
        self.head = nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids).mean(dim=1))[:, 0]


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_embedding_training_matches_torch(torch64, name: str, kwargs: dict[str, Any]) -> None:
    """12 steps on batches that repeat some rows (an uncoalesced gradient) and leave most rows
    out; the embedding in ``name``, the head in torch's Adam (SparseAdam takes no dense
    gradient): every param within 1e-12 of torch.optim's run, and the rows never looked up
    never moved (where torch's do not)."""
    torch.manual_seed(0)
    base = Recommender()
    batches = [torch.randint(0, 30, (16, 4)) for _ in range(12)]  # rows 30..49 never looked up
    targets = [torch.randn(16) for _ in range(12)]
    runs = []
    for module in (ours, torch.optim):
        model = copy.deepcopy(base)
        sparse_opt = getattr(module, name)([model.embedding.weight], **kwargs)
        dense_opt = torch.optim.Adam(model.head.parameters(), lr=1e-2)
        runs.append((model, sparse_opt, dense_opt))
    for ids, target in zip(batches, targets):
        for model, sparse_opt, dense_opt in runs:
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            nn.functional.mse_loss(model(ids), target).backward()
            assert model.embedding.weight.grad.is_sparse
            if sparse_opt.__module__.startswith("torch") and name == "SGD" and kwargs.get("weight_decay"):
                model.embedding.weight.grad = model.embedding.weight.grad.to_dense()
            sparse_opt.step()
            dense_opt.step()
    (mine, mine_opt, _), (theirs, _, _) = runs
    for p, q in zip(mine.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    untouched = base.embedding.weight[30:]
    if name != "SGD" or not (kwargs.get("momentum") or kwargs.get("weight_decay")):
        assert torch.equal(mine.embedding.weight[30:], untouched)
    if name == "SparseAdam":  # its moments are kept for the rows it saw only
        state = mine_opt.state[mine.embedding.weight]
        assert torch.count_nonzero(state["exp_avg"][30:]) == 0


def test_mixed_sparse_and_dense_gradients_in_one_group(torch64) -> None:
    """One SGD/Adagrad group holding the embedding (sparse) and the head (dense)."""
    torch.manual_seed(1)
    base = Recommender()
    for name in ("SGD", "Adagrad"):
        runs = []
        for module in (ours, torch.optim):
            model = copy.deepcopy(base)
            runs.append((model, getattr(module, name)(model.parameters(), lr=0.1)))
        for _ in range(6):
            ids, target = torch.randint(0, 50, (8, 3)), torch.randn(8)
            for model, opt in runs:
                opt.zero_grad()
                nn.functional.mse_loss(model(ids), target).backward()
                opt.step()
        for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Lion"])
def test_classes_without_sparse_support_refuse_before_any_change(name: str) -> None:
    model = Recommender()
    opt = getattr(ours, name)([{"params": model.head.parameters()}, {"params": [model.embedding.weight]}])
    nn.functional.mse_loss(model(torch.randint(0, 50, (4, 2))), torch.randn(4)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # (not even group 1)
    assert not any(opt.state.values())


def test_sparse_adam_refuses_dense_gradients_and_params_like_torch() -> None:
    model = Recommender()
    opt = ours.SparseAdam(model.head.parameters())
    nn.functional.mse_loss(model(torch.randint(0, 50, (4, 2))), torch.randn(4)).backward()
    with pytest.raises(RuntimeError, match="does not support dense gradients"):
        opt.step()
    with pytest.raises(ValueError, match="SparseAdam requires dense parameter tensors"):
        ours.SparseAdam([torch.zeros(3).to_sparse()])
    with pytest.raises(ValueError, match="SparseAdam does not support complex parameters"):
        ours.SparseAdam([torch.zeros(3, dtype=torch.complex64)])
