"""Per-device memory of paper-size steps under FSDP, and the step time of fsdp = 8 vs data = 8.

    python benchmarks/fsdp_memory.py [--which cifar10_fdistill,dpo_100m] [--fsdp 1,2,4,8]
                                     [--batch 8] [--time_steps 3] [--time_width 256] [--json out.json]
    python benchmarks/fsdp_memory.py --device [--batch 64] [--dtype bfloat16]   # on a GPU/TPU host

Runs in one process with 8 simulated CPU devices. For each config (ml_collections_configs/
cifar10_fdistill.py: f-distill of the 82.8M-parameter CIFAR-10-size U-Net teacher; synthetic_dpo_100m.py:
DPO of a ~99M-parameter Transformer) and each `mesh.fsdp`, the train step is jitted exactly as the
training loop does it (`fdistill.placement`) and compiled from shapes; printed per row:

  * XLA's `memory_analysis()` of the compiled step per device: arguments (state + frozen networks +
    batch), outputs, temporaries (activations, gradients, all-gathered parameters);
  * the per-device bytes of the state and frozen networks as placed by the sharding rules, the
    ideal total / fsdp, and their ratio (the issue's goal: <= 1.15 plus the small replicated leaves).

Then the step time of the same global batch on (data 8, fsdp 1) and (data 1, fsdp 8), measured
side by side in this process (the median of `--time_steps` steps after one warm-up step), for the
DPO config with its Transformer narrowed to `--time_width` (depth kept): replicated 8 times, the
99M-parameter state does not fit this 24 GB machine, which is the point of FSDP.

`--device` (benchmarks/gpu_check.sh runs it) instead times the CIFAR-10-size f-distill step on the
host's real devices (fsdp 1) in `--dtype`: steps/s, MFLOP/step (XLA cost analysis), MFU against
the device's published dense peak (`step_throughput.PEAK_TFLOPS`) and XLA's memory per device.

CIFAR-10 is not on this machine: the f-distill config reads random 32x32x3 images in its place
(memory and time do not depend on pixel values), and its teacher is a score run of the same U-Net
trained for one step here (only its weights' shapes matter). The DPO step computes the frozen
reference's log-probabilities in the step (`po.precompute_ref=False`), so the reference network is
part of its memory.
"""
from __future__ import annotations

import os
import sys

if "--device" not in sys.argv:  # 8 simulated CPU devices, before JAX starts
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

from fdistill import configs, objectives, placement, sharding, train  # noqa: E402
from fdistill.data import images as image_lib  # noqa: E402
from fdistill.data import tfds_images  # noqa: E402
from fdistill.evaluation import feature_metrics  # noqa: E402
from fdistill.models import param_count  # noqa: E402


class RandomImages:
    """A stand-in `DataSource` of random 32x32x3 images (see the module docstring)."""

    shape, num_classes = (32, 32, 3), 0

    def __init__(self, data_config):
        self.seed = int(data_config.seed)

    def batch(self, step, global_batch, process_index=0, process_count=1):
        rows = sharding.process_slice(global_batch, process_index, process_count)
        x = np.random.default_rng([self.seed, step]).uniform(-1, 1, (global_batch,) + self.shape)
        return {"x": x[rows].astype(np.float32)}

    def reference(self, n, seed=12345):
        return np.random.default_rng([self.seed, 2, seed]).uniform(-1, 1, (n,) + self.shape).astype(np.float32)

    def evaluate_samples(self, x, labels=None):
        feats = lambda a: tfds_images.pixel_features(np.clip(np.asarray(a, np.float32), -1, 1))
        return feature_metrics.feature_sample_metrics(feats(self.reference(64)), feats(x), prefix="fd_pixels")

    def plot_samples(self, x, path, title=""):
        return image_lib.plot_image_grid(x, path, title)


def teacher_run(workdir: str, batch: int, dtype: str = "float32") -> str:
    """cifar10_score.py trained for one step on random images (a finished run to distil); its
    compute dtype is the student's (adopted with the architecture)."""
    c = configs.load("cifar10_score")
    c.train.compute_dtype = dtype
    c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 1, batch, 1, 1
    c.eval.num_samples, c.eval.num_steps, c.eval.chunk = 8, 1, 8
    c.mesh.fsdp = jax.device_count()  # replicated 8 times, its 1.3 GB state and step do not fit 24 GB
    train.train_and_evaluate(c, workdir)
    return workdir


def build_config(name: str, batch: int, teacher: str | None):
    c = configs.complete(configs.load(name))
    c.train.batch_size = batch
    if name == "cifar10_fdistill":
        c.distill.teacher = teacher
    else:  # the reference's log-probs in the step (its network in memory), not precomputed for every pair
        c.po.precompute_ref = False
        c.po.pairs.num_pairs, c.po.pairs.num_test_pairs = 256, 64
    return c


def measure(config, fsdp: int) -> tuple[dict, tuple]:
    config = config.copy_and_resolve_references()
    config.mesh.fsdp = fsdp
    obj = objectives.build(config)
    mesh = sharding.make_mesh(None, fsdp)
    key = jax.random.PRNGKey(0)
    where, frozen = placement.on_mesh(obj, key, mesh, sharding.ShardingRules.from_config(config.mesh))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=where.batch) for k, v in obj.batch(0).items()}
    t0 = time.perf_counter()
    compiled = where.jit_step(obj).lower(where.abstract_state, where.abstract_frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    s_per, s_total, s_split, s_count = placement.per_device_bytes(where.abstract_state)
    f_per, f_total, _, _ = placement.per_device_bytes(where.abstract_frozen)
    params = where.abstract_state.params
    return {
        "fsdp": fsdp, "data": 8 // fsdp, "trained_params": param_count(params),
        "frozen_params": param_count(where.abstract_frozen), "compile_s": compile_s,
        "args_mib": mem.argument_size_in_bytes / 2**20, "out_mib": mem.output_size_in_bytes / 2**20,
        "temp_mib": mem.temp_size_in_bytes / 2**20,
        "placed_mib": (s_per + f_per) / 2**20, "ideal_mib": (s_total + f_total) / fsdp / 2**20,
        "sharded_leaves": f"{s_split}/{s_count}",
    }, (obj, where, frozen, compiled)


def step_time(obj, where, frozen, compiled, steps: int) -> float:
    state = where.init_state(obj, jax.random.PRNGKey(0), frozen)
    times = []
    for i in range(steps + 1):
        batch = sharding.shard_batch(obj.batch(i), where.mesh)
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def device_check(batch: int, dtype: str, seconds: float) -> dict:
    """The CIFAR-10-size f-distill step on this host's devices (fsdp 1): rate, FLOPs, MFU, memory."""
    import step_throughput

    with tempfile.TemporaryDirectory() as tmp:
        config = build_config("cifar10_fdistill", batch, teacher_run(os.path.join(tmp, "teacher"), batch, dtype))
        row, (obj, where, frozen, compiled) = measure(config, 1)
        state = where.init_state(obj, jax.random.PRNGKey(0), frozen)
        data = sharding.shard_batch(obj.batch(0), where.mesh)
        rate = step_throughput.time_fn(compiled, state, (frozen, data), seconds)
    flops = step_throughput.compiled_flops(compiled)
    peak = step_throughput.device_peak_tflops(dtype)
    row.update(device=jax.devices()[0].device_kind, devices=jax.device_count(), dtype=dtype, batch=batch,
               steps_per_sec=rate, mflop_per_step=flops / 1e6,
               mfu=flops * rate / (peak * 1e12 * jax.device_count()) if peak else None)
    mfu = f"{row['mfu']:.3f}" if row["mfu"] is not None else "n/a (unknown device peak)"
    print(f"cifar10_fdistill step on {jax.device_count()} x {row['device']}, {dtype}, global batch {batch} "
          f"(fake_updates_per_gen={config.distill.fake_updates_per_gen}): {rate:.2f} steps/s, "
          f"{flops / 1e9:.1f} GFLOP/step, MFU {mfu}; memory/device args {row['args_mib']:.0f} MiB, "
          f"temp {row['temp_mib']:.0f} MiB, out {row['out_mib']:.0f} MiB", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", default="cifar10_fdistill,dpo_100m")
    p.add_argument("--fsdp", default="1,2,4,8")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--time_steps", type=int, default=3)
    p.add_argument("--time_width", type=int, default=256)
    p.add_argument("--json", default="")
    p.add_argument("--device", action="store_true", help="time the CIFAR-size f-distill step on real devices")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    tfds_images.make_source = RandomImages  # no CIFAR-10 here: random images of its shape
    if args.device:
        row = device_check(args.batch, args.dtype, args.seconds)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(row, f, indent=1)
        return
    assert jax.device_count() == 8, "needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
    names = {"cifar10_fdistill": "cifar10_fdistill", "dpo_100m": "synthetic_dpo_100m"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.which.split(","):
            teacher = teacher_run(os.path.join(tmp, "teacher"), args.batch) if which == "cifar10_fdistill" else None
            config = build_config(names[which], args.batch, teacher)
            print(f"\n## {which} (global batch {args.batch}, 8 simulated CPU devices)\n", flush=True)
            print("| fsdp | data | trained params | frozen params | args MiB | out MiB | temp MiB | "
                  "state+frozen placed MiB/device | ideal total/fsdp MiB | placed / ideal | sharded state leaves | "
                  "compile s |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for fsdp in [int(f) for f in args.fsdp.split(",")]:
                row, _ = measure(config, fsdp)
                row["config"] = which
                rows.append(row)
                print(f"| {fsdp} | {row['data']} | {row['trained_params'] / 1e6:.1f}M | {row['frozen_params'] / 1e6:.1f}M | "
                      f"{row['args_mib']:.0f} | {row['out_mib']:.0f} | {row['temp_mib']:.0f} | {row['placed_mib']:.0f} | "
                      f"{row['ideal_mib']:.0f} | {row['placed_mib'] / row['ideal_mib']:.3f} | {row['sharded_leaves']} | "
                      f"{row['compile_s']:.0f} |", flush=True)
        if args.time_steps:
            config = build_config("synthetic_dpo_100m", args.batch, None)
            config.model.width, config.model.num_heads = args.time_width, max(args.time_width // 64, 1)
            timed = {fsdp: step_time(*measure(config, fsdp)[1], args.time_steps) for fsdp in (1, 8)}
            print(f"\nDPO step, Transformer width {args.time_width} x depth {config.model.depth}, global batch "
                  f"{args.batch}: data=8 {timed[1]:.3f} s, fsdp=8 {timed[8]:.3f} s, fsdp=8 / data=8 = "
                  f"{timed[8] / timed[1]:.2f}", flush=True)
            rows.append({"config": f"dpo_width{args.time_width}", "step_s_data8": timed[1], "step_s_fsdp8": timed[8]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
