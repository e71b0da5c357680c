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
import tempfile
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


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silences TFDS's absl warnings ('Using custom data configuration ...', 'Variant folder ...
    has no dataset_info.json') for one block: expected for the datasets written here."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _scratch_tempdir() -> Iterator[None]:
    """Points `tempfile` at a scratch directory, removed at the end of the block. TFDS 4.9 creates
    an empty temporary directory (`DatasetInfo.initialize_from_bucket`, for GCS metadata, even with
    GCS disabled) whenever a builder of an unprepared dataset is created, and never removes it:
    without this, every dataset written leaves a `/tmp/tmp*tfds` behind."""
    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="fdistill_tfds_") as scratch:
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = previous


def prepare_once(make_builder: Callable, data_dir: str, name: str):
    """The prepared builder `make_builder()`, built offline (no GCS, no download) under the lock by
    whichever process gets there first; the builder is re-created after waiting so that it sees the
    dataset another process wrote."""
    import tensorflow_datasets as tfds

    with quiet(), _scratch_tempdir():
        builder = make_builder()
        if builder.is_prepared():
            return builder
        with exclusive(data_dir, name):
            builder = make_builder()
            if not builder.is_prepared():
                tfds.disable_progress_bar()  # per-record progress bars of small local datasets
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


_RECORD_BUILDERS: dict = {}


def records_builder(class_name: str, code_file: str, config_fields: dict, features: Callable):
    """(tfds, config class, builder class) of a TFDS dataset written from in-memory records (the
    preference pairs of the language and diffusion objectives), defined once per `class_name`
    (TFDS names the dataset after it: `SyntheticPreferencePairs` -> `synthetic_preference_pairs`).

    The builder is created as `Builder(data_dir=..., config=ConfigClass(name=..., version='1.0.0',
    description=..., **config_fields), file_format='array_record', splits={split: records})`, each
    record a dict with an integer 'index' (its key); `features(builder_config)` returns the dict of
    TFDS features. Importing TFDS takes a moment, so nothing is defined before the first call.
    """
    if class_name in _RECORD_BUILDERS:
        return _RECORD_BUILDERS[class_name]
    import dataclasses

    import tensorflow_datasets as tfds

    config_cls = dataclasses.make_dataclass(
        f"{class_name}Config", [(k, type(v), dataclasses.field(default=v)) for k, v in config_fields.items()],
        bases=(tfds.core.BuilderConfig,), eq=False)

    def __init__(self, *, splits: dict | None = None, **kwargs):
        self._splits = splits
        with quiet():
            tfds.core.GeneratorBasedBuilder.__init__(self, **kwargs)

    def is_prepared(self):
        with quiet():
            return tfds.core.GeneratorBasedBuilder.is_prepared(self)

    def code_path(cls):
        # TFDS derives it from the top-level package, which for an editable install needs the
        # missing `importlib_resources` backport; the module defining the records is the code.
        from etils import epath

        return epath.Path(os.path.abspath(code_file))

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description,
                                     features=tfds.features.FeaturesDict(features(self.builder_config)))

    def _split_generators(self, dl_manager):
        if self._splits is None:
            raise RuntimeError(f"{class_name}: no records were given to write")
        return {split: ((int(r["index"]), r) for r in records) for split, records in self._splits.items()}

    builder_cls = type(class_name, (tfds.core.GeneratorBasedBuilder,), {
        "__module__": __name__, "__doc__": f"In-memory records written as a TFDS dataset ({class_name}).",
        "VERSION": tfds.core.Version("1.0.0"), "RELEASE_NOTES": {"1.0.0": "Initial release."},
        "__init__": __init__, "is_prepared": is_prepared,
        "code_path": tfds.core.utils.classproperty(classmethod(code_path)),
        "_info": _info, "_split_generators": _split_generators,
        "_generate_examples": lambda self, records: records,
    })
    _RECORD_BUILDERS[class_name] = (tfds, config_cls, builder_cls)
    return _RECORD_BUILDERS[class_name]
