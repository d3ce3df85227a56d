"""agnostic_optim: deep-learning optimizers written once against the Python array API standard.

Every optimizer is a pair of pure functions over pytrees of arrays from any array-API namespace
(NumPy, PyTorch, JAX, CuPy, array_api_strict)::

    import agnostic_optim as ao

    opt = ao.adamw(lr=1e-3, weight_decay=1e-2)
    state = opt.init(params)
    state, params = opt.step(state, grads, params)

Adapters for framework training loops live in ``agnostic_optim.adapters``.
"""

from agnostic_optim import checkpoint, schedules
from agnostic_optim.adaptive import adagrad, adam, adamw, amsgrad, rmsprop, sparse_adam
from agnostic_optim.adaptive_variants import adan, lion, nadam, radam
from agnostic_optim.composition import (
    AccumulateState,
    MaskedState,
    SkipNonfiniteState,
    accumulate,
    chain,
    clip_by_global_norm,
    masked,
    skip_nonfinite,
)
from agnostic_optim.curvature import adahessian, sophia
from agnostic_optim.engine import Optimizer, OptimizerState, Transform, mixed_precision
from agnostic_optim.first_order import sgd
from agnostic_optim.hparams import get_hparams, set_hparams
from agnostic_optim.kfac import KFACState, kfac
from agnostic_optim.layerwise import lamb, lars
from agnostic_optim.quasi_newton import LBFGSState, lbfgs
from agnostic_optim.registry import RegistryEntry, registry
from agnostic_optim.shampoo import shampoo
from agnostic_optim.wrappers import LookaheadState, SAMState, lookahead, sam

__version__ = "0.1.0"

__all__ = [
    "AccumulateState",
    "KFACState",
    "LBFGSState",
    "LookaheadState",
    "MaskedState",
    "Optimizer",
    "OptimizerState",
    "RegistryEntry",
    "SAMState",
    "SkipNonfiniteState",
    "Transform",
    "accumulate",
    "adagrad",
    "adahessian",
    "adam",
    "adamw",
    "adan",
    "amsgrad",
    "chain",
    "checkpoint",
    "clip_by_global_norm",
    "get_hparams",
    "kfac",
    "lamb",
    "lars",
    "lbfgs",
    "lion",
    "lookahead",
    "masked",
    "mixed_precision",
    "nadam",
    "radam",
    "registry",
    "rmsprop",
    "sam",
    "schedules",
    "set_hparams",
    "sgd",
    "shampoo",
    "skip_nonfinite",
    "sophia",
    "sparse_adam",
]
