"""Fine-tuning: methods (full, LoRA, DoRA), block-level layer policies, the training loop."""

from .methods import METHODS, FinetuneConfig, prepare_model, resolve_policy
from .trainer import StopRule, TrainConfig, TrainLog, train

__all__ = ["METHODS", "FinetuneConfig", "prepare_model", "resolve_policy", "StopRule", "TrainConfig", "TrainLog", "train"]
