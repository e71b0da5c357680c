"""Steps/s of jitted train steps and their achieved FLOP/s relative to a large float32 matmul.

    python benchmarks/step_throughput.py [--steps score] [--seconds 3]

For each step and batch size: the step's FLOPs from XLA's compiled cost analysis, steps/s measured
after a warm-up, achieved FLOP/s = FLOPs x steps/s, and its ratio to the FLOP/s of a 2048x2048
float32 matmul measured in the same process (a same-run ceiling, not a vendor peak).
Run on one device (no simulated devices): the numbers are for this machine only.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from fdistill import configs, objectives


def time_fn(fn, args, seconds: float) -> float:
    """Calls/s of `fn(*args)` (blocking on the result) over about `seconds` after two warm-ups."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        out = fn(*args)
        n += 1
    jax.block_until_ready(out)
    return n / (time.perf_counter() - t0)


def matmul_flops_per_sec(size: int = 2048, seconds: float = 2.0) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * size**3 * time_fn(f, (a, b), seconds)


def compiled_flops(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def objective_step(config):
    """(jitted step, args) for an objective's train step on one device; the state is not donated
    so the same arguments can be reused for every timed call."""
    obj = objectives.build(config)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    batch = jax.tree.map(jnp.asarray, obj.batch(0))
    return jax.jit(obj.train_step), (state, frozen, batch)


def score_configs():
    """The GMM score step (gmm_score.py's MLP) at two batch sizes."""
    for batch in (256, 4096):
        c = configs.load("gmm_score")
        c.train.batch_size = batch
        yield f"score mlp 3x128, batch {batch}", c


BENCHMARKS = {"score": score_configs}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(BENCHMARKS), help=f"comma list of {list(BENCHMARKS)}")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    args = parser.parse_args()
    names = args.steps.split(",")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown --steps {unknown}; allowed: {list(BENCHMARKS)}")

    peak = matmul_flops_per_sec(seconds=args.seconds)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"float32 2048^2 matmul: {peak / 1e9:.1f} GFLOP/s")
    print(f"| step | MFLOP/step | steps/s | GFLOP/s | fraction of matmul |")
    print(f"|---|---|---|---|---|")
    for name in names:
        for label, config in BENCHMARKS[name]():
            fn, fargs = objective_step(config)
            flops = compiled_flops(fn, *fargs)
            rate = time_fn(fn, fargs, args.seconds)
            achieved = flops * rate
            print(f"| {label} | {flops / 1e6:.2f} | {rate:.1f} | {achieved / 1e9:.2f} | {achieved / peak:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
