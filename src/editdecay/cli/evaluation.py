"""``editdecay eval``: downstream accuracy and activation drift."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EditdecayError
from ..models.embedded import DEFAULT_MODEL
from .options import DeviceOpt, JsonOpt, ModelOpt
from .output import load_stage, nan_to_none, print_table, write_json

eval_app = typer.Typer(help="Evaluate models: downstream accuracy, activation drift.", no_args_is_help=True)


@eval_app.command("downstream")
def eval_downstream(
    data_dir: Annotated[Path, typer.Option(help="LLM-Adapters commonsense folder (boolq/test.json, ..., hellaswag/hellaswag_val_full.txt).")],
    model: ModelOpt = DEFAULT_MODEL,
    adapter: Annotated[Optional[Path], typer.Option(help="A LoRA/DoRA adapter (or 'editdecay finetune' output) to apply.")] = None,
    tasks: Annotated[Optional[list[str]], typer.Option(help="Tasks (repeatable; default all 8): boolq, piqa, siqa, hellaswag, winogrande, arc-e, arc-c, obqa.")] = None,
    mode: Annotated[str, typer.Option(help="gen (LLM-Adapters generative) | ll (log-likelihood ranking).")] = "gen",
    limit: Annotated[Optional[int], typer.Option(min=1, help="First N items per task.")] = None,
    num_beams: Annotated[int, typer.Option(min=1, help="Beam width (LLM-Adapters' code uses 4).")] = 1,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward.")] = 16,
    prompt_style: Annotated[str, typer.Option(help="alpaca | llm-adapters | chat.")] = "alpaca",
    response_prefix: Annotated[str, typer.Option(help="Text the response starts with (gen), e.g. 'the correct answer is'.")] = "",
    ll_context: Annotated[str, typer.Option(help="ll mode: prompt (instruction + options) | cloze (question alone).")] = "prompt",
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy on the 8 commonsense tasks (seed 001), per task and mean.

    JSON schema: {"schema": "editdecay.downstream/1", "mode", "settings", "mean_accuracy",
    "seconds", "tasks": {task: {"n", "correct", "accuracy", "parse_rate", "seconds"}}}.
    """
    from ..evaluate.downstream import TASKS, evaluate_downstream
    from ..models import load_model

    m, tok = load_model(model, device=device)
    if adapter is not None:
        m, tok = load_stage(str(adapter), (m, tok), device)
    res = evaluate_downstream(m, tok, list(tasks or TASKS), data_dir, mode=mode, limit=limit, batch_size=batch_size,
                              num_beams=num_beams, prompt_style=prompt_style, response_prefix=response_prefix,
                              ll_context=ll_context)
    doc = nan_to_none(res.to_dict())
    if as_json:
        typer.echo(json.dumps(doc))
        return
    rows = [(name, str(r["n"]), f"{r['accuracy']:.3f}", "-" if r.get("parse_rate") is None else f"{r['parse_rate']:.2f}",
             f"{r['seconds']:.0f}") for name, r in doc["tasks"].items()]
    print_table(f"downstream ({mode}, {model}{', adapter ' + str(adapter) if adapter else ''})",
                ["task", "n", "accuracy", "parse rate", "seconds"],
                rows + [("mean", "", f"{doc['mean_accuracy']:.3f}", "", f"{doc['seconds']:.0f}")])


@eval_app.command("drift")
def eval_drift(
    base: Annotated[str, typer.Option(help="The unedited model (name or directory).")],
    edited: Annotated[Path, typer.Option(help="The edited model ('editdecay edit --save-model').")],
    prompts: Annotated[Path, typer.Option(help="Diagnostic prompts: a facts file (any supported format) or a text file, one prompt per line.")],
    finetuned: Annotated[Optional[Path], typer.Option(help="The base model fine-tuned ('editdecay finetune' output or model dir).")] = None,
    edited_finetuned: Annotated[Optional[Path], typer.Option(help="The edited model fine-tuned ('editdecay finetune --from-edit' output).")] = None,
    position: Annotated[str, typer.Option(help="last | subject_last (facts files only).")] = "last",
    out: Annotated[Optional[Path], typer.Option(help="Write drift.json here.")] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-block activation drift and displacement cosines (seed 001 Eq. 2–6).

    Pairs: edited vs base, fine-tuned vs base, edited+fine-tuned vs edited (those whose
    models are given); cosines between the displacements. LoRA adapters are merged.
    JSON schema: DriftResult.to_json(): {"position", "n_prompts", "n_blocks", "norms":
    {pair: [per block]}, "cosines": {pair: [per block]}, "norms_normalised": {...}, "eps", "pairs",
    "cosine_pairs"}.
    """
    from ..evaluate.activations import drift
    from ..facts.datasets import load_facts

    if finetuned is None and edited_finetuned is None:
        raise EditdecayError("give --finetuned and/or --edited-finetuned")
    subjects = None
    if prompts.suffix in (".json", ".jsonl", ".yaml") or prompts.is_dir():
        facts = load_facts(prompts)
        texts, subjects = [f.text for f in facts], [f.subject for f in facts]
    else:
        try:
            texts = [ln.strip() for ln in prompts.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except OSError as e:
            raise EditdecayError(f"{prompts}: {e.strerror or e}") from None
    if not texts:
        raise EditdecayError(f"{prompts}: no prompts")
    if position == "subject_last" and subjects is None:
        raise EditdecayError("--position subject_last needs a facts file (subjects)")
    b = load_stage(base, device=device)
    e = load_stage(str(edited), device=device)
    f = load_stage(str(finetuned), b, device) if finetuned else None
    ef = load_stage(str(edited_finetuned), e, device) if edited_finetuned else None
    res = drift(b[0], e[0], f[0] if f else None, ef[0] if ef else None, tokenizer=b[1], prompts=texts,
                position=position, subjects=subjects)
    doc = nan_to_none(res.to_json())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "drift.json", doc)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    for pair, curve in doc["norms"].items():
        peak = max(range(len(curve)), key=lambda i: curve[i] or 0.0)
        typer.echo(f"{pair}: max {curve[peak]:.3f} at block {peak}; last block {curve[-1]:.3f}")
    for pair, curve in doc["cosines"].items():
        typer.echo(f"cosine {pair}: mean {sum(c or 0.0 for c in curve) / len(curve):.3f}")
