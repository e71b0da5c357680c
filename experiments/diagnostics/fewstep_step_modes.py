"""Mode weights of each step's output of a trained few-step GMM student, and of their mixture.

    python -m experiments.diagnostics.fewstep_step_modes --workdir runs/fewstep_gmm/dmd2_multistep/K4/seed_0

A DMD2 backward-simulation student is trained on a mixture over steps k ~ U{0..K-1} of its outputs
D_gen(x_k; sigma_k), and its one fake score sees that mixture: the objective is at rest when the
*mixture* matches the data, not each step. This prints, for steps k = 0..K-1, the share of samples
nearest each mode, its total-variation distance to the true weights, and the same for the mixture.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from experiments.tables.common import final_samples
from fdistill import configs, objectives
from fdistill.evaluation.samples import mode_histogram


def step_mode_weights(workdir: str, n: int = 8192) -> tuple[list[np.ndarray], np.ndarray]:
    """([K] per-step mode-weight vectors, true weights) for the finished run in `workdir`."""
    config = configs.load_json(os.path.join(workdir, "config.json"))
    obj = objectives.build(config)
    if obj.student.num_steps < 2 or not hasattr(obj.source, "gmm"):
        raise ValueError(f"{workdir}: expected a few-step ('dmd2_multistep' or 'tdm') run on data 'gmm'")
    weights = [step_weights(final_samples(obj, workdir, n, step=k), obj.source.gmm) for k in range(obj.student.num_steps)]
    return weights, np.asarray(obj.source.gmm.weights, np.float64)


def step_weights(x: np.ndarray, gmm) -> np.ndarray:
    """The share of samples nearest each mode."""
    h = mode_histogram(x, gmm)
    return h / h.sum()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--num_samples", type=int, default=8192)
    args = p.parse_args(argv)
    weights, true = step_mode_weights(args.workdir, args.num_samples)
    tv = lambda h: 0.5 * float(np.abs(h - true).sum())  # noqa: E731
    for k, h in enumerate(weights):
        print(f"step {k}: mode weights {np.round(h, 3).tolist()}  TV {tv(h):.3f}")
    mix = np.mean(weights, axis=0)
    print(f"mixture over steps: {np.round(mix, 3).tolist()}  TV {tv(mix):.3f}")
    print(f"true weights:       {np.round(true, 3).tolist()}")


if __name__ == "__main__":
    main()
