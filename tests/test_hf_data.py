"""Hugging Face tokenizers, chat templates and TRL-format preference data
(fdistill.data.hf_tokenizer, fdistill.data.hf_preference) against the transformers / TRL outputs
recorded by tests/fixtures/make_hf_data_fixtures.py."""
from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest

from fdistill.data import hf_preference as hp
from fdistill.data import tfds_build
from fdistill.data.hf_tokenizer import HFTokenizer
from tests.hf_helpers import fixture_tokenizer, write_jsonl, write_parquet

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
TOKENIZERS = ("tokenizer_llama3", "tokenizer_chatml")


def _load(name):
    with open(os.path.join(FIX, name), encoding="utf-8") as f:
        return json.load(f)


CHAT = _load("chat_templates.json")
DPO = _load("trl_dpo.json")


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOKENIZERS)
def test_chat_template_matches_transformers(name):
    tok, fx = fixture_tokenizer(name), CHAT[name]
    assert tok.vocab_size == fx["vocab_size"]
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "bos_token", "eos_token", "pad_token"):
        assert getattr(tok, attr) == fx[attr], attr
    assert len(fx["chats"]) >= 8
    for c in fx["chats"]:
        kw = dict(add_generation_prompt=c["add_generation_prompt"], tools=c["tools"])
        assert tok.apply_chat_template(c["messages"], **kw) == c["text"], c["name"]
        assert tok.apply_chat_template(c["messages"], tokenize=True, **kw) == c["ids"], c["name"]
    for e in fx["encode"]:
        assert tok.encode(e["text"]) == e["ids"]
        assert tok.encode(e["text"], add_special_tokens=True) == e["ids_special"]
        assert tok.decode(e["ids_special"]) == e["decoded"]
        assert tok.decode(e["ids_special"], skip_special_tokens=False) == e["decoded_special"]


def test_template_sources_and_errors(tmp_path):
    # chat_template.jinja (chatml) and tokenizer_config.json (llama3) are both read
    assert "<|im_start|>" in fixture_tokenizer("tokenizer_chatml").get_chat_template()
    assert "<|start_header_id|>" in fixture_tokenizer("tokenizer_llama3").get_chat_template()
    # the list-of-named-templates form, and a template file that wins over the config
    d = tmp_path / "named"
    shutil.copytree(os.path.join(FIX, "tokenizer_llama3"), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "D{{ messages[0].content }}"},
                            {"name": "tool_use", "template": "T{{ tools | tojson }}"}]
    cfg["bos_token"] = {"content": "<|begin_of_text|>", "lstrip": False}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = HFTokenizer.from_dir(d)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.apply_chat_template(msgs) == "Dhi"
    assert tok.apply_chat_template(msgs, tools=[{"a": "\u00e9<>"}]) == 'T[{"a": "\u00e9<>"}]'  # no HTML escaping
    (d / "chat_template.jinja").write_text("J{{ bos_token }}")
    assert HFTokenizer.from_dir(d).apply_chat_template(msgs) == "J<|begin_of_text|>"
    # no template: the error names tokenizer_config.json
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    os.remove(d / "chat_template.jinja")
    with pytest.raises(ValueError, match="tokenizer_config.json.*no chat template"):
        HFTokenizer.from_dir(d).apply_chat_template(msgs)
    # raise_exception inside a template
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="Unknown role: robot"):
        fixture_tokenizer("tokenizer_chatml").apply_chat_template([{"role": "robot", "content": "x"}])
    # missing / malformed tokenizer.json
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        HFTokenizer.from_dir(d)
    os.remove(d / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        HFTokenizer.from_dir(d)


# ----------------------------------------------------------------------------------------------
# TRL tokenization parity
# ----------------------------------------------------------------------------------------------
def _tokenized(tok, rows, max_length, mode):
    out = []
    for i, row in enumerate(rows):
        ids = hp.tokenize_pair(tok, hp.parse_preference_row(row, f"row {i}"))
        tr = hp.truncate(ids, max_length or 10**6, mode)
        if tr is not None:
            out.append((ids, tr))
    return out


def test_dpo_tokenization_matches_trl():
    assert DPO["trl_version"] == hp.TRL_VERSION
    toks = {n: fixture_tokenizer(n) for n in TOKENIZERS}
    dropped = truncated = 0
    for key, res in DPO["results"].items():
        tname, dname, ml, mode = key.split("/")
        ml = None if ml == "None" else int(ml)
        got = _tokenized(toks[tname], DPO["datasets"][dname], ml, mode)
        assert len(got) == len(res["examples"]), key
        dropped += res["num_input_rows"] - len(got)
        for (ids, tr), e in zip(got, res["examples"]):
            assert ids == {k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}, key
            for side in hp.SIDES:
                assert tr[side][0] == e[f"{side}_input_ids"], key
                assert tr[side][1] == e[f"{side}_completion_mask"], key
                truncated += len(e["prompt_ids"]) + len(e[f"{side}_ids"]) > len(e[f"{side}_input_ids"])
            pad = toks[tname].pad_token_id
            arr = hp.pad_pair(tr, 120, pad)
            for side in hp.SIDES:
                n = len(e[f"{side}_input_ids"])
                np.testing.assert_array_equal(arr[f"{side}_tokens"][:n], e[f"{side}_input_ids"])
                assert np.all(arr[f"{side}_tokens"][n:] == pad)
                np.testing.assert_array_equal(arr[f"{side}_mask"][1:n], e[f"{side}_completion_mask"][1:])
                assert arr[f"{side}_mask"][0] == 0 and arr[f"{side}_lengths"] == arr[f"{side}_mask"].sum()
    assert dropped > 0 and truncated > 0  # the fixtures exercise TRL's drop and both truncations


def test_masks_and_truncation_by_hand():
    ids = {"prompt_ids": [1, 10, 11, 12], "chosen_ids": [20, 21, 2], "rejected_ids": [30, 2]}
    tr = hp.truncate(ids, 8, "keep_start")
    arr = hp.pad_pair(tr, 8, 0)
    np.testing.assert_array_equal(arr["chosen_tokens"], [1, 10, 11, 12, 20, 21, 2, 0])
    np.testing.assert_array_equal(arr["chosen_mask"], [0, 0, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(arr["rejected_mask"], [0, 0, 0, 0, 1, 1, 0, 0])
    assert arr["chosen_lengths"] == 3 and arr["rejected_lengths"] == 2
    assert arr["chosen_tokens"].dtype == np.int32 and arr["chosen_mask"].dtype == np.float32
    # keep_start cuts the end of the response; keep_end the start of the prompt
    assert hp.truncate(ids, 5, "keep_start")["chosen"] == ([1, 10, 11, 12, 20], [0, 0, 0, 0, 1])
    assert hp.truncate(ids, 5, "keep_end")["chosen"] == ([11, 12, 20, 21, 2], [0, 0, 1, 1, 1])
    assert hp.truncate(ids, 4, "keep_start") is None  # TRL drops prompts that fill max_length
    # keep_end cutting the whole prompt: the first token cannot be scored
    arr = hp.pad_pair(hp.truncate(ids, 2, "keep_end"), 4, 0)
    np.testing.assert_array_equal(arr["chosen_tokens"], [21, 2, 0, 0])
    np.testing.assert_array_equal(arr["chosen_mask"], [0, 1, 0, 0])
    # TRL 0.x max_prompt_length (keep the end) and max_completion_length (keep the start)
    tr = hp.truncate(ids, 100, "keep_start", max_prompt_length=2, max_completion_length=2)
    assert tr["chosen"] == ([11, 12, 20, 21], [0, 0, 1, 1]) and tr["rejected"] == ([11, 12, 30, 2], [0, 0, 1, 1])
    # implicit prompts (TRL extract_prompt)
    assert hp.extract_prompt("Q? It is four.", "Q? It is five.") == {"prompt": "Q? It is f", "chosen": "our.",
                                                                     "rejected": "ive."}
    assert hp.extract_prompt("Q? A", "Q? B") == {"prompt": "Q?", "chosen": " A", "rejected": " B"}


# ----------------------------------------------------------------------------------------------
# Files, errors, the stored dataset
# ----------------------------------------------------------------------------------------------
U = [{"role": "user", "content": "Hi?"}]
A = [{"role": "assistant", "content": "Yes."}]
BAD_ROWS = [
    ({"prompt": "Q", "rejected": " no"}, "'chosen' is missing"),
    ({"prompt": "Q", "chosen": 3, "rejected": " no"}, "'chosen' must be a string"),
    ({"prompt": "Q", "chosen": "", "rejected": " no"}, "'chosen' is an empty response"),
    ({"prompt": U, "chosen": A, "rejected": [{"content": "x"}]}, "'rejected' message 0 needs a string 'role'"),
    ({"prompt": U, "chosen": [{"role": "assistant"}], "rejected": A}, "'chosen' message 0 needs a string 'content'"),
    ({"prompt": U, "chosen": A, "rejected": " no"}, "'rejected' must be a list of messages"),
    ({"prompt": "Q", "chosen": A, "rejected": A}, "'chosen': the row is conversational"),  # after standard rows
    ({"chosen": " yes", "rejected": " no"}, "'prompt'"),  # implicit prompt after explicit rows
]


@pytest.mark.parametrize("row,msg", BAD_ROWS)
def test_malformed_rows_name_file_row_field(tmp_path, row, msg):
    good = ({"prompt": U, "chosen": A, "rejected": [{"role": "assistant", "content": "No."}]}
            if isinstance(row.get("prompt"), list) else {"prompt": "Sky?", "chosen": " Blue.", "rejected": " Green."})
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError) as e:
        hp.prepare(path, os.path.join(FIX, "tokenizer_llama3"), str(data_dir), max_length=32)
    assert path in str(e.value) and "row 1 (line 2)" in str(e.value) and msg in str(e.value), str(e.value)
    assert not os.path.exists(data_dir / "hf_preference_pairs")  # nothing written


def test_prepare_jsonl_parquet_batches_reuse_and_corruption(tmp_path, monkeypatch):
    rows = DPO["datasets"]["conversational"]
    tok = fixture_tokenizer("tokenizer_chatml")
    kw = dict(max_length=50, truncation_mode="keep_end")
    tr_j, te_j = hp.prepare(write_jsonl(tmp_path / "p.jsonl", rows), tok, str(tmp_path / "a"), **kw)
    tr_p, te_p = hp.prepare(write_parquet(tmp_path / "p.parquet", rows), tok, str(tmp_path / "b"), **kw)
    assert tr_j.num_pairs == tr_p.num_pairs == 3 and te_j.num_pairs == te_p.num_pairs == 0
    a, b = tr_j.rows([0, 1, 2]), tr_p.rows([0, 1, 2])
    assert set(a) == {f"{s}_{k}" for s in hp.SIDES for k in ("tokens", "mask", "lengths")}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["chosen_tokens"].shape == (3, 50) and a["chosen_tokens"].dtype == np.int32
    assert a["chosen_mask"].dtype == np.float32 and a["chosen_lengths"].shape == (3,)
    for i, e in enumerate(DPO["results"]["tokenizer_chatml/conversational/50/keep_end"]["examples"]):
        np.testing.assert_array_equal(a["chosen_tokens"][i, : len(e["chosen_input_ids"])], e["chosen_input_ids"])
        np.testing.assert_array_equal(a["rejected_mask"][i, 1: len(e["rejected_input_ids"])],
                                      e["rejected_completion_mask"][1:])
    # batches: deterministic, split over processes
    full = tr_j.batch(5, 4)
    halves = [tr_j.batch(5, 4, p, 2) for p in (0, 1)]
    for k in full:
        np.testing.assert_array_equal(full[k], np.concatenate([h[k] for h in halves]))
        np.testing.assert_array_equal(full[k], tr_j.batch(5, 4)[k])
    st = tr_j.stats()
    assert st["num_pairs"] == 3 and st["mean_tokens_chosen"] == pytest.approx(a["chosen_lengths"].mean())
    # a second prepare reuses the dataset without tokenizing
    monkeypatch.setattr(hp, "tokenize_file", lambda *a, **k: pytest.fail("tokenized again"))
    again, _ = hp.prepare(str(tmp_path / "p.jsonl"), tok, str(tmp_path / "a"), **kw)
    assert again.path == tr_j.path
    monkeypatch.undo()
    # a corrupt ArrayRecord file: CorruptDataError naming it
    f = sorted(glob.glob(os.path.join(tr_j.path, "*train*.array_record*")))[0]
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    fresh, _ = hp.prepare(str(tmp_path / "p.jsonl"), tok, str(tmp_path / "a"), **kw)
    with pytest.raises(tfds_build.CorruptDataError, match="array_record"):
        fresh.rows([0, 1, 2])


def test_splits_sft_free_settings_and_failed_write(tmp_path, monkeypatch):
    rows = [{"prompt": f"Question {i}?", "chosen": " It is blue.", "rejected": " No."} for i in range(10)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    tok_dir = os.path.join(FIX, "tokenizer_llama3")
    tr, te = hp.prepare(path, tok_dir, str(tmp_path / "d"), max_length=24, test_fraction=0.3, split_seed=1)
    assert (tr.num_pairs, te.num_pairs) == (7, 3)
    tr2, te2 = hp.prepare(path, tok_dir, str(tmp_path / "d"), max_length=24, test_fraction=0.3, split_seed=1)
    np.testing.assert_array_equal(te.rows([0, 1, 2])["chosen_tokens"], te2.rows([0, 1, 2])["chosen_tokens"])
    # a separate test file
    test_path = write_jsonl(tmp_path / "t.jsonl", rows[:2])
    tr, te = hp.prepare(path, tok_dir, str(tmp_path / "d"), max_length=24, test_path=test_path)
    assert (tr.num_pairs, te.num_pairs) == (10, 2)
    with pytest.raises(ValueError, match="max_length"):
        hp.prepare(path, tok_dir, str(tmp_path / "d"), max_length=None)
    with pytest.raises(ValueError, match="truncation_mode"):
        hp.prepare(path, tok_dir, str(tmp_path / "d"), max_length=24, truncation_mode="middle")
    # a failure while TFDS writes leaves no dataset directory behind
    real = hp.tokenize_file

    def broken(*a, **k):
        recs = real(*a, **k)
        recs[-1]["chosen_tokens"] = np.zeros((2, 2), np.int32)  # the writer rejects this shape
        return recs

    monkeypatch.setattr(hp, "tokenize_file", broken)
    data_dir = tmp_path / "broken"
    with pytest.raises(Exception):
        hp.prepare(path, tok_dir, str(data_dir), max_length=24)
    assert not os.path.exists(data_dir / "hf_preference_pairs"), os.listdir(data_dir)
