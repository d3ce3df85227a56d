"""K-FAC's ``layer_stats`` from a JAX loss function: each linear layer's inputs and the gradients
at its outputs, found in the loss's jaxpr (no module system, no hooks).

A linear layer is a ``dot_general`` one of whose operands is a 2-D weight leaf of ``params``,
possibly through a ``transpose`` (``x @ W.T``, torch's layout) or a ``convert_element_type``
(a cast for mixed precision), with one contracting dimension and no batch dimensions: flax's
``x @ kernel``, torch-style ``x @ W.T`` and equinox's ``W @ x`` under ``jax.vmap`` all trace to
one. The loss's jaxpr is evaluated equation by equation, as ``jax.core.eval_jaxpr`` does, except
that each layer's other operand is kept (the activations) and a zero is added to its output;
the gradient with respect to that zero is the gradient at the layer's output, the one torch's
backward hooks see. One forward and one backward pass give the loss, the gradients and the
statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from agnostic_optim import trees
from agnostic_optim.trees import KeyPath, PyTree


class _Layer(NamedTuple):
    equation: int  # index of the dot_general in the jaxpr
    inputs_operand: int  # 0 or 1: the operand that is the activations
    inputs_axis: int  # its contracted axis
    outputs_axis: int  # the output axis of the weight's free dimension


_PASS_THROUGH = ("convert_element_type", "copy")


def kfac_layer_stats(
    loss_fn: Callable[[PyTree], Any], params: PyTree, layers: Iterable[KeyPath] | None = None
) -> tuple[jax.Array, PyTree, dict[KeyPath, tuple[jax.Array, jax.Array]]]:
    """``(loss, grads, layer_stats)`` of ``loss_fn`` at ``params`` in one forward-backward pass.

    ``layer_stats`` is K-FAC's step input (:func:`agnostic_optim.kfac`): ``{weight key path:
    (activations (batch..., in), output gradients (batch..., out))}`` for every linear layer.
    ``layers`` names the weights (key paths as ``kfac``'s ``layers``; a ``kfac`` ``layers``
    mapping works too); None takes every 2-D leaf that ``loss_fn`` uses as a linear layer's
    weight. A named weight that is not used as exactly one linear layer raises ``ValueError``
    (a weight tied to two layers has no single Kronecker factorisation). For the Fisher that
    KFAC-Pytorch estimates, compute the statistics of a loss on targets sampled from the
    model's predictions (and the update's gradients from the true loss).
    """
    pairs, treedef = trees.flatten_with_paths(params)
    paths = [path for path, _ in pairs]
    leaves = [leaf for _, leaf in pairs]
    wanted = None if layers is None else [tuple(path) for path in layers]
    for path in wanted or ():
        if path not in paths:
            raise ValueError(f"kfac_layer_stats: {path!r} is no leaf path of params")

    def loss_of_leaves(*flat: jax.Array) -> Any:
        return loss_fn(trees.unflatten(treedef, list(flat)))

    closed = jax.make_jaxpr(loss_of_leaves)(*leaves)
    if len(closed.jaxpr.outvars) != 1 or closed.out_avals[0].shape != ():
        raise ValueError("kfac_layer_stats: loss_fn must return a scalar")
    candidates = [i for i, leaf in enumerate(leaves) if leaf.ndim == 2]
    if wanted is not None:
        candidates = [paths.index(path) for path in wanted]
    found = _find_layers(closed.jaxpr, candidates)
    for i in candidates if wanted is not None else ():
        uses = found.get(i, [])
        if len(uses) != 1:
            raise ValueError(
                f"kfac_layer_stats: weight {paths[i]!r} is used by {len(uses)} linear layers of "
                "loss_fn (it must be exactly one)"
            )
    layer_of = {paths[i]: uses[0] for i, uses in found.items() if len(uses) == 1}
    by_equation = {layer.equation: path for path, layer in layer_of.items()}

    def objective(flat: list[jax.Array], zeros: dict[KeyPath, jax.Array]) -> tuple[Any, dict]:
        return _evaluate(closed, flat, zeros, by_equation, layer_of)

    outputs = {path: closed.jaxpr.eqns[layer.equation].outvars[0].aval for path, layer in layer_of.items()}
    zeros = {path: jnp.zeros(aval.shape, aval.dtype) for path, aval in outputs.items()}
    (loss, activations), (grads, output_grads) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        leaves, zeros
    )
    stats = {}
    for path, layer in layer_of.items():
        a = jnp.moveaxis(activations[path], layer.inputs_axis, -1)
        g = jnp.moveaxis(output_grads[path], layer.outputs_axis, -1)
        stats[path] = (a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1]))
    return loss, trees.unflatten(treedef, grads), stats


def _find_layers(jaxpr: Any, candidates: list[int]) -> dict[int, list[_Layer]]:
    """Leaf index -> the linear layers (dot_general equations) that use it as their weight."""
    origin = {jaxpr.invars[i]: i for i in candidates}  # var -> the weight leaf it holds
    found: dict[int, list[_Layer]] = {}
    for index, eqn in enumerate(jaxpr.eqns):
        name = eqn.primitive.name
        sources = [None if isinstance(v, Literal) else origin.get(v) for v in eqn.invars]
        if sources[0] is not None and (
            name in _PASS_THROUGH or (name == "transpose" and tuple(eqn.params["permutation"]) == (1, 0))
        ):
            origin[eqn.outvars[0]] = sources[0]
        elif name == "dot_general":
            contracting, batch = eqn.params["dimension_numbers"]
            if batch != ((), ()) or len(contracting[0]) != 1:
                continue
            for side in (0, 1):
                if sources[side] is not None:
                    # the output's axes are lhs's free axes, then rhs's; a weight has one
                    layer = _Layer(index, 1 - side, contracting[1 - side][0], 0 if side == 0 else -1)
                    found.setdefault(sources[side], []).append(layer)
    return found


def _evaluate(
    closed: Any,
    leaves: list[jax.Array],
    zeros: dict[KeyPath, jax.Array],
    by_equation: dict[int, KeyPath],
    layer_of: dict[KeyPath, _Layer],
) -> tuple[Any, dict[KeyPath, jax.Array]]:
    """The jaxpr's loss, with each layer's activations kept and its zero added to its output."""
    jaxpr, env = closed.jaxpr, {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, leaves))
    activations = {}
    for index, eqn in enumerate(jaxpr.eqns):
        invals = [read(v) for v in eqn.invars]
        bound = eqn.primitive.get_bind_params(eqn.params)  # (JAX < 0.7: (subfuns, params))
        subfuns, bind_params = bound if isinstance(bound, tuple) else ((), bound)
        with eqn.ctx.manager:
            outvals = eqn.primitive.bind(*subfuns, *invals, **bind_params)
        if not eqn.primitive.multiple_results:
            outvals = [outvals]
        path = by_equation.get(index)
        if path is not None:
            activations[path] = invals[layer_of[path].inputs_operand]
            outvals = [outvals[0] + zeros[path]]
        env.update(zip(eqn.outvars, outvals))
    return read(jaxpr.outvars[0]), activations
