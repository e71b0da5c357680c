"""Sampling throughput measured without compilation."""
from __future__ import annotations

import time
from typing import Any, Callable


def timed_sampling(sample: Callable[[int], Any], n: int, warm_up: int = 256) -> tuple[Any, float]:
    """(sample(n), samples per second). `sample(m)` draws m samples with a sampler jitted for a fixed
    chunk shape; a first call with min(n, warm_up) samples compiles it outside the timed region."""
    sample(min(n, warm_up))
    t0 = time.perf_counter()
    out = sample(n)
    return out, n / max(time.perf_counter() - t0, 1e-9)
