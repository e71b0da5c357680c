"""SFT of a small Transformer LM on the known-reward synthetic language (the reference for DPO).

    python -m experiments.run --config ml_collections_configs/synthetic_sft.py --workdir runs/synthetic_sft

The task (`fdistill.data.preference`): prompts [BOS, a, b, SEP] over 28 content words; the hidden
reward counts the prompt's three target words {a, b, pi(a)} present in the response and subtracts
`task.length_cost` per word. The demonstrator writes 1-11 words, half of them targets. The model
learns the demonstrator (next-token NLL on response tokens). results.json: nll_heldout (held-out
prompts), true_reward / mean_length / optimal_frac of sampled responses on held-out prompts,
greedy/true_reward, demo/true_reward (the demonstrator's own), best_reward.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "sft"

    c.task = ml_collections.ConfigDict()
    c.task.vocab_size = 32  # 4 special tokens + 28 content words
    c.task.response_len = 12  # response positions incl. EOS: at most 11 words
    c.task.length_cost = 0.1  # reward per word: -length_cost
    c.task.demo_target_prob = 0.5  # demonstrator: probability that a word is a target word
    c.task.demo_max_words = 11  # demonstrator lengths ~ Uniform{1..demo_max_words}
    c.task.heldout_frac = 0.2  # prompts held out for evaluation
    c.task.seed = 0  # the language: target map pi and the prompt split

    c.model = ml_collections.ConfigDict()
    c.model.name = "transformer"
    c.model.width = 64
    c.model.depth = 2
    c.model.num_heads = 4
    c.model.mlp_ratio = 4

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 2000
    c.train.batch_size = 64
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.grad_clip = 1.0
    c.train.weight_decay = 0.0
    c.train.ema_decay = 0.99
    c.train.seed = 0
    c.train.log_every = 100
    c.train.eval_every = 0
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 2
    c.train.compute_dtype = "float32"

    c.eval = ml_collections.ConfigDict()
    c.eval.samples_per_prompt = 8  # x 146 held-out prompts
    c.eval.temperature = 1.0
    c.eval.num_heldout = 2048  # demonstrations on held-out prompts for nll_heldout
    c.eval.chunk = 1024
    return c
