"""Steps/s of jitted train steps and their achieved FLOP/s relative to a matmul measured in the same run.

    python benchmarks/step_throughput.py [--steps score,distill,po] [--seconds 3] [--dtype float32]
                                          [--sizes cpu|gpu] [--peak_tflops auto|<number>] [--json out.json]

For each step (score: EDM denoising score matching, distill: one f-distill generator update with
its K critic updates, po: one DPO update of a small Transformer LM, unet: the digits U-Net score
step) and two sizes: the step's FLOPs from XLA's compiled cost analysis, steps/s measured after a
warm-up, achieved FLOP/s = FLOPs x steps/s, and its ratio to the FLOP/s of a large matmul of the
same dtype measured in the same process (a same-run ceiling, not a vendor peak). With
`--peak_tflops` (or `auto` on a GPU/TPU whose peak is known, see PEAK_TFLOPS) it also prints MFU
= achieved FLOP/s / the device's dense peak for the dtype.

Run on one device (no simulated devices): the numbers are for this machine only. Steps are jitted
as the training loop does (state donated), on a fixed batch.
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import jax
import jax.numpy as jnp

from fdistill import configs, objectives
from timing import best_rate
from fdistill.train import MAX_STEPS_IN_FLIGHT

# Dense (no sparsity) peak TFLOP/s by device_kind substring and compute dtype. float32 matmuls run
# as TF32 on these NVIDIA GPUs under JAX's default precision, so 'float32' lists the TF32 peak.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float32": 494.0},  # same compute as H100 SXM (NVIDIA datasheet)
    "H100": {"bfloat16": 989.0, "float32": 494.0},  # SXM; PCIe is 756 / 378
    "A100": {"bfloat16": 312.0, "float32": 156.0},
    "L4": {"bfloat16": 121.0, "float32": 60.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6": {"bfloat16": 918.0, "float32": 918.0},
}


def device_peak_tflops(dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peaks in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peaks[dtype]
    return None


def time_fn(step, state, args, seconds: float, warmup: int = 3, windows: int = 3) -> float:
    """Calls/s of `state, metrics = step(state, *args)` (`best_rate`) after `warmup` calls, with at
    most MAX_STEPS_IN_FLIGHT steps queued, as in the training loop."""
    for _ in range(warmup):
        state = step(state, *args)[0]
    jax.block_until_ready(state)
    carry = {"state": state, "in_flight": collections.deque()}

    def call():
        carry["state"], metrics = step(carry["state"], *args)
        carry["in_flight"].append(metrics)
        if len(carry["in_flight"]) > MAX_STEPS_IN_FLIGHT:
            jax.block_until_ready(carry["in_flight"].popleft())

    return best_rate(call, seconds, windows, sync=lambda: jax.block_until_ready(carry["state"]))


def matmul_flops_per_sec(size: int, dtype: str, seconds: float) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), dtype)
    f = jax.jit(lambda a, b: a @ b)
    for _ in range(3):
        jax.block_until_ready(f(a, b))
    queue = collections.deque()

    def call():  # at most 10 products queued
        queue.append(f(a, b))
        if len(queue) > 10:
            jax.block_until_ready(queue.popleft())

    return 2 * size**3 * best_rate(call, seconds, sync=lambda: jax.block_until_ready(list(queue)))


def compiled_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def objective_step(config):
    """(compiled step, state, (frozen, batch)) for an objective's train step on one device, jitted
    like the training loop (state donated; frozen parameters and the batch as arguments)."""
    obj = objectives.build(config)
    state, frozen = obj.init(jax.random.PRNGKey(0))
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)  # distinct buffers (donation)
    batch = jax.tree.map(jnp.asarray, obj.batch(0))
    compiled = jax.jit(obj.train_step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
    return compiled, state, (frozen, batch)


# ----- the benchmarked steps: name -> generator of (label, config) for (sizes, dtype) -----------------


def score_configs(sizes: str, dtype: str):
    """The GMM score step (gmm_score.py's residual MLP)."""
    for width, batch in ((128, 256), (128, 4096)) if sizes == "cpu" else ((128, 4096), (1024, 65536)):
        c = configs.load("gmm_score")
        c.model.width, c.train.batch_size, c.train.compute_dtype = width, batch, dtype
        yield f"score mlp 3x{width}, batch {batch}", c


def distill_configs(sizes: str, dtype: str):
    """One f-distill (JS) generator update with K=5 critic updates (gmm_fdistill.py)."""
    for width, batch in ((64, 256), (128, 1024)) if sizes == "cpu" else ((256, 4096), (1024, 32768)):
        c = configs.load("gmm_fdistill")
        c.model.width, c.train.batch_size, c.train.compute_dtype = width, batch, dtype
        yield f"f-distill mlp 3x{width}, K={c.distill.fake_updates_per_gen}, batch {batch}", c


def po_configs(sizes: str, dtype: str):
    """One DPO update of the synthetic-language Transformer (synthetic_dpo.py, random reference so
    no SFT run is needed; reference log-probs precomputed as in the default config)."""
    shapes = ((64, 2, 64), (128, 2, 128)) if sizes == "cpu" else ((256, 4, 1024), (512, 8, 4096))
    for width, depth, batch in shapes:
        c = configs.load("synthetic_dpo")
        c.po.reference = "init"
        c.model.width, c.model.depth = width, depth
        c.train.batch_size, c.train.compute_dtype = batch, dtype
        c.po.pairs.num_pairs = max(batch, 1024)
        yield f"dpo transformer d={width} L={depth}, batch {batch} pairs", c


def unet_configs(sizes: str, dtype: str):
    """The digits U-Net score step (digits_score.py): 8x8 images, channels 32/64 with attention;
    the larger size is 16x16 digits with channels 128/256/256 (`--sizes gpu`)."""
    shapes = (((8, 32, (1, 2)), 64), ((8, 32, (1, 2)), 256)) if sizes == "cpu" else (
        ((8, 32, (1, 2)), 512), ((16, 128, (1, 2, 2)), 512))
    for (res, ch, mult), batch in shapes:
        c = configs.load("digits_score")
        c.data.resolution, c.model.channels, c.model.channel_mult = res, ch, mult
        c.train.batch_size, c.train.compute_dtype = batch, dtype
        yield f"digits u-net {res}x{res} ch {ch}x{mult}, batch {batch}", c


BENCHMARKS = {"score": score_configs, "distill": distill_configs, "po": po_configs, "unet": unet_configs}
DEFAULT_STEPS = "score,distill,po"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=DEFAULT_STEPS, help=f"comma list of {list(BENCHMARKS)}")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="config.train.compute_dtype of every step, and the matmul's dtype")
    parser.add_argument("--sizes", default="cpu", choices=("cpu", "gpu"), help="the two sizes per step")
    parser.add_argument("--matmul", type=int, default=0, help="matmul size (default 2048 on CPU, 8192 else)")
    parser.add_argument("--peak_tflops", default="auto",
                        help="device dense peak for MFU: a number, 'auto' (known GPUs/TPUs) or 'none'")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    names = args.steps.split(",")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown --steps {unknown}; allowed: {list(BENCHMARKS)}")

    platform = jax.devices()[0].platform
    size = args.matmul or (2048 if platform == "cpu" else 8192)
    ceiling = matmul_flops_per_sec(size, args.dtype, args.seconds)
    peak = (device_peak_tflops(args.dtype) if args.peak_tflops == "auto"
            else None if args.peak_tflops == "none" else float(args.peak_tflops))
    peak = peak * 1e12 if peak else None
    kind = jax.devices()[0].device_kind
    print(f"device: {kind} x{jax.device_count()} ({platform}); jax {jax.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{args.dtype} {size}^2 matmul: {ceiling / 1e9:.1f} GFLOP/s"
          + (f" = {ceiling / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s dense peak" if peak else ""))
    mfu_head = " MFU |" if peak else ""
    print(f"| step | dtype | MFLOP/step | steps/s | GFLOP/s | fraction of matmul |{mfu_head}")
    print(f"|---|---|---|---|---|---|{'---|' if peak else ''}")
    rows = []
    for name in names:
        for label, config in BENCHMARKS[name](args.sizes, args.dtype):
            compiled, state, fargs = objective_step(config)
            flops = compiled_flops(compiled)
            rate = time_fn(compiled, state, fargs, args.seconds)
            achieved = flops * rate
            row = {"step": label, "dtype": args.dtype, "flops": flops, "steps_per_sec": rate,
                   "flops_per_sec": achieved, "fraction_of_matmul": achieved / ceiling}
            mfu = ""
            if peak:
                row["mfu"] = achieved / peak
                mfu = f" {row['mfu']:.2%} |"
            rows.append(row)
            print(f"| {label} | {args.dtype} | {flops / 1e6:.2f} | {rate:.1f} | {achieved / 1e9:.2f} | "
                  f"{achieved / ceiling:.3f} |{mfu}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": kind, "platform": platform, "matmul_flops_per_sec": ceiling,
                       "peak_flops_per_sec": peak, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
