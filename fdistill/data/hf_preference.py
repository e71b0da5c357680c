"""TRL-format preference data (DPO family) from local `.jsonl` / `.parquet` files, tokenized as TRL's
`DPOTrainer` does, written once as a local TFDS ArrayRecord dataset and read back by random access.

Input rows (TRL's dataset formats, https://huggingface.co/docs/trl/dataset_formats):
  * standard, explicit prompt:       {"prompt": str, "chosen": str, "rejected": str}
  * standard, implicit prompt:       {"chosen": str, "rejected": str}  (the prompt is their common prefix)
  * conversational, explicit prompt: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  * conversational, implicit prompt: {"chosen": [messages], "rejected": [messages]}
with messages {"role": str, "content": str}. Other columns are ignored except `tools` (a list of
JSON schemas, or that list as a JSON string), which is passed to the chat template as TRL does.
Every row of a file must have the same format as row 0. A malformed row (a missing field, a wrong
type, an empty response, a message without a string role/content, a mix of formats) raises a
ValueError naming the file, the row (0-based; jsonl also gives its line) and the field.

Tokenization follows TRL 1.16.0 (`trl/trainer/dpo_trainer.py::DPOTrainer._prepare_dataset` and
`DataCollatorForPreference`; `trl/data_utils.py::extract_prompt`, `common_prefix_length`):
  1. implicit prompt: `extract_prompt` - the prompt is the longest common prefix of chosen and
     rejected (characters for strings, with a trailing space handed back to the responses; whole
     messages for conversations).
  2. standard rows: `eos_token` is appended to chosen and rejected as text unless they already end
     with it; prompt, prompt + chosen and prompt + rejected are each tokenized with the tokenizer's
     own special tokens (its post-processor, e.g. Llama-3's BOS).
     conversational rows: the chat template renders and tokenizes (`add_special_tokens=False`)
     the prompt with `add_generation_prompt=True`, and prompt + chosen, prompt + rejected without
     it (the template writes BOS and the end-of-turn tokens itself; no EOS is appended).
  3. the prompt ends where the tokenized prompt and both prompt + response sequences stop agreeing
     (`common_prefix_length`); chosen/rejected ids are the rest of prompt + chosen/rejected.
  4. (TRL 0.x only) `max_prompt_length` keeps the *last* `max_prompt_length` prompt tokens and
     `max_completion_length` the *first* `max_completion_length` response tokens: the rule of TRL
     0.x's `DPOTrainer.tokenize_row` (e.g. TRL 0.19), whose options TRL 1.x removed. None (the
     default) skips them, which is TRL 1.16's behaviour. They apply to the token lists of step 3.
  5. `max_length` (TRL's default 1024) with `truncation_mode`: each sequence prompt + response is
     cut to its first (`keep_start`, the default) or last (`keep_end`) `max_length` tokens, as
     `DataCollatorForPreference` does; with `keep_start`, a pair whose prompt alone has
     >= max_length tokens is dropped, as `_prepare_dataset` does (records keep `source_row`, the
     row they came from, so dropped rows are the missing ones; `prepare` stores nothing for them).
Outputs per pair (the repo's convention, `fdistill.objectives.preference.sequence_logps`):
`chosen_tokens`, `rejected_tokens` int32 [max_length] = prompt ids + response ids padded with the pad
id (eos when the tokenizer has no pad, as TRL does); `chosen_mask`, `rejected_mask` float32 = 1 on
response tokens (the end-of-turn / EOS tokens included), 0 on the prompt and padding - TRL's
`completion_mask`, except that position 0 is always 0 (no prediction scores the first token; it
matters only when `keep_end` cut the whole prompt away); `chosen_lengths`, `rejected_lengths`
float32 = the number of masked tokens. A pair left with no scored response token raises ValueError.

Storage: `prepare` validates and tokenizes every row first (nothing is written when a row is bad),
then writes TFDS dataset `hf_preference_pairs/<name>` under `data_dir` (ArrayRecord; TFDS writes
into a temporary directory and renames it), `<name>` hashing the data file(s)' contents, the
tokenizer files and the truncation settings, under `tfds_build.prepare_once`'s lock; a second
`prepare` with the same inputs reuses it without tokenizing. Batches are read by random access
(`as_data_source()`), through `tfds_build.read_records` (a corrupt file raises `CorruptDataError`).
The held-out split is either a separate file (`test_path`) or a deterministic seeded fraction
(`test_fraction`) of the data file's rows. `fdistill.data.hf_sft` (TRL SFT data) uses this module's
row reading, message/tool checks, fingerprint, split and write helpers.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from fdistill.data import tfds_build, trl_files
from fdistill.data.hf_tokenizer import HFTokenizer
from fdistill.data.trl_files import (TRL_VERSION, TRUNCATION_MODES, check_split, check_truncation,  # noqa: F401
                                     common_prefix_length, fingerprint, padding_id, parse_messages, parse_tools,
                                     read_rows, split_records, write_once)

SIDES = ("chosen", "rejected")


# ----------------------------------------------------------------------------------------------
# Reading rows
# ----------------------------------------------------------------------------------------------
def row_format(row: dict) -> tuple[bool, bool]:
    """(conversational, explicit prompt) of a row, judged by its `chosen` field and `prompt` key."""
    return isinstance(row.get("chosen"), (list, tuple)), row.get("prompt") is not None


def parse_preference_row(row: dict, where: str, expected: tuple[bool, bool] | None = None) -> dict:
    """The validated row {prompt, chosen, rejected, conversational, tools} with an implicit prompt
    extracted (TRL `extract_prompt`). `expected` is row 0's `row_format`."""
    for field in SIDES:
        if row.get(field) is None:
            raise ValueError(f"{where}: field {field!r} is missing (a preference row needs 'chosen' and "
                             "'rejected', and optionally 'prompt')")
    conv, explicit = row_format(row)
    if expected is not None and (conv, explicit) != expected:
        name = {(False, True): "standard with a prompt", (False, False): "standard with an implicit prompt",
                (True, True): "conversational with a prompt", (True, False): "conversational with an implicit prompt"}
        raise ValueError(f"{where}: field {'chosen' if conv != expected[0] else 'prompt'!r}: the row is "
                         f"{name[(conv, explicit)]} but row 0 is {name[expected]}; a file holds one format")
    fields = ("prompt",) + SIDES if explicit else SIDES
    if conv:
        vals = {f: parse_messages(row[f], where, f) for f in fields}
    else:
        vals = {}
        for f in fields:
            if not isinstance(row[f], str):
                raise ValueError(f"{where}: field {f!r} must be a string like 'chosen' "
                                 f"(or every field a list of messages), got {type(row[f]).__name__}")
            vals[f] = row[f]
    for f in SIDES:
        if len(vals[f]) == 0:
            raise ValueError(f"{where}: field {f!r} is an empty response")
    if not explicit:
        vals = extract_prompt(vals["chosen"], vals["rejected"])
        for f in SIDES:
            if len(vals[f]) == 0:
                raise ValueError(f"{where}: field {f!r} is empty once the prompt shared with the other response "
                                 "is removed (implicit-prompt rows need chosen and rejected to differ at the end)")
    if conv and not vals["prompt"]:
        raise ValueError(f"{where}: field 'prompt' is an empty list of messages"
                         f"{'' if explicit else ' (chosen and rejected share no leading message)'}")
    return {**vals, "conversational": conv, "tools": parse_tools(row, where)}


def extract_prompt(chosen: Sequence, rejected: Sequence) -> dict:
    """TRL `extract_prompt`: the longest common prefix of chosen and rejected is the prompt (for
    strings a space just before the split goes back to the responses). As in TRL, when one is a
    prefix of the other the split is one element before the shorter one ends."""
    n = min(len(chosen), len(rejected))
    idx = n - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    idx = max(idx, 0)
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


# ----------------------------------------------------------------------------------------------
# Tokenization (TRL 1.16 DPOTrainer)
# ----------------------------------------------------------------------------------------------
def tokenize_pair(tok: HFTokenizer, ex: dict, where: str = "") -> dict[str, list[int]]:
    """{prompt_ids, chosen_ids, rejected_ids} of a parsed row, steps 2-3 of the module docstring."""
    if ex["conversational"]:
        try:
            p = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True, tools=ex["tools"])
            pc = tok.apply_chat_template(ex["prompt"] + ex["chosen"], tokenize=True, tools=ex["tools"])
            pr = tok.apply_chat_template(ex["prompt"] + ex["rejected"], tokenize=True, tools=ex["tools"])
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a template's raise_exception names the problem
            raise ValueError(f"{where}: the chat template of {tok.path} failed: {e}") from e
    else:
        eos = tok.eos_token
        if eos is None:
            raise ValueError(f"{tok.path}: the tokenizer has no eos_token; standard-format preference data "
                             "needs one to end the responses (TRL appends it)")
        chosen, rejected = (s if s.endswith(eos) else s + eos for s in (ex["chosen"], ex["rejected"]))
        p = tok.encode(ex["prompt"], add_special_tokens=True)
        pc = tok.encode(ex["prompt"] + chosen, add_special_tokens=True)
        pr = tok.encode(ex["prompt"] + rejected, add_special_tokens=True)
    n = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
    return {"prompt_ids": p[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}


def truncate(ids: dict[str, list[int]], max_length: int, truncation_mode: str,
             max_prompt_length: int | None = None, max_completion_length: int | None = None):
    """{side: (tokens, mask)} after steps 4-5 (mask as TRL's completion_mask), or None when TRL
    drops the pair (keep_start and a prompt of >= max_length tokens)."""
    prompt = list(ids["prompt_ids"])
    if max_prompt_length is not None:
        prompt = prompt[len(prompt) - max_prompt_length:] if len(prompt) > max_prompt_length else prompt
    if truncation_mode == "keep_start" and len(prompt) >= max_length:
        return None
    out = {}
    for side in SIDES:
        resp = list(ids[f"{side}_ids"])
        if max_completion_length is not None:
            resp = resp[:max_completion_length]
        seq, mask = prompt + resp, [0] * len(prompt) + [1] * len(resp)
        sl = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        out[side] = (seq[sl], mask[sl])
    return out


def pad_pair(tr: dict, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The padded arrays of one pair ({side}_tokens/_mask [seq_len], {side}_lengths scalar)."""
    out = {}
    for side in SIDES:
        seq, mask = tr[side]
        tokens = np.full(seq_len, pad_id, np.int32)
        tokens[: len(seq)] = seq
        m = np.zeros(seq_len, np.float32)
        m[: len(mask)] = mask
        m[0] = 0.0  # the first token has no prediction (sequence_logps ignores it too)
        out[f"{side}_tokens"], out[f"{side}_mask"], out[f"{side}_lengths"] = tokens, m, np.float32(m.sum())
    return out


def _check_settings(max_length, truncation_mode, max_prompt_length, max_completion_length):
    check_truncation(max_length, truncation_mode)
    for name, v in (("max_prompt_length", max_prompt_length), ("max_completion_length", max_completion_length)):
        if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name}={v!r} must be None or an int >= 1")


def tokenize_file(path: str, tok: HFTokenizer, *, max_length: int = 1024, truncation_mode: str = "keep_start",
                  max_prompt_length: int | None = None, max_completion_length: int | None = None) -> list[dict]:
    """One record per kept pair of a data file: {index, source_row, chosen_tokens, chosen_mask,
    rejected_tokens, rejected_mask} (unpadded int32 lists), every row validated first."""
    _check_settings(max_length, truncation_mode, max_prompt_length, max_completion_length)
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    expected = row_format(rows[0][1]) if rows[0][1].get("chosen") is not None else None
    records = []
    for i, (where, row) in enumerate(rows):
        ex = parse_preference_row(row, where, expected)
        tr = truncate(tokenize_pair(tok, ex, where), max_length, truncation_mode, max_prompt_length,
                      max_completion_length)
        if tr is None:
            continue
        rec = {"index": len(records), "source_row": i}
        for side in SIDES:
            seq, mask = tr[side]
            if sum(mask[1:]) == 0:
                raise ValueError(f"{where}: field {side!r} keeps no scored response token after truncation "
                                 f"(max_length={max_length}, truncation_mode={truncation_mode!r}, "
                                 f"max_completion_length={max_completion_length})")
            rec[f"{side}_tokens"] = np.asarray(seq, np.int32)
            rec[f"{side}_mask"] = np.asarray(mask, np.int32)
        records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------
# TFDS storage
# ----------------------------------------------------------------------------------------------
def _features(config) -> dict:
    import tensorflow_datasets as tfds

    f = {"index": tfds.features.Scalar(np.int64), "source_row": tfds.features.Scalar(np.int64)}
    for side in SIDES:
        f[f"{side}_tokens"] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
        f[f"{side}_mask"] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    return f


def _builder(data_dir: str, name: str, spec: str = "", records: dict | None = None):
    tfds, Config, Builder = tfds_build.records_builder("HfPreferencePairs", __file__, {"spec": ""}, _features)
    cfg = Config(name=name, version="1.0.0", description="TRL-format preference pairs " + spec[:300], spec=spec)
    return Builder(data_dir=data_dir, config=cfg, file_format="array_record", splits=records)


def prepare(data_path: str, tokenizer: str | HFTokenizer, data_dir: str, *, max_length: int = 1024,
            truncation_mode: str = "keep_start", max_prompt_length: int | None = None,
            max_completion_length: int | None = None, test_path: str | None = None, test_fraction: float = 0.0,
            split_seed: int = 0, seed: int = 0) -> tuple["HFPreferencePairs", "HFPreferencePairs"]:
    """(train, test) `HFPreferencePairs` of a TRL-format preference file (module docstring).

    The test split is `test_path` when given (then `test_fraction` must be 0), else a seeded
    `round(test_fraction * rows)` of the data file's rows (at least one when test_fraction > 0),
    else empty. `split_seed` draws that split; `seed` orders the training batches."""
    tok = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer.from_dir(tokenizer)
    _check_settings(max_length, truncation_mode, max_prompt_length, max_completion_length)
    check_split(test_path, test_fraction)
    pad_id = padding_id(tok)
    settings = {"max_length": int(max_length), "truncation_mode": truncation_mode,
                "max_prompt_length": max_prompt_length, "max_completion_length": max_completion_length,
                "test_fraction": float(test_fraction), "split_seed": int(split_seed), "pad_id": int(pad_id)}
    name = fingerprint(data_path, tok, settings, test_path)
    spec = json.dumps({"data": os.path.abspath(data_path), "test": test_path and os.path.abspath(test_path),
                       "tokenizer": os.path.abspath(tok.path), **settings}, sort_keys=True)
    if not _builder(data_dir, name).is_prepared():
        kw = dict(max_length=max_length, truncation_mode=truncation_mode, max_prompt_length=max_prompt_length,
                  max_completion_length=max_completion_length)
        records = tokenize_file(data_path, tok, **kw)  # raises before anything is written
        test = tokenize_file(test_path, tok, **kw) if test_path is not None else None
        splits = split_records(records, len(read_rows(data_path)), test, test_fraction, split_seed, data_path,
                               "pairs")
        write_once(lambda: _builder(data_dir, name, spec, splits), data_dir, "hf_preference_pairs", name)
    return (HFPreferencePairs(data_dir, name, "train", max_length, pad_id, seed=seed, vocab_size=tok.vocab_size),
            HFPreferencePairs(data_dir, name, "test", max_length, pad_id, seed=seed, vocab_size=tok.vocab_size))


class HFPreferencePairs(trl_files.StoredSplit):
    """One split of a prepared dataset as model inputs, read by random access: `rows(idx)` and the
    deterministic `batch(step, ...)` give {chosen,rejected}_{tokens [B, L] int32, mask [B, L]
    float32, lengths [B] float32} (plus ref_{chosen,rejected}_logps after `set_reference_logps`)."""

    what = "preference pairs"

    def __init__(self, data_dir: str, name: str, split: str, seq_len: int, pad_id: int, seed: int = 0,
                 vocab_size: int | None = None):
        super().__init__(_builder(data_dir, name), "hf_preference_pairs", name, split, seq_len, pad_id, seed,
                         vocab_size)
        self.reference: dict[str, np.ndarray] = {}

    @property
    def num_pairs(self) -> int:
        return self.size

    def set_reference_logps(self, chosen: np.ndarray, rejected: np.ndarray) -> None:
        self.reference = {"ref_chosen_logps": np.asarray(chosen, np.float32),
                          "ref_rejected_logps": np.asarray(rejected, np.float32)}

    def rows(self, idx) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, np.int64).reshape(-1)
        out: dict[str, list] = {}
        for pos, rec in zip(idx, self.records(idx)):
            where = f"{self.path} split {self.split!r}: record {int(pos)}"
            tr = {}
            for side in SIDES:
                seq, mask = np.asarray(rec[f"{side}_tokens"]), np.asarray(rec[f"{side}_mask"])
                self.check_sequence(seq, mask, where, f"{side}_tokens", "mask")
                tr[side] = (seq, mask)
            for k, v in pad_pair(tr, self.seq_len, self.pad_id).items():
                out.setdefault(k, []).append(v)
        if not out:
            return {f"{s}_{k}": np.zeros((0, self.seq_len) if k != "lengths" else (0,),
                                         np.int32 if k == "tokens" else np.float32)
                    for s in SIDES for k in ("tokens", "mask", "lengths")}
        res = {k: np.stack(v) for k, v in out.items()}
        for k, v in self.reference.items():
            res[k] = v[idx]
        return res

    def stats(self, chunk: int = 1024) -> dict[str, float]:
        """Counts and mean lengths of the split (reads every record, `chunk` at a time)."""
        n, acc = self.num_pairs, {"chosen": 0.0, "rejected": 0.0, "chosen_longer": 0.0, "seq": 0.0, "full": 0.0}
        for start in range(0, n, chunk):
            for rec in self.records(np.arange(start, min(n, start + chunk))):
                lens = {s: float(np.asarray(rec[f"{s}_mask"])[1:].sum()) for s in SIDES}
                acc["chosen"] += lens["chosen"]
                acc["rejected"] += lens["rejected"]
                acc["chosen_longer"] += float(lens["chosen"] > lens["rejected"])
                for s in SIDES:
                    size = len(np.asarray(rec[f"{s}_tokens"]))
                    acc["seq"] += size / 2
                    acc["full"] += float(size >= self.seq_len) / 2
        d = max(n, 1)
        return {"num_pairs": float(n), "mean_tokens_chosen": acc["chosen"] / d,
                "mean_tokens_rejected": acc["rejected"] / d, "chosen_longer": acc["chosen_longer"] / d,
                "mean_sequence_tokens": acc["seq"] / d, "frac_sequences_at_max_length": acc["full"] / d,
                "max_length": float(self.seq_len)}
