"""Optimizer step time on JAX (ours vs optax) and NumPy (ours vs the memory-traffic bound).

Parameter set: ResNet-18's (62 float32 tensors, 11.7M parameters). All in one run:

1. JAX, jitted with buffer donation on both sides: AdamW, Lion, Adan and SGD-momentum through
   ``agnostic_optim.adapters.jax.jit_step`` vs optax's equivalent (``optax.adamw``,
   ``optax.lion``, ``optax.adan``, ``optax.sgd(momentum=...)``) as ``update`` +
   ``apply_updates`` in one ``jax.jit(..., donate_argnums=...)``. Runs alternate between the two
   implementations; the median step time of each and their ratio are printed (target: ours
   <= 1.0x optax). Before timing, both run 3 steps from the same start and the agreement of
   their params is printed (a sanity check that like is compared with like).
2. NumPy AdamW through ``ArrayOptimizer`` (in place: chunked, which runs the rule as a
   recorded ufunc program, and unchunked, which runs it directly) vs the
   memory-traffic lower bound: AdamW must read g, p, m, v and write p, m, v, i.e. 7 x itemsize x n
   bytes per step; divided by the bandwidth of a NumPy triad ``a = b + s*c`` measured in the same
   run (np.multiply then np.add with ``out=``, preallocated arrays of n elements). The triad's
   two passes really move 5 arrays (read c, write a; read a, b, write a), which is what the
   bandwidth is computed from; STREAM's convention (3 arrays) would give a bound 5/3 looser.
   Target: ours <= 2.5x the bound. ``ArrayOptimizer`` splits the chunks between every core's
   thread; a row with ``threads=1`` and a last column against a triad run by as many threads
   (a tighter bound) show what the threads add. A last row times a hand-written NumPy AdamW
   that does the same arithmetic with the fewest passes NumPy allows (14 in-place ufunc calls
   with ``out=`` per chunk, no temporaries, one thread): the floor for one thread of NumPy. The
   recorded program makes the same 14 calls; what remains between the two is the per-chunk
   Python.

    python benchmarks/jax_step.py [--rounds 15] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from param_sets import resnet18_shapes

import agnostic_optim as ao
from agnostic_optim.adapters._chunk_program import available_cores
from agnostic_optim.adapters.jax import jit_step
from agnostic_optim.adapters.numpy import CHUNK_ELEMENTS, ArrayOptimizer

# name -> (ours, optax's equivalent, note)
OPTIMIZERS: dict[str, tuple[Callable[[], ao.Optimizer], Callable[[], Any], str]] = {
    "AdamW": (
        lambda: ao.adamw(lr=1e-3, weight_decay=1e-2),
        lambda: optax.adamw(1e-3, weight_decay=1e-2),
        "",
    ),
    "Lion": (
        lambda: ao.lion(lr=1e-4, betas=(0.9, 0.99), weight_decay=1e-2),
        lambda: optax.lion(1e-4, b1=0.9, b2=0.99, weight_decay=1e-2),
        "",
    ),
    "Adan": (
        lambda: ao.adan(lr=1e-3, weight_decay=2e-2),
        lambda: optax.adan(1e-3, eps_root=0.0, weight_decay=2e-2),
        "optax.adan is not the official code (it uses (1-b2) where the official uses b2 in the "
        "Nesterov terms, and decoupled instead of proximal decay): same buffers and traffic, "
        "different numbers",
    ),
    "SGD-momentum": (
        lambda: ao.sgd(lr=0.1, momentum=0.9),
        lambda: optax.sgd(0.1, momentum=0.9),
        "",
    ),
}


def make_tree(shapes: list[tuple[int, ...]], seed: int, scale: float = 1.0) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    return [jnp.asarray(scale * rng.standard_normal(s, dtype=np.float32)) for s in shapes]


def optax_step(tx: Any, donate: bool = True) -> Callable:
    def step(opt_state, grads, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return opt_state, optax.apply_updates(params, updates)

    return jax.jit(step, donate_argnums=(0, 2) if donate else ())


def max_rel_error(a: list[jax.Array], b: list[jax.Array]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30)))
    return worst


def agreement(ours: ao.Optimizer, tx: Any, shapes, stream) -> float:
    """Max relative difference of params after 3 steps (different gradients) from the same
    start (no donation)."""
    start = make_tree(shapes, 1)
    step_a, step_b = jit_step(ours, donate=False), optax_step(tx, donate=False)
    sa, pa = ours.init(start), start
    sb, pb = tx.init(start), start
    for grads in stream:
        sa, pa = step_a(sa, grads, pa)
        sb, pb = step_b(sb, grads, pb)
    return max_rel_error(pa, pb)


def time_steps(step: Callable, carry: tuple, grads, steps: int) -> tuple[float, tuple]:
    """Seconds per step over ``steps`` donated steps; returns the new (state, params)."""
    state, params = carry
    jax.block_until_ready((state, params))
    start = time.perf_counter()
    for _ in range(steps):
        state, params = step(state, grads, params)
    jax.block_until_ready((state, params))
    return (time.perf_counter() - start) / steps, (state, params)


def bench_jax(rounds: int, steps: int) -> None:
    shapes = resnet18_shapes()
    n = sum(int(np.prod(s)) for s in shapes)
    print(
        f"JAX {jax.__version__} / optax {optax.__version__} on {jax.devices()[0].platform}, "
        f"ResNet-18 parameter set: {len(shapes)} float32 tensors, {n:,} parameters"
    )
    print(f"jitted steps with donation; median over {rounds} alternating rounds of {steps} steps\n")
    grads = make_tree(shapes, 2, scale=1e-3)
    stream = [grads, make_tree(shapes, 3, scale=1e-3), make_tree(shapes, 4, scale=1e-3)]
    header = f"{'optimizer':<14}{'ours ms':>10}{'optax ms':>10}{'ours/optax':>12}{'agreement':>12}"
    print(header)
    print("-" * len(header))
    notes = []
    for name, (make_ours, make_optax, note) in OPTIMIZERS.items():
        ours, tx = make_ours(), make_optax()
        agree = agreement(ours, tx, shapes, stream)
        step_a, step_b = jit_step(ours), optax_step(tx)
        params_a, params_b = make_tree(shapes, 1), make_tree(shapes, 1)
        carry_a = (ours.init(params_a), params_a)
        carry_b = (tx.init(params_b), params_b)
        _, carry_a = time_steps(step_a, carry_a, grads, 2)  # compile and warm up
        _, carry_b = time_steps(step_b, carry_b, grads, 2)
        times_a, times_b = [], []
        for r in range(rounds):
            order = ((step_a, "a"), (step_b, "b")) if r % 2 == 0 else ((step_b, "b"), (step_a, "a"))
            for step, which in order:
                if which == "a":
                    t, carry_a = time_steps(step, carry_a, grads, steps)
                    times_a.append(t)
                else:
                    t, carry_b = time_steps(step, carry_b, grads, steps)
                    times_b.append(t)
        ma, mb = statistics.median(times_a) * 1e3, statistics.median(times_b) * 1e3
        flag = "" if not note else " *"
        print(f"{name:<14}{ma:>10.2f}{mb:>10.2f}{ma / mb:>11.2f}x{agree:>12.1e}{flag}")
        if note:
            notes.append(f"* {name}: {note}")
        del carry_a, carry_b
    for note in notes:
        print(note)
    print("(target: ours/optax <= 1.00x; agreement: max relative difference of params after 3 steps)\n")


def triad_bandwidth(n: int, dtype: Any, repeats: int, threads: int = 1) -> float:
    """Bytes/s of ``a = b + s*c`` (np.multiply then np.add, out=a): 5 arrays cross memory. With
    ``threads`` > 1 the arrays are split into that many slices, each run by its own thread."""
    rng = np.random.default_rng(0)
    a = np.empty(n, dtype)
    b = rng.standard_normal(n).astype(dtype)
    c = rng.standard_normal(n).astype(dtype)
    s = dtype(1.0001)
    cuts = np.linspace(0, n, threads + 1).astype(int)

    def triad(lo: int, hi: int) -> None:
        np.multiply(c[lo:hi], s, out=a[lo:hi])
        np.add(a[lo:hi], b[lo:hi], out=a[lo:hi])

    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats + 1):
            start = time.perf_counter()
            list(pool.map(triad, cuts[:-1], cuts[1:]))
            times.append(time.perf_counter() - start)
    return 5 * np.dtype(dtype).itemsize * n / statistics.median(times[1:])


class HandWrittenAdamW:
    """torch-form AdamW on NumPy arrays, in place, in chunks: the fewest ufunc passes (reference
    for the benchmark only; float64 scalars rounded to the arrays' dtype as ours does)."""

    def __init__(self, params: list[np.ndarray], lr: float, weight_decay: float, chunk: int):
        self.params = [p.reshape(-1) for p in params]
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.lr, self.weight_decay, self.chunk, self.t = lr, weight_decay, chunk, 0
        self.tmp = np.empty((2, chunk), params[0].dtype)

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        dtype = self.params[0].dtype.type
        b1, b2, eps = 0.9, 0.999, 1e-8
        decay = dtype(1 - self.lr * self.weight_decay)
        step_size = dtype(self.lr / (1 - b1**self.t))
        inv_sqrt_bc2 = dtype(1 / np.sqrt(1 - b2**self.t))
        b1, b2, eps, c1, c2 = dtype(b1), dtype(b2), dtype(eps), dtype(1 - b1), dtype(1 - b2)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            g = g.reshape(-1)
            for a in range(0, p.size, self.chunk):
                b = min(a + self.chunk, p.size)
                pp, gg, mm, vv = p[a:b], g[a:b], m[a:b], v[a:b]
                x, y = self.tmp[0, : b - a], self.tmp[1, : b - a]
                pp *= decay
                mm *= b1
                np.multiply(gg, c1, out=x)
                mm += x
                vv *= b2
                np.multiply(gg, gg, out=x)
                x *= c2
                vv += x
                np.sqrt(vv, out=x)
                x *= inv_sqrt_bc2
                x += eps
                np.divide(mm, x, out=y)
                y *= step_size
                pp -= y


def bench_numpy(repeats: int) -> None:
    shapes = resnet18_shapes()
    n = sum(int(np.prod(s)) for s in shapes)
    threads = available_cores()
    print(f"NumPy {np.__version__}: AdamW through ArrayOptimizer (in place) vs the memory-traffic bound")
    print("bound = 7 arrays (read g, p, m, v; write p, m, v) x itemsize x n / triad bandwidth")
    print(
        f"ArrayOptimizer splits a step's chunks between {threads} threads; the last column divides by "
        f"a {threads}-thread triad's bandwidth\n"
    )
    header = (
        f"{'dtype':<9}{'run':<24}{'step ms':>9}{'bound ms':>10}{'ratio':>8}"
        f"{'triad GB/s':>12}{'ratio (STREAM 3n)':>19}{f'ratio ({threads}-thread triad)':>24}"
    )
    print(header)
    print("-" * len(header))
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(0)
        grads = [rng.standard_normal(s).astype(dtype) * 1e-3 for s in shapes]
        runs = {}
        configs = (
            (f"chunks of {CHUNK_ELEMENTS}", CHUNK_ELEMENTS, None),
            ("chunks, 1 thread", CHUNK_ELEMENTS, 1),
            ("unchunked", 0, None),
        )
        for label, chunk, run_threads in configs:
            params = [rng.standard_normal(s).astype(dtype) for s in shapes]
            opt = ao.adamw(lr=1e-3, weight_decay=1e-2)
            runs[label] = ArrayOptimizer(params, opt, chunk_elements=chunk, threads=run_threads)
            runs[label].step(grads)  # warm up
        label = "hand-written, 1 thread"
        hand_params = [rng.standard_normal(s).astype(dtype) for s in shapes]
        runs[label] = HandWrittenAdamW(hand_params, lr=1e-3, weight_decay=1e-2, chunk=CHUNK_ELEMENTS)
        runs[label].step(grads)
        times: dict[str, list[float]] = {label: [] for label in runs}
        bandwidths, threaded = [], []
        for r in range(repeats):
            bandwidths.append(triad_bandwidth(n, dtype, 3))
            threaded.append(triad_bandwidth(n, dtype, 3, threads))
            labels = list(runs) if r % 2 == 0 else list(reversed(runs))
            for label in labels:
                start = time.perf_counter()
                runs[label].step(grads)
                times[label].append(time.perf_counter() - start)
        bandwidth = statistics.median(bandwidths)
        bound = 7 * np.dtype(dtype).itemsize * n / bandwidth
        threaded_bound = 7 * np.dtype(dtype).itemsize * n / statistics.median(threaded)
        for label in runs:
            t = statistics.median(times[label])
            print(
                f"{np.dtype(dtype).name:<9}{label:<24}{t * 1e3:>9.1f}{bound * 1e3:>10.1f}"
                f"{t / bound:>7.2f}x{bandwidth / 1e9:>12.1f}{t / (bound * 5 / 3):>18.2f}x"
                f"{t / threaded_bound:>23.2f}x"
            )
    print("(target: ratio <= 2.5x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="alternating timing rounds (JAX)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timing round (JAX)")
    parser.add_argument("--numpy-repeats", type=int, default=9, help="timed steps per NumPy config")
    args = parser.parse_args()
    bench_jax(args.rounds, args.steps)
    bench_numpy(args.numpy_repeats)


if __name__ == "__main__":
    main()
