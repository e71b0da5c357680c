"""Small configs shared by the tests."""
import os

from fdistill.configs import load as load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_score_config(num_steps: int = 20, **train):
    """gmm_score with a small network, batch and evaluation: seconds, not minutes."""
    c = load_config("gmm_score")
    c.model.width = 32
    c.model.depth = 1
    c.model.emb_dim = 16
    c.train.num_steps = num_steps
    c.train.batch_size = 64
    c.train.warmup_steps = 0
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.checkpoint_every = 10
    c.eval.num_samples = 256
    c.eval.chunk = 256
    c.eval.num_steps = 4
    for k, v in train.items():
        c.train[k] = v
    return c
