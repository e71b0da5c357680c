"""MaPO (arXiv 2406.06424) on the 8x8 digits U-Net with the in-project classifier as reward.

    python -m experiments.run --config ml_collections_configs/digits_mapo.py --workdir runs/digits_mapo

Same reference, reward and pairs as digits_diffusion_dpo.py (see there); the loss is the public MaPO
code's err_w - beta log sigmoid(T [h(s err_w) - h(s err_l)]) with beta = 0.01 (0.1 is the public default,
which hacked the reward on the GMM table).
"""
import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_diffusion_dpo.py")
    spec = importlib.util.spec_from_file_location("_fdistill_digits_diffusion_dpo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.dpo.method = "mapo"
    c.dpo.beta = 0.01
    c.dpo.snr_value = 0.5
    c.dpo.margin_scale = 1000.0
    return c
