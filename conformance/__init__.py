"""Cross-backend conformance: every optimizer, every backend, every reference, one command.

    python -m agnostic_optim.conformance [--backends numpy,array_api_strict,torch,torch-cuda,jax,jax-gpu,cupy]
        [--dtypes float64,float32] [--optimizers adam,lion] [--steps 25] [--require torch,jax]
        [--json FILE] [--markdown] [--quiet] [--verbose]

What runs. Every optimizer in ``ao.registry()`` has cases in :mod:`.cases` (the suite fails for
one without, and for a registered extra step input that no case generates). Each case runs on
three deterministic problems (:mod:`.problems`): a multi-leaf tree (0-d, 1-d, 2-d and 4-d
leaves) fed identical host gradients, an ill-conditioned quadratic and a small tanh-MLP
regression whose gradients each backend computes with the same array-API code, in float64 then
cast to the run's dtype. Extra step inputs (``hessian_diag``...) are generated on the host from a
fixed seed and passed identically to every backend. Each runs ``--steps`` steps (default 25)
through the functional API and the backend's native adapters (the named torch ``Optimizer``
class, ``as_optax`` eagerly and under ``jax.jit``, ``ArrayOptimizer``). torch and JAX run on the
CPU (``torch``, ``jax``) and, when present, on a GPU (``torch-cuda``, ``jax-gpu``).

Tolerance policy. Errors are max-norm relative errors per leaf and step
(``max|ours - expected| / max|expected|``), checked at every step; the first step above the
tolerance is reported as the divergence.

* Every run vs the NumPy float64 functional run: 1e-12 in float64, 1e-5 in float32. No case
  needs more: the rules are elementwise or reduce over single leaves, and the reductions that
  do exist (global norms for clipping, per-leaf norms for LARS/LAMB, the MLP's matmuls) differ
  across backends only in summation order, a few ulps that 25 steps do not amplify past 1e-12.
* Every run vs the case's external reference (torch.optim, optax, timm, or a transcription of
  the official code, :mod:`.references`), always run in float64: 1e-12 in float64 and 1e-5 in
  float32. The float32 comparison is against the float64 reference trajectory (a float32
  reference would measure the reference's own rounding); it is what catches a rule that is
  wrong in our code everywhere, which the comparison with our own NumPy run cannot see.
* A case may override the tolerance for a dtype (``Case.tolerance``), and then must carry a
  justification string (``Case.tolerance_reason``), printed as a note with the results. No
  current case uses one.

Missing backends (not installed, no GPU) are reported as skipped with the reason;
``--require`` turns a missing backend into a failure. Any failure gives a non-zero exit status;
each failed cell prints one line with the optimizer, backend, dtype and earliest divergence
(``--verbose`` and ``--json`` give every failed comparison).
"""

from agnostic_optim.conformance.runner import DEFAULT_STEPS, TOLERANCE, CellResult, run_cell

__all__ = ["DEFAULT_STEPS", "TOLERANCE", "CellResult", "run_cell"]
