"""Tiny Hugging Face checkpoints and TRL-format files made by the tests (no download, no PyTorch).

`make_checkpoint(dir)` writes a random Llama (config.json, model.safetensors) with a word-level
tokenizer (tokenizer.json, tokenizer_config.json with a ChatML template); `copy_task_pairs` writes
the "copy" preference task: the prompt lists words, the chosen response repeats them, the rejected
one is other random words, so DPO has something to learn.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from fdistill.models import llama

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["copy", ":", "user", "assistant", "system"] + [f"w{i}" for i in range(59)]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' + message['content'] + "
          "' <|im_end|> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}")


def make_tokenizer(path: str) -> int:
    """A word-level tokenizer (whitespace-split words of `WORDS`) with BOS added in front; its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens(SPECIALS)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return len(vocab)


def make_checkpoint(path: str, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 128, seed: int = 0, **kw) -> llama.LlamaConfig:
    """A random Llama checkpoint directory with the word-level tokenizer; returns its config."""
    vocab = make_tokenizer(path)
    cfg = llama.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                            head_dim=hidden // heads, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                            **kw)
    module = llama.build(cfg, max_len=8)
    llama.save_pretrained(path, cfg, llama.init_params(module, jax.random.PRNGKey(seed)))
    return cfg


def copy_task_pairs(path: str, n: int = 200, seed: int = 0, conversational: bool = False,
                    words: int = 40) -> str:
    """`n` pairs of the copy task as JSONL (standard strings, or conversational messages)."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(words)]
    rows = []
    for _ in range(n):
        k = int(rng.integers(2, 6))
        ws = list(rng.choice(vocab, k, replace=False))
        other = list(rng.choice([w for w in vocab if w not in ws], k, replace=False))
        prompt, chosen, rejected = "copy " + " ".join(ws) + " :", " " + " ".join(ws), " " + " ".join(other)
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen.strip()}],
                         "rejected": [{"role": "assistant", "content": rejected.strip()}]})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return write_jsonl(path, rows)


def copy_task_sft(path: str, n: int = 200, seed: int = 1, words: int = 40) -> str:
    """`n` prompt-completion rows of the copy task as JSONL (the completion repeats the prompt's words)."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(words)]
    rows = []
    for _ in range(n):
        ws = list(rng.choice(vocab, int(rng.integers(2, 6)), replace=False))
        rows.append({"prompt": "copy " + " ".join(ws) + " :", "completion": " " + " ".join(ws)})
    return write_jsonl(path, rows)


def fixture_tokenizer(name: str):
    """A tokenizer directory of tests/fixtures/hf/ (written with transformers) as an `HFTokenizer`."""
    from fdistill.data.hf_tokenizer import HFTokenizer

    return HFTokenizer.from_dir(os.path.join(FIXTURES, name))


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write_parquet(path, rows) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)
