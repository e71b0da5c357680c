"""TRL-format supervised fine-tuning (SFT) data from local `.jsonl` / `.parquet` files, tokenized as
TRL's `SFTTrainer` does, written once as a local TFDS ArrayRecord dataset and read back by random
access. The SFT counterpart of `fdistill.data.hf_preference`; both read rows, check messages,
split and write through `fdistill.data.trl_files`.

Input rows (TRL's SFT dataset formats, https://huggingface.co/docs/trl/dataset_formats):
  * language modeling:                 {"text": str}
  * prompt-completion:                 {"prompt": str, "completion": str}
  * conversational:                    {"messages": [messages]}
  * conversational prompt-completion:  {"prompt": [messages], "completion": [messages]}
with messages {"role": str, "content": str}. A row with a `prompt` is prompt-completion, else one
with `messages` is conversational, else it needs `text`. Other columns are ignored except `tools`
(a list of JSON schemas, or that list as a JSON string), passed to the chat template as TRL does;
a non-empty `chat_template_kwargs` column is refused (not implemented). Every row of a file must
have row 0's format. A malformed row (a missing field, a wrong type, an empty message list, a
message without a string role/content, a mix of formats) raises a ValueError naming the file, the
row (0-based; jsonl also gives its line) and the field; nothing is written then.

Tokenization follows TRL 1.16.0 (`trl/trainer/sft_trainer.py::SFTTrainer.__init__`,
`SFTTrainer._prepare_dataset`, `DataCollatorForLanguageModeling`; `trl/data_utils.py::_tokenize`,
`common_prefix_length`), checked by tests/fixtures/make_hf_sft_fixtures.py:
  1. non-conversational rows: `eos_token` is appended as text to `text` (language modeling) or to
     `completion` (prompt-completion) unless it already ends with it. Conversational rows get no
     EOS (the chat template writes its end-of-turn tokens).
  2. strings are tokenized with the tokenizer's own special tokens (its post-processor, e.g.
     Llama-3's BOS); conversations by the chat template (`add_special_tokens=False`), the prompt of
     conversational prompt-completion rows with `add_generation_prompt=True`.
  3. prompt-completion rows: `prompt` and `prompt + completion` are tokenized separately (not
     prompt ids + completion ids); the sequence is all of `prompt + completion`'s ids and the
     completion starts where the two stop agreeing (`common_prefix_length`): TRL's
     `completion_mask`.
  4. labels: with `completion_only_loss` (None, the default, means True for prompt-completion
     data and False otherwise) a token is scored only inside the completion; otherwise every token
     is (conversational rows included). `assistant_only_loss=True` is not implemented: TRL 1.16
     masks assistant turns with transformers' `return_assistant_tokens_mask`, which needs
     `{% generation %}` blocks - the tokenizer's template if it has them, else TRL's own training
     template for a template it recognises (Llama-3, Qwen2.5, ...; TRL raises for any other) - and
     `fdistill.data.hf_tokenizer` renders those blocks without the assistant mask; it raises.
  5. `max_length` (TRL's default 1024) with `truncation_mode`: ids and labels are cut to their
     first (`keep_start`, the default) or last (`keep_end`, deprecated in TRL 1.16) `max_length`
     tokens; an example left with no scored token is dropped, as TRL does (records keep
     `source_row`, the row they came from, so dropped rows are the missing ones). TRL's
     `max_length=None` (no truncation) is `max_length` >= the longest sequence here.
  6. padding (the collator): right padding with `pad_token`, else `eos_token`, as TRL does.
Outputs per example (the repo's convention, `fdistill.objectives.language.token_nll`):
`tokens` int32 [max_length]; `loss_mask` float32 [max_length] = 1 where TRL's labels are not -100,
0 on the prompt (when completion-only) and on padding, and 0 at position 0 always (mask[t] = 1
means token t is predicted from the tokens before it; TRL's model shifts the labels, so its label 0
never counts either). An example whose only scored token is position 0 (TRL keeps it; it carries
no loss) raises ValueError naming the row.

Storage as in `hf_preference`: every row is validated and tokenized first, then TFDS dataset
`hf_sft_examples/<name>` is written under `data_dir` (ArrayRecord), `<name>` hashing the data
file(s)' contents, the tokenizer files and the settings; a second `prepare_sft` with the same inputs
reuses it without tokenizing. Batches are read by random access through `tfds_build.read_records`.
The held-out split is a separate file (`test_path`) or a seeded fraction (`test_fraction`) of rows.
"""
from __future__ import annotations

import json
import os

import numpy as np

from fdistill.data import tfds_build, trl_files
from fdistill.data.hf_tokenizer import HFTokenizer

TRL_VERSION = trl_files.TRL_VERSION
FORMAT_VERSION = 1  # bump when the records or the tokenization rules change
FORMATS = ("language_modeling", "prompt_completion", "conversational", "conversational_prompt_completion")
DATASET = "hf_sft_examples"  # the TFDS dataset name of `HfSftExamples`


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
def row_format(row: dict) -> str | None:
    """The SFT format of a row (one of FORMATS), judged as TRL does: `prompt` first (its type tells
    conversational), then `messages`, then `text`; None when it has none of them."""
    if row.get("prompt") is not None:
        return "conversational_prompt_completion" if isinstance(row["prompt"], (list, tuple)) else "prompt_completion"
    if row.get("messages") is not None:
        return "conversational"
    if row.get("text") is not None:
        return "language_modeling"
    return None


def parse_sft_row(row: dict, where: str, expected: str | None = None) -> dict:
    """The validated row {format, text | messages | prompt + completion, tools}. `expected` is row
    0's format."""
    fmt = row_format(row)
    if fmt is None:
        raise ValueError(f"{where}: field 'text' is missing (an SFT row needs 'text', 'messages', or 'prompt' and "
                         f"'completion'; got {sorted(row)})")
    if expected is not None and fmt != expected:
        field = {"language_modeling": "text", "conversational": "messages"}.get(fmt, "prompt")
        raise ValueError(f"{where}: field {field!r}: the row is {fmt.replace('_', ' ')} but row 0 is "
                         f"{expected.replace('_', ' ')}; a file holds one format")
    if row.get("chat_template_kwargs"):
        raise ValueError(f"{where}: field 'chat_template_kwargs' is not supported (only 'tools' is passed to the "
                         "chat template)")
    out = {"format": fmt, "tools": trl_files.parse_tools(row, where)}
    if fmt == "language_modeling":
        if not isinstance(row["text"], str):
            raise ValueError(f"{where}: field 'text' must be a string, got {type(row['text']).__name__}")
        out["text"] = row["text"]
    elif fmt == "conversational":
        out["messages"] = trl_files.parse_messages(row["messages"], where, "messages")
        if not out["messages"]:
            raise ValueError(f"{where}: field 'messages' is an empty list of messages")
    else:
        if row.get("text") is not None:
            raise ValueError(f"{where}: field 'text' next to 'prompt': a row is either language modeling or "
                             "prompt-completion (TRL would append the EOS to 'text' and train on prompt + completion "
                             "without it)")
        if row.get("completion") is None:
            raise ValueError(f"{where}: field 'completion' is missing (a row with a 'prompt' is prompt-completion)")
        if fmt == "prompt_completion":
            for f in ("prompt", "completion"):
                if not isinstance(row[f], str):
                    raise ValueError(f"{where}: field {f!r} must be a string like 'prompt' (or both lists of "
                                     f"messages), got {type(row[f]).__name__}")
                out[f] = row[f]
        else:
            for f in ("prompt", "completion"):
                out[f] = trl_files.parse_messages(row[f], where, f)
                if not out[f]:
                    raise ValueError(f"{where}: field {f!r} is an empty list of messages")
    return out


# ----------------------------------------------------------------------------------------------
# Tokenization (TRL 1.16 SFTTrainer)
# ----------------------------------------------------------------------------------------------
def _template(tok: HFTokenizer, messages: list, where: str, **kw) -> list[int]:
    try:
        return tok.apply_chat_template(messages, tokenize=True, **kw)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - a template's raise_exception names the problem
        raise ValueError(f"{where}: the chat template of {tok.path} failed: {e}") from e


def _with_eos(tok: HFTokenizer, s: str) -> str:
    eos = tok.eos_token
    if eos is None:
        raise ValueError(f"{tok.path}: the tokenizer has no eos_token; non-conversational SFT data needs one "
                         "(TRL appends it to the text / completion)")
    return s if s.endswith(eos) else s + eos


def tokenize_example(tok: HFTokenizer, ex: dict, where: str = "") -> tuple[list[int], list[int] | None]:
    """(input_ids, completion_mask) of a parsed row, steps 1-3 of the module docstring; the
    completion mask is None for language-modeling and conversational rows."""
    fmt, tools = ex["format"], ex["tools"]
    if fmt == "language_modeling":
        return tok.encode(_with_eos(tok, ex["text"]), add_special_tokens=True), None
    if fmt == "conversational":
        return _template(tok, ex["messages"], where, tools=tools), None
    if fmt == "prompt_completion":
        p = tok.encode(ex["prompt"], add_special_tokens=True)
        pc = tok.encode(ex["prompt"] + _with_eos(tok, ex["completion"]), add_special_tokens=True)
    else:
        p = _template(tok, ex["prompt"], where, add_generation_prompt=True, tools=tools)
        pc = _template(tok, ex["prompt"] + ex["completion"], where, tools=tools)
    n = trl_files.common_prefix_length(p, pc)
    return pc, [0] * n + [1] * (len(pc) - n)


def truncate(ids: list[int], scored: list[int], max_length: int, truncation_mode: str):
    """(ids, scored) cut to `max_length` (step 5), or None when TRL drops the example (no scored
    token left)."""
    sl = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
    ids, scored = list(ids)[sl], list(scored)[sl]
    return (ids, scored) if any(scored) else None


def pad_example(tokens, mask, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [seq_len] padded with `pad_id`, loss_mask float32 [seq_len], 0 at position 0)."""
    t = np.full(seq_len, pad_id, np.int32)
    t[: len(tokens)] = tokens
    m = np.zeros(seq_len, np.float32)
    m[: len(mask)] = mask
    m[0] = 0.0  # the first token has no prediction (token_nll ignores it too)
    return t, m


def _check_options(assistant_only_loss, completion_only_loss) -> None:
    if completion_only_loss not in (None, True, False):
        raise ValueError(f"completion_only_loss={completion_only_loss!r} must be None, True or False")
    if assistant_only_loss not in (True, False):
        raise ValueError(f"assistant_only_loss={assistant_only_loss!r} must be True or False")


def tokenize_file(path: str, tok: HFTokenizer, *, max_length: int = 1024, truncation_mode: str = "keep_start",
                  completion_only_loss: bool | None = None, assistant_only_loss: bool = False) -> list[dict]:
    """One record per kept example of a data file: {index, source_row, tokens, loss_mask} (unpadded
    int32; loss_mask is TRL's labels != -100), every row validated first."""
    trl_files.check_truncation(max_length, truncation_mode)
    _check_options(assistant_only_loss, completion_only_loss)
    rows = trl_files.read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    expected = row_format(rows[0][1])
    parsed = [parse_sft_row(row, where, expected) for where, row in rows]
    fmt = parsed[0]["format"]
    if assistant_only_loss:
        if not fmt.startswith("conversational"):
            raise ValueError(f"{path}: assistant_only_loss=True needs conversational data (TRL raises too); the "
                             f"file is {fmt.replace('_', ' ')}")
        raise ValueError(f"{path}: assistant_only_loss=True is not implemented: TRL {TRL_VERSION} masks assistant "
                         "turns with `{% generation %}` blocks in the chat template (its own training template for "
                         "known model families), and fdistill's HFTokenizer renders those blocks without an "
                         "assistant mask. Use assistant_only_loss=False (loss on every token) or prompt-completion "
                         "rows (loss on the completion)")
    completion_only = fmt.endswith("prompt_completion") if completion_only_loss is None else completion_only_loss
    records = []
    for i, ((where, _), ex) in enumerate(zip(rows, parsed)):
        ids, cmask = tokenize_example(tok, ex, where)
        scored = cmask if completion_only and cmask is not None else [1] * len(ids)
        tr = truncate(ids, scored, max_length, truncation_mode)
        if tr is None:
            continue
        if sum(tr[1][1:]) == 0:
            field = {"language_modeling": "text", "conversational": "messages"}.get(fmt, "completion")
            raise ValueError(f"{where}: field {field!r}: the only "
                             f"scored token is the first one, which nothing predicts (max_length={max_length}, "
                             f"truncation_mode={truncation_mode!r}); TRL keeps such an example but it carries no loss")
        records.append({"index": len(records), "source_row": i, "tokens": np.asarray(tr[0], np.int32),
                        "loss_mask": np.asarray(tr[1], np.int32)})
    return records


# ----------------------------------------------------------------------------------------------
# TFDS storage
# ----------------------------------------------------------------------------------------------
def _features(config) -> dict:
    import tensorflow_datasets as tfds

    return {"index": tfds.features.Scalar(np.int64), "source_row": tfds.features.Scalar(np.int64),
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.int32)}


def _builder(data_dir: str, name: str, spec: str = "", records: dict | None = None):
    tfds, Config, Builder = tfds_build.records_builder("HfSftExamples", __file__, {"spec": ""}, _features)
    cfg = Config(name=name, version="1.0.0", description="TRL-format SFT examples " + spec[:300], spec=spec)
    return Builder(data_dir=data_dir, config=cfg, file_format="array_record", splits=records)


def prepare_sft(data_path: str, tokenizer: str | HFTokenizer, data_dir: str, *, max_length: int = 1024,
                truncation_mode: str = "keep_start", test_path: str | None = None, test_fraction: float = 0.0,
                split_seed: int = 0, seed: int = 0, completion_only_loss: bool | None = None,
                assistant_only_loss: bool = False) -> tuple["HFSFTExamples", "HFSFTExamples"]:
    """(train, test) `HFSFTExamples` of a TRL-format SFT file (module docstring).

    The test split is `test_path` when given (then `test_fraction` must be 0), else a seeded
    `round(test_fraction * rows)` of the data file's rows (at least one when test_fraction > 0),
    else empty. `split_seed` draws that split; `seed` orders the training batches."""
    tok = tokenizer if isinstance(tokenizer, HFTokenizer) else HFTokenizer.from_dir(tokenizer)
    trl_files.check_truncation(max_length, truncation_mode)
    _check_options(assistant_only_loss, completion_only_loss)
    trl_files.check_split(test_path, test_fraction)
    pad_id = trl_files.padding_id(tok)
    settings = {"kind": "sft", "sft_format": FORMAT_VERSION, "max_length": int(max_length),
                "truncation_mode": truncation_mode, "completion_only_loss": completion_only_loss,
                "assistant_only_loss": bool(assistant_only_loss), "test_fraction": float(test_fraction),
                "split_seed": int(split_seed), "pad_id": pad_id}
    name = trl_files.fingerprint(data_path, tok, settings, test_path)
    spec = json.dumps({"data": os.path.abspath(data_path), "test": test_path and os.path.abspath(test_path),
                       "tokenizer": os.path.abspath(tok.path), **settings}, sort_keys=True)
    if not _builder(data_dir, name).is_prepared():
        kw = dict(max_length=max_length, truncation_mode=truncation_mode, completion_only_loss=completion_only_loss,
                  assistant_only_loss=assistant_only_loss)
        records = tokenize_file(data_path, tok, **kw)  # raises before anything is written
        test = tokenize_file(test_path, tok, **kw) if test_path is not None else None
        splits = trl_files.split_records(records, len(trl_files.read_rows(data_path)), test, test_fraction, split_seed, data_path)
        trl_files.write_once(lambda: _builder(data_dir, name, spec, splits), data_dir, DATASET, name)
    return tuple(HFSFTExamples(data_dir, name, split, max_length, pad_id, seed=seed, vocab_size=tok.vocab_size)
                 for split in ("train", "test"))


class HFSFTExamples(trl_files.StoredSplit):
    """One split of a prepared SFT dataset as model inputs, read by random access: `rows(idx)` and
    the deterministic `batch(step, ...)` give {tokens [B, L] int32, loss_mask [B, L] float32}."""

    what = "SFT examples"

    def __init__(self, data_dir: str, name: str, split: str, seq_len: int, pad_id: int, seed: int = 0,
                 vocab_size: int | None = None):
        super().__init__(_builder(data_dir, name), DATASET, name, split, seq_len, pad_id, seed, vocab_size)

    @property
    def num_examples(self) -> int:
        return self.size

    def rows(self, idx) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, np.int64).reshape(-1)
        tokens, masks = [], []
        for pos, rec in zip(idx, self.records(idx)):
            seq, mask = np.asarray(rec["tokens"]), np.asarray(rec["loss_mask"])
            self.check_sequence(seq, mask, f"{self.path} split {self.split!r}: record {int(pos)}", "tokens", "loss_mask")
            t, m = pad_example(seq, mask, self.seq_len, self.pad_id)
            tokens.append(t)
            masks.append(m)
        if not tokens:
            return {"tokens": np.zeros((0, self.seq_len), np.int32), "loss_mask": np.zeros((0, self.seq_len), np.float32)}
        return {"tokens": np.stack(tokens), "loss_mask": np.stack(masks)}

    def stats(self, chunk: int = 1024) -> dict[str, float]:
        """Counts and mean lengths of the split (reads every record, `chunk` at a time)."""
        n, seq, scored, full = self.num_examples, 0.0, 0.0, 0.0
        for start in range(0, n, chunk):
            for rec in self.records(np.arange(start, min(n, start + chunk))):
                size = len(np.asarray(rec["tokens"]))
                seq += size
                scored += float(np.asarray(rec["loss_mask"])[1:].sum())
                full += float(size >= self.seq_len)
        d = max(n, 1)
        return {"num_examples": float(n), "mean_sequence_tokens": seq / d, "mean_scored_tokens": scored / d,
                "frac_sequences_at_max_length": full / d, "max_length": float(self.seq_len)}
