"""SFT of a small Transformer LM on the known-reward synthetic language (the reference for DPO).

    python -m experiments.run --config ml_collections_configs/synthetic_sft.py --workdir runs/synthetic_sft

The task (`fdistill.data.preference`): prompts [BOS, a, b, SEP] over 28 content words; the hidden
reward counts the prompt's three target words {a, b, pi(a)} present in the response and subtracts
`task.length_cost` per word. The demonstrator writes 1-11 words, half of them targets. The model
(a 2-layer, width-64 Transformer) learns the demonstrator (next-token NLL on response tokens).
About a minute on a laptop CPU. results.json: nll_heldout (held-out prompts), true_reward /
mean_length / optimal_frac of sampled responses on held-out prompts, greedy/true_reward,
demo/true_reward (the demonstrator's own), best_reward.
"""
from fdistill import configs


def get_config():
    c = configs.base("sft")  # task: 32 tokens, responses of <= 11 words; Transformer 2 x 64, 4 heads
    c.train.num_steps = 2000
    c.train.batch_size = 64
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.99  # evaluated (and used as the DPO reference) with its EMA
    return c
