"""Evaluation: batched knowledge probes and metrics."""

from .probes import GreedyToken, Prober, TopToken

__all__ = ["GreedyToken", "Prober", "TopToken"]
