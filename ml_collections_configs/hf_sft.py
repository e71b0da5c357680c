"""Supervised fine-tuning of a Hugging Face checkpoint on a local TRL-format SFT file.

    python -m experiments.run --config ml_collections_configs/hf_sft.py --workdir runs/hf_sft \
        --config.model.hf_path=/models/Qwen2.5-0.5B --config.data.path=/data/sft.jsonl

`data.path`: a .jsonl or .parquet file with, per row, `text` (the loss on every token), `prompt` and
`completion` (the loss on the completion), or `messages` (a conversation rendered with the
checkpoint's chat template; the loss on the assistant turns), TRL's SFT formats. The loss is the
token mean of the next-token cross-entropy over the batch. The finished run is the starting point
(and reference) of hf_dpo.py with `--config.po.sft_workdir=runs/hf_sft`. results.json: loss and
eval_loss (held-out rows), and plots/samples_<step>.txt.
"""
from fdistill import configs


def get_config():
    c = configs.base("hf_sft")
    c.data.max_length = 512
    c.train.num_steps = 1000
    c.train.batch_size = 32
    c.train.learning_rate = 2e-5  # TRL's SFTConfig default
    c.train.warmup_steps = 50
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    return c
