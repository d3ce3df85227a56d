"""K-FAC against a float64 NumPy transcription of alecwangcq/KFAC-Pytorch, on every backend.

The reference below is written here, independently of ``agnostic_optim``, line by line from
KFAC-Pytorch's ``optimizers/kfac.py`` (``KFACOptimizer``: ``_save_input``, ``_save_grad_output``,
``_update_inv``, ``_get_natural_grad``, ``_kl_clip_and_update_grad``, ``_step``, ``step``) and
``utils/kfac_utils.py`` (``ComputeCovA.linear``, ``ComputeCovG.linear`` with
``batch_averaged=True``, ``update_running_stat``). Its hooks see the inputs and output gradients
of each ``nn.Linear``; here a hand-written NumPy backprop of a small MLP gives them, and the same
backprop gives the core its ``layer_stats``.

The MLP: ``y = W2 (s * tanh(W1 x + b1)) + b2`` with a per-unit gain ``s`` (a leaf no layer
covers, as a norm layer's), loss ``½ mean_batch ‖y - t‖²``. Its predictive distribution is
``N(y, I)``: KFAC-Pytorch's true-Fisher loop takes the statistics from a backward pass on targets
sampled from it, ``y + ε`` (``noise``).
"""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim.conformance.compare import relative_error

BATCH, IN, HIDDEN, OUT = 8, 3, 5, 2
STEPS = 44  # weight decay starts at step 20 * T_cov = 40 (KFAC-Pytorch's delay)
TCOV, TINV = 2, 4
HPARAMS = dict(lr=0.05, momentum=0.9, stat_decay=0.95, damping=0.01, kl_clip=0.001, weight_decay=0.01)
TOL = 1e-10


def problem() -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(20260611)
    params = {
        "fc1": {"weight": rng.standard_normal((HIDDEN, IN)) / 2, "bias": rng.standard_normal(HIDDEN) / 4},
        "gain": 1 + rng.standard_normal(HIDDEN) / 10,
        "fc2": {"weight": rng.standard_normal((OUT, HIDDEN)) / 2, "bias": rng.standard_normal(OUT) / 4},
    }
    x = rng.standard_normal((BATCH, IN))
    target = np.stack([np.sin(x[:, 0] + x[:, 1]), x[:, 2] * x[:, 0]], axis=1)
    return params, x, target


def noise() -> np.ndarray:
    """ε of every step, for targets ``y + ε`` sampled from the model's predictive distribution."""
    return np.random.default_rng(7).standard_normal((STEPS, BATCH, OUT))


def predict(params: dict, x: np.ndarray) -> np.ndarray:
    hidden = np.tanh(x @ params["fc1"]["weight"].T + params["fc1"]["bias"])
    return (hidden * params["gain"]) @ params["fc2"]["weight"].T + params["fc2"]["bias"]


def forward_backward(params: dict, x: np.ndarray, target: np.ndarray):
    """Loss, gradients (like params) and each layer's (input, output gradient) by hand."""
    w1, b1, gain = params["fc1"]["weight"], params["fc1"]["bias"], params["gain"]
    w2, b2 = params["fc2"]["weight"], params["fc2"]["bias"]
    hidden = np.tanh(x @ w1.T + b1)
    scaled = hidden * gain
    y = scaled @ w2.T + b2
    loss = 0.5 * np.mean(np.sum((y - target) ** 2, axis=1))
    g2 = (y - target) / len(x)  # d loss / d y, the batch-mean loss
    d_scaled = g2 @ w2
    g1 = d_scaled * gain * (1 - hidden**2)  # d loss / d (W1 x + b1)
    grads = {
        "fc1": {"weight": g1.T @ x, "bias": g1.sum(0)},
        "gain": (d_scaled * hidden).sum(0),
        "fc2": {"weight": g2.T @ scaled, "bias": g2.sum(0)},
    }
    stats = {("fc1", "weight"): (x, g1), ("fc2", "weight"): (scaled, g2)}
    return loss, grads, stats


# --------------------------------------------------------------------------- reference


def kfac_reference(
    steps: int, lr, momentum, stat_decay, damping, kl_clip, weight_decay, TCov, TInv, sampled=None
):
    """KFAC-Pytorch's ``KFACOptimizer`` (linear layers with bias) in float64 NumPy.

    With ``sampled`` (ε per step), KFAC-Pytorch's true-Fisher training loop: on the steps with
    statistics, its hooks see the backward pass on the sampled targets ``y + ε`` (``acc_stats``
    true), not the one on the real targets. Returns the params after every step, as
    ``{name: array}`` with names ``fc1.weight``...
    """
    init, x, target = problem()
    p = {
        "fc1.weight": init["fc1"]["weight"].copy(),
        "fc1.bias": init["fc1"]["bias"].copy(),
        "gain": init["gain"].copy(),
        "fc2.weight": init["fc2"]["weight"].copy(),
        "fc2.bias": init["fc2"]["bias"].copy(),
    }
    modules = ("fc1", "fc2")
    m_aa, m_gg, d_a, Q_a, d_g, Q_g, buffers = {}, {}, {}, {}, {}, {}, {}
    trajectory = []
    for t in range(steps):
        nested = {m: {"weight": p[f"{m}.weight"], "bias": p[f"{m}.bias"]} for m in modules}
        _, nested_grads, stats = forward_backward({**nested, "gain": p["gain"]}, x, target)
        grad = {f"{m}.{k}": nested_grads[m][k] for m in modules for k in ("weight", "bias")}
        grad["gain"] = nested_grads["gain"]
        if t % TCov == 0:  # _save_input / _save_grad_output hooks
            if sampled is not None:
                params = {**nested, "gain": p["gain"]}
                stats = forward_backward(params, x, predict(params, x) + sampled[t])[2]
            for m in modules:
                a, g = stats[(m, "weight")]
                batch_size = a.shape[0]
                a = np.concatenate([a, np.ones((batch_size, 1))], 1)
                aa = a.T @ (a / batch_size)  # ComputeCovA.linear
                gg = g.T @ (g * batch_size)  # ComputeCovG.linear, batch_averaged
                if t == 0:
                    m_aa[m], m_gg[m] = np.eye(aa.shape[0]), np.eye(gg.shape[0])
                for running, new in ((m_aa[m], aa), (m_gg[m], gg)):  # update_running_stat
                    running *= stat_decay / (1 - stat_decay)
                    running += new
                    running *= 1 - stat_decay
        updates = {}
        for m in modules:
            if t % TInv == 0:  # _update_inv
                eps = 1e-10
                d_a[m], Q_a[m] = np.linalg.eigh(m_aa[m])
                d_g[m], Q_g[m] = np.linalg.eigh(m_gg[m])
                d_a[m] = d_a[m] * (d_a[m] > eps)
                d_g[m] = d_g[m] * (d_g[m] > eps)
            p_grad_mat = np.concatenate([grad[f"{m}.weight"], grad[f"{m}.bias"].reshape(-1, 1)], 1)
            v1 = Q_g[m].T @ p_grad_mat @ Q_a[m]  # _get_natural_grad
            v2 = v1 / (d_g[m][:, None] * d_a[m][None, :] + damping)
            v = Q_g[m] @ v2 @ Q_a[m].T
            updates[m] = [v[:, :-1], v[:, -1]]
        vg_sum = 0.0  # _kl_clip_and_update_grad
        for m in modules:
            vg_sum += (updates[m][0] * grad[f"{m}.weight"] * lr**2).sum()
            vg_sum += (updates[m][1] * grad[f"{m}.bias"] * lr**2).sum()
        nu = min(1.0, math.sqrt(kl_clip / vg_sum))
        for m in modules:
            grad[f"{m}.weight"] = updates[m][0] * nu
            grad[f"{m}.bias"] = updates[m][1] * nu
        for name in p:  # _step
            d_p = grad[name]
            if weight_decay != 0 and t >= 20 * TCov:
                d_p = d_p + weight_decay * p[name]
            if momentum != 0:
                buffers[name] = buffers.get(name, np.zeros_like(p[name])) * momentum + d_p
                d_p = buffers[name]
            p[name] = p[name] - lr * d_p
        trajectory.append({k: v.copy() for k, v in p.items()})
    return trajectory


def flat(params: dict) -> dict[str, np.ndarray]:
    return {
        "fc1.weight": params["fc1"]["weight"],
        "fc1.bias": params["fc1"]["bias"],
        "gain": params["gain"],
        "fc2.weight": params["fc2"]["weight"],
        "fc2.bias": params["fc2"]["bias"],
    }


def worst(ours: list[dict], reference: list[dict]) -> float:
    assert len(ours) == len(reference)
    return max(relative_error(a[k], b[k]) for a, b in zip(ours, reference) for k in b)


# --------------------------------------------------------------------------- the core


def map_nested(fn, tree: dict) -> dict:
    return {k: map_nested(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def run_core(backend, opt, steps: int = STEPS, step=None, stats_every_step: bool = True) -> list[dict]:
    """The functional API on ``backend``; the test's backprop runs on host copies of the params."""
    init, x, target = problem()
    params = map_nested(backend.asarray, init)
    state = opt.init(params)
    step = step or opt.step
    trajectory = []
    for t in range(steps):
        _, grads, stats = forward_backward(map_nested(backend.to_numpy, params), x, target)
        stats = {k: (backend.asarray(a), backend.asarray(g)) for k, (a, g) in stats.items()}
        if not stats_every_step and t % TCOV:
            stats = None
        state, params = step(state, map_nested(backend.asarray, grads), params, layer_stats=stats)
        trajectory.append(flat(map_nested(backend.to_numpy, params)))
    return trajectory


@pytest.fixture(scope="module")
def reference() -> list[dict]:
    return kfac_reference(STEPS, TCov=TCOV, TInv=TINV, **HPARAMS)


def kfac(**overrides):
    return ao.kfac(**{**HPARAMS, "cov_update_frequency": TCOV, "inverse_update_frequency": TINV, **overrides})


def test_reference_clips_some_steps_only():
    """The problem exercises both sides of the KL clip and of the weight-decay delay."""
    assert STEPS > 20 * TCOV
    trajectory = kfac_reference(2, TCov=TCOV, TInv=TINV, **{**HPARAMS, "kl_clip": 1e9})
    clipped = kfac_reference(2, TCov=TCOV, TInv=TINV, **HPARAMS)
    assert relative_error(clipped[0]["gain"], trajectory[0]["gain"]) == 0  # gain: SGD only
    assert relative_error(clipped[0]["fc1.weight"], trajectory[0]["fc1.weight"]) > 1e-3


def test_core_matches_kfac_pytorch_on_every_backend(backend, reference):
    error = worst(run_core(backend, kfac()), reference)
    assert error <= TOL, f"{backend.name}: relative error {error:.2e}"


def test_stats_may_be_left_out_on_steps_without_a_statistics_update(reference):
    from agnostic_optim.conformance.backends import get_backend

    error = worst(run_core(get_backend("numpy"), kfac(), stats_every_step=False), reference)
    assert error <= TOL


def test_jit_matches_eager(jax_backend):
    import jax

    opt = kfac()
    eager = run_core(jax_backend, opt, steps=12)
    jitted = run_core(jax_backend, opt, steps=12, step=jax.jit(opt.step))
    assert worst(jitted, eager) <= 1e-12


def test_in_out_layout_with_explicit_layers_on_a_list(reference):
    """Weights stored (in, out) in a list, layers named by index (flax-style kernels)."""
    init, x, target = problem()
    order = [("fc1", "weight"), ("fc1", "bias"), ("gain",), ("fc2", "weight"), ("fc2", "bias")]

    def as_list(tree: dict) -> list[np.ndarray]:
        leaves = [tree[k[0]][k[1]] if len(k) == 2 else tree[k[0]] for k in order]
        return [leaf.T if leaf.ndim == 2 else leaf for leaf in leaves]

    def as_tree(leaves: list[np.ndarray]) -> dict:
        w1, b1, gain, w2, b2 = (leaf.T if leaf.ndim == 2 else leaf for leaf in leaves)
        return {"fc1": {"weight": w1, "bias": b1}, "gain": gain, "fc2": {"weight": w2, "bias": b2}}

    opt = kfac(layers={(0,): (1,), (3,): (4,)}, weight_layout="in_out")
    params = as_list(init)
    state, ours = opt.init(params), []
    for _ in range(STEPS):
        _, grads, stats = forward_backward(as_tree(params), x, target)
        layer_stats = {(0,): stats[("fc1", "weight")], (3,): stats[("fc2", "weight")]}
        state, params = opt.step(state, as_list(grads), params, layer_stats=layer_stats)
        ours.append(flat(as_tree(params)))
    assert worst(ours, reference) <= TOL


def test_float32_state_hparams_and_layers(torch_backend):
    init, x, target = problem()
    params = map_nested(lambda a: torch_backend.asarray(a, "float32"), init)
    opt = kfac()
    state = opt.init(params)
    assert sorted(state.layers) == ["fc1.weight", "fc2.weight"]
    assert tuple(state.layers["fc1.weight"].m_aa.shape) == (IN + 1, IN + 1)
    assert tuple(state.layers["fc2.weight"].m_gg.shape) == (OUT, OUT)
    _, grads, stats = forward_backward(map_nested(torch_backend.to_numpy, params), x, target)
    grads = map_nested(lambda a: torch_backend.asarray(a, "float32"), grads)
    stats = {k: tuple(torch_backend.asarray(a, "float32") for a in v) for k, v in stats.items()}
    state, new = opt.step(state, grads, params, layer_stats=stats)
    f32 = torch_backend.dtype("float32")
    assert all(leaf.dtype == f32 for leaf in [*flat(new).values(), *state.layers["fc1.weight"]])
    assert float(ao.get_hparams(state)["damping"]) == HPARAMS["damping"]
    assert sorted(ao.get_hparams(state)) == sorted(HPARAMS)
    state = ao.set_hparams(state, lr=0.5)
    assert float(ao.get_hparams(state)["lr"]) == 0.5


def test_bad_inputs_raise_before_anything_changes():
    init, x, target = problem()
    opt = kfac()
    state = opt.init(init)
    _, grads, stats = forward_backward(init, x, target)
    with pytest.raises(ValueError, match="not one of the layers"):
        opt.step(state, grads, init, layer_stats={("fc3", "weight"): stats[("fc1", "weight")]})
    with pytest.raises(ValueError, match=r"activations must have shape \(batch..., 3\)"):
        opt.step(state, grads, init, layer_stats={("fc1", "weight"): stats[("fc2", "weight")]})
    with pytest.raises(TypeError, match="must map weight key paths"):
        opt.step(state, grads, init, layer_stats=[stats[("fc1", "weight")]])
    with pytest.raises(ValueError, match="no leaf path"):
        ao.kfac(layers={("fc1", "weight"): ("fc1", "beta")}).init(init)
    with pytest.raises(ValueError, match="must be 2-D"):
        ao.kfac(layers={("gain",): None}).init(init)
    for bad in (dict(stat_decay=1.0), dict(damping=-1.0), dict(kl_clip=0.0), dict(cov_update_frequency=0)):
        with pytest.raises(ValueError):
            ao.kfac(**bad)
    assert int(state.count) == 0


def test_loss_decreases_faster_than_sgd():
    init, x, target = problem()

    def final_loss(opt: ao.Optimizer, steps: int = 30) -> float:
        params, state = init, opt.init(init)
        for _ in range(steps):
            _, grads, stats = forward_backward(params, x, target)
            inputs = {"layer_stats": stats} if opt.inputs else {}
            state, params = opt.step(state, grads, params, **inputs)
        return forward_backward(params, x, target)[0]

    initial = forward_backward(init, x, target)[0]
    ours = final_loss(
        ao.kfac(lr=0.1, damping=0.01, kl_clip=0.01, cov_update_frequency=1, inverse_update_frequency=1)
    )
    sgd = final_loss(ao.sgd(lr=0.1, momentum=0.9))
    assert ours < 0.6 * sgd < initial / 10


# --------------------------------------------------------------------------- the torch class


def torch_model(torch):
    init, _, _ = problem()

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = torch.nn.Linear(IN, HIDDEN, dtype=torch.float64)
            self.gain = torch.nn.Parameter(torch.tensor(init["gain"]))
            self.fc2 = torch.nn.Linear(HIDDEN, OUT, dtype=torch.float64)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)) * self.gain)

    model = MLP()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.tensor(flat(init)[name]))
    return model


def torch_steps(torch, model, opt, steps: int, sampled=None) -> list[dict]:
    """``steps`` training steps; with ``sampled`` (ε per step), KFAC-Pytorch's true-Fisher loop."""
    _, x, target = problem()
    x, target = torch.tensor(x), torch.tensor(target)
    trajectory = []
    for t in range(steps):
        opt.zero_grad()
        y = model(x)
        if sampled is not None and opt.stats_due:
            opt.acc_stats = True
            sample = y.detach() + torch.tensor(sampled[t])
            (0.5 * ((y - sample) ** 2).sum(1).mean()).backward(retain_graph=True)
            opt.acc_stats = False
            opt.zero_grad()
        loss = 0.5 * ((y - target) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
        trajectory.append({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
    return trajectory


def test_torch_class_matches_kfac_pytorch(torch_backend, reference):
    import torch

    from agnostic_optim.adapters._torch_kfac import KFAC

    model = torch_model(torch)
    opt = KFAC(model, cov_update_frequency=TCOV, inverse_update_frequency=TINV, **HPARAMS)
    assert worst(torch_steps(torch, model, opt, STEPS), reference) <= TOL


def test_torch_class_state_dict_round_trip(torch_backend):
    import torch

    from agnostic_optim.adapters._torch_kfac import KFAC

    kwargs = dict(cov_update_frequency=TCOV, inverse_update_frequency=TINV, **HPARAMS)
    model = torch_model(torch)
    opt = KFAC(model, **kwargs)
    torch_steps(torch, model, opt, 5)
    saved = opt.state_dict()
    assert "layers.fc1.weight.q_a" in saved["state"] and "momentum_buffer.gain" in saved["state"]
    resumed_model = torch_model(torch)
    resumed_model.load_state_dict(model.state_dict())
    resumed = KFAC(resumed_model, **kwargs)
    resumed.load_state_dict(saved)
    assert worst(torch_steps(torch, resumed_model, resumed, 5), torch_steps(torch, model, opt, 5)) == 0


def test_torch_class_sampled_fisher_loop_matches_kfac_pytorch(torch_backend, reference):
    """Statistics from the backward passes run while ``acc_stats`` is true, as KFAC-Pytorch's."""
    import torch

    from agnostic_optim.adapters._torch_kfac import KFAC

    eps = noise()
    sampled_reference = kfac_reference(STEPS, TCov=TCOV, TInv=TINV, sampled=eps, **HPARAMS)
    assert worst(sampled_reference, reference) > 1e-3  # the sampled statistics matter
    model = torch_model(torch)
    opt = KFAC(model, cov_update_frequency=TCOV, inverse_update_frequency=TINV, **HPARAMS)
    assert worst(torch_steps(torch, model, opt, STEPS, sampled=eps), sampled_reference) <= TOL


def forward_backward_torch(torch, model) -> None:
    _, x, target = problem()
    (0.5 * ((model(torch.tensor(x)) - torch.tensor(target)) ** 2).sum(1).mean()).backward()


def test_torch_class_hooks_do_not_keep_the_optimizer_alive(torch_backend):
    import torch

    from agnostic_optim.adapters._torch_kfac import KFAC

    model = torch_model(torch)
    opt = KFAC(model, cov_update_frequency=TCOV, inverse_update_frequency=TINV, **HPARAMS)
    forward_backward_torch(torch, model)
    assert sorted(opt._captured) == [("fc1.weight",), ("fc2.weight",)]
    opt.step()
    assert not opt._captured  # dropped once the step used them
    forward_backward_torch(torch, model)
    opt.step()
    forward_backward_torch(torch, model)  # step 2: statistics due, captured, never used
    assert opt._captured
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None
    assert not model.fc1._forward_hooks and not model.fc2._forward_hooks
    forward_backward_torch(torch, model)  # runs, and nothing captures


def test_torch_class_two_optimizers_on_one_model(torch_backend, reference):
    import torch

    from agnostic_optim.adapters._torch_kfac import KFAC

    kwargs = dict(cov_update_frequency=TCOV, inverse_update_frequency=TINV, **HPARAMS)
    model = torch_model(torch)
    idle = KFAC(model, **kwargs)  # records its own statistics, never steps
    opt = KFAC(model, **kwargs)
    assert worst(torch_steps(torch, model, opt, STEPS), reference) <= TOL
    assert idle._captured and len(model.fc1._forward_hooks) == 2
    idle.remove_hooks()
    assert not idle._captured and len(model.fc1._forward_hooks) == 1
    forward_backward_torch(torch, model)
    assert not idle._captured
    idle.remove_hooks()  # a second call does nothing
    del opt
    gc.collect()
    assert not model.fc1._forward_hooks


def test_torch_class_failed_load_changes_nothing(torch_backend):
    import torch

    from agnostic_optim.adapters._torch_kfac import KFAC

    kwargs = dict(cov_update_frequency=TCOV, inverse_update_frequency=TINV, **HPARAMS)
    models = [torch_model(torch) for _ in range(3)]
    opts = [KFAC(model, **kwargs) for model in models]
    for model, opt, steps in zip(models, opts, (3, 3, 6)):
        torch_steps(torch, model, opt, steps)
    other = opts[2].state_dict()
    bad_groups = {**other, "param_groups": [{**other["param_groups"][0], "params": [0, 1]}]}
    bad_state = {**other, "state": {k: v for k, v in other["state"].items() if k != "count"}}
    for bad, error in ((bad_groups, ValueError), (bad_state, KeyError)):
        with pytest.raises(error):
            opts[0].load_state_dict(bad)
    continued = torch_steps(torch, models[0], opts[0], 5)
    assert worst(continued, torch_steps(torch, models[1], opts[1], 5)) == 0


def test_torch_class_weight_tied_to_an_embedding(torch_backend):
    """GPT's ``lm_head.weight = emb.weight``: a layer by its canonical name ``emb.weight``,
    preconditioned with the statistics of ``lm_head`` (as KFAC-Pytorch does)."""
    import torch

    from agnostic_optim.adapters._torch_kfac import KFAC

    vocab, width = 7, 4
    torch.manual_seed(0)

    class TinyGPT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, width, dtype=torch.float64)
            self.fc = torch.nn.Linear(width, width, dtype=torch.float64)
            self.lm_head = torch.nn.Linear(width, vocab, bias=False, dtype=torch.float64)
            self.lm_head.weight = self.emb.weight

        def forward(self, tokens):
            self.e = self.emb(tokens)
            self.z = self.fc(self.e)
            self.h = torch.tanh(self.z)
            self.logits = self.lm_head(self.h)
            return self.logits

    hp = dict(
        lr=0.1, momentum=0.9, damping=0.01, kl_clip=10.0, cov_update_frequency=1, inverse_update_frequency=1
    )
    model = TinyGPT()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = KFAC(model, **hp)
    assert sorted(opt._kfac_state.layers) == ["emb.weight", "fc.weight"]
    tokens, labels = torch.randint(vocab, (3, 5)), torch.randint(vocab, (15,))
    model(tokens)
    for out in (model.z, model.logits):
        out.retain_grad()
    torch.nn.functional.cross_entropy(model.logits.reshape(-1, vocab), labels).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.step()
    stats = {
        ("emb.weight",): (model.h.detach(), model.logits.grad),
        ("fc.weight",): (model.e.detach(), model.z.grad),
    }
    core = ao.kfac(**hp, layers={("emb.weight",): None, ("fc.weight",): ("fc.bias",)})
    _, expected = core.step(core.init(params), grads, params, layer_stats=stats)
    for name, p in model.named_parameters():
        assert relative_error(p.detach().numpy(), expected[name].numpy()) <= 1e-12, name


def test_torch_class_weight_shared_by_two_linear_layers_gets_sgd(torch_backend):
    import torch

    from agnostic_optim.adapters._torch_kfac import KFAC

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 3, dtype=torch.float64),
        torch.nn.Tanh(),
        torch.nn.Linear(3, 3, dtype=torch.float64),
        torch.nn.Linear(3, 2, dtype=torch.float64),
    )
    model[2].weight = model[0].weight
    with pytest.warns(UserWarning, match=r"\['0.weight'\] belong to several nn.Linear modules"):
        opt = KFAC(model, lr=0.1, cov_update_frequency=1, inverse_update_frequency=1)
    assert sorted(opt._kfac_state.layers) == ["3.weight"]
    assert len(model[0]._forward_hooks) == len(model[2]._forward_hooks) == 0
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(torch.randn(5, 3, dtype=torch.float64)).square().mean().backward()
    opt.step()
    for name in ("0.weight", "0.bias", "2.bias"):  # first step: the buffer is the gradient
        p = model.get_parameter(name)
        assert torch.equal(p, before[name] - 0.1 * p.grad), name
    assert not torch.equal(model[3].weight, before["3.weight"] - 0.1 * model[3].weight.grad)


# --------------------------------------------------------------------------- the JAX helper


def jax_loss(x: np.ndarray, target: np.ndarray):
    """The problem's loss in JAX, weights in torch's (out, in) layout (``x @ W.T``)."""
    import jax.numpy as jnp

    def loss_fn(params: dict):
        hidden = jnp.tanh(x @ params["fc1"]["weight"].T + params["fc1"]["bias"])
        y = (hidden * params["gain"]) @ params["fc2"]["weight"].T + params["fc2"]["bias"]
        return 0.5 * jnp.mean(jnp.sum((y - target) ** 2, axis=1))

    return loss_fn


def test_jax_layer_stats_match_the_hand_written_backprop(jax_backend):
    """``kfac_layer_stats`` finds both linear layers in the loss's jaxpr (through the transpose
    of ``x @ W.T``; ``gain`` is 1-D, no layer) and returns the loss, the gradients and each
    layer's (input, output gradient) of one pass, as the hand-written backprop computes them."""
    from agnostic_optim.adapters.jax import kfac_layer_stats

    init, x, target = problem()
    params = map_nested(jax_backend.asarray, init)
    loss, grads, stats = kfac_layer_stats(jax_loss(x, target), params)
    expected_loss, expected_grads, expected_stats = forward_backward(init, x, target)
    assert abs(float(loss) - expected_loss) <= 1e-12 * abs(expected_loss)
    assert worst([flat(map_nested(np.asarray, grads))], [flat(expected_grads)]) <= 1e-12
    assert set(stats) == set(expected_stats)
    for path, (activations, output_grads) in expected_stats.items():
        assert relative_error(np.asarray(stats[path][0]), activations) <= 1e-12, path
        assert relative_error(np.asarray(stats[path][1]), output_grads) <= 1e-12, path


def test_jax_helper_drives_kfac_to_kfac_pytorchs_trajectory(jax_backend, reference):
    """The whole K-FAC step in JAX, under ``jax.jit``: the helper's statistics and gradients
    into ``ao.kfac`` follow KFAC-Pytorch's trajectory (the torch class's, from its hooks)."""
    import jax

    from agnostic_optim.adapters.jax import kfac_layer_stats

    init, x, target = problem()
    loss_fn = jax_loss(x, target)
    opt = kfac()

    @jax.jit
    def train_step(state, params):
        _, grads, stats = kfac_layer_stats(loss_fn, params)
        return opt.step(state, grads, params, layer_stats=stats)

    params = map_nested(jax_backend.asarray, init)
    state, trajectory = opt.init(params), []
    for _ in range(STEPS):
        state, params = train_step(state, params)
        trajectory.append(flat(map_nested(np.asarray, params)))
    assert worst(trajectory, reference) <= TOL


def test_jax_layer_stats_of_equinox_and_flax_style_layers(jax_backend):
    """Layers as equinox writes them (``W @ x`` per example under ``jax.vmap``: the weight is the
    dot's left operand, the batch axis last) and as flax does (``x @ kernel``, (in, out)), with
    a float32 cast in between: the statistics are those of explicit perturbations."""
    import jax
    import jax.numpy as jnp

    from agnostic_optim.adapters.jax import kfac_layer_stats

    rng = np.random.default_rng(3)
    params = {
        "torch_style": {"weight": jnp.asarray(rng.standard_normal((5, 3))), "bias": jnp.zeros(5)},
        "flax_style": {"kernel": jnp.asarray(rng.standard_normal((5, 2)))},
    }
    x, target = jnp.asarray(rng.standard_normal((4, 3))), jnp.asarray(rng.standard_normal((4, 2)))

    def forward(params, perturbations):
        layer = params["torch_style"]
        hidden = jax.vmap(lambda row: layer["weight"] @ row)(x) + layer["bias"] + perturbations[0]
        hidden = jnp.tanh(hidden).astype(jnp.float32).astype(jnp.float64)
        y = hidden @ params["flax_style"]["kernel"] + perturbations[1]
        return jnp.mean((y - target) ** 2), hidden

    _, grads, stats = kfac_layer_stats(lambda p: forward(p, (0.0, 0.0))[0], params)
    zeros = (jnp.zeros((4, 5)), jnp.zeros((4, 2)))
    output_grads = jax.grad(lambda e: forward(params, e)[0])(zeros)
    hidden = forward(params, zeros)[1]
    expected = {
        ("torch_style", "weight"): (x, output_grads[0]),
        ("flax_style", "kernel"): (hidden, output_grads[1]),
    }
    assert set(stats) == set(expected)
    for path, pair in expected.items():
        for got, want in zip(stats[path], pair):
            assert got.shape == want.shape and relative_error(np.asarray(got), np.asarray(want)) <= 1e-12
    assert (
        relative_error(np.asarray(grads["flax_style"]["kernel"]), np.asarray(hidden.T @ output_grads[1]))
        <= 1e-12
    )


def test_jax_layer_stats_refuse_what_is_no_single_linear_layer(jax_backend):
    import jax.numpy as jnp

    from agnostic_optim.adapters.jax import kfac_layer_stats

    params = {"w": jnp.ones((3, 3)), "v": jnp.ones(3)}
    x = jnp.ones((2, 3))
    tied = lambda p: jnp.sum((x @ p["w"]) @ p["w"].T)  # noqa: E731
    with pytest.raises(ValueError, match=r"\('w',\) is used by 2 linear layers"):
        kfac_layer_stats(tied, params, layers=[("w",)])
    loss, _, stats = kfac_layer_stats(tied, params)  # by default a tied weight is no layer
    assert stats == {} and float(loss) == 54.0
    with pytest.raises(ValueError, match="no leaf path of params"):
        kfac_layer_stats(tied, params, layers=[("u",)])
    with pytest.raises(ValueError, match="must return a scalar"):
        kfac_layer_stats(lambda p: x @ p["w"], params)
