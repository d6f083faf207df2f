"""``editdecay probe`` and ``editdecay trace``: what a model predicts, and where it recalls a fact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..models.embedded import DEFAULT_MODEL
from .options import DeviceOpt, JsonOpt, ModelOpt
from .output import nan_to_none, print_table, write_json


def probe(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to probe.", show_default=False)],
    model: ModelOpt = DEFAULT_MODEL,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Number of next tokens to list.")] = 5,
    device: DeviceOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 32,
    as_json: JsonOpt = False,
) -> None:
    """Top-k next tokens and the first non-stop token of greedy decoding for each prompt.

    JSON schema: {"model": str, "results": [{"prompt": str, "top": [{"token": str,
    "prob": float}], "first_non_stop": str}]}. "first_non_stop" is "" when the first 8
    greedy tokens are all stop words or punctuation.
    """
    from ..evaluate.probes import Prober
    from ..models import load_model

    m, tok = load_model(model, device=device)
    results = Prober(m, tok, batch_size=batch_size).probe(prompts, k=top_k)
    doc = {
        "model": model,
        "results": [
            {
                "prompt": r.prompt,
                "top": [{"token": t.token, "prob": t.prob} for t in r.top],
                "first_non_stop": r.first_non_stop.token,
            }
            for r in results
        ],
    }
    if as_json:
        typer.echo(json.dumps(doc, ensure_ascii=False))
        return
    print_table(f"next tokens ({model})", ["prompt", "first non-stop", f"top {top_k}"],
                [(r["prompt"], repr(r["first_non_stop"]), "  ".join(f"{t['token']!r} {t['prob']:.3f}" for t in r["top"]))
                 for r in doc["results"]])


def trace(
    facts: Annotated[Path, typer.Option(help="Facts to trace (any supported format).")],
    out: Annotated[Path, typer.Option(help="Output directory (trace.json, effects.png, heatmap_*.png).")],
    model: ModelOpt = DEFAULT_MODEL,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Trace only the first N facts.")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Noise samples per restoration.")] = 10,
    heatmaps: Annotated[int, typer.Option(min=0, help="Write token × layer heat maps for the first N facts.")] = 3,
    db: Annotated[Optional[Path], typer.Option(help="Also record OUT/trace.json in this study database (artefact of kind 'trace'), for the report's Figs. 6–7 section.")] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Causal tracing (seed 001 Figs. 6–7): restoration effect per layer of the clean
    state at the subject's last token (overall, MLP, attention), and the edit layers it
    suggests for a model without a preset.

    JSON schema (also OUT/trace.json): {"n_facts", "mean_effect": {kind: [per layer]},
    "peak_layers": {kind: int}, "suggested": {"peak": int, "layers": [int]},
    "facts": FactsTrace.to_json()}.
    """
    from ..evaluate.tracing import (
        effect_plot,
        heatmap,
        suggest_edit_layers,
        trace_facts,
    )
    from ..facts.datasets import load_facts
    from ..models import load_model

    fs = load_facts(facts)[:limit]
    m, tok = load_model(model, device=device)
    res = trace_facts(m, tok, fs, n_samples=samples)
    out.mkdir(parents=True, exist_ok=True)
    effect_plot(res, out / "effects.png")
    for i, t in enumerate(res.traces[:heatmaps]):
        heatmap(t, out / f"heatmap_{i}.png")
    mean = {k: v.tolist() for k, v in res.mean_effect().items()}
    peak, layers = suggest_edit_layers(res.mean_effect()["mlp"]) if "mlp" in mean else (None, [])
    doc = nan_to_none({"n_facts": len(fs), "mean_effect": mean, "peak_layers": res.peak_layers(),
                       "suggested": {"peak": peak, "layers": layers}, "facts": res.to_json()})
    write_json(out / "trace.json", doc)
    if db is not None:
        from ..models.loading import model_identity
        from ..study.store import Store

        with Store(db) as store:
            store.add_artefact(f"trace:{(out / 'trace.json').resolve()}", "trace", (out / "trace.json").resolve(),
                               meta={"model": str(model), "identity": model_identity(m), "facts": str(facts),
                                     "n_facts": len(fs), "label": f"{model} ({len(fs)} facts)"})
    if as_json:
        typer.echo(json.dumps(doc))
        return
    typer.echo(f"{len(fs)} facts traced; peak layers {doc['peak_layers']}; suggested edit layers {layers} (MLP peak {peak}); wrote {out}")
