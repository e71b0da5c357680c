"""Preparing local TFDS datasets once when several processes start together.

`tfds.core.DatasetBuilder.download_and_prepare` writes into a temporary directory and renames it;
two processes preparing the same dataset in one `data_dir` at once (a multi-process run on one
host, or several runs started side by side) race on that rename and one fails with
FileExistsError. `prepare_once` serialises them with an exclusive `fcntl` lock on
`<data_dir>/.<name>.lock`: the first process builds, the others wait and then find it prepared.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Callable, Iterator


@contextlib.contextmanager
def exclusive(data_dir: str, name: str) -> Iterator[None]:
    """An exclusive inter-process lock (blocking) on `<data_dir>/.<name>.lock`."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{name.replace('/', '_')}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_once(make_builder: Callable, data_dir: str, name: str):
    """The prepared builder `make_builder()`, built offline (no GCS, no download) under the lock by
    whichever process gets there first; the builder is re-created after waiting so that it sees the
    dataset another process wrote."""
    import tensorflow_datasets as tfds

    builder = make_builder()
    if builder.is_prepared():
        return builder
    with exclusive(data_dir, name):
        builder = make_builder()
        if not builder.is_prepared():
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
