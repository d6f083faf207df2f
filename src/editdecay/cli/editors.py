"""``editdecay train-editor``: train a MEND or MALMEN hypernetwork.

Registered in :mod:`editdecay.cli` (``app.command("train-editor")(train_editor)``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EditdecayError
from ..models.embedded import DEFAULT_MODEL
from .options import DeviceOpt, JsonOpt, ModelOpt
from .output import nan_to_none, print_table, write_json

log = logging.getLogger(__name__)

METHODS = ("mend", "malmen")


def parse_layers(text: str) -> list[int]:
    """Block indices from ``"27,28,29"``, ``"24-29"`` or a mix (``"3,5-7"``)."""
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                out += range(a, b + 1)
            else:
                out.append(int(part))
        except ValueError:
            raise EditdecayError(f"--layers {text!r}: expected block indices like 27,28,29 or 24-29") from None
    if not out or any(x < 0 for x in out):
        raise EditdecayError(f"--layers {text!r}: expected non-negative block indices like 27,28,29 or 24-29")
    return sorted(set(out))


def _subjects(facts) -> set[str]:
    return {f.subject.strip().lower() for f in facts}


def split_training_facts(train, val_pool, exclude, n_val: int):
    """``(train, val)``: validation = the first ``n_val`` facts of ``val_pool`` with
    distinct subjects (``val_pool`` None: held out from the end of ``train``); facts
    sharing a subject with ``exclude`` are dropped from both, and training facts sharing
    a subject with a validation fact are dropped."""
    banned = _subjects(exclude)
    train = [f for f in train if f.subject.strip().lower() not in banned]
    pool = [f for f in (val_pool if val_pool is not None else reversed(train)) if f.subject.strip().lower() not in banned]
    val, seen = [], set()
    for f in pool:
        s = f.subject.strip().lower()
        if s not in seen:
            seen.add(s)
            val.append(f)
        if len(val) == n_val:
            break
    held = _subjects(val)
    train = [f for f in train if f.subject.strip().lower() not in held]
    return train, val


def train_editor(
    method: Annotated[str, typer.Option(help="Hypernetwork editor: mend | malmen.")],
    data: Annotated[Path, typer.Option(help="Training facts (CounterFact or zsRE file, any supported format).")],
    out: Annotated[Path, typer.Option(help="Output directory: the checkpoint (hypernet.safetensors, config.json) and train_state/.")],
    model: ModelOpt = DEFAULT_MODEL,
    layers: Annotated[Optional[str], typer.Option(help="Edit blocks, e.g. 27,28,29 or 24-29 (default: the preset's).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Training steps at most (default: the preset's).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Named preset, e.g. gpt2-xl@reference or smollm2-135m@cpu (default: derived from the model).")] = None,
    hparams: Annotated[Optional[Path], typer.Option(help="YAML of hyperparameters (over the preset).")] = None,
    val_data: Annotated[Optional[Path], typer.Option(help="Validation facts (e.g. counterfact-val.json); default: held out from --data.")] = None,
    n_val: Annotated[Optional[int], typer.Option(min=1, help="Validation facts (distinct subjects; default: the preset's).")] = None,
    exclude: Annotated[Optional[list[Path]], typer.Option(help="Facts to keep out of training and validation by subject, e.g. a selected edit set (repeatable).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Use only the first N training facts.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after this many minutes of training.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out (same hyperparameters and data).")] = False,
    zsre_preset: Annotated[str, typer.Option(help="zsRE targets: memit (answers[0] as new) | easyedit (alt as new).")] = "memit",
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a MEND or MALMEN hypernetwork on facts and save it as an editor checkpoint.

    Training and validation facts are disjoint by subject (and from every --exclude
    file). The network is validated every eval_every steps (ES/PS/NS of single edits of
    the validation facts), starting with the untrained one; the best is kept in OUT,
    training stops early after `patience` validations without improvement, and
    OUT/train_state/ lets --resume continue. Use the result with
    'editdecay edit --method METHOD --editor-checkpoint OUT'.

    JSON schema (also OUT/train.json): {"method": str, "model": str, "preset": str,
    "out": str, "steps": int, "stop_reason": "max_steps" | "early_stop" | "time",
    "seconds": float, "n_train": int, "n_val": int, "edit_modules": ["module path", ...],
    "baseline": {"step", "es", "ps", "ns", "score"}, "best": {same keys},
    "curve": [{"step", "es", "ps", "ns", "score", "train": {"loss", "loss_edit",
    "loss_loc"}, "seconds", "val_seconds"}], "resumed_from": int | null}; undefined
    values are null.
    """
    import torch

    from ..editing import get_editor
    from ..editing.hparams import read_hparams_file
    from ..editing.hypernet import train_hypernet
    from ..facts.datasets import load_facts
    from ..models import load_model

    if method not in METHODS:
        raise EditdecayError(f"unknown hypernetwork editor {method!r}: use one of {', '.join(METHODS)}")
    overrides = read_hparams_file(hparams) if hparams else {}
    if "checkpoint" in overrides:
        raise EditdecayError("train-editor trains a new network: remove 'checkpoint' from --hparams (use --resume to continue a run)")
    if layers is not None:
        overrides["layers"] = parse_layers(layers)
    if steps is not None:
        overrides["steps"] = steps
    if n_val is not None:
        overrides["n_val"] = n_val
    if max_minutes is not None:
        overrides["max_minutes"] = max_minutes
    train = load_facts(data, zsre_preset=zsre_preset)
    if limit is not None:
        train = train[:limit]
    val_pool = load_facts(val_data, zsre_preset=zsre_preset) if val_data is not None else None
    excluded = [f for p in (exclude or []) for f in load_facts(p, zsre_preset=zsre_preset)]
    m, tok = load_model(model, device=device)
    editor = get_editor(method, preset=preset, overrides=overrides, model=m)
    hp = editor.hparams
    train, val = split_training_facts(train, val_pool, excluded, hp.n_val)
    if len(val) < hp.n_val:
        log.warning("only %d validation facts (asked for %d)", len(val), hp.n_val)
    if not train:
        raise EditdecayError(f"{data}: no training facts left after removing validation and --exclude subjects")
    if not val:
        raise EditdecayError("no validation facts: pass --val-data or more --data")
    log.info("%s: %d training facts, %d validation facts", method, len(train), len(val))
    torch.manual_seed(hp.seed)
    extra = {"train_data": str(data), "val_data": str(val_data) if val_data else None,
             "exclude": [str(p) for p in exclude or []], "val_case_ids": [f.case_id for f in val]}
    report = train_hypernet(editor, m, tok, train, val, out, resume=resume, progress=not as_json, extra_config=extra)
    doc = nan_to_none({
        "method": method, "model": str(model), "preset": editor.preset_info.get("preset"), "out": str(out),
        "steps": report.steps, "stop_reason": report.stop_reason, "seconds": report.seconds,
        "n_train": report.n_train, "n_val": report.n_val, "edit_modules": list(editor.module_names),
        "baseline": {k: report.baseline.get(k) for k in ("step", "es", "ps", "ns", "score")},
        "best": report.best, "curve": report.curve, "resumed_from": report.resumed_from,
    })
    write_json(out / "train.json", doc)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print_table(f"train-editor {method} ({len(train)} training facts, {len(val)} validation facts)",
                ["step", "es", "ps", "ns", "score", "train loss"],
                [(str(row["step"]), fmt(row["es"]), fmt(row["ps"]), fmt(row["ns"]), fmt(row["score"]), fmt(row["train"]["loss"]))
                 for row in doc["curve"]],
                f"{report.steps} steps in {report.seconds / 60:.1f} min, stopped by {report.stop_reason}; "
                f"best step {doc['best']['step']} (score {doc['best']['score']:.3f}); wrote {out}")
