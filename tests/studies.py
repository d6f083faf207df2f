"""The tiny study used by the runner and report tests: a random 3-block Llama with the
embedded tokenizer, built-in facts without the confidence filter, protocol single
(3 facts), FT edits and two LoRA steps on a small text file."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_tiny_spec(tmp_path: Path, tiny_dir: Path, **extra) -> Path:
    """Write the tiny spec; ``extra`` blocks are merged into it (``axes={"protocol": "batch"}``)."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"Line {i}: the river flows past the mill and the town of {i % 7}." for i in range(120)))
    spec = {
        "name": "tiny",
        "axes": {"model": str(tiny_dir), "dataset": "builtin", "editor": ["none", "ft"], "n_edits": 3,
                 "protocol": "single", "task": "unstructured", "ft_method": ["none", "lora"], "layer_policy": "all",
                 "seed": 0},
        "selection": {"n_intrinsic": 3, "filter": False},
        "editors": {"ft": {"hparams": {"num_steps": 3}}},
        "finetune": {"preset": "cpu-unstructured", "data": {"unstructured": str(text)},
                     "overrides": {"max_steps": 2, "eval_every": 1, "n_val": 2, "block_size": 16, "batch_size": 2},
                     "stop": ["loss<0.0"]},
        "probes": {"every": 1},
    }
    for key, value in extra.items():  # a mapping updates the block of that name, anything else sets it
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
