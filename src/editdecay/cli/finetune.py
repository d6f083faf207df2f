"""``editdecay finetune``: fine-tune a (possibly edited) model, probing facts as it trains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EditdecayError
from ..models.embedded import DEFAULT_MODEL
from .options import DeviceOpt, JsonOpt, ModelOpt
from .output import nan_to_none, write_json


def finetune(
    out: Annotated[Path, typer.Option(help="Output directory (finetune.json, model/ or adapter/).")],
    model: ModelOpt = DEFAULT_MODEL,
    from_edit: Annotated[Optional[Path], typer.Option(help="An edited model saved by 'editdecay edit --save-model'.")] = None,
    task: Annotated[str, typer.Option(help="unstructured | structured | classification | sft | commonsense | hotpotqa.")] = "unstructured",
    data: Annotated[Optional[list[Path]], typer.Option(help="Training data file or directory (repeatable, pooled); default: the offline corpus (unstructured) or the built-in facts (structured).")] = None,
    method: Annotated[Optional[str], typer.Option(help="full | lora | dora (default: the preset's).")] = None,
    layers: Annotated[str, typer.Option(help="Layer policy: all | threshold:t | window:c,w | edited | non-edited.")] = "all",
    layers_from: Annotated[Optional[str], typer.Option(help="For edited/non-edited on an unedited model: take the blocks of this editor's preset (e.g. rome).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Fine-tuning preset (default cpu-TASK; seed000-*, seed001-* for the papers' settings).")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stopping rule (repeatable, OR-combined; replaces the preset's): loss<τ | loss<base-Δ | acc>τ.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Optimiser steps at most.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(min=1, help="Evaluate and probe every N steps.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Examples per optimiser step.")] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option(min=1, help="Examples per forward (gradient accumulation).")] = None,
    block_size: Annotated[Optional[int], typer.Option(min=8, help="Tokens per block (unstructured).")] = None,
    cutoff: Annotated[Optional[int], typer.Option(min=8, help="Tokens per example (other tasks).")] = None,
    n_train: Annotated[Optional[int], typer.Option(min=1, help="Training examples at most.")] = None,
    n_val: Annotated[Optional[int], typer.Option(min=1, help="Validation examples.")] = None,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast with fp32 master weights (GPU).")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Activation checkpointing.")] = False,
    probe_facts: Annotated[Optional[list[Path]], typer.Option(help="Facts probed at every evaluation (repeatable): the first file is the edit set (retention_new), the others the intrinsic set (retention_true).")] = None,
    hygiene: Annotated[bool, typer.Option(help="Drop training documents containing non-stop words of the probed facts (seed 000 §4.1).")] = False,
    preserve_edits: Annotated[Optional[str], typer.Option(help="Keep the edits of the first --probe-facts file: anchor | nullspace | replay | distill | freeze-edited (docs/finetune.md).")] = None,
    preserve_mu: Annotated[float, typer.Option(min=0.0, help="anchor: weight of the edited modules' output drift at the edited keys.")] = 1.0,
    preserve_rho: Annotated[float, typer.Option(help="replay, distill: share of the loss on the edit prompts and paraphrases (distill: and the neighbourhood prompts) (0 < rho < 1).")] = 0.1,
    remove_edits: Annotated[Optional[str], typer.Option(help="Remove the edits: edited-blocks (fine-tune only the edited blocks, seed 001) | unedit (subtract the low-rank part of W_edited - W_base first; needs the base, recorded by 'editdecay edit' or --unedit-base).")] = None,
    unedit_base: Annotated[Optional[str], typer.Option(help="For --remove-edits unedit: the unedited model (default: the base recorded with --from-edit).")] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a (possibly edited) model on a downstream task, probing facts as it trains.

    JSON schema (also OUT/finetune.json): {"steps": int, "stop_reason": str,
    "trainable": [names], "val": [{"step", "loss", "acc"?}], "probes": [{"step",
    "retention_new", "retention_true", "edit_reverted", "n_edit", "n_intrinsic",
    "categories": {"edited"|"intrinsic": {"edited", "true", "related", "other",
    "nonstop", "n"}}, "top": [{"case_id", "first_non_stop", "tokens": [[tok, p]]}],
    "per_fact": {"edit": [bool], "intrinsic": [bool]}}], "blocks": [int], "base":
    {"loss", "acc"?}, "preset": {...}, "task": {...}, "seconds", "tokens", "method",
    "layers", "edited_layers", "from_edit", "model", "probe_facts": [paths]}. retention_new is measured on the first --probe-facts
    file, retention_true on the others (on the first when it is the only one).
    "loss<base-Δ" compares with the unedited model's validation loss (for --from-edit
    the base model recorded by 'editdecay edit').
    """
    from ..editing import get_editor
    from ..facts.datasets import load_facts
    from ..finetune.callbacks import FactProbe
    from ..finetune.presets import get_preset
    from ..finetune.run import finetune as run_finetune
    from ..finetune.tasks import TASKS, load_task
    from ..models import load_model
    from ..models import save_model as save_model_dir

    if task not in TASKS:
        raise EditdecayError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    p = get_preset(preset or f"cpu-{task}", task=task, method=method, lr=lr, batch_size=batch_size,
                   micro_batch_size=micro_batch_size, max_steps=max_steps, eval_every=eval_every, stop=stop,
                   block_size=block_size, cutoff=cutoff, n_train=n_train, n_val=n_val,
                   bf16=bf16 or None, gradient_checkpointing=gradient_checkpointing or None)
    edited, base_model = None, None
    if from_edit is not None:
        meta = json.loads((from_edit / "identity.json").read_text()) if (from_edit / "identity.json").exists() else {}
        edited = meta.get("edit", {}).get("edited_layers")
        m, tok = load_model(str(from_edit), device=device)
        base_name = meta.get("base", {}).get("model")
        if base_name and any(r.replace(" ", "").startswith("loss<base") for r in p.stop):
            base_model, _ = load_model(base_name, device=device)
    else:
        m, tok = load_model(model, device=device)
    if layers_from is not None:
        edited = list(get_editor(layers_from, model=m).hparams.layers)
    preserve = _preserve_config(preserve_edits, preserve_mu, preserve_rho, remove_edits, layers, probe_facts)
    removal = None
    if remove_edits == "edited-blocks":
        layers = "edited"
    elif remove_edits == "unedit":
        removal = _unedit(m, unedit_base or (meta.get("base", {}).get("model") if from_edit is not None else None), device)
    sets = [load_facts(f) for f in (probe_facts or [])]
    edit_set = sets[0] if sets else []
    intrinsic = [f for s in sets[1:] for f in s] or list(edit_set)
    data_arg = None if not data else (data[0] if len(data) == 1 else list(data))
    t = load_task(task, tok, data_arg, model=m, n_train=p.n_train, n_val=p.n_val, cutoff=p.cutoff,
                  block_size=p.block_size or 128, seed=p.seed, exclude_facts=edit_set + intrinsic,
                  hygiene_facts=(edit_set + intrinsic) if hygiene else None)
    fact_probe = FactProbe(m, tok, edit_set, intrinsic) if sets else None
    res = run_finetune(m, tok, t, p, policy=layers, edited=edited, probe=fact_probe, base_model=base_model,
                       preserve=preserve, edit_facts=edit_set)
    del base_model
    doc = nan_to_none({**res.to_json(), "method": p.method, "layers": layers, "edited_layers": edited,
                       "from_edit": str(from_edit) if from_edit is not None else None,
                       "model": str(model) if from_edit is None else None,
                       "probe_facts": [str(f) for f in probe_facts or []],
                       **({"remove_edits": removal} if removal else {})})
    out.mkdir(parents=True, exist_ok=True)
    meta = {"finetune": {"task": task, "method": p.method, "layers": layers, "steps": res.log.steps, "stop_reason": res.log.stop_reason}}
    if p.method == "full":
        save_model_dir(res.lm, tok, out / "model", meta)
    else:
        res.model.save_pretrained(str(out / "adapter"))
    if hasattr(res.module, "head"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in res.module.head.state_dict().items()}, str(out / "head.safetensors"))
    write_json(out / "finetune.json", doc)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    metric = t.metric
    first, last = res.log.val[0].get(metric), res.log.val[-1].get(metric)
    typer.echo(f"{res.log.steps} steps in {res.log.seconds:.0f} s, stopped by {res.log.stop_reason}; "
               f"val {metric} {first:.3f} -> {last:.3f}; wrote {out}")
    if fact_probe is not None:
        curve = ", ".join(f"{q['step']}: {q['retention_new']:.2f}/{q['retention_true']:.2f}" for q in res.log.probes)
        typer.echo(f"retention edited/intrinsic by step: {curve}")


def _preserve_config(method, mu, rho, remove, layers, probe_facts):
    """Validate --preserve-edits / --remove-edits; the PreserveConfig (or None)."""
    from ..finetune.preserve import PreserveConfig

    if method is not None and remove is not None:
        raise EditdecayError("--preserve-edits and --remove-edits exclude each other")
    if remove is not None and remove not in ("edited-blocks", "unedit"):
        raise EditdecayError(f"unknown --remove-edits {remove!r}: use edited-blocks | unedit")
    if remove == "edited-blocks" and layers != "all":
        raise EditdecayError(f"--remove-edits edited-blocks is the layer policy edited: it cannot combine with --layers {layers}")
    if method is not None and method != "freeze-edited" and not probe_facts:
        raise EditdecayError(f"--preserve-edits {method} needs the edited facts: pass them as the first --probe-facts file")
    return PreserveConfig(method, mu=mu, rho=rho) if method is not None else None


def _unedit(model, base: str | None, device) -> dict:
    """Subtract the edits the forensics find against ``base`` (in place); what was removed."""
    from ..forensics import inspect_models, unedit
    from ..models import load_model

    if base is None:
        raise EditdecayError("--remove-edits unedit needs the unedited model: --unedit-base, or --from-edit with its recorded base")
    b, _ = load_model(base, device=device)
    ins = inspect_models(b, model, base_free=False)
    removed = unedit(model, ins)
    return {"method": "unedit", "base": base, "blocks": ins.edited_blocks, "n_edits": ins.n_edits,
            "removed": sorted(removed)}
