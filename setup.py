"""fdistill: f-divergence distribution matching, score estimation and preference optimisation in JAX."""
from setuptools import find_packages, setup

setup(
    name="fdistill",
    version="0.1.0",
    description="JAX/Flax diffusion distillation (f-distill, DMD2, TDM) and preference optimisation.",
    python_requires=">=3.10",
    packages=find_packages(include=["fdistill", "fdistill.*", "experiments", "experiments.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "tensorflow-datasets>=4.9.10",
        "array_record>=0.8",
        "ml_collections>=1.1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-learn>=1.4",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "safetensors>=0.4",  # Hugging Face checkpoints (fdistill.models.llama)
        "tokenizers>=0.20",  # tokenizer.json (fdistill.data.hf_tokenizer)
        "jinja2>=3.1.6",  # chat templates, rendered as transformers does
    ],
    extras_require={
        "test": ["pytest>=8"],
        "bench": ["torch"],
        # the fixture scripts under tests/fixtures/ and benchmarks/trl_dpo_reference.py (never the tests)
        "hf": ["torch", "transformers>=5", "trl>=1.16"],
    },
)
