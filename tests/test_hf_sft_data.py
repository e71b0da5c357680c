"""TRL-format SFT data (fdistill.data.hf_sft) against the TRL 1.16 `SFTTrainer` outputs recorded by
tests/fixtures/make_hf_sft_fixtures.py, plus masks by hand, malformed rows and storage."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fdistill.data import hf_preference as hp
from fdistill.data import hf_sft
from tests.hf_helpers import fixture_tokenizer, write_jsonl, write_parquet

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
with open(os.path.join(FIX, "trl_sft.json"), encoding="utf-8") as _f:
    SFT = json.load(_f)
U = [{"role": "user", "content": "Sky?"}]
A = [{"role": "assistant", "content": "Blue."}]


# ----------------------------------------------------------------------------------------------
# Parity with TRL
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(SFT["results"]))
def test_matches_trl_sft_trainer(tmp_path, key):
    assert SFT["trl_version"] == hf_sft.TRL_VERSION
    tname, dname, max_length, mode, col = key.split("/")
    res, tok = SFT["results"][key], fixture_tokenizer(tname)
    path = write_jsonl(tmp_path / "d.jsonl", SFT["datasets"][dname])
    recs = hf_sft.tokenize_file(path, tok, max_length=1 << 20 if max_length == "None" else int(max_length),
                                truncation_mode=mode, completion_only_loss={"None": None, "False": False}[col])
    assert len(recs) == len(res["examples"])
    assert hp.padding_id(tok) == res["pad_token_id"]
    for rec, ex in zip(recs, res["examples"]):
        assert rec["tokens"].tolist() == ex["input_ids"]
        assert rec["loss_mask"].tolist() == [int(lab != -100) for lab in ex["labels"]]
        # padded: tokens then pad ids; the mask drops position 0 and padding
        n, seq_len = len(ex["input_ids"]), len(ex["input_ids"]) + 3
        t, m = hf_sft.pad_example(rec["tokens"], rec["loss_mask"], seq_len, res["pad_token_id"])
        assert t.dtype == np.int32 and m.dtype == np.float32
        assert t.tolist() == ex["input_ids"] + [res["pad_token_id"]] * 3
        assert m.tolist() == [0.0] + [float(lab != -100) for lab in ex["labels"][1:]] + [0.0] * 3
        assert n <= (1 << 20 if max_length == "None" else int(max_length))


def test_fixture_covers_drops_and_assistant_only_loss():
    r = SFT["results"]
    # keep_start drops rows whose prompt fills max_length (TRL's filter), keep_end keeps them
    assert len(r["tokenizer_llama3/prompt_completion/12/keep_start/None"]["examples"]) == 2
    assert len(r["tokenizer_llama3/prompt_completion/12/keep_end/None"]["examples"]) == 3
    assert r["tokenizer_chatml/prompt_completion/None/keep_start/None"]["completion_only_loss"]
    assert not r["tokenizer_chatml/conversational/None/keep_start/None"]["completion_only_loss"]
    # TRL needs generation markers: its own Llama-3 training template, nothing for this ChatML one
    assert SFT["assistant_only_loss_errors"]["tokenizer_llama3"] is None
    assert "generation" in SFT["assistant_only_loss_errors"]["tokenizer_chatml"]


# ----------------------------------------------------------------------------------------------
# Masks by hand
# ----------------------------------------------------------------------------------------------
def test_masks_by_hand(tmp_path):
    tok = fixture_tokenizer("tokenizer_llama3")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    # language modeling: BOS + text + EOS, every token but the first scored
    recs = hf_sft.tokenize_file(write_jsonl(tmp_path / "a.jsonl", [{"text": "The sky is blue."}]), tok)
    body = tok.encode("The sky is blue.")
    assert recs[0]["tokens"].tolist() == [bos] + body + [eos]
    t, m = hf_sft.pad_example(recs[0]["tokens"], recs[0]["loss_mask"], len(body) + 4, tok.pad_token_id)
    assert m.tolist() == [0.0] + [1.0] * (len(body) + 1) + [0.0] * 2
    assert t[-2:].tolist() == [tok.pad_token_id] * 2
    # prompt-completion: the prompt's tokens are not scored; completion_only_loss=False scores them
    row = {"prompt": "What color is the sky?", "completion": " It is blue."}
    path = write_jsonl(tmp_path / "b.jsonl", [row])
    (rec,) = hf_sft.tokenize_file(path, tok)
    n_prompt = len(tok.encode(row["prompt"], add_special_tokens=True))
    assert rec["tokens"].tolist() == tok.encode(row["prompt"] + row["completion"] + "<|eot_id|>",
                                                add_special_tokens=True)
    assert rec["loss_mask"].tolist() == [0] * n_prompt + [1] * (len(rec["tokens"]) - n_prompt)
    (rec,) = hf_sft.tokenize_file(path, tok, completion_only_loss=False)
    assert rec["loss_mask"].tolist() == [1] * len(rec["tokens"])
    # conversational prompt-completion: the prompt with the generation prompt is not scored
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": U, "completion": A}])
    (rec,) = hf_sft.tokenize_file(path, tok)
    n_prompt = len(tok.apply_chat_template(U, add_generation_prompt=True, tokenize=True))
    assert rec["tokens"].tolist() == tok.apply_chat_template(U + A, tokenize=True)
    assert rec["loss_mask"].tolist() == [0] * n_prompt + [1] * (len(rec["tokens"]) - n_prompt)
    assert rec["tokens"][-1] == eos  # the template's end of turn, no EOS appended
    # truncation keep_end keeps the completion; keep_start drops a prompt that fills max_length
    (rec,) = hf_sft.tokenize_file(path, tok, max_length=4, truncation_mode="keep_end")
    assert rec["tokens"].tolist() == tok.apply_chat_template(U + A, tokenize=True)[-4:]
    assert hf_sft.tokenize_file(path, tok, max_length=n_prompt) == []


def test_only_first_token_scored_and_nothing_left_raise(tmp_path):
    tok = fixture_tokenizer("tokenizer_chatml")  # no BOS: an empty text is the single token EOS
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "Hi."}, {"text": ""}])
    with pytest.raises(ValueError, match=r"row 1 \(line 2\).*only scored token is the first"):
        hf_sft.prepare_sft(path, tok, str(tmp_path / "d"), max_length=8)
    path = write_jsonl(tmp_path / "b.jsonl", [{"prompt": U, "completion": A}])
    with pytest.raises(ValueError, match="no training examples left"):
        hf_sft.prepare_sft(path, tok, str(tmp_path / "d"), max_length=8)
    assert not os.path.exists(tmp_path / "d" / hf_sft.DATASET)


def test_assistant_only_loss_raises(tmp_path):
    tok = fixture_tokenizer("tokenizer_llama3")
    conv = write_jsonl(tmp_path / "c.jsonl", [{"messages": U + A}])
    with pytest.raises(ValueError, match="generation"):
        hf_sft.prepare_sft(conv, tok, str(tmp_path / "d"), assistant_only_loss=True)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="needs conversational data"):
        hf_sft.prepare_sft(text, tok, str(tmp_path / "d"), assistant_only_loss=True)
    assert not os.path.exists(tmp_path / "d" / hf_sft.DATASET)


# ----------------------------------------------------------------------------------------------
# Malformed rows
# ----------------------------------------------------------------------------------------------
BAD_ROWS = [
    ({"text": "ok"}, {"body": "x"}, "'text' is missing"),
    ({"text": "ok"}, {"text": 3}, "'text' must be a string"),
    ({"text": "ok"}, {"text": "x", "tools": "{bad"}, "'tools' is a string but not JSON"),
    ({"prompt": "Q", "completion": " A"}, {"prompt": "Q"}, "'completion' is missing"),
    ({"prompt": "Q", "completion": " A"}, {"prompt": "Q", "completion": 3}, "'completion' must be a string"),
    ({"prompt": "Q", "completion": " A"}, {"prompt": "Q", "completion": " A", "text": "x"}, "'text' next to 'prompt'"),
    ({"prompt": "Q", "completion": " A"}, {"text": "x"}, "'text': the row is language modeling but row 0 is prompt"),
    ({"messages": U + A}, {"messages": []}, "'messages' is an empty list"),
    ({"messages": U + A}, {"messages": [{"role": "user"}]}, "'messages' message 0 needs a string 'content'"),
    ({"messages": U + A}, {"messages": U, "chat_template_kwargs": {"x": 1}}, "'chat_template_kwargs' is not supported"),
    ({"prompt": U, "completion": A}, {"prompt": U, "completion": "x"}, "'completion' must be a list of messages"),
    ({"prompt": U, "completion": A}, {"prompt": U, "completion": []}, "'completion' is an empty list"),
    ({"prompt": U, "completion": A}, {"prompt": "Q", "completion": " A"},
     "'prompt': the row is prompt completion but row 0 is conversational prompt completion"),
]


@pytest.mark.parametrize("good,bad,msg", BAD_ROWS)
def test_malformed_rows_name_file_row_field(tmp_path, good, bad, msg):
    path = write_jsonl(tmp_path / "sft.jsonl", [good, bad])
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError) as e:
        hf_sft.prepare_sft(path, os.path.join(FIX, "tokenizer_chatml"), str(data_dir), max_length=32)
    assert path in str(e.value) and "row 1 (line 2)" in str(e.value) and msg in str(e.value), str(e.value)
    assert not os.path.exists(data_dir / hf_sft.DATASET)  # nothing written


# ----------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------
def test_prepare_jsonl_parquet_batches_reuse(tmp_path, monkeypatch):
    rows = SFT["datasets"]["conversational_prompt_completion"]
    tok = fixture_tokenizer("tokenizer_llama3")
    kw = dict(max_length=48, truncation_mode="keep_end")
    tr_j, te_j = hf_sft.prepare_sft(write_jsonl(tmp_path / "s.jsonl", rows), tok, str(tmp_path / "a"), **kw)
    tr_p, te_p = hf_sft.prepare_sft(write_parquet(tmp_path / "s.parquet", rows), tok, str(tmp_path / "b"), **kw)
    assert tr_j.num_examples == tr_p.num_examples == 3 and te_j.num_examples == te_p.num_examples == 0
    a, b = tr_j.rows([0, 1, 2]), tr_p.rows([0, 1, 2])
    assert set(a) == {"tokens", "loss_mask"}
    assert a["tokens"].shape == (3, 48) and a["tokens"].dtype == np.int32 and a["loss_mask"].dtype == np.float32
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert (a["loss_mask"][:, 0] == 0).all()
    trl = hf_sft.tokenize_file(str(tmp_path / "s.jsonl"), tok, **kw)
    for i, rec in enumerate(trl):
        n = len(rec["tokens"])
        np.testing.assert_array_equal(a["tokens"][i, :n], rec["tokens"])
        assert (a["tokens"][i, n:] == tok.pad_token_id).all() and a["loss_mask"][i, n:].sum() == 0
    # batches: deterministic, split over processes
    full = tr_j.batch(5, 4)
    halves = [tr_j.batch(5, 4, p, 2) for p in (0, 1)]
    for k in full:
        np.testing.assert_array_equal(full[k], np.concatenate([h[k] for h in halves]))
        np.testing.assert_array_equal(full[k], tr_j.batch(5, 4)[k])
    st = tr_j.stats()
    assert st["num_examples"] == 3 and st["mean_scored_tokens"] == pytest.approx(a["loss_mask"].sum() / 3)
    with pytest.raises(ValueError, match="no SFT examples"):
        te_j.batch(0, 2)
    # a second prepare reuses the dataset without tokenizing
    monkeypatch.setattr(hf_sft, "tokenize_file", lambda *a, **k: pytest.fail("tokenized again"))
    again, _ = hf_sft.prepare_sft(str(tmp_path / "s.jsonl"), tok, str(tmp_path / "a"), **kw)
    assert again.path == tr_j.path and again.num_examples == 3


def test_splits_and_settings(tmp_path):
    rows = [{"text": f"Question {i}? It is blue."} for i in range(10)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    tok_dir = os.path.join(FIX, "tokenizer_llama3")
    tr, te = hf_sft.prepare_sft(path, tok_dir, str(tmp_path / "d"), max_length=16, test_fraction=0.3, split_seed=1)
    assert (tr.num_examples, te.num_examples) == (7, 3)
    tr2, te2 = hf_sft.prepare_sft(path, tok_dir, str(tmp_path / "d"), max_length=16, test_fraction=0.3,
                                  split_seed=1)
    np.testing.assert_array_equal(te.rows([0, 1, 2])["tokens"], te2.rows([0, 1, 2])["tokens"])
    tr, te = hf_sft.prepare_sft(path, tok_dir, str(tmp_path / "d"), max_length=16,
                                test_path=write_jsonl(tmp_path / "t.jsonl", rows[:2]))
    assert (tr.num_examples, te.num_examples) == (10, 2)
    for bad, match in ((dict(max_length=None), "max_length"), (dict(truncation_mode="middle"), "truncation_mode"),
                       (dict(completion_only_loss="yes"), "completion_only_loss"),
                       (dict(test_fraction=0.2, test_path=path), "not both")):
        with pytest.raises(ValueError, match=match):
            hf_sft.prepare_sft(path, tok_dir, str(tmp_path / "d"), **{"max_length": 16, **bad})
