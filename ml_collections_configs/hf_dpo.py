"""Preference optimisation (DPO family) of a Hugging Face checkpoint on a local TRL-format file.

    python -m experiments.run --config ml_collections_configs/hf_dpo.py --workdir runs/hf_dpo \
        --config.model.hf_path=/models/Qwen2.5-0.5B-Instruct --config.data.path=/data/ultrafeedback.jsonl

`model.hf_path`: a Llama, Mistral or Qwen2 checkpoint directory (config.json, *.safetensors,
tokenizer.json, tokenizer_config.json with its chat template), read with no PyTorch. `data.path`:
a .jsonl or .parquet file of `prompt`/`chosen`/`rejected` rows, plain strings or lists of
{role, content} messages (TRL's standard and conversational formats); it is tokenized once, as
TRL's DPOTrainer does, into a TFDS ArrayRecord dataset in `data.data_dir` (default: beside the file,
`<file without suffix>_tfds`). Held out: `data.test_path`, or a seeded `data.test_fraction` of the rows.
`po.loss`: any loss of fdistill/objectives/preference.py (dpo, ipo, ln_dpo, simpo, rpo, orpo, cpo,
TRL's robust, exo_pair, ...), `po.beta` and the loss's parameters, as in synthetic_dpo.py. Start
from an SFT run of the same checkpoint with `--config.po.sft_workdir=runs/hf_sft`; the reference is
the starting policy. Several devices: `--config.mesh.fsdp=N` shards the parameters (the checkpoint
is read tensor by tensor onto its shards). results.json: loss, rewards/{chosen,rejected,accuracies,
margins}, logps/{chosen,rejected} on training pairs (TRL's names) and heldout/* on held-out ones;
plots/samples_<step>.txt: responses to held-out prompts.
"""
from fdistill import configs


def get_config():
    c = configs.base("hf_po")  # DPO, beta 0.1; the reference log-probs are computed in the step (TRL's default)
    c.data.max_length = 512
    c.train.num_steps = 1000
    c.train.batch_size = 32  # pairs per step
    c.train.learning_rate = 5e-7  # TRL's DPOConfig default (for full fine-tuning of a real checkpoint)
    c.train.warmup_steps = 50
    c.train.grad_clip = 1.0
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    return c
