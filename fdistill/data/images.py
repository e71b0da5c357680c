"""The image input pipeline shared by the image data sources (`digits`, `tfds:<name>`).

Order: the training stream is the concatenation of per-epoch permutations of the N examples,
epoch e being `np.random.default_rng([seed, e]).permutation(N)`. The global batch of step s is
stream positions [s B, (s + 1) B), and process p of P loads rows [p B / P, (p + 1) B / P) of it
(the loop then places these process-local rows on the 'data' mesh axis). The pipeline therefore has
no state beyond the step: its position is `state.step`, saved in every checkpoint, so a restored
run continues with exactly the batch an uninterrupted run would have used, on any number of
devices or processes.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from fdistill.sharding import process_slice

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fdistill", "tfds")


def data_dir_from_config(data_config) -> str:
    """`config.data.data_dir`, else $FDISTILL_DATA_DIR, else ~/.cache/fdistill/tfds."""
    d = data_config.get("data_dir", None) or os.environ.get("FDISTILL_DATA_DIR") or DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(d))


class EpochShuffler:
    """Indices of the examples in a (step, global_batch) batch; see the module docstring."""

    def __init__(self, num_examples: int, seed: int, cache: int = 4):
        if num_examples < 1:
            raise ValueError("an image source needs at least one example")
        self.n = int(num_examples)
        self.seed = int(seed)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache = cache

    def permutation(self, epoch: int) -> np.ndarray:
        epoch = int(epoch)
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            while len(self._perms) > self._cache:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def indices(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        rows = process_slice(global_batch, process_index, process_count)
        pos = int(step) * int(global_batch) + np.arange(rows.start, rows.stop, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(len(pos), np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(e)[offsets[sel]]
        return out


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]; float images are taken to be in [-1, 1] already."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


def image_grid(x: np.ndarray, ncols: int | None = None) -> np.ndarray:
    """Tiles images [n, H, W, C] in [-1, 1] into one [rows H', cols W', C] array in [0, 1] with a
    1-pixel border between tiles."""
    x = np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)
    x = np.nan_to_num(x, nan=0.0)
    n, h, w, c = x.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.ones((nrows * (h + 1) + 1, ncols * (w + 1) + 1, c), np.float32)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
    return grid


def plot_image_grid(x, path: str, title: str = "", max_images: int = 100, ncols: int = 10) -> str:
    """Writes a PNG grid of the first `max_images` images of x [n, H, W, C] (values in [-1, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(x)[:max_images]
    grid = image_grid(x, min(ncols, len(x)))
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + 0.4))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0.0, vmax=1.0,
              interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
