"""The DPO step on a Hugging Face checkpoint, fdistill (JAX) against TRL's DPOTrainer (PyTorch),
side by side on the same model, data and batch: steps/s, their ratio, and what 50 steps learn.

    # once: the tiny Llama (3.2M parameters) and the 200-pair copy task, with TRL's venv
    /tmp/hfvenv/bin/python benchmarks/trl_dpo_reference.py --make-model /tmp/trl_dpo/model \
        --make-data /tmp/trl_dpo/pairs.jsonl
    python benchmarks/hf_dpo_speed.py --model /tmp/trl_dpo/model --data /tmp/trl_dpo/pairs.jsonl \
        --trl-python /tmp/hfvenv/bin/python [--rounds 2] [--steps 50]

Both sides: sigmoid DPO, beta 0.1, the reference = the initial checkpoint computed in the step
(TRL's default), 8 pairs per step, AdamW 5e-4 (0.9, 0.999, 1e-8, no decay), constant rate,
global-norm clip 1.0, float32, 2 CPU threads. TRL's max_length is 64 and its collator pads each
batch to its longest pair (<= 20 tokens here); fdistill's batches have one fixed length (one
compiled step), `data.max_length`, timed at 64 (the same setting) and at 24 (what a user would set
for this data: just above its longest pair) by `--max-lengths`. TRL runs in its own process
(`benchmarks/trl_dpo_reference.py`, timed from its 3rd to its last `on_step_end`, data loading and
collation included); fdistill runs `experiments`' own loop pieces: the objective's batch (read by
random access from the ArrayRecord dataset), placed on the mesh, the jitted step, over `--steps`
steps after a compiled warm-up, in a worker process per round. Rounds alternate the two; the
script prints each round's steps/s, the medians, the ratio fdistill / TRL, and each side's
implicit-reward accuracy on all training pairs after its `--steps` steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WARMUP_STEPS = 3


def jax_worker(args) -> dict:
    """One timed run of the fdistill DPO step (called in a fresh process)."""
    import jax
    import numpy as np

    from fdistill import configs, objectives, placement, sharding

    c = configs.load("hf_dpo")
    c.model.hf_path, c.data.path = args.model, args.data
    c.data.update(max_length=args.max_length, test_fraction=0.0, data_dir=os.path.join(args.workdir, "tfds"))
    c.train.update(batch_size=args.batch, learning_rate=args.lr, warmup_steps=0, grad_clip=1.0)
    c.po.beta = args.beta
    obj = objectives.build(c)
    mesh = sharding.make_mesh(1)
    place, frozen = placement.on_mesh(obj, jax.random.PRNGKey(0), mesh, sharding.ShardingRules.from_config(c.mesh))
    state = place.init_state(obj, jax.random.PRNGKey(0), frozen)
    step = place.jit_step(obj)
    batch = lambda i: sharding.shard_batch(obj.batch(i), mesh)
    for i in range(WARMUP_STEPS):  # the first compiles; as TRL's side, 3 untimed steps
        state, m = step(state, frozen, batch(i))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(WARMUP_STEPS, WARMUP_STEPS + args.steps):
        state, m = step(state, frozen, batch(i))
    jax.block_until_ready(m)
    rate = args.steps / (time.perf_counter() - t0)
    pairs = obj.train_pairs
    acc = obj._pair_metrics(state.params, frozen["ref"],
                            {k: jax.numpy.asarray(v) for k, v in pairs.rows(np.arange(pairs.num_pairs)).items()})
    return {"steps_per_sec": rate, "pairs_per_sec": rate * args.batch, "steps": WARMUP_STEPS + args.steps,
            "accuracy_all_pairs": float(acc["rewards/accuracies"]), "jax_version": jax.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--trl-python", default="/tmp/hfvenv/bin/python")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-lengths", default="64,24",
                    help="fdistill's fixed sequence lengths to time (TRL pads each batch to its longest pair)")
    ap.add_argument("--max-length", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="/tmp/hf_dpo_speed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(jax_worker(args)))
        return
    sys.path.insert(0, HERE)
    from timing import run_worker

    common = ["--model", args.model, "--data", args.data, "--steps", str(args.steps), "--batch", str(args.batch),
              "--lr", str(args.lr), "--beta", str(args.beta)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": REPO}
    lengths = [int(v) for v in args.max_lengths.split(",")]
    jax_rates, trl_rates, jax_out, trl_out = {n: [] for n in lengths}, [], {}, {}
    for r in range(args.rounds):
        for n in lengths:
            jax_out[n] = run_worker([sys.executable, __file__, "--worker", "--workdir", args.workdir,
                                     "--max-length", str(n)] + common, env, "fdistill")
            jax_rates[n].append(jax_out[n]["steps_per_sec"])
        trl_out = run_worker([args.trl_python, os.path.join(HERE, "trl_dpo_reference.py")] + common, env, "TRL")
        trl_rates.append(trl_out["steps_per_sec"])
        print(f"round {r}: " + ", ".join(f"fdistill (max_length {n}) {jax_rates[n][-1]:.1f}" for n in lengths)
              + f", TRL {trl_rates[-1]:.1f} steps/s", flush=True)
    t = statistics.median(trl_rates)
    out = {"trl_steps_per_sec": t, "trl_accuracy_all_pairs": trl_out.get("train_set_implicit_reward_accuracy"),
           "trl_version": trl_out.get("trl_version"), "torch_version": trl_out.get("torch_version"),
           "jax_version": jax_out[lengths[0]]["jax_version"], "steps": args.steps, "batch": args.batch}
    for n in lengths:
        j = statistics.median(jax_rates[n])
        out.update({f"fdistill_len{n}_steps_per_sec": j, f"ratio_fdistill_len{n}_over_trl": j / t,
                    f"fdistill_len{n}_accuracy_all_pairs": jax_out[n]["accuracy_all_pairs"]})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
