"""Fine-tuning: methods (full, LoRA, DoRA) and block-level layer policies."""

from .methods import METHODS, FinetuneConfig, prepare_model, resolve_policy

__all__ = ["METHODS", "FinetuneConfig", "prepare_model", "resolve_policy"]
