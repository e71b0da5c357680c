"""TRL DPOTrainer on CPU as the reference for the JAX DPO step: steps/s and what it learned.

    /tmp/hfvenv/bin/python benchmarks/trl_dpo_reference.py --make-model /tmp/trl_dpo/model \
        --make-data /tmp/trl_dpo/pairs.jsonl
    /tmp/hfvenv/bin/python benchmarks/trl_dpo_reference.py --model /tmp/trl_dpo/model \
        --data /tmp/trl_dpo/pairs.jsonl --steps 50

(needs torch, transformers, trl, tokenizers, datasets; not part of the package, never imported by it.
`--make-*` alone only writes files (an existing model dir / data file is kept, not overwritten);
`--model` and `--data` run the benchmark. Both outputs are deterministic.)

`--make-model DIR` writes a random LlamaForCausalLM (vocab 512, hidden 256, intermediate 688, 4
layers, 4 heads, 2 KV heads, head_dim 64, untied embeddings, seed 0, float32 safetensors) and a
word-level tokenizer (`tokenizer.json` + PreTrainedTokenizerFast files: `<pad>` 0, `<s>` 1 (BOS,
prepended), `</s>` 2 (EOS), `<unk>` 3, then `copy`, `:`, `w0`..`w505`; whitespace pre-tokenizer).

`--make-data FILE` writes 200 standard-format pairs (JSONL `{"prompt", "chosen", "rejected"}`, seed
0): the prompt is `copy w.. w.. :` with 3-8 random words; `chosen` repeats the prompt's words,
`rejected` is as many other random words. TRL appends `</s>` to both completions, BOS comes from the
tokenizer, so a row is at most 1 + 1 + 8 + 1 + 8 + 1 = 20 tokens (max_length 64 never truncates).

The run: TRL `DPOTrainer` (sigmoid loss, beta 0.1, reference model = a second copy of the initial
checkpoint), per-device batch 8 pairs, AdamW lr 5e-4 (betas 0.9/0.999, eps 1e-8, weight decay 0),
constant schedule, no warm-up, grad-norm clip 1.0, float32, no gradient checkpointing, dropout off,
CPU, `torch.set_num_threads(--threads, default 2)`, shuffled data (seed 0), logging every step, no
eval, no saving. It runs 3 warm-up steps + `--steps` timed steps; a TrainerCallback stamps every
`on_step_end`, and steps/s = steps / (time of the last stamp - time of the 3rd stamp). Data
loading, collation and TRL's per-step metrics are inside the timed window (they are part of a TRL
step); tokenisation and model loading are not. After training it scores the implicit-reward
accuracy over all 200 pairs (policy vs reference, untimed). It prints one JSON line.

OMP_WAIT_POLICY defaults to PASSIVE (spinning OpenMP threads slowed 2-thread PyTorch badly on a
shared machine, see benchmarks/torch_reference.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

N_WORDS = 506  # 4 special tokens + "copy" + ":" + 506 words = vocab 512
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["copy", ":"] + [f"w{i}" for i in range(N_WORDS)]
CONTENT = [f"w{i}" for i in range(N_WORDS)]
WARMUP_STEPS = 3


def make_tokenizer(out_dir: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    assert len(vocab) == 512
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=256)
    fast.save_pretrained(out_dir)
    return fast


def make_model(out_dir: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    tok = make_tokenizer(out_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, initializer_range=0.02, hidden_act="silu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM._from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out_dir}: LlamaForCausalLM, {n} parameters; tokenizer vocab {len(tok)}",
          file=sys.stderr)


def make_data(path: str, n: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            k = rng.randint(3, 8)
            words = rng.sample(CONTENT, k)
            others = rng.sample([w for w in CONTENT if w not in words], k)
            row = {"prompt": "copy " + " ".join(words) + " :",
                   "chosen": " " + " ".join(words),
                   "rejected": " " + " ".join(others)}
            f.write(json.dumps(row) + "\n")
    print(f"wrote {path}: {n} pairs", file=sys.stderr)


def implicit_reward_accuracy(policy, ref, dataset, tokenizer, beta: float) -> dict:
    """Fraction of pairs with beta*(log pi/pi_ref)(chosen) > same for rejected, over all pairs."""
    import torch

    def seq_logp(model, prompt_ids, completion_ids):
        ids = torch.tensor([prompt_ids + completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        return lp[len(prompt_ids) - 1:].sum().item()

    policy.eval()
    ref.eval()
    correct, margins = 0, []
    for row in dataset:
        p, c, r = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
        rc = beta * (seq_logp(policy, p, c) - seq_logp(ref, p, c))
        rr = beta * (seq_logp(policy, p, r) - seq_logp(ref, p, r))
        correct += rc > rr
        margins.append(rc - rr)
    return {"accuracy": correct / len(dataset), "mean_margin": sum(margins) / len(margins)}


def run(args) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(args.data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation=args.attn)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_step_end(self, targs, state, control, **kw):
            self.stamps.append(time.perf_counter())

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DPOConfig(
            output_dir=tmp, beta=args.beta, loss_type=["sigmoid"], max_length=64,
            per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
            max_grad_norm=1.0, max_steps=WARMUP_STEPS + args.steps, num_train_epochs=1000,
            logging_steps=1, logging_strategy="steps", save_strategy="no", eval_strategy="no",
            report_to="none", use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, activation_checkpointing=False,
            disable_dropout=True, seed=0, data_seed=0, dataloader_num_workers=0,
            disable_tqdm=True, remove_unused_columns=False)
        trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[timer])
        trainer.train()
        assert not trainer.args.activation_checkpointing
        assert not getattr(trainer.model, "is_activation_checkpointing", False)
        assert next(trainer.model.parameters()).dtype == torch.float32
        logs = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
        post = implicit_reward_accuracy(trainer.model, trainer.ref_model, trainer.train_dataset,
                                        tokenizer, args.beta)

    t = timer.stamps
    assert len(t) == WARMUP_STEPS + args.steps, len(t)
    elapsed = t[-1] - t[WARMUP_STEPS - 1]
    sps = args.steps / elapsed
    last10 = logs[-10:]
    return {
        "steps_per_sec": round(sps, 3),
        "pairs_per_sec": round(sps * args.batch, 2),
        "timed_steps": args.steps, "warmup_steps": WARMUP_STEPS, "batch_pairs": args.batch,
        "seconds": round(elapsed, 3),
        "rewards/accuracies_final": logs[-1]["rewards/accuracies"],
        "rewards/accuracies_last10_mean": round(sum(h["rewards/accuracies"] for h in last10)
                                                / len(last10), 4),
        "rewards/margins_final": logs[-1]["rewards/margins"],
        "loss_first": logs[0]["loss"], "loss_final": logs[-1]["loss"],
        "mean_token_accuracy_final": logs[-1].get("mean_token_accuracy"),
        "train_set_implicit_reward_accuracy": post["accuracy"],
        "train_set_mean_margin": round(post["mean_margin"], 4),
        "num_params": sum(p.numel() for p in trainer.model.parameters()),
        "attn_implementation": args.attn, "threads": args.threads,
        "trl_version": trl.__version__, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_1min_at_end": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make-model", metavar="DIR")
    ap.add_argument("--make-data", metavar="FILE")
    ap.add_argument("--model", metavar="DIR")
    ap.add_argument("--data", metavar="FILE")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    args = ap.parse_args()
    if args.make_model and not os.path.exists(os.path.join(args.make_model, "config.json")):
        make_model(args.make_model)
    if args.make_data and not os.path.exists(args.make_data):
        make_data(args.make_data)
    if args.model and args.data:
        print(json.dumps(run(args)))
    elif not (args.make_model or args.make_data):
        ap.error("give --model DIR and --data FILE (and/or --make-model DIR, --make-data FILE)")


if __name__ == "__main__":
    main()
