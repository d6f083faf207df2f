"""``editdecay stats`` and ``editdecay edit``: key second moments and editing facts into a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EditdecayError
from ..models.embedded import DEFAULT_MODEL
from .options import DeviceOpt, JsonOpt, ModelOpt
from .output import nan_to_none, print_table, write_json


def stats(
    layers: Annotated[list[str], typer.Option("--layers", "-l", help="Blocks (0-based): repeat or comma-separate (--layers 3,4 --layers 5); a-b is a range.", show_default=False)],
    model: ModelOpt = DEFAULT_MODEL,
    corpus: Annotated[Optional[Path], typer.Option(help="Corpus file: .txt (a document per line, or per paragraph when blank lines separate them), .jsonl or .json (field 'text'). Default: standard-library docstrings (offline).")] = None,
    tokens: Annotated[Optional[int], typer.Option(min=1, help="Keys per layer (default 20 x d_k, d_k = width of the rewrite module's input).")] = None,
    max_length: Annotated[int, typer.Option("--max-length", min=2, help="Chunk length in tokens (capped at the model's maximum positions).")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Chunks per forward pass.")] = 8,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Second moments C (the mean of k kᵀ) of the rewrite module's input keys k, for ROME,
    MEMIT and AlphaEdit: all layers in one pass, cached as safetensors under the cache root.

    JSON schema: {"model": str, "corpus": {"id": str, "sha256": str}, "tokens": int,
    "max_length": int, "layers": [{"layer": int, "d_k": int, "count": int, "trace":
    float, "cached": bool, "path": str}]}. "tokens" is the per-layer budget, "max_length"
    the effective chunk length, "trace" = tr C = E[|k|^2], "cached" whether the layer came
    from the cache, "path" its cache file.
    """
    from ..editing.corpus import Corpus
    from ..editing.stats import StatsCache, layer_stats
    from ..models import load_model

    wanted: list[int] = []
    for item in layers:
        for part in filter(None, (p.strip() for p in item.split(","))):
            try:
                if "-" in part[1:]:
                    a, b = part.split("-", 1)
                    wanted.extend(range(int(a), int(b) + 1))
                else:
                    wanted.append(int(part))
            except ValueError:
                raise EditdecayError(f"--layers: {part!r} is not a layer number or a range a-b") from None
    src = Corpus.from_path(corpus) if corpus is not None else Corpus.offline_default()
    m, tok = load_model(model, device=device)
    res = layer_stats(m, tok, wanted, src, tokens=tokens, max_length=max_length, batch_size=batch_size, cache=StatsCache())
    first = next(iter(res.values()))
    doc = {
        "model": model,
        "corpus": {"id": src.id, "sha256": src.sha256},
        "tokens": tokens if tokens is not None else max(s.count for s in res.values()),
        "max_length": first.key.max_length,
        "layers": [
            {"layer": s.layer, "d_k": s.d_k, "count": s.count, "trace": s.trace, "cached": s.cached, "path": str(s.path)}
            for s in res.values()
        ],
    }
    if as_json:
        typer.echo(json.dumps(doc))
        return
    print_table(f"second moments ({model}, {src.id}, max length {doc['max_length']})",
                ["layer", "d_k", "count", "trace", "cached", "path"],
                [(str(row["layer"]), str(row["d_k"]), str(row["count"]), f"{row['trace']:.4g}",
                  "yes" if row["cached"] else "no", row["path"]) for row in doc["layers"]])


def edit(
    requests: Annotated[Path, typer.Option(help="Facts to edit (any supported format).")],
    out: Annotated[Path, typer.Option(help="Output directory (results.json).")],
    method: Annotated[str, typer.Option(help="Editing method: rome | memit | alphaedit | ft | mend | malmen.")] = "rome",
    model: ModelOpt = DEFAULT_MODEL,
    protocol: Annotated[str, typer.Option(help="single (each fact alone, restored) | batch (all at once) | sequential (batches in turn).")] = "single",
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Facts per batch for --protocol sequential.")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Named preset, e.g. gpt2-xl@reference (default: derived from the model).")] = None,
    hparams: Annotated[Optional[Path], typer.Option(help="YAML of hyperparameters (over the preset).")] = None,
    stats_corpus: Annotated[Optional[Path], typer.Option(help="Text corpus for the key second moments (default: offline corpus).")] = None,
    save_model: Annotated[Optional[Path], typer.Option(help="Save the edited model here (protocol single: one fact only).")] = None,
    editor_checkpoint: Annotated[Optional[Path], typer.Option(help="A trained MEND/MALMEN hypernetwork ('editdecay train-editor --out').")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Edit only the first N facts.")] = None,
    mode: Annotated[str, typer.Option(help="Retention probe mode: greedy | masked_argmax.")] = "greedy",
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Edit facts into the model and measure ES/PS/NS and retention before and after.

    JSON schema (also written to OUT/results.json): {"method": str, "protocol": str,
    "preset": str, "n_facts": int, "pre": {"es", "ps", "ns", "retention_new",
    "retention_true"}, "post": {same keys}, "ns_drop": {"estimate", "low", "high", "n"}
    (pre NS − post NS, paired over facts, 95% bootstrap), "seconds_per_fact": float,
    "edited_layers": [int], "dropped": [case ids], "facts": [{"case_id", "pre": {...},
    "post": {...}, "seconds", "edited_layers", "steps_factor", "dropped"}]}; undefined
    means are null.
    """
    from ..editing import get_editor
    from ..editing.hparams import read_hparams_file
    from ..editing.protocols import PROTOCOLS, run_batch, run_single, save_edited_model
    from ..facts.datasets import load_facts
    from ..models import load_model

    if protocol not in PROTOCOLS:
        raise EditdecayError(f"unknown protocol {protocol!r} for {method}: use one of {', '.join(PROTOCOLS)}")
    facts = load_facts(requests)[:limit]
    if protocol == "sequential" and batch_size is None:
        raise EditdecayError("--protocol sequential needs --batch-size B")
    if save_model is not None and protocol == "single" and len(facts) != 1:
        raise EditdecayError(f"--save-model with protocol {protocol} needs exactly one fact, got {len(facts)} (use --limit 1)")
    overrides = read_hparams_file(hparams) if hparams else {}
    if stats_corpus is not None:
        overrides["stats_corpus"] = str(stats_corpus)
    m, tok = load_model(model, device=device)
    extra = {"checkpoint": str(editor_checkpoint)} if editor_checkpoint is not None else {}
    editor = get_editor(method, preset=preset, overrides=overrides, model=m, **extra)
    if protocol == "single":
        res = run_single(editor, m, tok, facts, mode=mode, keep_results=save_model is not None)
    else:
        res = run_batch(editor, m, tok, facts, batch_size=batch_size if protocol == "sequential" else None, mode=mode)
    doc = nan_to_none(res.to_json(editor.preset_info["preset"]))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", doc)
    if save_model is not None:
        # base: the unedited model, fine-tuning measures loss<base-Δ against it
        save_edited_model(m, tok, save_model, res, method=method, base_model=str(model), preset=preset,
                          requests=str(requests))
    if protocol != "single":
        res.restore(m)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    keys = ("es", "ps", "ns", "retention_new", "retention_true")
    print_table(f"{method} ({protocol}, {len(facts)} facts, preset {doc['preset']})", ["stage", *keys],
                [(stage, *[("-" if doc[stage][k] is None else f"{doc[stage][k]:.3f}") for k in keys]) for stage in ("pre", "post")],
                _ns_line(doc),
                f"{doc['seconds_per_fact']:.1f} s per fact; edited blocks {doc['edited_layers']}; "
                f"dropped {doc['dropped'] or 'none'}; wrote {out / 'results.json'}")


def _ns_line(doc: dict) -> str:
    """NS after the edit beside the unedited model's, and the drop with its interval."""
    d, pre, post = doc["ns_drop"], doc["pre"]["ns"], doc["post"]["ns"]
    if not d["n"] or pre is None or post is None:
        return "NS: no neighbourhood prompts"
    return (f"NS {post:.3f} after the edit vs {pre:.3f} unedited: drop {d['estimate']:+.3f} "
            f"[{d['low']:+.3f}, {d['high']:+.3f}] over n={d['n']} facts")
