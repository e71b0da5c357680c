"""Objectives: pure losses and train steps, one module per family, found by `base.build`."""
from fdistill.objectives.base import Objective, available, build, register

__all__ = ["Objective", "available", "build", "register"]
