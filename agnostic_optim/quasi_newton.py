"""Quasi-Newton methods (seed deck, curvature-aware): L-BFGS as torch.optim.LBFGS runs it.

L-BFGS re-evaluates the objective during a step (each inner iteration, and each trial point of
the line search), so ``step`` takes ``value_and_grad_fn=`` (``params -> (loss, grads)``) and calls
it several times. How many times, and where, depends on the values it gets back: the step runs
with host control flow on concrete arrays (NumPy, PyTorch, CuPy, array_api_strict, eager JAX);
under ``jax.jit``/``vmap`` it raises, since that data-dependent loop cannot be traced.

The maths is written once against the array API, leaf by leaf: a dot product of two "flat
vectors" is the sum over leaves of ``sum(a * b)``, accumulated in the scalar dtype (float64
where available); the scalar arithmetic (step sizes, ``rho``, the line search) runs on the host
in float64, as torch.optim.LBFGS's Python loop does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

from agnostic_optim import _backend, engine, trees
from agnostic_optim import hparams as hp
from agnostic_optim.hparams import HParam, check_range
from agnostic_optim.registry import register

PyTree = Any
Array = Any
Vector = list[Array]  # one array per leaf: a "flat vector" of torch.optim.LBFGS
Evaluate = Callable[[Vector], tuple[float, Vector]]

_LINE_SEARCHES = (None, "strong_wolfe")


class LBFGSState(NamedTuple):
    """State of ``lbfgs``: torch.optim.LBFGS's state, leaf by leaf.

    Fields (torch's names):
      count:      0-d int32, ``step`` calls so far (drives schedules).
      hparams:    ``lr``, ``tolerance_grad``, ``tolerance_change`` as 0-d arrays (scalar dtype).
      scheduled:  the scheduled hyperparameters' latest values.
      d:          like params: the latest search direction.
      t:          0-d: the latest step size along ``d``.
      old_dirs:   like params, each leaf with a leading axis of ``history_size``: the curvature
                  pairs' ``y = g_{k+1} - g_k``, oldest first; rows ``num_old:`` are zero.
      old_stps:   the same layout for ``s = t d``.
      ro:         (history_size,): ``1 / (y . s)`` per stored pair.
      num_old:    0-d int32, the number of stored pairs.
      H_diag:     0-d: the initial inverse-Hessian scale ``(y . s) / (y . y)`` of the latest pair.
      prev_flat_grad: like params: the gradient at the start of the latest inner iteration.
      prev_loss:  0-d: the loss there.
      n_iter:     0-d int32, inner iterations over all steps.
      func_evals: 0-d int32, evaluations of the objective over all steps.
    """

    count: Array
    hparams: dict[str, Array]
    scheduled: dict[str, Array]
    d: PyTree
    t: Array
    old_dirs: PyTree
    old_stps: PyTree
    ro: Array
    num_old: Array
    H_diag: Array
    prev_flat_grad: PyTree
    prev_loss: Array
    n_iter: Array
    func_evals: Array


# ----------------------------------------------------------------------------- vectors


def _dot(xp: Any, a: Vector, b: Vector, dtype: Any) -> float:
    """``a . b`` over every leaf, each leaf's sum in its dtype, accumulated in ``dtype``."""
    return float(sum(xp.astype(xp.sum(x * y), dtype) for x, y in zip(a, b)))


def _abs_max(xp: Any, a: Vector) -> float:
    return max(float(xp.max(xp.abs(x))) for x in a)


def _abs_sum(xp: Any, a: Vector, dtype: Any) -> float:
    return float(sum(xp.astype(xp.sum(xp.abs(x)), dtype) for x in a))


def _axpy(alpha: float, x: Vector, y: Vector) -> Vector:
    """``y + alpha x``."""
    return [b + alpha * a for a, b in zip(x, y)]


def _scale(alpha: float, x: Vector) -> Vector:
    return [alpha * a for a in x]


# ----------------------------------------------------------------------------- line search


def _divide(a: float, b: float) -> float:
    """``a / b`` with IEEE semantics (inf or nan when ``b == 0``), as torch's tensors divide."""
    if b != 0:
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _cubic_interpolate(
    x1: float, f1: float, g1: float, x2: float, f2: float, g2: float, bounds: tuple | None = None
) -> float:
    """The minimiser of the cubic through two points with values and slopes, clipped to
    ``bounds`` (the interval's midpoint when the cubic has none); torch's port of minFunc's
    ``polyinterp``::

        d1 = g1 + g2 - 3 (f1 - f2) / (x1 - x2);   d2 = sqrt(d1² - g1 g2)
        x  = x2 - (x2 - x1) (g2 + d2 - d1) / (g2 - g1 + 2 d2)       (x1 <= x2; mirrored else)
    """
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - _divide(3 * (f1 - f2), x1 - x2)
    d2_square = d1 * d1 - g1 * g2
    if d2_square >= 0:
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * _divide(g2 + d2 - d1, g2 - g1 + 2 * d2)
        else:
            min_pos = x1 - (x1 - x2) * _divide(g1 + d2 - d1, g1 - g2 + 2 * d2)
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _strong_wolfe(
    xp: Any,
    dtype: Any,
    evaluate: Evaluate,
    x: Vector,
    t: float,
    d: Vector,
    f: float,
    g: Vector,
    gtd: float,
    max_ls: int,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
) -> tuple[float, Vector, float, int]:
    """torch.optim.lbfgs's ``_strong_wolfe`` (minFunc's ``WolfeLineSearch``): bracket a step
    satisfying the strong Wolfe conditions ``f(x + t d) <= f + c1 t gtd`` and
    ``|g(x + t d) . d| <= -c2 gtd``, then zoom in by cubic interpolation. Returns
    ``(loss, grad, t, evaluations)`` at the chosen step. Like torch, ``tolerance_change`` is the
    default 1e-9, not the optimizer's."""
    d_norm = _abs_max(xp, d)

    def along(step: float) -> tuple[float, Vector, float]:
        loss, grad = evaluate(_axpy(step, d, x))
        return loss, grad, _dot(xp, grad, d, dtype)

    f_new, g_new, gtd_new = along(t)
    ls_func_evals = 1

    # bracket an interval containing a point satisfying the Wolfe criteria
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f = [t_prev, t], [f_prev, f_new]
            bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
            break
        # interpolate
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        tmp = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(min_step, max_step))
        t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
        f_new, g_new, gtd_new = along(t)
        ls_func_evals += 1
        ls_iter += 1

    if ls_iter == max_ls:  # out of evaluations
        bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

    # zoom: refine the bracket until a point satisfies the criteria
    insuf_progress = False
    low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(
            bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1]
        )
        # a trial too close to the bracket's ends (twice, or at an end) moves 0.1 of its width in
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insuf_progress or t >= max(bracket) or t <= min(bracket):
                t = (
                    max(bracket) - eps
                    if abs(t - max(bracket)) < abs(t - min(bracket))
                    else min(bracket) + eps
                )
                insuf_progress = False
            else:
                insuf_progress = True
        else:
            insuf_progress = False

        f_new, g_new, gtd_new = along(t)
        ls_func_evals += 1
        ls_iter += 1

        if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
            # Armijo condition not satisfied or not lower than the lowest point
            bracket[high_pos], bracket_f[high_pos] = t, f_new
            bracket_g[high_pos], bracket_gtd[high_pos] = g_new, gtd_new
            low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                # the old high becomes the new low
                bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                bracket_g[high_pos], bracket_gtd[high_pos] = bracket_g[low_pos], bracket_gtd[low_pos]
            # the new point becomes the new low
            bracket[low_pos], bracket_f[low_pos] = t, f_new
            bracket_g[low_pos], bracket_gtd[low_pos] = g_new, gtd_new

    return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals


# ----------------------------------------------------------------------------- the optimizer


def _two_loop(xp: Any, dtype: Any, g: Vector, dirs: list, stps: list, ro: list, H_diag: float) -> Vector:
    """The L-BFGS direction ``d = -H g`` by the two-loop recursion (torch's one-buffer form)::

    q = -g;  for i = k-1..0:  a_i = ro_i s_i . q;   q -= a_i y_i
    r = H_diag q;  for i = 0..k-1:  b_i = ro_i y_i . r;   r += (a_i - b_i) s_i
    """
    q = [-leaf for leaf in g]
    al = [0.0] * len(dirs)
    for i in range(len(dirs) - 1, -1, -1):
        al[i] = _dot(xp, stps[i], q, dtype) * ro[i]
        q = _axpy(-al[i], dirs[i], q)
    r = _scale(H_diag, q)
    for i in range(len(dirs)):
        be_i = _dot(xp, dirs[i], r, dtype) * ro[i]
        r = _axpy(al[i] - be_i, stps[i], r)
    return r


def _rows(stacked: list[Array], count: int) -> list[Vector]:
    """The first ``count`` history entries of per-leaf stacked arrays, each a vector."""
    return [[leaf[i, ...] for leaf in stacked] for i in range(count)]


def _stacked(xp: Any, rows: list[Vector], like: Vector, size: int) -> list[Array]:
    """History entries stacked per leaf along a leading axis of ``size``, zero-padded."""
    padding = [[xp.zeros_like(leaf) for leaf in like]] * (size - len(rows))
    return [xp.stack(column) for column in zip(*rows, *padding)]


def _is_traced(xp: Any, arrays: list[Array]) -> bool:
    """True when some array has no value yet (a JAX tracer under ``jit``/``vmap``): converting it
    to a Python bool raises ``TypeError``, as the standard specifies."""
    try:
        for a in arrays:
            if _backend.is_lazy(a):  # (every JAX array, traced or not)
                bool(xp.any(a))
    except TypeError:
        return True
    return False


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {low})")


def default_max_eval(max_iter: int) -> int:
    """L-BFGS's evaluation budget when ``max_eval`` is not given (torch.optim.LBFGS's)."""
    return max_iter * 5 // 4


@register(
    "curvature-aware",
    inputs={"value_and_grad_fn": "params -> (loss, grads): re-evaluates the objective"},
)
def lbfgs(
    lr: HParam = 1.0,
    max_iter: int = 20,
    max_eval: int | None = None,
    tolerance_grad: HParam = 1e-7,
    tolerance_change: HParam = 1e-9,
    history_size: int = 100,
    line_search_fn: str | None = None,
) -> engine.Optimizer:
    """L-BFGS (Liu & Nocedal 1989) as ``torch.optim.LBFGS`` runs it (iterate for iterate).

    ``state, params = opt.step(state, grads, params, value_and_grad_fn=f)`` runs up to
    ``max_iter`` inner iterations and at most about ``max_eval`` (default ``max_iter * 5 // 4``)
    evaluations of ``f: params -> (loss, grads)``. Like torch's first closure call, the step
    starts with ``f(params)``; ``grads`` only has to match params (or be None), its values are
    not used. Each inner iteration k, with g the gradient and f the loss at x::

        y = g - g_prev,  s = t_prev d_prev;   if y . s > 1e-10: store (y, s, ro = 1 / (y . s))
                                              (dropping the oldest beyond history_size) and
                                              H_diag = (y . s) / (y . y)
        d = -H g  by the two-loop recursion over the stored pairs  (d = -g on the first one)
        t = lr · min(1, 1 / ‖g‖₁) on the very first iteration, else lr
        stop if g . d > -tolerance_change
        x <- x + t d     (t from the strong-Wolfe line search when line_search_fn="strong_wolfe";
                          without it, f is re-evaluated at x except on the last iteration)

    and the step ends early when ``max|g| <= tolerance_grad`` (also checked before the first
    iteration), ``max|t d| <= tolerance_change``, ``|f - f_prev| < tolerance_change`` or the
    evaluations reach ``max_eval``. The history, direction and step size carry over to the next
    ``step``. Reference: ``torch.optim.LBFGS`` (torch 2.13), including its line search
    ``_strong_wolfe`` (c1 = 1e-4, c2 = 0.9, minFunc's cubic interpolation).

    ``lr``, ``tolerance_grad`` and ``tolerance_change`` are hyperparameters in the state; the
    integer options are structural. The loop branches on the values it computes, so ``step``
    runs eagerly on concrete arrays and raises under ``jax.jit``/``vmap``. The state holds
    ``2 · history_size`` copies of the params (see :class:`LBFGSState`).
    """
    check_range("learning rate", lr)
    check_range("tolerance_grad", tolerance_grad, None, finite=False)  # (±inf, as torch.optim.LBFGS)
    check_range("tolerance_change", tolerance_change, None, finite=False)
    _check_int("max_iter", max_iter, 1)
    _check_int("history_size", history_size, 1)
    if max_eval is None:
        max_eval = default_max_eval(max_iter)
    _check_int("max_eval", max_eval, 1)
    if line_search_fn not in _LINE_SEARCHES:
        raise ValueError(f"Invalid line_search_fn: {line_search_fn!r} (expected one of {_LINE_SEARCHES})")
    values = {"lr": lr, "tolerance_grad": tolerance_grad, "tolerance_change": tolerance_change}
    schedules = {k: v for k, v in values.items() if hp.is_scheduled(v)}

    def init(params: PyTree) -> LBFGSState:
        leaves, _ = trees.flatten(params)
        xp = _backend.namespace_of(*leaves)
        device = _backend.device_of(leaves[0])
        dtype = _backend.scalar_dtype(xp, leaves[0])
        constants, scheduled = hp.to_state(xp, values, dtype, device)

        def history(p: Array) -> Array:
            return xp.zeros((history_size, *p.shape), dtype=p.dtype, device=_backend.device_of(p))

        def scalar(value: float) -> Array:
            return _backend.scalar(xp, value, dtype, device)

        def counter() -> Array:
            return xp.asarray(0, dtype=xp.int32, device=device)

        return LBFGSState(
            count=counter(),
            hparams=constants,
            scheduled=scheduled,
            d=trees.tree_map(xp.zeros_like, params),
            t=scalar(0.0),
            old_dirs=trees.tree_map(history, params),
            old_stps=trees.tree_map(history, params),
            ro=xp.zeros((history_size,), dtype=dtype, device=device),
            num_old=counter(),
            H_diag=scalar(1.0),
            prev_flat_grad=trees.tree_map(xp.zeros_like, params),
            prev_loss=scalar(0.0),
            n_iter=counter(),
            func_evals=counter(),
        )

    def step(
        state: LBFGSState,
        grads: PyTree,
        params: PyTree,
        value_and_grad_fn: Callable[[PyTree], tuple[Any, PyTree]] | None = None,
    ) -> tuple[LBFGSState, PyTree]:
        if not isinstance(state, LBFGSState):
            raise TypeError(f"lbfgs: expected the state made by its init, got {type(state).__name__}")
        if value_and_grad_fn is None:
            raise TypeError("lbfgs.step needs value_and_grad_fn=: a function params -> (loss, grads)")
        xp, _, x, treedef = engine.flatten_step_inputs(params if grads is None else grads, params)
        if _is_traced(xp, [state.count, *x]):
            raise TypeError(
                "lbfgs cannot be traced (jax.jit, jax.vmap): how many times it evaluates the objective "
                "and where depends on the values it computes. Call opt.step outside jit, on concrete arrays."
            )
        state_leaves = {
            name: trees.flatten_like(treedef, getattr(state, name), f"lbfgs state {name}")
            for name in ("d", "old_dirs", "old_stps", "prev_flat_grad")
        }
        dtype, device = _backend.scalar_dtype(xp, x[0]), _backend.device_of(x[0])
        scheduled = hp.evaluate_schedules(xp, schedules, state.count, state.scheduled)
        h = {name: float(value) for name, value in {**state.hparams, **scheduled}.items()}
        lr, tolerance_grad, tolerance_change = h["lr"], h["tolerance_grad"], h["tolerance_change"]

        def scalar(value: float) -> Array:
            return _backend.scalar(xp, value, dtype, device)

        def counter(value: int) -> Array:
            return xp.asarray(value, dtype=xp.int32, device=device)

        def evaluate(point: Vector) -> tuple[float, Vector]:
            candidate = trees.unflatten(treedef, point)
            loss, g = value_and_grad_fn(candidate)
            _, g, _, _ = engine.flatten_step_inputs(g, candidate)  # (the gradient must match params)
            return float(loss), g

        count = xp.asarray(state.count + 1)
        func_evals = int(state.func_evals)
        loss, flat_grad = evaluate(x)
        current_evals = 1
        func_evals += 1
        if _abs_max(xp, flat_grad) <= tolerance_grad:  # already optimal
            return state._replace(count=count, scheduled=scheduled, func_evals=counter(func_evals)), params

        num_old = int(state.num_old)
        d, t = state_leaves["d"], float(state.t)
        old_dirs = _rows(state_leaves["old_dirs"], num_old)
        old_stps = _rows(state_leaves["old_stps"], num_old)
        ro = [float(state.ro[i]) for i in range(num_old)]
        H_diag, prev_flat_grad, prev_loss = (
            float(state.H_diag),
            state_leaves["prev_flat_grad"],
            float(state.prev_loss),
        )
        total_iter = int(state.n_iter)

        opt_cond = False
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            total_iter += 1

            # the descent direction
            if total_iter == 1:
                d = [-leaf for leaf in flat_grad]
                old_dirs, old_stps, ro, H_diag = [], [], [], 1.0
            else:
                y = [a - b for a, b in zip(flat_grad, prev_flat_grad)]
                s = _scale(t, d)
                ys = _dot(xp, y, s, dtype)
                if ys > 1e-10:
                    if len(old_dirs) == history_size:
                        old_dirs, old_stps, ro = old_dirs[1:], old_stps[1:], ro[1:]
                    old_dirs, old_stps, ro = [*old_dirs, y], [*old_stps, s], [*ro, 1.0 / ys]
                    H_diag = ys / _dot(xp, y, y, dtype)
                d = _two_loop(xp, dtype, flat_grad, old_dirs, old_stps, ro, H_diag)
            prev_flat_grad, prev_loss = flat_grad, loss

            # the step length
            if total_iter == 1:  # (a zero gradient: 1 / 0 = inf, as torch's tensor division gives)
                total = _abs_sum(xp, flat_grad, dtype)
                t = min(1.0, 1.0 / total if total else math.inf) * lr
            else:
                t = lr
            gtd = _dot(xp, flat_grad, d, dtype)
            if gtd > -tolerance_change:  # the directional derivative is below tolerance
                break
            ls_func_evals = 0
            if line_search_fn == "strong_wolfe":
                loss, flat_grad, t, ls_func_evals = _strong_wolfe(
                    xp, dtype, evaluate, x, t, d, loss, flat_grad, gtd, max_ls=max_eval - current_evals
                )
                x = _axpy(t, d, x)
                opt_cond = _abs_max(xp, flat_grad) <= tolerance_grad
            else:
                x = _axpy(t, d, x)
                if n_iter != max_iter:  # no re-evaluation after the last iteration
                    loss, flat_grad = evaluate(x)
                    opt_cond = _abs_max(xp, flat_grad) <= tolerance_grad
                    ls_func_evals = 1
            current_evals += ls_func_evals
            func_evals += ls_func_evals

            if n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if _abs_max(xp, _scale(t, d)) <= tolerance_change:  # lack of progress
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        like = state_leaves["d"]
        new_state = LBFGSState(
            count=count,
            hparams=state.hparams,
            scheduled=scheduled,
            d=trees.unflatten(treedef, d),
            t=scalar(t),
            old_dirs=trees.unflatten(treedef, _stacked(xp, old_dirs, like, history_size)),
            old_stps=trees.unflatten(treedef, _stacked(xp, old_stps, like, history_size)),
            ro=xp.asarray(ro + [0.0] * (history_size - len(ro)), dtype=dtype, device=device),
            num_old=counter(len(old_dirs)),
            H_diag=scalar(H_diag),
            prev_flat_grad=trees.unflatten(treedef, prev_flat_grad),
            prev_loss=scalar(prev_loss),
            n_iter=counter(total_iter),
            func_evals=counter(func_evals),
        )
        return new_state, trees.unflatten(treedef, x)

    return engine.Optimizer(
        init=init, step=step, name="lbfgs", inputs=("value_and_grad_fn",), traceable=False
    )
