"""The analytic Gaussian mixture as a `DataSource` (see `fdistill.data`)."""
from __future__ import annotations

import numpy as np

from fdistill.configs import ConfigError
from fdistill.data import gmm as gmm_lib
from fdistill.evaluation import samples as sample_metrics
from fdistill.sharding import process_slice


class GMMSource:
    """Batches of mixture samples; the global batch of a step depends only on (seed, step).

    `config.data.num_train` chooses what a batch is made of:

    - 0 (the default): `global_batch` fresh exact samples of the mixture, drawn with the NumPy
      stream [seed, 1, step] (an infinite training set: no example is ever seen twice).
    - n > 0: a fixed finite training set of n exact samples, `train_points`, drawn once with the
      stream [seed, 3] (independent of the batches' [seed, 1, step] and `reference`'s
      [seed, 2, seed']); the batch of a step is `global_batch` rows of it chosen uniformly WITH
      replacement by the stream [seed, 1, step] (i.i.d. draws from the empirical distribution, not
      epoch shuffling). The global batch is built in full and each process keeps its
      `process_slice`, so any process count trains on the same rows.

    `reference` and the evaluation stay against the exact mixture whatever num_train is.
    """

    num_classes = 0

    def __init__(self, data_config):
        self.config = data_config
        self.gmm = gmm_lib.from_config(data_config)
        self.shape = (self.gmm.dim,)
        self.seed = int(data_config.get("seed", 0))
        num_train = data_config.get("num_train", 0)
        if isinstance(num_train, bool) or int(num_train) != num_train or num_train < 0:
            raise ConfigError(f"config.data.num_train={num_train!r} must be an integer >= 0 (0 = fresh exact samples "
                             "every step; n > 0 = batches drawn from one fixed training set of n points)")
        self.num_train = int(num_train)
        self.train_points = self.training_set() if self.num_train else None

    def training_set(self) -> np.ndarray:
        """The fixed training set [num_train, dim] (float32), drawn with the stream [seed, 3]."""
        return self.gmm.sample_numpy(np.random.default_rng([self.seed, 3]), self.num_train)

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> dict:
        rng = np.random.default_rng([self.seed, 1, int(step)])
        if self.train_points is None:
            x = self.gmm.sample_numpy(rng, global_batch)
        else:
            x = self.train_points[rng.integers(0, self.num_train, size=global_batch)]
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
