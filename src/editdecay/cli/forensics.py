"""``editdecay inspect``: which blocks of a model were edited, how many edits, which facts;
``editdecay reedit``: re-apply the edits that fine-tuning undid.

Registered in :mod:`editdecay.cli`; the analysis is :mod:`editdecay.forensics`, the
re-edit :func:`editdecay.editing.protocols.reedit`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EditdecayError
from .options import DeviceOpt, JsonOpt
from .output import load_stage, print_table, write_json


def inspect(
    suspect: Annotated[str, typer.Option(help="The model to inspect: a model directory, 'editdecay finetune' output or embedded name.")],
    out: Annotated[Path, typer.Option(help="Output directory (inspect.json).")],
    base: Annotated[Optional[str], typer.Option(help="The model it was made from (omit for the base-free score only).")] = None,
    facts: Annotated[Optional[Path], typer.Option(help="Candidate facts (any supported format): which of them the edit matches, whose answers differ.")] = None,
    adapter_on: Annotated[Optional[str], typer.Option(help="When --suspect is an adapter: the model it was trained on (default: --base).")] = None,
    outlier_ratio: Annotated[float, typer.Option(min=1.0, help="After fine-tuning: a block is edited when σ₁ of its rewrite diff is this many times the other blocks' median.")] = 3.0,
    top_k: Annotated[int, typer.Option(min=1, help="Facts listed in the table.")] = 10,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Edit forensics: per block of SUSPECT, was it edited by a locate-then-edit method,
    fine-tuned or left unchanged, judged from the singular values of W_suspect − W_base.

    JSON schema (also OUT/inspect.json): {"schema": "editdecay.inspect/1", "base",
    "suspect", "settings", "edited_blocks": [int], "n_edits": int, "blocks": [{"block",
    "verdict": "edited"|"fine-tuned"|"unchanged", "score", "rank", "n_edits",
    "changed_modules", "signature"}], "modules": [{"name", "block", "rewrite", "shape",
    "norm", "rel_norm", "rank", "top_sv"}] (changed only), "facts": [{"case_id",
    "subject", "score", "block", "answer_base", "answer_suspect", "answer_changed"}]
    (best match first), "base_free": [{"block", "score", "log_gap"}]}. Without --base
    only "base_free" is filled. "score" is null for an isolated edit (no background).
    """
    from ..facts.datasets import load_facts
    from ..forensics import Inspection, inspect_models, spectral_anomaly

    if base is None and facts is not None:
        raise EditdecayError("--facts needs --base (facts are matched against the weight difference)")
    cands = load_facts(facts) if facts is not None else []
    if base is None:
        s, _ = load_stage(suspect, device=device)
        ins = Inspection([], [], {}, base_free=spectral_anomaly(s))
    else:
        b = load_stage(base, device=device)
        on = load_stage(adapter_on, device=device) if adapter_on else b
        s, _ = load_stage(suspect, on, device)
        ins = inspect_models(b[0], s, b[1], cands, outlier_ratio=outlier_ratio)
    doc = {"base": base, "suspect": suspect, **ins.to_json()}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "inspect.json", doc)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    if base is not None:
        rows = [[str(v.block), v.verdict, v.signature, "∞" if v.score == float("inf") else f"{v.score:.1f}",
                 str(v.rank), str(v.n_edits)] for v in ins.blocks if v.verdict != "unchanged"]
        print_table(f"blocks of {suspect} against {base}", ["block", "verdict", "signature", "score", "rank", "edits"],
                    rows, f"edited blocks {ins.edited_blocks}, estimated edits {ins.n_edits}; "
                    f"{sum(v.verdict == 'unchanged' for v in ins.blocks)} blocks unchanged; wrote {out / 'inspect.json'}")
    if ins.facts:
        print_table(f"best-matching facts (of {len(ins.facts)})", ["case", "subject", "score", "block", "base → suspect"],
                    [[f.case_id, f.subject, f"{f.score:.3f}", str(f.block), f"{f.answer_base!r} → {f.answer_suspect!r}"]
                     for f in ins.facts[:top_k]])
    top = sorted(ins.base_free, key=lambda r: -r["score"])[:3]
    typer.echo("base-free spectral score, highest blocks: " + ", ".join(f"{r['block']} ({r['score']:+.2f})" for r in top))


def reedit(
    from_finetune: Annotated[Path, typer.Option(help="An 'editdecay finetune --from-edit' output directory (model/ or adapter/, finetune.json).")],
    out: Annotated[Path, typer.Option(help="Output directory (reedit.json).")],
    method: Annotated[Optional[str], typer.Option(help="Editor for the re-edit (default: the one that made the edit).")] = None,
    facts: Annotated[Optional[Path], typer.Option(help="The edited facts (default: the first --probe-facts file of the fine-tune, else the edit's requests).")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Editor preset (default: the edit's, for the same editor; else derived).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Facts per editor call (default: all at once).")] = None,
    scratch: Annotated[bool, typer.Option(help="Also time editing every fact again from scratch on the fine-tuned model.")] = True,
    save_model: Annotated[Optional[Path], typer.Option(help="Save the re-edited model here.")] = None,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-apply the edits that fine-tuning undid (seed 001's re-edit cost, measured).

    Loads the fine-tuned model of FROM_FINETUNE, finds the edited facts whose edit no longer
    succeeds (ES on the rewrite prompt), re-edits only those and compares with editing
    every fact from scratch on the fine-tuned model and with the original edit's time.

    JSON schema (also OUT/reedit.json): {"schema": "editdecay.reedit/1", "from_finetune",
    "method", "n_facts", "decayed": [case ids], "finetuned": {"n", "es", "success",
    "retention_new"}, "reedit": {"n", "seconds", "seconds_per_fact", "decayed": {rates over
    the decayed facts}, "all": {rates over every fact}}, "scratch": {same} | null,
    "original": {"method", "seconds_per_fact", "seconds"} | null}.
    """
    from ..editing import get_editor
    from ..editing.protocols import reedit as run_reedit
    from ..facts.datasets import load_facts
    from ..models import save_model as save_model_dir

    info_path = from_finetune / "finetune.json"
    if not info_path.is_file():
        raise EditdecayError(f"{from_finetune}: no finetune.json (an 'editdecay finetune' output directory is needed)")
    info = json.loads(info_path.read_text())
    src = info.get("from_edit")
    if not src:
        raise EditdecayError(f"{info_path}: the fine-tune was not started from an edited model (--from-edit), so there are no edits to re-apply")
    ident_path = Path(src) / "identity.json"
    edit_meta = json.loads(ident_path.read_text()).get("edit", {}) if ident_path.is_file() else {}
    fact_file = facts or (Path(info["probe_facts"][0]) if info.get("probe_facts") else None) or (
        Path(edit_meta["requests"]) if edit_meta.get("requests") else None)
    if fact_file is None:
        raise EditdecayError(f"{info_path}: which facts were edited is not recorded; pass --facts FILE")
    edit_set = load_facts(fact_file)
    ids = set(edit_meta.get("case_ids") or ([edit_meta["case_id"]] if edit_meta.get("case_id") else []))
    if ids and not facts:
        edit_set = [f for f in edit_set if f.case_id in ids] or edit_set
    name = method or edit_meta.get("method")
    if not name:
        raise EditdecayError(f"{ident_path}: the editor is not recorded; pass --method")
    edited = load_stage(str(from_finetune), load_stage(src, device=device) if (from_finetune / "adapter").is_dir() else None,
                        device)
    model, tok = edited
    editor = get_editor(name, preset=preset or (edit_meta.get("preset") if name == edit_meta.get("method") else None),
                        model=model)
    doc, _ = run_reedit(editor, model, tok, edit_set, batch_size=batch_size, scratch=scratch)
    spf = edit_meta.get("seconds_per_fact")
    doc = {"schema": "editdecay.reedit/1", "from_finetune": str(from_finetune), "method": name, **doc,
           "original": {"method": edit_meta.get("method"), "seconds_per_fact": spf,
                        "seconds": spf * len(edit_set) if spf is not None else None} if edit_meta else None}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "reedit.json", doc)
    if save_model is not None:
        save_model_dir(model, tok, save_model, {"reedit": {"from_finetune": str(from_finetune), "method": name,
                                                           "case_ids": doc["decayed"]}})
    if as_json:
        typer.echo(json.dumps(doc))
        return

    def cells(label: str, d: dict | None, secs: float | None) -> list[str]:
        if d is None:
            return [label, "—", "—", "—", "—"]
        return [label, str(d["n"]), "—" if secs is None else f"{secs:.1f}",
                f"{d['decayed']['success']:.2f}" if d["decayed"]["n"] else "—", f"{d['all']['success']:.2f}"]

    o = doc["original"] or {}
    rows = [cells("re-edit the decayed facts", doc["reedit"], doc["reedit"]["seconds"]),
            cells("edit every fact from scratch", doc["scratch"], (doc["scratch"] or {}).get("seconds")),
            ["original edit (base model)", str(len(edit_set)), "—" if o.get("seconds") is None else f"{o['seconds']:.1f}",
             "—", "—"]]
    print_table(f"re-edit cost: {len(doc['decayed'])} of {doc['n_facts']} edits decayed "
                f"(ES {doc['finetuned']['es']:.2f} after fine-tuning)",
                ["pass", "facts edited", "seconds", "success on decayed", "success on all"], rows,
                f"wrote {out / 'reedit.json'}")
