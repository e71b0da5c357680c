"""Timing shared by the benchmarks (no JAX or PyTorch import: the PyTorch worker uses it too)."""
from __future__ import annotations

import time


def best_rate(call, seconds: float, windows: int = 3, sync=lambda: None) -> float:
    """Calls/s of `call()`: the best of `windows` windows of `seconds / windows` each, `sync()`
    (waiting for queued device work) closing every window; the best window is the least disturbed
    by other jobs on the machine."""
    rates = []
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / windows:
            call()
            n += 1
        sync()
        rates.append(n / (time.perf_counter() - t0))
    return max(rates)


def run_worker(cmd: list[str], env: dict, what: str, timeout: float = 900) -> dict:
    """Runs a benchmark worker process and returns the JSON object on the last line of its stdout."""
    import json
    import subprocess

    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
