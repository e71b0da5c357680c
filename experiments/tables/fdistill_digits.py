"""Digits table: the EDM teacher at NFE 1, 3, 7, 17, 35 against one-step f-distill students.

    python -m experiments.tables.fdistill_digits --workdir runs/table_digits [--teacher runs/digits_score]

Trains (or resumes, or reuses with --teacher) the teacher of ml_collections_configs/digits_score.py in
WORKDIR/teacher, distils it with ml_collections_configs/digits_fdistill.py for each divergence in
--divergences (default rkl, kl, js) into WORKDIR/student_<div> (finished runs are reused), then
evaluates every row on the same number of samples in the features of the in-project digits classifier:
fd_digits (Frechet distance to the 1500 training digits), k-NN precision / recall (k = 3),
class_entropy (nats; log 10 = 2.303 is uniform over the 10 classes) and samples/s (1 process, all
local devices, jitted chunks of 512, compile excluded). A `data (test split)` row scores the 297
held-out digits (its FD is inflated by the small sample). Writes WORKDIR/table.md, table.json and
samples.png (one image grid per row; all rows start from the same noise). About 40 minutes on
2 CPU cores with --teacher, 60 without. SIGTERM or Ctrl-C stops the table after the run in progress
saved a checkpoint (exit status 143 / 130); re-running the same command resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.tables.common import generator_params, plot_image_rows, train_row
from fdistill import diffusion, objectives
from fdistill import data as data_lib
from fdistill.configs import load as load_config
from fdistill.denoiser import sample_chunked
from fdistill.objectives.score import load_teacher

TEACHER_STEPS = (1, 2, 4, 9, 18)  # Heun NFE = 2N - 1: 1, 3, 7, 17, 35
DIVERGENCES = ("rkl", "kl", "js")
COLUMNS = ("fd_digits", "precision", "recall", "class_entropy", "samples_per_sec")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--teacher", default="", help="workdir of a finished digits score run (default: train one)")
    p.add_argument("--divergences", default=",".join(DIVERGENCES))
    p.add_argument("--num_samples", type=int, default=4096)
    p.add_argument("--student_steps", type=int, default=None, help="override digits_fdistill train.num_steps")
    p.add_argument("--teacher_train_steps", type=int, default=None, help="override digits_score train.num_steps")
    p.add_argument("--data_dir", default="", help="config.data.data_dir for every run")
    p.add_argument("--grid", type=int, default=30, help="images per row in samples.png")
    return p.parse_args(argv)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def teacher_rows(teacher_dir, source, num_samples, grid_noise, key):
    """Heun samples of the teacher's EMA denoiser at each NFE: (rows, grids)."""
    denoiser, params, tconfig = load_teacher(teacher_dir)
    dc, chunk = tconfig.diffusion, 512
    num_classes = tconfig.model.num_classes  # a class-conditional teacher gets random labels
    kw = {"labels": grid_labels(len(grid_noise))} if num_classes else {}
    rows, grids = [], []
    for n_steps in TEACHER_STEPS:
        run = lambda n, k=key: sample_chunked(denoiser, params, source.shape, k, n, n_steps, "heun",  # noqa: E731
                                              dc, chunk, num_classes)
        run(chunk)  # compile outside the timed region
        x, seconds = timed(run, num_samples)
        m = source.evaluate_samples(x)
        nfe = diffusion.nfe(n_steps, "heun")
        rows.append({"row": f"teacher Heun NFE {nfe}", "nfe": nfe, **{k: m[k] for k in COLUMNS[:-1]},
                     "samples_per_sec": num_samples / seconds, "nonfinite_frac": m["nonfinite_frac"]})
        sample = jax.jit(lambda p, z, n=n_steps: diffusion.sample(lambda x, s: denoiser(p, x, s, **kw), z, n,
                                                                  sigma_min=dc.sigma_min, sigma_max=dc.sigma_max,
                                                                  rho=dc.rho))
        grids.append((rows[-1]["row"], np.asarray(sample(params, grid_noise))))
        print(f"[table] {rows[-1]}", flush=True)
    return rows, grids


def grid_labels(n):
    """Labels 0, 1, ..., 9, 0, ... for the sample grids of class-conditional models (else ignored)."""
    return jnp.arange(n, dtype=jnp.int32) % 10


def student_config(args, teacher_dir, divergence):
    c = load_config("digits_fdistill")
    c.distill.teacher = teacher_dir
    c.distill.divergence = divergence
    c.data.data_dir = args.data_dir
    c.eval.num_samples = args.num_samples
    c.eval.num_steps = 1  # the teacher's own rows are computed here; keep its in-run reference cheap
    if args.student_steps:
        c.train.num_steps = args.student_steps
        c.train.eval_every = 0
    return c


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    timings = {}

    teacher_dir = os.path.abspath(args.teacher) if args.teacher else os.path.join(workdir, "teacher")
    if not args.teacher:
        tc = load_config("digits_score")
        tc.data.data_dir = args.data_dir
        if args.teacher_train_steps:
            tc.train.num_steps = args.teacher_train_steps
        _, timings["teacher_train_s"] = timed(train_row, tc, teacher_dir, "teacher")
    tconfig = load_teacher(teacher_dir)[2]
    source = data_lib.build(tconfig.data)
    print(f"[table] digits classifier test accuracy {source.classifier.test_accuracy:.4f}", flush=True)

    key = jax.random.key(2024)
    grid_noise = jax.random.normal(jax.random.key(7), (args.grid,) + source.shape)
    x_test, y_test = source.split("test")
    m = source.evaluate_samples(x_test)
    rows = [{"row": "data (test split, n=297)", "nfe": 0, **{k: m[k] for k in COLUMNS[:-1]},
             "samples_per_sec": float("nan")}]
    grids = [(rows[0]["row"], x_test[:args.grid])]
    (t_rows, t_grids), timings["teacher_eval_s"] = timed(teacher_rows, teacher_dir, source, args.num_samples,
                                                         grid_noise, key)
    rows += t_rows
    grids += t_grids

    for div in [d for d in args.divergences.split(",") if d]:
        c = student_config(args, teacher_dir, div)
        sdir = os.path.join(workdir, f"student_{div}")
        results, timings[f"student_{div}_s"] = timed(train_row, c, sdir, f"1-step student ({div})")
        row = {"row": f"1-step student ({div})", "nfe": 1, **{k: results[k] for k in COLUMNS},
               "nonfinite_frac": results.get("nonfinite_frac", 0.0), "train_steps": results["step"]}
        rows.append(row)
        obj = objectives.build(c)
        sample = jax.jit(obj.student.sample)
        grids.append((row["row"], np.asarray(sample(generator_params(sdir), grid_noise, grid_labels(len(grid_noise))))))
        print(f"[table] {row}", flush=True)

    timings["total_s"] = time.perf_counter() - t_start
    write_outputs(workdir, rows, grids, timings, source, args)


def write_outputs(workdir, rows, grids, timings, source, args):
    info = {"classifier_test_accuracy": source.classifier.test_accuracy, "num_samples": args.num_samples,
            "devices": jax.device_count(), "timings_s": timings}
    with open(os.path.join(workdir, "table.json"), "w") as f:
        json.dump({"rows": rows, **info}, f, indent=2)
    lines = [
        f"Digits 8x8: teacher vs one-step f-distill students ({args.num_samples} samples per row; features of the "
        f"in-project classifier, test accuracy {source.classifier.test_accuracy:.4f}; class_entropy max "
        f"{np.log(10):.3f}).",
        "",
        "| row | NFE | fd_digits | precision | recall | class_entropy | samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['row']} | {r['nfe']} | {r['fd_digits']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['class_entropy']:.3f} | {r['samples_per_sec']:.0f} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(text)
    plot_image_rows(grids, os.path.join(workdir, "samples.png"))
    print(text, flush=True)


if __name__ == "__main__":
    main()
