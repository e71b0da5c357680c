"""DPO with a ~100M-parameter Transformer policy on the synthetic language, sharded with FSDP.

    python -m experiments.run --config ml_collections_configs/synthetic_dpo_100m.py --workdir runs/dpo_100m \
        --config.mesh.fsdp=8

A paper-size config, not trained by this project: `benchmarks/fsdp_memory.py` compiles and steps it
and measures its per-device memory at fsdp = 1, 2, 4, 8. The policy and the frozen reference are a
768-wide, 14-layer Transformer (about 99M parameters each); the reference is a random
initialisation (`po.reference=init`, demonstrator pairs) so that no 100M SFT run is needed.
"""
from fdistill import configs


def get_config():
    c = configs.base("po")
    c.po.reference = "init"
    c.model.width = 768
    c.model.depth = 14
    c.model.num_heads = 12
    c.train.num_steps = 1000
    c.train.batch_size = 64
    c.train.learning_rate = 1e-5
    c.train.warmup_steps = 100
    c.train.log_every = 50
    c.train.checkpoint_every = 500
    return c
