"""Kept for the import path ``from editdecay.cli_editors import parse_layers, train_editor``; the code is :mod:`editdecay.cli.editors`."""

from .cli.editors import parse_layers, train_editor

__all__ = ["parse_layers", "train_editor"]
