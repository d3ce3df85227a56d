"""JAX adapter: optax compatibility, jitted steps with buffer donation, curvature inputs.

``ao.Optimizer.init/step`` already run on any JAX pytree, under ``jax.jit``, ``jax.vmap`` and
with sharded arrays: the core is written against the array API, and hyperparameters are state
data, so changing them never retraces. This module adds what a JAX codebase expects::

    tx = optax.chain(optax.clip_by_global_norm(1.0), as_optax(ao.lion(lr=1e-4)))
    step = jit_step(ao.adamw(1e-3))                   # jitted, donates state and params
    diag = hutchinson_diagonal(loss_fn, params, key)  # Hessian-diagonal estimate (AdaHessian, Sophia)
    loss, grads, stats = kfac_layer_stats(loss_fn, params)  # K-FAC's layer_stats, from the jaxpr
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import agnostic_optim as ao
from agnostic_optim.adapters._jax_layers import kfac_layer_stats

__all__ = ["as_optax", "hessian_vector_product", "hutchinson_diagonal", "jit_step", "kfac_layer_stats"]

PyTree = Any


def as_optax(opt: ao.Optimizer) -> optax.GradientTransformationExtraArgs:
    """``opt`` as an optax gradient transformation (usable in ``optax.chain``, ``MultiSteps``,
    flax ``TrainState``, equinox loops).

    optax transformations return *updates* that ``optax.apply_updates`` adds to params, so
    ``update`` needs ``params`` and returns ``new_params - params``. Extra step inputs
    (``grad_fn=``, ``hessian_diag=``...) come through optax's ``extra_args``; those the
    optimizer does not take are ignored, as optax requires of every transformation in a chain.
    """

    def init_fn(params: PyTree) -> PyTree:
        return opt.init(params)

    def update_fn(updates: PyTree, state: PyTree, params: PyTree | None = None, **extra_args: Any):
        if params is None:
            raise ValueError(
                f"as_optax({opt.name}).update needs params: agnostic_optim optimizers compute the "
                "new parameters (pass params=... to update)"
            )
        inputs = {name: value for name, value in extra_args.items() if name in opt.inputs}
        new_state, new_params = opt.step(state, updates, params, **inputs)
        return jax.tree.map(jnp.subtract, new_params, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def jit_step(opt: ao.Optimizer, *, donate: bool = True) -> Callable[..., tuple[PyTree, PyTree]]:
    """``opt.step`` compiled with ``jax.jit``, donating the state and params buffers, and
    returning them where they were: each output array has its input's sharding.

    With donation XLA writes the new state and params into the old buffers, so a step needs no
    second copy of either; the caller must not reuse the arrays it passed in. Hyperparameters
    live in the state, so ``ao.set_hparams`` between calls does not retrace. On params sharded
    over a mesh, every state leaf keeps the placement ``init`` gave it (a param-shaped buffer
    its param's, a scalar replicated) whatever XLA would propagate from the gradients; that is
    also what lets XLA reuse the donated buffers. One compilation per tree structure and
    placement of the state and params.
    """
    compiled: dict[Any, Callable[..., tuple[PyTree, PyTree]]] = {}

    def step(state: PyTree, grads: PyTree, params: PyTree, **inputs: Any) -> tuple[PyTree, PyTree]:
        leaves, treedef = jax.tree.flatten((state, params))
        placements = tuple(getattr(leaf, "sharding", None) for leaf in leaves)
        key = (treedef, placements)
        if key not in compiled:
            outs = None if None in placements else jax.tree.unflatten(treedef, placements)
            compiled[key] = jax.jit(opt.step, donate_argnums=(0, 2) if donate else (), out_shardings=outs)
        return compiled[key](state, grads, params, **inputs)

    return step


def hessian_vector_product(loss_fn: Callable[[PyTree], Any], params: PyTree, vector: PyTree) -> PyTree:
    """``H v`` for the Hessian ``H`` of ``loss_fn`` at ``params``, by forward-over-reverse."""
    return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def hutchinson_diagonal(
    loss_fn: Callable[[PyTree], Any], params: PyTree, key: jax.Array, num_samples: int = 1
) -> PyTree:
    """Hutchinson's estimate of ``diag(H)``: the mean of ``z ⊙ (H z)`` over Rademacher ``z``.

    Unbiased; ``num_samples`` probes are averaged (vectorised with ``jax.vmap``). This is the
    ``hessian_diag=`` input of AdaHessian and Sophia.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    leaves, treedef = jax.tree.flatten(params)

    def one_probe(probe_key: jax.Array) -> PyTree:
        keys = jax.random.split(probe_key, len(leaves))
        probe = treedef.unflatten(
            [jax.random.rademacher(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
        )
        product = hessian_vector_product(loss_fn, params, probe)
        return jax.tree.map(jnp.multiply, probe, product)

    estimates = jax.vmap(one_probe)(jax.random.split(key, num_samples))
    return jax.tree.map(lambda e: jnp.mean(e, axis=0), estimates)
