"""Weak scaling over 1-8 simulated CPU devices: the cost of sharding at a fixed per-device batch.

    python benchmarks/weak_scaling.py [--steps score,distill] [--per_device_batch 256]
                                      [--devices 1,2,4,8] [--seconds 3] [--json out.json]

For each device count n, one process with n simulated devices (`XLA_FLAGS` is read when JAX
starts, so every n gets its own process) runs the train step jitted as the training loop does it:
a (data n, fsdp 1) mesh, the global batch n x per_device_batch split over the devices, state and frozen
parameters replicated, state donated. A second process with 1 device runs the same global batch
unsharded. Printed per n:

  * steps/s of the sharded step and of the 1-device step on the same global batch (each the best of
    `--repeats` processes, each process the best of three timing windows);
  * sharding overhead = time per step sharded / time per step on 1 device (same work: it isolates
    the partitioning and the gradient all-reduce from the compute; 1.0 = free);
  * weak-scaling efficiency = time per step at n = 1 / time per step at n. Simulated devices share
    this machine's cores, so the work grows n-fold on fixed hardware: on C physical cores the best
    possible is about min(n, C) / n. On n real accelerators the ideal is 1.0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STEPS = ("score", "distill", "po")


def worker(step_name: str, global_batch: int, num_devices: int, seconds: float) -> dict:
    import jax

    sys.path.insert(0, HERE)
    import step_throughput

    from fdistill import objectives, placement, sharding

    assert jax.device_count() == num_devices, (jax.device_count(), num_devices)
    _, config = next(iter(step_throughput.BENCHMARKS[step_name]("cpu", "float32")))
    config.train.batch_size = global_batch
    mesh = sharding.make_mesh()
    sharding.check_batch_size(global_batch, mesh)
    obj = objectives.build(config)
    key = jax.random.PRNGKey(0)
    where, frozen = placement.on_mesh(obj, key, mesh, sharding.ShardingRules(fsdp=1))
    state = where.init_state(obj, key, frozen)
    batch = sharding.shard_batch(obj.batch(0), mesh)
    step = where.jit_step(obj).lower(state, frozen, batch).compile()
    rate = step_throughput.time_fn(step, state, (frozen, batch), seconds)
    return {"steps_per_sec": rate}


def run(step_name: str, global_batch: int, num_devices: int, seconds: float) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", step_name, "--global_batch", str(global_batch),
           "--num_devices", str(num_devices), "--seconds", str(seconds)]
    from timing import run_worker

    return run_worker(cmd, env, f"worker {step_name} n={num_devices}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="score,distill", help=f"comma list of {list(STEPS)}")
    parser.add_argument("--per_device_batch", type=int, default=256)
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=2, help="processes per measurement (best is kept)")
    parser.add_argument("--json", default="")
    parser.add_argument("--worker", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--global_batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--num_devices", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.global_batch, args.num_devices, args.seconds)))
        return

    counts = [int(n) for n in args.devices.split(",")]
    print(f"weak scaling, {args.per_device_batch} examples per device; {os.cpu_count()} CPU cores; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| step | devices | global batch | steps/s sharded | steps/s 1 device, same batch | "
          "sharding overhead | weak-scaling efficiency |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in args.steps.split(","):
        if name not in STEPS:
            raise SystemExit(f"unknown step {name!r}; allowed: {list(STEPS)}")
        base = None
        for n in counts:
            g = n * args.per_device_batch
            # best of `repeats` processes each, alternating sharded / 1 device (other jobs' load varies)
            sharded, single = {"steps_per_sec": 0.0}, {"steps_per_sec": 0.0}
            for _ in range(args.repeats):
                r = run(name, g, n, args.seconds)
                sharded = max(sharded, r, key=lambda x: x["steps_per_sec"])
                if n > 1:
                    r = run(name, g, 1, args.seconds)
                    single = max(single, r, key=lambda x: x["steps_per_sec"])
            single = sharded if n == 1 else single
            base = base or sharded["steps_per_sec"]
            row = {"step": name, "devices": n, "global_batch": g, "sharded": sharded["steps_per_sec"],
                   "single": single["steps_per_sec"], "overhead": single["steps_per_sec"] / sharded["steps_per_sec"],
                   "efficiency": sharded["steps_per_sec"] / base}
            rows.append(row)
            print(f"| {name} | {n} | {g} | {row['sharded']:.1f} | {row['single']:.1f} | {row['overhead']:.2f} | "
                  f"{row['efficiency']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
