"""The analytic Gaussian mixture as a `DataSource` (see `fdistill.data`)."""
from __future__ import annotations

import numpy as np

from fdistill.data import gmm as gmm_lib
from fdistill.evaluation import samples as sample_metrics
from fdistill.sharding import process_slice


class GMMSource:
    """Batches of exact mixture samples; the batch of a step depends only on (seed, step)."""

    num_classes = 0

    def __init__(self, data_config):
        self.config = data_config
        self.gmm = gmm_lib.from_config(data_config)
        self.shape = (self.gmm.dim,)
        self.seed = int(data_config.get("seed", 0))

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> dict:
        rng = np.random.default_rng([self.seed, 1, int(step)])
        x = self.gmm.sample_numpy(rng, global_batch)
        return {"x": x[process_slice(global_batch, process_index, process_count)]}

    def reference(self, n: int, seed: int = 12345) -> np.ndarray:
        return self.gmm.sample_numpy(np.random.default_rng([self.seed, 2, seed]), n)

    def evaluate_samples(self, x, labels=None) -> dict[str, float]:
        return sample_metrics.gmm_sample_metrics(x, self.gmm, self.reference(len(x)))

    def plot_samples(self, x, path: str, title: str = "") -> str:
        """Scatter of model samples over data samples (first two coordinates)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = np.asarray(x)
        ref = self.reference(len(x))
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.3, c="tab:gray", label="data")
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, c="tab:red", label="model")
        lim = float(np.abs(ref[:, :2]).max()) * 1.3
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.legend(loc="upper right", markerscale=4)
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def make_source(data_config) -> GMMSource:
    return GMMSource(data_config)
