"""The torch classes and the portable checkpoint: ``opt.portable_state(model)`` is the core's
state (the one every backend reads), so a torch run saved with ``ao.checkpoint.save_state``
resumes in JAX (and back) with the numbers of an uninterrupted run; saved weights' layouts are
checked, never transposed silently; files are verified and written atomically."""

from __future__ import annotations

import copy
import os
import pathlib

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim import checkpoint

torch = pytest.importorskip("torch", reason="torch is not installed")
ours = pytest.importorskip("agnostic_optim.adapters.torch", reason="the torch adapter needs torch")

from torch import nn  # noqa: E402

HPARAMS = {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1}


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 4, generator=generator, dtype=torch.float64), torch.randn(
        16, 1, generator=generator, dtype=torch.float64
    )


def torch_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_torch_run_resumes_in_jax_and_back(tmp_path: pathlib.Path, jax_backend) -> None:
    """5 AdamW steps in torch, saved; 5 more in JAX from the file (params from the model's
    state_dict, same names); saved again and resumed in a fresh torch optimizer for 5 more:
    every param within 1e-12 of 15 uninterrupted torch.optim.AdamW steps."""
    import jax
    import jax.numpy as jnp

    reference = make_model()
    torch_steps(reference, torch.optim.AdamW(reference.parameters(), **HPARAMS), range(15))

    model = make_model()
    opt = ours.AdamW(model.parameters(), **HPARAMS)
    torch_steps(model, opt, range(5))
    checkpoint.save_state(
        tmp_path / "torch.safetensors", opt.portable_state(model), layouts=ours.param_layouts(model)
    )

    params = {name: jnp.asarray(value.detach().numpy()) for name, value in model.named_parameters()}
    functional = ao.adamw(**HPARAMS)
    state = checkpoint.load_state(tmp_path / "torch.safetensors", like=functional.init(params))
    assert int(state.count) == 5

    def loss(params, x, y):
        h = jnp.tanh(x @ params["0.weight"].T + params["0.bias"])
        return jnp.mean((h @ params["2.weight"].T + params["2.bias"] - y) ** 2)

    for step in range(5, 10):
        x, y = (jnp.asarray(t.numpy()) for t in batch(step))
        state, params = functional.step(state, jax.grad(loss)(params, x, y), params)
    checkpoint.save_state(tmp_path / "jax.safetensors", state)

    resumed = make_model()
    with torch.no_grad():
        for name, p in resumed.named_parameters():
            p.copy_(torch.from_numpy(np.asarray(params[name])))
    opt = ours.AdamW(resumed.parameters(), lr=0.5)  # (the file's hyperparameters replace these)
    opt.load_portable_state(
        checkpoint.load_state(tmp_path / "jax.safetensors", like=opt.portable_state(resumed)), resumed
    )
    assert opt.param_groups[0]["lr"] == HPARAMS["lr"]
    torch_steps(resumed, opt, range(10, 15))
    for p, q in zip(resumed.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_a_weight_saved_in_torchs_layout_is_not_loaded_on_a_flax_kernel(tmp_path: pathlib.Path) -> None:
    """A square (4, 4) torch weight renamed onto a flax ``kernel``: the shapes agree, the axes do
    not; the load is refused. Onto equinox's ``weight`` (torch's layout) it loads."""
    model = make_model()
    opt = ours.AdamW(model.parameters(), **HPARAMS)
    torch_steps(model, opt, range(2))
    path = tmp_path / "state.safetensors"
    checkpoint.save_state(path, opt.portable_state(model), layouts=ours.param_layouts(model))
    assert ours.param_layouts(model) == {"0.weight": "out_in", "2.weight": "out_in"}

    def tree(kind: str) -> dict:
        names = {
            "0.weight": f"Dense_0.{kind}",
            "0.bias": "Dense_0.bias",
            "2.weight": f"Dense_1.{kind}",
            "2.bias": "Dense_1.bias",
        }
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        flat = {
            names[name]: np.zeros(shapes[name][::-1] if kind == "kernel" else shapes[name]) for name in names
        }
        return flat, names

    flax_params, names = tree("kernel")
    with pytest.raises(
        ValueError, match=r"Dense_\d\.kernel.*torch's \(out, in\) weight.*flax's \(in, out\) kernel"
    ):
        checkpoint.load_state(path, like=ao.adamw(**HPARAMS).init(flax_params), rename=names)
    equinox_params, names = tree("weight")
    state = checkpoint.load_state(path, like=ao.adamw(**HPARAMS).init(equinox_params), rename=names)
    np.testing.assert_array_equal(
        state.buffers["exp_avg"]["Dense_0.weight"], opt.state[model[0].weight]["exp_avg"].numpy()
    )
    with pytest.raises(ValueError, match="not transposed silently"):  # (declared, not guessed from the name)
        checkpoint.load_state(
            path,
            like=ao.adamw(**HPARAMS).init(equinox_params),
            rename=names,
            layouts={"Dense_0.weight": "in_out"},
        )


def test_portable_state_round_trip_continues_like_an_uninterrupted_run(tmp_path: pathlib.Path) -> None:
    for name, hparams in (
        ("SGD", {"lr": 0.1, "momentum": 0.9}),
        ("NAdam", {"lr": 1e-2}),
        ("Adagrad", {"lr": 0.1}),
    ):
        uninterrupted, resumed = make_model(), make_model()
        opt = getattr(ours, name)(uninterrupted.parameters(), **hparams)
        torch_steps(uninterrupted, opt, range(4))
        path = tmp_path / f"{name}.safetensors"
        checkpoint.save_state(path, opt.portable_state())  # (names: the params' positions)
        torch_steps(uninterrupted, opt, range(4, 8))
        with torch.no_grad():
            for p, q in zip(resumed.parameters(), copy.deepcopy(make_model()).parameters()):
                p.copy_(q)
        first = getattr(ours, name)(resumed.parameters(), **hparams)
        torch_steps(resumed, first, range(4))
        fresh = getattr(ours, name)(resumed.parameters(), **hparams)
        fresh.load_portable_state(checkpoint.load_state(path, like=fresh.portable_state()))
        torch_steps(resumed, fresh, range(4, 8))
        for p, q in zip(resumed.parameters(), uninterrupted.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_portable_state_needs_one_set_of_options() -> None:
    model = make_model()
    opt = ours.AdamW(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 1.0}], **HPARAMS
    )
    with pytest.raises(ValueError, match=r"groups 0 and 1 differ in \['lr'\]"):
        opt.portable_state(model)


def test_a_changed_byte_is_an_error_and_a_failed_save_keeps_the_old_file(
    tmp_path: pathlib.Path, monkeypatch
) -> None:
    model = make_model()
    opt = ours.AdamW(model.parameters(), **HPARAMS)
    torch_steps(model, opt, range(2))
    path = tmp_path / "state.safetensors"
    checkpoint.save_state(path, opt.portable_state(model))
    good = path.read_bytes()
    like = opt.portable_state(model)
    for offset in (len(good) - 1, len(good) // 2 + 7):  # a float's last byte; one in the middle
        corrupt = bytearray(good)
        corrupt[offset] ^= 0x10
        path.write_bytes(bytes(corrupt))
        with pytest.raises(ValueError, match=r"checksum|not a readable safetensors"):
            checkpoint.load_state(path, like=like)
    path.write_bytes(good)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_state(path, opt.portable_state(model))
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]  # (no temporary left)
    monkeypatch.undo()
    mask = os.umask(0o022)
    os.umask(mask)
    checkpoint.save_state(tmp_path / "new.safetensors", opt.portable_state(model))
    assert (tmp_path / "new.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
