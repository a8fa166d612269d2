"""The evaluation lab of diffusers-guda: toy base models, benchmark datasets, LOGO ground truth,
baselines, metrics, the evaluation runner and the demo.

It imports the library (:mod:`diffusers_guda`) and is never imported by it; its ``guda`` commands
(``train``, ``logo``, ``demo``, ``evaluate``) and named datasets reach the command line through entry
points.
"""

from .recipes import training_config
from .training import TrainConfig, train_base_model

__all__ = ["TrainConfig", "train_base_model", "training_config"]
