"""Reading TRL-format files and storing their tokenized rows: what the preference
(`fdistill.data.hf_preference`) and SFT (`fdistill.data.hf_sft`) readers share.

Rows come from local `.jsonl` (one JSON object per line) or `.parquet` files; messages are
{"role": str, "content": str} dicts, `tools` a list of JSON schemas (or that list as a JSON string).
Tokenized datasets are named by `fingerprint` (the files' contents, the tokenizer files, the
settings, the TRL version whose rules they follow) and written once by `write_once`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

from fdistill.data import tfds_build
from fdistill.data.hf_tokenizer import HFTokenizer
from fdistill.data.preference import epoch_indices
from fdistill.sharding import process_slice

TRL_VERSION = "1.16.0"  # the TRL release whose tokenization the readers reproduce
FORMAT_VERSION = 1  # bump when the records or the tokenization rules change
TRUNCATION_MODES = ("keep_start", "keep_end")


def read_rows(path: str) -> list[tuple[str, dict]]:
    """[(where, row)] of a `.jsonl` or `.parquet` file; `where` names the file and row (and line)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: data file not found")
    if path.endswith(".jsonl"):
        out = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}: row {len(out)} (line {lineno})"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e})") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
                out.append((where, row))
        return out
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow's error, with the file named
            raise ValueError(f"{path}: not a readable parquet file ({e})") from e
        return [(f"{path}: row {i}", row) for i, row in enumerate(rows)]
    raise ValueError(f"{path}: unsupported data file type; expected .jsonl or .parquet")


def parse_messages(value: Any, where: str, field: str) -> list[dict]:
    """The validated list of {"role": str, "content": str, ...} messages of a row's field (None-valued
    keys dropped, as transformers does); ValueError naming `where`, the field and the message."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: field {field!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: field {field!r} message {j} must be an object with 'role' and 'content', "
                             f"got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if m.get(key) is None else type(m[key]).__name__
                raise ValueError(f"{where}: field {field!r} message {j} needs a string {key!r} ({got})")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def parse_tools(row: dict, where: str) -> list | None:
    """A row's `tools` column (a list of JSON schemas, or that list as a JSON string, as TRL accepts)."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: field 'tools' is a string but not JSON ({e})") from e
    if tools is not None and not isinstance(tools, list):
        raise ValueError(f"{where}: field 'tools' must be a list of tool schemas, got {type(tools).__name__}")
    return tools or None


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_truncation(max_length, truncation_mode) -> None:
    """ValueError unless `max_length` is an int >= 2 and `truncation_mode` one of TRUNCATION_MODES."""
    if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} must be an int >= 2 (TRL's default is 1024): sequences are "
                         "truncated and padded to it")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode={truncation_mode!r}; allowed: {list(TRUNCATION_MODES)}")


def file_hash(path: str) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(data_path: str, tok: HFTokenizer, settings: dict, test_path: str | None = None) -> str:
    """The dataset name: a hash of the data file(s)' contents, the tokenizer files and the settings."""
    h = hashlib.sha256()
    parts = {"format": FORMAT_VERSION, "trl": TRL_VERSION, "data": file_hash(data_path),
             "test": file_hash(test_path) if test_path else None, "settings": settings,
             "tokenizer": {os.path.relpath(f, tok.path): file_hash(f) for f in tok.files}}
    h.update(json.dumps(parts, sort_keys=True).encode())
    return "h" + h.hexdigest()[:20]


def padding_id(tok: HFTokenizer) -> int:
    """The id TRL pads with: `pad_token`, else `eos_token` (ValueError when the tokenizer has neither)."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad_id is None:
        raise ValueError(f"{tok.path}: the tokenizer has neither pad_token nor eos_token to pad with")
    return int(pad_id)


def check_split(test_path: str | None, test_fraction: float) -> None:
    """ValueError unless the held-out split is given one way: `test_path`, or `test_fraction` in [0, 1)."""
    if test_path is not None and test_fraction:
        raise ValueError(f"give either test_path ({test_path}) or test_fraction ({test_fraction}), not both")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in [0, 1)")


def split_records(records: list[dict], n_rows: int, test_records: list[dict] | None, test_fraction: float,
                  split_seed: int, data_path: str, what: str = "examples") -> dict[str, list[dict]]:
    """{"train", "test"} records, each renumbered 0.. in its `index`, empty splits left out (TFDS
    writes none; they read as empty): `test_records` (from `test_path`) when given, else a seeded
    `round(test_fraction * n_rows)` of the data file's rows (at least one when test_fraction > 0),
    chosen by each record's `source_row`. ValueError when no training record is left."""
    if test_records is not None:
        splits = {"train": records, "test": test_records}
    else:
        n_test = 0 if not test_fraction else max(1, int(round(test_fraction * n_rows)))
        held = set(np.random.default_rng([int(split_seed), 13]).permutation(n_rows)[:n_test].tolist())
        splits = {"train": [r for r in records if r["source_row"] not in held],
                  "test": [r for r in records if r["source_row"] in held]}
    for recs in splits.values():
        for i, r in enumerate(recs):
            r["index"] = i
    if not splits["train"]:
        raise ValueError(f"{data_path}: no training {what} left (rows {sum(len(v) for v in splits.values())} "
                         f"kept after truncation, test_fraction={test_fraction})")
    return {k: v for k, v in splits.items() if v}


def write_once(make_builder, data_dir: str, dataset: str, name: str) -> None:
    """`tfds_build.prepare_once` of TFDS dataset `<dataset>/<name>` under `data_dir`; on failure its
    directories are removed when empty (TFDS removes its temporary `incomplete.*` directory; never one
    another process is writing into), so an error leaves nothing behind."""
    try:
        tfds_build.prepare_once(make_builder, data_dir, name)
    except BaseException:
        root = os.path.join(data_dir, dataset)
        for d in (os.path.join(root, name), root):
            try:
                os.rmdir(d)
            except OSError:
                pass
        raise


class StoredSplit:
    """One split ('train' | 'test') of a tokenized dataset written by `write_once`, read by random
    access: `records(idx)`, and the deterministic `batch(step, ...)` of the subclass's `rows(idx)`
    (epoch permutations seeded by `seed`, as `fdistill.data.preference.PreferencePairs.batch`;
    only this process's slice is read). `size` counts the split's records, `what` names them."""

    what = "records"

    def __init__(self, builder, dataset: str, name: str, split: str, seq_len: int, pad_id: int, seed: int = 0,
                 vocab_size: int | None = None):
        if not builder.is_prepared():
            raise FileNotFoundError(f"no prepared dataset {dataset}/{name} under {builder.data_dir}")
        if split not in ("train", "test"):
            raise ValueError(f"{builder.data_dir}: unknown split {split!r}; have 'train' and 'test'")
        # no empty split is written (TFDS refuses them): a split that is absent is empty
        self.source, self.split, self.name = builder.as_data_source().get(split, []), split, name
        self.path = str(builder.data_dir)
        self.seq_len, self.pad_id, self.seed, self.vocab_size = int(seq_len), int(pad_id), int(seed), vocab_size
        self.size = len(self.source)

    def records(self, idx) -> list[dict]:
        idx = np.asarray(idx, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise IndexError(f"{self.path} split {self.split!r}: indices outside [0, {self.size})")
        return tfds_build.read_records(self.source, idx, self.path)

    def check_sequence(self, seq: np.ndarray, mask: np.ndarray, where: str, field: str, mask_field: str) -> None:
        """ValueError naming the record and field unless `seq` fits `seq_len` and the vocabulary."""
        if seq.ndim != 1 or seq.shape != mask.shape or len(seq) > self.seq_len:
            raise ValueError(f"{where}: field {field!r} has shape {seq.shape} ({mask_field} {mask.shape}); "
                             f"expected equal 1-D lengths <= {self.seq_len}")
        if self.vocab_size is not None and seq.size and (seq.min() < 0 or seq.max() >= self.vocab_size):
            raise ValueError(f"{where}: field {field!r} holds ids outside [0, {self.vocab_size})")

    def rows(self, idx) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def batch(self, step: int, global_batch: int, process_index: int = 0, process_count: int = 1) -> dict:
        if self.size == 0:
            raise ValueError(f"{self.path} split {self.split!r}: no {self.what}")
        idx = epoch_indices(self.size, global_batch, step, self.seed)
        return self.rows(idx[process_slice(global_batch, process_index, process_count)])
