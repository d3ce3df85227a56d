"""Cross-backend conformance: every optimizer, every backend, every reference, one command.

    python -m agnostic_optim.conformance [--backends numpy,array_api_strict,torch,jax,cupy]
        [--dtypes float64,float32] [--optimizers adam,lion] [--steps 25] [--require torch,jax]
        [--json FILE] [--markdown]

What runs. Every optimizer in ``ao.registry()`` has cases in :mod:`.cases` (the suite fails for
one without). Each case runs on three deterministic problems (:mod:`.problems`): a multi-leaf
tree (0-d, 1-d, 2-d and 4-d leaves) fed identical host gradients, an ill-conditioned quadratic
and a small tanh-MLP regression whose gradients each backend computes with the same array-API
code, in float64 then cast to the run's dtype. Each runs ``--steps`` steps (default 25) through
the functional API and the backend's native adapter (the torch ``Optimizer`` class,
``as_optax``, ``ArrayOptimizer``).

Tolerance policy. Errors are max-norm relative errors per leaf and step
(``max|ours - expected| / max|expected|``), checked at every step; the first step above the
tolerance is reported as the divergence.

* Every run vs the NumPy float64 functional run: 1e-12 in float64, 1e-5 in float32. No case
  needs more: the rules are elementwise or reduce over single leaves, and the reductions that
  do exist (global norms for clipping, per-leaf norms for LARS/LAMB, the MLP's matmuls) differ
  across backends only in summation order, a few ulps that 25 steps do not amplify past 1e-12.
* float64 runs vs the case's external reference (torch.optim, optax, timm, or a transcription
  of the official code, :mod:`.references`): 1e-12. Reference comparisons run in float64
  only: a float32 reference would measure the reference's own rounding.

Missing backends (not installed, no GPU) are reported as skipped with the reason;
``--require`` turns a missing backend into a failure. Any failure gives a non-zero exit status.
"""

from agnostic_optim.conformance.runner import DEFAULT_STEPS, TOLERANCE, CellResult, run_cell

__all__ = ["DEFAULT_STEPS", "TOLERANCE", "CellResult", "run_cell"]
