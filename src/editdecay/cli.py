"""The ``editdecay`` command line: a thin layer over the Python API.

Every command that takes ``--json`` prints one JSON document on stdout with the schema
given in its help; logs and progress go to stderr. User errors print
``error: <message>`` on stderr and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import EditdecayError
from .models.embedded import DEFAULT_MODEL

app = typer.Typer(
    name="editdecay",
    help="Edit facts into a language model, fine-tune it, and measure whether the edits survive.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help=f"Embedded model name, local directory, .gguf file or hub id (default {DEFAULT_MODEL})."),
]
DeviceOpt = Annotated[Optional[str], typer.Option(help="Device (default: cuda if available, else cpu).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document (schema in this help) instead of a table.")]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"editdecay {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output on stderr (-v info, -vv debug).")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
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
    from .evaluate.probes import Prober
    from .models import load_model

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
    _print_table(f"next tokens ({model})", ["prompt", "first non-stop", f"top {top_k}"],
                 [(r["prompt"], repr(r["first_non_stop"]), "  ".join(f"{t['token']!r} {t['prob']:.3f}" for t in r["top"]))
                  for r in doc["results"]])


@app.command()
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
    from .editing.corpus import Corpus
    from .editing.stats import StatsCache, layer_stats
    from .models import load_model

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
    _print_table(f"second moments ({model}, {src.id}, max length {doc['max_length']})",
                 ["layer", "d_k", "count", "trace", "cached", "path"],
                 [(str(row["layer"]), str(row["d_k"]), str(row["count"]), f"{row['trace']:.4g}",
                   "yes" if row["cached"] else "no", row["path"]) for row in doc["layers"]])


facts_app = typer.Typer(help="Fact datasets: select edit/intrinsic sets, score facts.", no_args_is_help=True)
app.add_typer(facts_app, name="facts")

DATASETS = ("counterfact", "zsre", "builtin")


def _load_dataset(dataset: str, data: Optional[Path], zsre_preset: str):
    from .facts.datasets import load_facts

    if dataset not in DATASETS:
        raise EditdecayError(f"unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}")
    if dataset == "builtin":
        return load_facts("", format="builtin")
    if data is None:
        raise EditdecayError(f"--data PATH is required for --dataset {dataset} (a file or a directory of JSON files)")
    facts = load_facts(data, zsre_preset=zsre_preset)
    wrong = [f for f in facts if (f.metric == "zsre") != (dataset == "zsre")]
    if wrong:
        raise EditdecayError(f"{data}: record {facts.index(wrong[0])} is not a {dataset} record")
    return facts


@facts_app.command("select")
def facts_select(
    dataset: Annotated[str, typer.Option(help="counterfact | zsre | builtin.")],
    out: Annotated[Path, typer.Option(help="Output directory (edit.jsonl, intrinsic.jsonl, selection.json).")],
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[Optional[Path], typer.Option(help="Dataset file or directory (any supported format).")] = None,
    n_edit: Annotated[int, typer.Option("--n-edit", min=0, help="Facts in the edit set.")] = 50,
    n_intrinsic: Annotated[int, typer.Option("--n-intrinsic", min=0, help="Facts in the intrinsic set.")] = 100,
    margin: Annotated[float, typer.Option(help="Confidence margin p(true) - p(second).")] = 0.1,
    mode: Annotated[str, typer.Option(help="Probe mode: greedy | masked_argmax.")] = "greedy",
    seed: Annotated[int, typer.Option(help="Seed of the edit/intrinsic split.")] = 0,
    zsre_preset: Annotated[str, typer.Option(help="zsRE targets: memit (answers[0] as new) | easyedit (alt as new).")] = "easyedit",
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Confidence-filter a dataset and split it into disjoint edit and intrinsic sets.

    Writes OUT/edit.jsonl and OUT/intrinsic.jsonl (FactRecords) and OUT/selection.json
    (the statistics of seed 000 Table 3; also printed with --json).
    """
    from .facts.datasets import write_facts
    from .facts.selection import select_facts
    from .models import load_model

    facts = _load_dataset(dataset, data, zsre_preset)
    m, tok = load_model(model, device=device)
    sel = select_facts(m, tok, facts, n_edit=n_edit, n_intrinsic=n_intrinsic, margin=margin, mode=mode, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    write_facts(sel.edit, out / "edit.jsonl")
    write_facts(sel.intrinsic, out / "intrinsic.jsonl")
    stats = {"dataset": dataset, "data": str(data) if data else None, **sel.stats}
    _write_json(out / "selection.json", stats)
    if as_json:
        typer.echo(json.dumps(stats))
        return
    _print_table(f"selection ({dataset}, {mode}, margin {margin})",
                 ["set", "n", "mean p(true)", "mean p(second)", "relations"],
                 [(n, str(stats[n]["n"]), f"{stats[n]['mean_p_true']:.3f}", f"{stats[n]['mean_p_second']:.3f}",
                   str(stats[n]["n_relations"])) for n in ("edit", "intrinsic")],
                 f"{stats['n_passed']} of {stats['n_total']} facts pass the filter ({stats['pass_rate']:.1%}); wrote {out}")


@facts_app.command("score")
def facts_score(
    file: Annotated[Path, typer.Argument(help="Facts file (any supported format) or directory.")],
    model: ModelOpt = DEFAULT_MODEL,
    mode: Annotated[str, typer.Option(help="Retention probe mode: greedy | masked_argmax.")] = "greedy",
    prob: Annotated[str, typer.Option(help="CounterFact P(x|p): mean (per-token) | joint.")] = "mean",
    zsre_preset: Annotated[str, typer.Option(help="zsRE targets: memit | easyedit.")] = "memit",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Score only the first N facts.")] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retention of true and new targets and ES/PS/NS of every fact in FILE.

    JSON schema: {"n_facts": int, "mode": str, "retention_true": float, "retention_new":
    float, "es": float, "ps": float, "ns": float, "facts": [{"case_id", "first_non_stop",
    "capped", "retained_true", "retained_new", "es", "ps", "ns", "success"}]}; undefined
    means are NaN (written as null).
    """
    from .evaluate.metrics import score_facts
    from .facts.datasets import load_facts
    from .models import load_model

    facts = load_facts(file, zsre_preset=zsre_preset)[:limit]
    m, tok = load_model(model, device=device)
    res = score_facts(m, tok, facts, mode=mode, prob=prob)
    doc = {**res.summary(), "facts": [f.to_dict() for f in res.facts]}
    if as_json:
        typer.echo(json.dumps(_nan_to_none(doc)))
        return
    from rich.console import Console

    s = doc  # the summary's keys
    Console().print(
        f"{s['n_facts']} facts ({mode}): retention_true {s['retention_true']:.3f}  retention_new "
        f"{s['retention_new']:.3f}  ES {s['es']:.3f}  PS {s['ps']:.3f}  NS {s['ns']:.3f}"
    )


@app.command()
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
    from .editing import get_editor
    from .editing.hparams import read_hparams_file
    from .editing.protocols import PROTOCOLS, run_batch, run_single
    from .facts.datasets import load_facts
    from .models import load_model, save_model as save_model_dir

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
    base = {"model": str(model)}  # the unedited model: fine-tuning measures loss<base-Δ against it
    extra = {"checkpoint": str(editor_checkpoint)} if editor_checkpoint is not None else {}
    editor = get_editor(method, preset=preset, overrides=overrides, model=m, **extra)
    if protocol == "single":
        res = run_single(editor, m, tok, facts, mode=mode, keep_results=save_model is not None)
    else:
        res = run_batch(editor, m, tok, facts, batch_size=batch_size if protocol == "sequential" else None, mode=mode)
    doc = _nan_to_none(res.to_json(editor.preset_info["preset"]))
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "results.json", doc)
    if save_model is not None and protocol != "single":
        save_model_dir(m, tok, save_model, {"base": base, "edit": {"method": method, "protocol": protocol,
                                                                   "case_ids": [f.case_id for f in facts],
                                                                   "edited_layers": doc["edited_layers"],
                                                                   "preset": preset, "requests": str(requests),
                                                                   "seconds_per_fact": doc["seconds_per_fact"]}})
    if protocol != "single":
        res.restore(m)
    elif save_model is not None:
        import torch

        outcome = res.outcomes[0]
        if outcome.dropped:
            raise EditdecayError(f"fact {outcome.case_id} could not be edited; no model saved")
        params = dict(m.named_parameters())
        with torch.no_grad():
            for name, d in outcome.result.deltas.items():
                params[name].add_(d)
        save_model_dir(m, tok, save_model, {"base": base, "edit": {"method": method, "case_id": outcome.case_id,
                                                                   "edited_layers": outcome.edited_layers,
                                                                   "preset": preset, "requests": str(requests),
                                                                   "seconds_per_fact": outcome.seconds}})
        outcome.result.restore(m)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    keys = ("es", "ps", "ns", "retention_new", "retention_true")
    _print_table(f"{method} ({protocol}, {len(facts)} facts, preset {doc['preset']})", ["stage", *keys],
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


@app.command()
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
    preserve_edits: Annotated[Optional[str], typer.Option(help="Keep the edits of the first --probe-facts file: anchor | nullspace | replay | freeze-edited (docs/finetune.md).")] = None,
    preserve_mu: Annotated[float, typer.Option(min=0.0, help="anchor: weight of the edited modules' output drift at the edited keys.")] = 1.0,
    preserve_rho: Annotated[float, typer.Option(help="replay: share of the loss on the edit prompts and paraphrases (0 < rho < 1).")] = 0.1,
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
    from .editing import get_editor
    from .facts.datasets import load_facts
    from .finetune.callbacks import FactProbe
    from .finetune.presets import get_preset
    from .finetune.run import finetune as run_finetune
    from .finetune.tasks import TASKS, load_task
    from .models import load_model, save_model as save_model_dir

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
    doc = _nan_to_none({**res.to_json(), "method": p.method, "layers": layers, "edited_layers": edited,
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
    _write_json(out / "finetune.json", doc)
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
    from .finetune.preserve import PreserveConfig

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
    from .forensics import inspect_models, unedit
    from .models import load_model

    if base is None:
        raise EditdecayError("--remove-edits unedit needs the unedited model: --unedit-base, or --from-edit with its recorded base")
    b, _ = load_model(base, device=device)
    ins = inspect_models(b, model, base_free=False)
    removed = unedit(model, ins)
    return {"method": "unedit", "base": base, "blocks": ins.edited_blocks, "n_edits": ins.n_edits,
            "removed": sorted(removed)}


eval_app = typer.Typer(help="Evaluate models: downstream accuracy, activation drift.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _load_stage(path: str, base: tuple | None = None, device: str | None = None):
    """A model for analysis: a model name or directory, a 'finetune' output directory
    (model/ inside, or adapter/ applied to ``base`` and merged), or an adapter
    directory applied to ``base``."""
    from .models import load_model

    p = Path(path)
    if (p / "model").is_dir():
        return load_model(str(p / "model"), device=device)
    adapter = p / "adapter" if (p / "adapter").is_dir() else p if (p / "adapter_config.json").exists() else None
    if adapter is None:
        return load_model(path, device=device)
    if base is None:
        raise EditdecayError(f"{path}: an adapter needs the model it was trained on")
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base[0]), str(adapter)).merge_and_unload()
    return model.eval(), base[1]


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
    from .evaluate.downstream import TASKS, evaluate_downstream
    from .models import load_model

    m, tok = load_model(model, device=device)
    if adapter is not None:
        m, tok = _load_stage(str(adapter), (m, tok), device)
    res = evaluate_downstream(m, tok, list(tasks or TASKS), data_dir, mode=mode, limit=limit, batch_size=batch_size,
                              num_beams=num_beams, prompt_style=prompt_style, response_prefix=response_prefix,
                              ll_context=ll_context)
    doc = _nan_to_none(res.to_dict())
    if as_json:
        typer.echo(json.dumps(doc))
        return
    rows = [(name, str(r["n"]), f"{r['accuracy']:.3f}", "-" if r.get("parse_rate") is None else f"{r['parse_rate']:.2f}",
             f"{r['seconds']:.0f}") for name, r in doc["tasks"].items()]
    _print_table(f"downstream ({mode}, {model}{', adapter ' + str(adapter) if adapter else ''})",
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
    from .evaluate.activations import drift
    from .facts.datasets import load_facts

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
    b = _load_stage(base, device=device)
    e = _load_stage(str(edited), device=device)
    f = _load_stage(str(finetuned), b, device) if finetuned else None
    ef = _load_stage(str(edited_finetuned), e, device) if edited_finetuned else None
    res = drift(b[0], e[0], f[0] if f else None, ef[0] if ef else None, tokenizer=b[1], prompts=texts,
                position=position, subjects=subjects)
    doc = _nan_to_none(res.to_json())
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "drift.json", doc)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    for pair, curve in doc["norms"].items():
        peak = max(range(len(curve)), key=lambda i: curve[i] or 0.0)
        typer.echo(f"{pair}: max {curve[peak]:.3f} at block {peak}; last block {curve[-1]:.3f}")
    for pair, curve in doc["cosines"].items():
        typer.echo(f"cosine {pair}: mean {sum(c or 0.0 for c in curve) / len(curve):.3f}")


@app.command()
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
    from .evaluate.tracing import effect_plot, heatmap, suggest_edit_layers, trace_facts
    from .facts.datasets import load_facts
    from .models import load_model

    fs = load_facts(facts)[:limit]
    m, tok = load_model(model, device=device)
    res = trace_facts(m, tok, fs, n_samples=samples)
    out.mkdir(parents=True, exist_ok=True)
    effect_plot(res, out / "effects.png")
    for i, t in enumerate(res.traces[:heatmaps]):
        heatmap(t, out / f"heatmap_{i}.png")
    mean = {k: v.tolist() for k, v in res.mean_effect().items()}
    peak, layers = suggest_edit_layers(res.mean_effect()["mlp"]) if "mlp" in mean else (None, [])
    doc = _nan_to_none({"n_facts": len(fs), "mean_effect": mean, "peak_layers": res.peak_layers(),
                        "suggested": {"peak": peak, "layers": layers}, "facts": res.to_json()})
    _write_json(out / "trace.json", doc)
    if db is not None:
        from .models.loading import model_identity
        from .study.store import Store

        with Store(db) as store:
            store.add_artefact(f"trace:{(out / 'trace.json').resolve()}", "trace", (out / "trace.json").resolve(),
                               meta={"model": str(model), "identity": model_identity(m), "facts": str(facts),
                                     "n_facts": len(fs), "label": f"{model} ({len(fs)} facts)"})
    if as_json:
        typer.echo(json.dumps(doc))
        return
    typer.echo(f"{len(fs)} facts traced; peak layers {doc['peak_layers']}; suggested edit layers {layers} (MLP peak {peak}); wrote {out}")


@app.command()
def demo(
    out: Annotated[Optional[Path], typer.Option(help="Output directory (demo.db, report/); default: the editdecay cache's demo folder.")] = None,
    full: Annotated[bool, typer.Option(help="A larger run: 24 facts per editor and longer fine-tuning (about 4x the time).")] = False,
    device: DeviceOpt = None,
) -> None:
    """The one-command demo: a complete small study on the embedded model, offline.

    Selects built-in facts the model knows, edits 8 of them with ROME and with MEMIT (and
    keeps a no-edit baseline), fine-tunes each model with LoRA under the layer policies
    `all` and `non-edited` on real English text shipped with Python, probes the edited
    and intrinsic facts during training, and writes the report. Resumable: rerunning
    with the same --out skips finished work.
    """
    from importlib.resources import files

    import yaml

    from .cache import cache_root
    from .report import build_report, summary_table
    from .study import StudySpec
    from .study.runner import run_study

    out = out or cache_root() / "demo"
    raw = yaml.safe_load(files("editdecay.study").joinpath("demo.yaml").read_text(encoding="utf-8"))
    if full:
        raw["name"] = "demo-full"
        raw["axes"]["n_edits"] = 24
        raw["selection"]["n_intrinsic"] = 24
        raw["finetune"]["overrides"]["max_steps"] = 2 * raw["finetune"]["overrides"]["max_steps"]
    spec = StudySpec.from_dict(raw, "demo.yaml", base_dir=out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / f"{spec.name}.db"
    typer.echo(f"editdecay demo: {len(spec.expand())} trials on the embedded model; results in {db}", err=True)
    summary = run_study(spec, db, device=device)
    paths = build_report(db, out / "report", title="editdecay demo: do edits survive fine-tuning?")
    rows = summary_table(db)
    cols = [c for c in ("trial", "edited_retention", "intrinsic_retention", "es") if rows and c in rows[0]]
    _print_table("edited vs intrinsic retention (95% bootstrap intervals)", [c.replace("_", " ") for c in cols],
                 [[str(r[c]) for c in cols] for r in rows],
                 f"{summary.done} units run, {summary.failed} failed, {summary.seconds / 60:.1f} min",
                 *[f"[red]failed[/red] {e}" for e in summary.errors], f"report: {paths.html}", overflow="fold")


@app.command()
def plan(
    spec: Annotated[Path, typer.Argument(help="Study spec (YAML).", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Print a study's trials and an estimated cost before anything runs.

    JSON schema: {"study": str, "grid_points": int, "trials": [trial dicts with key,
    kind, axes, config, points], "cost": {counts and cpu_seconds}}.
    """
    from .study import StudySpec, estimate_cost, format_plan

    s = StudySpec.from_yaml(spec)
    trials = s.expand()
    cost = estimate_cost(trials)
    if as_json:
        typer.echo(json.dumps(_nan_to_none({"study": s.name, "grid_points": s.grid_size(),
                                            "trials": [t.to_dict() for t in trials], "cost": cost})))
        return
    typer.echo(format_plan(s, trials, cost))


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Study spec (YAML).", show_default=False)],
    db: Annotated[Optional[Path], typer.Option(help="Study database (default: SPEC's name with .db beside it).")] = None,
    executor: Annotated[str, typer.Option(help="local | ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Address of a running Ray cluster (default: start a local one).")] = None,
    max_parallel: Annotated[int, typer.Option(min=1, help="Units in flight at once (Ray actors).")] = 1,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run every unfinished unit of a study; finished units are skipped, failures are
    recorded and the study goes on.

    JSON schema: {"db": str, "study_id": int, "done": int, "failed": int, "seconds":
    float, "errors": [str], "status": {status: count}}.
    """
    from .study import Store, StudySpec
    from .study.runner import run_study

    s = StudySpec.from_yaml(spec)
    db = db or spec.with_suffix(".db")
    summary = run_study(s, db, executor=executor, max_parallel=max_parallel, ray_address=ray_address, device=device)
    with Store(db) as store:
        status = store.status_counts(summary.study_id)
    doc = {"db": str(db), "study_id": summary.study_id, "done": summary.done, "failed": summary.failed,
           "seconds": round(summary.seconds, 1), "errors": summary.errors, "status": status}
    if as_json:
        typer.echo(json.dumps(doc))
        return
    typer.echo(f"{summary.done} units done, {summary.failed} failed in {summary.seconds:.0f} s; trials {status}; results in {db}")
    for e in summary.errors:
        typer.echo(f"  failed {e}", err=True)


@app.command()
def report(
    db: Annotated[Path, typer.Argument(help="Study database.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output directory (report.md, report.html, figures/).")],
    study: Annotated[Optional[str], typer.Option(help="Only this study (name or id) of the database.")] = None,
    title: Annotated[Optional[str], typer.Option(help="Report title.")] = None,
) -> None:
    """Markdown + self-contained HTML report regenerating the seeds' tables and figures
    from a study database; every rate with its bootstrap 95% interval and n."""
    from .report import build_report

    paths = build_report(db, out, title=title, study=study)
    typer.echo(f"wrote {paths.markdown}, {paths.html} and {len(paths.figures)} figures")


@app.command("export")
def export_cmd(
    db: Annotated[Path, typer.Argument(help="Study database.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: DB's name without suffix + '-export').")] = None,
    format: Annotated[str, typer.Option("--format", help="csv | parquet.")] = "csv",
) -> None:
    """Write every table of a study database to OUT/<table>.<format>."""
    from .study import export

    out = out or db.with_name(db.stem + "-export")
    files = export(db, out, format=format)
    typer.echo(f"wrote {len(files)} tables to {out}")


def _print_table(title: str, columns: list[str], rows, *lines: str, **column_options) -> None:
    """Print a rich table (``rows`` of cell strings under ``columns``), then ``lines``."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, **column_options)
    for r in rows:
        t.add_row(*r)
    console = Console()
    console.print(t)
    for line in lines:
        console.print(line)


def _write_json(path: Path, doc) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def _nan_to_none(x):
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


from .cli_editors import train_editor  # noqa: E402

app.command("train-editor")(train_editor)

from .cli_forensics import inspect, reedit  # noqa: E402

app.command("inspect")(inspect)
app.command("reedit")(reedit)


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one line."""
    try:
        app()
    except EditdecayError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
