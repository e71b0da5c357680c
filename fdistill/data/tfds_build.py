"""Local TFDS datasets: preparing them once when several processes start together, and naming
a corrupt ArrayRecord file when reading fails.

`tfds.core.DatasetBuilder.download_and_prepare` writes into a temporary directory and renames it;
two processes preparing the same dataset in one `data_dir` at once (a multi-process run on one
host, or several runs started side by side) race on that rename and one fails with
FileExistsError. `prepare_once` serialises them with an exclusive `fcntl` lock on
`<data_dir>/.<name>.lock`: the first process builds, the others wait and then find it prepared.

A truncated or bit-flipped ArrayRecord file fails Riegeli's checksums with "Corrupted
Riegeli/records file" and no file name (or, cut short enough, reads back as records of None);
readers read through `read_records`, which then finds the bad file and says which split it holds
and how to write it again.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
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


class CorruptDataError(RuntimeError):
    """A stored dataset file is unreadable (checksum or length errors); the message names it."""


def corrupt_file(dataset_dir: str) -> tuple[str, str, str] | None:
    """(path, split, cause) of the first ArrayRecord file under `dataset_dir` that does not read
    back completely, or None when every file reads."""
    from array_record.python import array_record_module

    for path in sorted(glob.glob(os.path.join(dataset_dir, "*.array_record*"))):
        try:
            reader = array_record_module.ArrayRecordReader(path)
            if not reader.ok():  # a truncated file opens without an error and reads as empty
                reader.read_all()  # raises the reason
                raise RuntimeError("unreadable ArrayRecord file")
            n = reader.num_records()
            for start in range(0, n, 4096):
                reader.read(start, min(start + 4096, n))
            reader.close()
        except Exception as e:  # noqa: BLE001 - any failure to read is corruption
            m = re.search(r"-([^-/]+)\.array_record", os.path.basename(path))
            return path, m.group(1) if m else "?", (str(e).splitlines() or [type(e).__name__])[0]
    return None


def read_records(source, indices, dataset_dir: str, regenerate: str = "") -> list:
    """`source.__getitems__(indices)` (a TFDS data source of the dataset in `dataset_dir`). When the
    read fails, or yields a record whose features are all None (what TFDS returns from a file cut
    short), the ArrayRecord files are checked and a CorruptDataError names the bad one, its split and
    `regenerate` (how to write it again; default: delete the dataset's directory and re-run, for
    datasets that are written when missing). Files are read a second time only on an error."""
    indices = [int(i) for i in indices]
    try:
        records = list(source.__getitems__(indices)) if indices else []
        if any(isinstance(r, dict) and r and all(v is None for v in r.values()) for r in records):
            raise ValueError(f"a record of {dataset_dir} read back empty")
    except Exception as e:
        bad = corrupt_file(str(dataset_dir))
        if bad is None:
            raise
        path, split, cause = bad
        regenerate = regenerate or (f"delete {dataset_dir} and re-run the same command (the dataset is written "
                                    "again when missing)")
        raise CorruptDataError(f"{path} (split {split!r}) is corrupt: {cause}. To regenerate it: {regenerate}") from e
    return records
