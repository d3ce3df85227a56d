"""K-FAC: Kronecker-factored approximate curvature for fully-connected layers (curvature-aware).

K-FAC (Martens & Grosse, 2015) approximates the Fisher block of a linear layer ``y = W a + b``
by a Kronecker product ``G ⊗ A`` of the second moments of the layer's inputs and of the
gradients of the loss with respect to its outputs, and preconditions the layer's gradient with
the inverse of that product through the eigendecompositions of ``A`` and ``G``. The reference
is the widely used PyTorch implementation ``KFACOptimizer`` of alecwangcq/KFAC-Pytorch
(``optimizers/kfac.py`` and ``utils/kfac_utils.py``), reproduced here for linear layers.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from agnostic_optim import _backend, blocks, engine, trees
from agnostic_optim import hparams as hp
from agnostic_optim.hparams import HParam, check_range, is_nonzero
from agnostic_optim.registry import register

Array = Any
PyTree = Any
KeyPath = tuple[Hashable, ...]
WeightLayout = Literal["out_in", "in_out"]

EIGENVALUE_FLOOR = 1e-10  # eigenvalues at or below it count as 0 (KFAC-Pytorch's ``eps``)
DECAY_DELAY = 20  # weight decay starts after this many statistics updates (KFAC-Pytorch)


class LayerFactors(NamedTuple):
    """K-FAC state of one linear layer; ``n`` counts the bias column when the layer has one."""

    m_aa: Array  # (n, n) running E[ā āᵀ] of the layer inputs (ā: a 1 appended for the bias)
    m_gg: Array  # (out, out) running E[g gᵀ] of the output gradients, scaled by the batch size
    d_a: Array  # (n,) eigenvalues of m_aa at its latest decomposition (those <= 1e-10 set to 0)
    q_a: Array  # (n, n) eigenvectors of m_aa (columns)
    d_g: Array  # (out,) eigenvalues of m_gg (those <= 1e-10 set to 0)
    q_g: Array  # (out, out) eigenvectors of m_gg (columns)


class KFACState(NamedTuple):
    """State of ``kfac`` (a pytree of arrays; ``ao.get_hparams``/``set_hparams`` work on it)."""

    count: Array  # 0-d int32, the number of steps taken
    hparams: dict[str, Array]  # name -> 0-d array in the scalar dtype
    scheduled: dict[str, Array]  # name -> 0-d array, the value a schedule gave at the latest step
    momentum_buffer: PyTree  # like params, in each leaf's dtype; None when momentum == 0
    layers: dict[str, LayerFactors]  # by the weight's dotted key path (``fc1.weight``)


@dataclass(frozen=True)
class _Layer:
    """Where one linear layer's leaves sit among the flattened params."""

    name: str  # the weight's dotted key path
    path: KeyPath  # the weight's key path
    weight: int  # leaf index of the weight
    bias: int | None  # leaf index of the bias
    out_features: int
    in_features: int

    @property
    def columns(self) -> int:
        return self.in_features + (self.bias is not None)


def _default_layers(pairs: list[tuple[KeyPath, Array]]) -> dict[KeyPath, KeyPath | None]:
    """Every 2-D leaf is a layer; its bias is the sibling leaf named ``bias``, if there is one."""
    paths = {path for path, _ in pairs}
    layers = {}
    for path, leaf in pairs:
        if len(leaf.shape) == 2:
            sibling = (*path[:-1], "bias") if path else None
            layers[path] = sibling if sibling in paths else None
    return layers


def _resolve_layers(
    params: PyTree, layers: Mapping[KeyPath, KeyPath | None] | None, weight_layout: WeightLayout
) -> list[_Layer]:
    pairs, _ = trees.flatten_with_paths(params)
    index = {path: i for i, (path, _) in enumerate(pairs)}
    spec = _default_layers(pairs) if layers is None else layers
    resolved, used = [], set()
    for path, bias_path in spec.items():
        for p in (path, bias_path):
            if p is not None and tuple(p) not in index:
                raise ValueError(f"kfac: layers names {p!r}, which is no leaf path of params")
        weight = pairs[index[tuple(path)]][1]
        name = trees.paths_str(tuple(path))
        if len(weight.shape) != 2:
            raise ValueError(f"kfac: layer weight {name} must be 2-D, got shape {tuple(weight.shape)}")
        out_features, in_features = weight.shape if weight_layout == "out_in" else weight.shape[::-1]
        bias = None if bias_path is None else index[tuple(bias_path)]
        if bias is not None and tuple(pairs[bias][1].shape) != (out_features,):
            raise ValueError(
                f"kfac: bias {trees.paths_str(tuple(bias_path))} of layer {name} must have shape "
                f"({out_features},), got {tuple(pairs[bias][1].shape)}"
            )
        leaves = {index[tuple(path)], bias} - {None}
        if leaves & used:
            raise ValueError(f"kfac: a leaf of layer {name} belongs to another layer too")
        used |= leaves
        resolved.append(_Layer(name, tuple(path), index[tuple(path)], bias, out_features, in_features))
    return resolved


def _check_stats(
    xp: Any, layer_stats: Any, plan: list[_Layer], batch_like: Array
) -> dict[str, tuple[Array, Array]]:
    """``layer_stats`` validated and keyed by layer name: (activations, output grads) as 2-D."""
    if layer_stats is None:
        return {}
    if not isinstance(layer_stats, Mapping):
        raise TypeError(
            "kfac: layer_stats must map weight key paths to (activations, output_grads), "
            f"got {type(layer_stats).__name__}"
        )
    by_path = {layer.path: layer for layer in plan}
    checked = {}
    for path, value in layer_stats.items():
        layer = by_path.get(path)
        if layer is None:
            known = [layer.path for layer in plan]
            raise ValueError(f"kfac: layer_stats names {path!r}, which is not one of the layers {known}")
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise TypeError(f"kfac: layer_stats[{path!r}] must be a pair (activations, output_grads)")
        activations, output_grads = value
        _backend.namespace_of(batch_like, activations, output_grads)
        for what, array, width in (
            ("activations", activations, layer.in_features),
            ("output_grads", output_grads, layer.out_features),
        ):
            if len(array.shape) < 2 or array.shape[-1] != width:
                raise ValueError(
                    f"kfac: layer_stats[{path!r}] {what} must have shape (batch..., {width}), "
                    f"got {tuple(array.shape)}"
                )
        if tuple(activations.shape[:-1]) != tuple(output_grads.shape[:-1]):
            raise ValueError(
                f"kfac: layer_stats[{path!r}] activations {tuple(activations.shape)} and output_grads "
                f"{tuple(output_grads.shape)} must share their batch dimensions"
            )
        flat = [xp.reshape(a, (-1, a.shape[-1])) for a in (activations, output_grads)]
        checked[layer.name] = (flat[0], flat[1])
    return checked


def _factor_dtype(xp: Any, weight: Array) -> Any:
    return _backend.compute_dtype(xp, weight.dtype)


def _eye(xp: Any, n: int, weight: Array) -> Array:
    return xp.eye(n, dtype=_factor_dtype(xp, weight), device=_backend.device_of(weight))


def _initial_factors(xp: Any, layer: _Layer, weight: Array) -> LayerFactors:
    """Identity factors, as KFAC-Pytorch initialises its running statistics."""
    n, out = layer.columns, layer.out_features
    dtype, device = _factor_dtype(xp, weight), _backend.device_of(weight)
    return LayerFactors(
        m_aa=_eye(xp, n, weight),
        m_gg=_eye(xp, out, weight),
        d_a=xp.ones((n,), dtype=dtype, device=device),
        q_a=_eye(xp, n, weight),
        d_g=xp.ones((out,), dtype=dtype, device=device),
        q_g=_eye(xp, out, weight),
    )


def _when(xp: Any, flag: Array, compute: Callable[[], tuple], old: tuple) -> tuple:
    """``compute()`` where ``flag`` holds, else ``old``: a host branch for concrete flags, a
    ``where`` selection under tracing (``jax.jit``)."""
    if not _backend.is_lazy(flag):
        return compute() if bool(flag) else old
    return tuple(xp.where(flag, new, previous) for new, previous in zip(compute(), old))


def _transpose(xp: Any, x: Array) -> Array:
    return xp.permute_dims(x, (1, 0))


def _covariances(
    xp: Any, activations: Array, output_grads: Array, has_bias: bool, batch_averaged: bool, dtype: Any
) -> tuple[Array, Array]:
    """This batch's ``A = ā ā^T / B`` and ``G = B g g^T`` (``g g^T / B`` if not batch-averaged)."""
    a = _backend.astype(xp, activations, dtype)
    g = _backend.astype(xp, output_grads, dtype)
    batch = a.shape[0]
    if has_bias:
        a = xp.concat([a, xp.ones((batch, 1), dtype=dtype, device=_backend.device_of(a))], axis=1)
    aa = _transpose(xp, a) @ (a / batch)
    gg = _transpose(xp, g) @ (g * batch if batch_averaged else g / batch)
    return aa, gg


def _eigh(xp: Any, matrix: Array, scalar_dtype: Any) -> tuple[Array, Array]:
    """Eigenvalues (those <= 1e-10 set to 0) and eigenvectors, computed in the scalar dtype."""
    values, vectors = xp.linalg.eigh(_backend.astype(xp, matrix, scalar_dtype))
    values = xp.where(values > EIGENVALUE_FLOOR, values, xp.zeros_like(values))
    # a row-major copy (solvers return column-major vectors; a reloaded state is row-major), so
    # that the products below round identically before and after a checkpoint
    vectors = xp.reshape(xp.reshape(vectors, (-1,)), vectors.shape)
    return _backend.astype(xp, values, matrix.dtype), _backend.astype(xp, vectors, matrix.dtype)


def _matrix_grad(xp: Any, layer: _Layer, grads: list[Array], layout: WeightLayout, dtype: Any) -> Array:
    """The layer's gradient as an (out, n) matrix: ``[∇W | ∇b]`` in the (out, in) layout."""
    weight = _backend.astype(xp, grads[layer.weight], dtype)
    matrix = weight if layout == "out_in" else _transpose(xp, weight)
    if layer.bias is None:
        return matrix
    bias = _backend.astype(xp, grads[layer.bias], dtype)
    return xp.concat([matrix, xp.reshape(bias, (layer.out_features, 1))], axis=1)


def _natural_grad(xp: Any, f: LayerFactors, matrix: Array, damping: Array) -> Array:
    """``Q_G ((Q_G^T ∇ Q_A) / (d_G d_A^T + damping)) Q_A^T``."""
    rotated = _transpose(xp, f.q_g) @ matrix @ f.q_a
    scaled = rotated / (xp.reshape(f.d_g, (-1, 1)) * xp.reshape(f.d_a, (1, -1)) + damping)
    return f.q_g @ scaled @ _transpose(xp, f.q_a)


@register(
    "curvature-aware",
    inputs={
        "layer_stats": "optional mapping: weight key path -> (activations (batch..., in), "
        "output_grads (batch..., out)) of that linear layer, on steps where statistics are due",
    },
)
def kfac(
    lr: HParam = 0.001,
    momentum: HParam = 0.9,
    stat_decay: HParam = 0.95,
    damping: HParam = 0.001,
    kl_clip: HParam = 0.001,
    weight_decay: HParam = 0.0,
    cov_update_frequency: int = 10,
    inverse_update_frequency: int = 100,
    batch_averaged: bool = True,
    layers: Mapping[KeyPath, KeyPath | None] | None = None,
    weight_layout: WeightLayout = "out_in",
) -> engine.Optimizer:
    """K-FAC for linear layers (KFACOptimizer of alecwangcq/KFAC-Pytorch), then SGD with momentum.

    Each linear layer ``y = W a + b`` (``layers``) keeps running Kronecker factors of its
    Fisher block, updated on the steps ``t`` (counted from 0) with ``t % T_cov == 0`` from that
    step's ``layer_stats`` (``B`` rows of inputs ``a`` and of output gradients ``g``, which are
    gradients of the batch-*mean* loss when ``batch_averaged``)::

        ā = [a, 1]  (1 appended when the layer has a bias);   A_t = ā^T ā / B;   G_t = B g^T g
        m_AA <- (1 - ρ) A_t + ρ m_AA;    m_GG <- (1 - ρ) G_t + ρ m_GG   (both start as I)

    (``G_t = g^T g / B`` when not ``batch_averaged``). On steps with ``t % T_inv == 0`` they are
    eigendecomposed, ``m_AA = Q_A diag(d_A) Q_A^T`` and ``m_GG = Q_G diag(d_G) Q_G^T``
    (in float64 where the namespace has it; eigenvalues <= 1e-10 become 0). Every step, with
    ``∇ = [∇W | ∇b]`` the layer's gradient as an (out, in [+1]) matrix::

        v  = Q_G ((Q_G^T ∇ Q_A) / (d_G d_A^T + damping)) Q_A^T      per layer
        ν  = min(1, sqrt(kl_clip / Σ_layers Σ v ∇ lr²))              (ν = 1 when the sum is <= 0)
        g  <- ν v  on the layers' weights and biases;  g unchanged on every other leaf
        g  <- g + λ θ                  only once t >= 20 T_cov  (KFAC-Pytorch's delay)
        b  <- μ b + g  (b starts at 0);   θ <- θ - lr b

    Names: ``cov_update_frequency`` is KFAC-Pytorch's ``TCov``, ``inverse_update_frequency`` its
    ``TInv``, ``stat_decay`` its ``stat_decay`` (ρ). Like it, only statistics of steps with
    ``t % T_cov == 0`` are used; ``layer_stats`` may be left out (``None``) on the other steps
    (under ``jax.jit`` too: ``None`` is a separate trace, and given stats are selected with
    ``where`` as the count is not known while tracing, where eigendecompositions run every step).
    Layers without statistics on a step keep their factors.

    Args:
      layers: the linear layers, ``{weight key path: bias key path or None}`` with key paths as
        ``trees.flatten_with_paths`` spells them (``("fc1", "weight")``, ``(0,)`` in a list).
        ``None`` takes every 2-D leaf as a layer, with the sibling leaf named ``bias`` (same
        container) as its bias when there is one. Every other leaf gets the SGD part only.
      weight_layout: ``"out_in"`` for weights stored (out, in) as torch's ``nn.Linear`` does,
        ``"in_out"`` for (in, out) kernels (flax's ``Dense``).
      layer_stats (a ``step`` input): ``{weight key path: (activations, output_grads)}`` with
        activations of shape (batch..., in) and output gradients (batch..., out); leading
        dimensions are flattened into one batch.

    The factors and eigenbases of each layer live in ``state.layers`` (allocated by ``init``,
    so the state keeps its structure); factors are kept in the layer's compute dtype.
    """
    check_range("learning rate", lr)
    check_range("momentum value", momentum)
    check_range("weight_decay value", weight_decay)
    check_range("stat_decay", stat_decay, 0.0, 1.0, high_open=True)
    check_range("damping", damping)
    check_range("kl_clip", kl_clip, low_open=True)
    for name, value in (
        ("cov_update_frequency", cov_update_frequency),
        ("inverse_update_frequency", inverse_update_frequency),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (must be a positive integer)")
    if weight_layout not in ("out_in", "in_out"):
        raise ValueError(f"Invalid weight_layout: {weight_layout!r} (expected 'out_in' or 'in_out')")
    use_momentum = is_nonzero(momentum)
    use_decay = is_nonzero(weight_decay)
    values: dict[str, HParam] = {"lr": lr, "stat_decay": stat_decay, "damping": damping, "kl_clip": kl_clip}
    if use_momentum:
        values["momentum"] = momentum
    if use_decay:
        values["weight_decay"] = weight_decay
    schedules = {k: v for k, v in values.items() if hp.is_scheduled(v)}

    def init(params: PyTree) -> KFACState:
        leaves, treedef = trees.flatten(params)
        xp = engine._params_namespace(leaves, "params")
        first = leaves[0]
        device = _backend.device_of(first)
        constants, scheduled = hp.to_state(xp, values, _backend.scalar_dtype(xp, first), device)
        buffer = trees.unflatten(treedef, [xp.zeros_like(p) for p in leaves]) if use_momentum else None
        factors = {
            layer.name: _initial_factors(xp, layer, leaves[layer.weight])
            for layer in _resolve_layers(params, layers, weight_layout)
        }
        count = xp.asarray(0, dtype=xp.int32, device=device)
        return KFACState(count, constants, scheduled, buffer, factors)

    def step(
        state: KFACState, grads: PyTree, params: PyTree, layer_stats: Any = None
    ) -> tuple[KFACState, PyTree]:
        if not isinstance(state, KFACState):
            raise TypeError(f"kfac: expected the state made by its init, got {type(state).__name__}")
        xp, grad_leaves, param_leaves, treedef = engine.flatten_step_inputs(grads, params)
        plan = _resolve_layers(params, layers, weight_layout)
        if sorted(state.layers) != sorted(layer.name for layer in plan):
            raise ValueError(
                f"kfac: the state holds layers {sorted(state.layers)}, params have "
                f"{sorted(layer.name for layer in plan)}"
            )
        for layer in plan:
            f = state.layers[layer.name]
            if (
                tuple(f.m_aa.shape) != (layer.columns,) * 2
                or tuple(f.m_gg.shape) != (layer.out_features,) * 2
            ):
                raise ValueError(f"kfac: the state's factors of {layer.name} do not fit its params")
        buffers = (
            trees.flatten_like(treedef, state.momentum_buffer, "momentum_buffer") if use_momentum else []
        )
        stats = _check_stats(xp, layer_stats, plan, param_leaves[0])

        sdtype = _backend.scalar_dtype(xp, param_leaves[0])
        scheduled = hp.evaluate_schedules(xp, schedules, state.count, state.scheduled)
        h = engine.Scalars({**state.hparams, **scheduled})
        count = state.count
        decay_on = xp.astype(count >= DECAY_DELAY * cov_update_frequency, sdtype)
        scalars = {**h, "keep": 1 - h.stat_decay, "ratio": h.stat_decay / (1 - h.stat_decay)}
        if use_decay:
            scalars["weight_decay"] = h.weight_decay * decay_on
        caster = engine.ScalarCaster(xp, scalars)
        stats_due = count % cov_update_frequency == 0
        inverse_due = count % inverse_update_frequency == 0

        new_layers, directions = {}, []
        vg_sum = xp.zeros((), dtype=sdtype, device=_backend.device_of(param_leaves[0]))
        for layer in plan:
            f = state.layers[layer.name]
            dtype = f.m_aa.dtype
            s = caster.for_leaf(param_leaves[layer.weight], dtype)
            if layer.name in stats:

                def running(f: LayerFactors = f, s: engine.Scalars = s, layer: _Layer = layer) -> tuple:
                    aa, gg = _covariances(
                        xp, *stats[layer.name], layer.bias is not None, batch_averaged, f.m_aa.dtype
                    )
                    return tuple((m * s.ratio + new) * s.keep for m, new in ((f.m_aa, aa), (f.m_gg, gg)))

                f = f._replace(**dict(zip(("m_aa", "m_gg"), _when(xp, stats_due, running, f[:2]))))

            def decompose(f: LayerFactors = f) -> tuple:
                return (*_eigh(xp, f.m_aa, sdtype), *_eigh(xp, f.m_gg, sdtype))

            f = f._replace(
                **dict(zip(("d_a", "q_a", "d_g", "q_g"), _when(xp, inverse_due, decompose, f[2:])))
            )
            new_layers[layer.name] = f
            matrix = _matrix_grad(xp, layer, grad_leaves, weight_layout, dtype)
            v = _natural_grad(xp, f, matrix, s.damping)
            vg_sum = vg_sum + xp.astype(xp.sum(v * matrix), sdtype) * h.lr**2
            directions.append(v)

        clipped = vg_sum > h.kl_clip
        one = xp.ones_like(vg_sum)
        nu = xp.where(clipped, xp.sqrt(h.kl_clip / xp.where(clipped, vg_sum, one)), one)
        new_grads = list(grad_leaves)
        for layer, v in zip(plan, directions):
            v = v * xp.astype(nu, v.dtype)
            weight = v[:, : layer.in_features]
            new_grads[layer.weight] = weight if weight_layout == "out_in" else _transpose(xp, weight)
            if layer.bias is not None:
                new_grads[layer.bias] = xp.reshape(v[:, layer.in_features], (layer.out_features,))

        new_params, new_buffers = [], []
        for i, (g, p) in enumerate(zip(new_grads, param_leaves)):
            dtype = _backend.compute_dtype(xp, p.dtype)
            s = caster.for_leaf(p, dtype)
            g, working = _backend.astype(xp, g, dtype), _backend.astype(xp, p, dtype)
            if use_decay:
                g = blocks.coupled_weight_decay(g, working, s.weight_decay)
            if use_momentum:
                g = _backend.astype(xp, buffers[i], dtype) * s.momentum + g
                new_buffers.append(_backend.astype(xp, g, buffers[i].dtype))
            new_params.append(_backend.astype(xp, working - g * s.lr, p.dtype))
        new_state = KFACState(
            count=xp.asarray(count + 1),
            hparams=state.hparams,
            scheduled=scheduled,
            momentum_buffer=trees.unflatten(treedef, new_buffers) if use_momentum else None,
            layers=new_layers,
        )
        return new_state, trees.unflatten(treedef, new_params)

    return engine.Optimizer(init=init, step=step, name="kfac", inputs=("layer_stats",))


__all__ = ["KFACState", "LayerFactors", "kfac"]
