"""fdistill: diffusion teachers, f-divergence distillation and preference optimisation in JAX."""
__version__ = "0.1.0"
