"""Edit detection on the embedded model: block precision/recall, estimated edits and
fact-level recall of ``editdecay inspect``, before and after LoRA / full fine-tuning.

    python -m benchmarks.forensics --out /tmp/forensics.jsonl     # the whole grid (~40 min on 2 CPU cores)
    python -m benchmarks.forensics --only memit-10 --out F.jsonl

Each row edits ``n`` confidence-filtered CounterFact facts (ROME in turn, MEMIT/AlphaEdit
in one batch) into a fresh copy of the model, then inspects it against the base with the
``n`` edited facts and 100 other filtered facts as candidates. The facts are the decay
study's selection (examples/decay-curves-cpu.yaml: its 100 edit facts, and intrinsic facts
of other subjects as decoys), so the confidence filter is read from the selection cache,
and AlphaEdit reuses MEMIT's optimised targets (one TargetCache): the truth is the blocks
whose weights the editor changed and the facts it edited. ``stage`` ``edited`` inspects
the edited model; ``lora`` / ``full`` fine-tune it first (the demo's LoRA run: r 8 on
every block, 40 steps at lr 2e-3 on the offline corpus; full: 40 steps at lr 5e-5) and
merge. ``base_free`` is the precision of the spectral score's top blocks (as many as
were edited) without the base. Fact recall@n: edited facts among the n best matches.
Rows already in ``--out`` are skipped, so the grid resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from .common import SHARED, decay_selection, study_edit

GRID = [("rome", 1), ("rome", 10), ("memit", 1), ("memit", 10), ("memit", 100),
        ("alphaedit", 1), ("alphaedit", 10), ("alphaedit", 100)]
STAGES = ("edited", "lora", "full")


def fine_tune(model, tok, task, method: str):
    from editdecay.finetune.presets import get_preset
    from editdecay.finetune.run import finetune

    lr = 2e-3 if method == "lora" else 5e-5
    p = get_preset("cpu-unstructured", method=method, lr=lr, max_steps=40, batch_size=4, block_size=64, n_val=16, stop=[])
    res = finetune(model, tok, task, p, progress=False)
    return res.merged().eval(), res.log.seconds


def save_diffs(path: Path, base, suspect, truth) -> None:
    """The changed rewrite-module diffs (out × in, fp16) by block, and the edited blocks
    (a subtraction per block: the inspection's spectra are not needed again)."""
    from safetensors.torch import save_file

    from editdecay.models.arch import get_arch

    spec, deltas = get_arch(base), {}
    for b in range(spec.num_blocks(base)):
        name = spec.rewrite_module_name(b)
        d = (spec.weight_out_in(suspect.get_submodule(name)) - spec.weight_out_in(base.get_submodule(name))).detach().float().cpu()
        if torch.any(d):
            deltas[b] = d
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({str(b): d.half().contiguous() for b, d in deltas.items()}, str(path),
              metadata={"truth": json.dumps(sorted(truth))})


def row_for(base, suspect, tok, edited_facts, decoys, truth_blocks, **extra) -> dict:
    from editdecay.forensics import inspect_models

    t = time.perf_counter()
    ins = inspect_models(base, suspect, tok, edited_facts + decoys, answers=True)
    secs = time.perf_counter() - t
    found, truth = set(ins.edited_blocks), set(truth_blocks)
    ids = {f.case_id for f in edited_facts}
    top = [m.case_id for m in ins.facts[: len(edited_facts)]]
    bf = sorted(ins.base_free, key=lambda r: -r["score"])[: len(truth)]
    changed = [m for m in ins.facts if m.case_id in ids]
    return {
        **extra,
        "blocks_true": sorted(truth), "blocks_found": sorted(found),
        "block_precision": len(found & truth) / len(found) if found else None,
        "block_recall": len(found & truth) / len(truth),
        "false_blocks": len(found - truth),
        "n_edits_est": ins.n_edits,
        # no edited block found: nothing to match the candidates against (ties, not evidence)
        "fact_recall_at_n": sum(c in ids for c in top) / len(ids) if found else None,
        "n_candidates": len(ins.facts),
        "answers_changed_edited": sum(bool(m.answer_changed) for m in changed) / len(changed),
        "answers_changed_decoys": sum(bool(m.answer_changed) for m in ins.facts if m.case_id not in ids) / max(len(decoys), 1),
        "base_free_precision": sum(r["block"] in truth for r in bf) / len(bf),
        "scores": {str(v.block): (None if v.score == float("inf") else round(v.score, 2))
                   for v in ins.blocks if v.verdict == "edited" or v.block in truth},
        "signatures": {str(v.block): v.signature for v in ins.blocks if v.verdict == "edited"},
        "inspect_s": round(secs, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="append JSON lines here (resumes)")
    ap.add_argument("--only", action="append", default=[], help="run only these EDITOR-N entries")
    ap.add_argument("--db", type=Path, help="the decay study's database: its 100-fact MEMIT/AlphaEdit edits ...")
    ap.add_argument("--edit-cache", type=Path, help="... loaded from its --edit-cache instead of recomputed")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="inspect at these stages")
    ap.add_argument("--facts", type=Path, default=SHARED / "counterfact" / "counterfact-edit.json")
    ap.add_argument("--save-diffs", type=Path, help="also save each row's rewrite-module diffs (fp16 safetensors) here")
    args = ap.parse_args(argv)

    from editdecay import load_model
    from editdecay.editing import get_editor
    from editdecay.editing.base import restore_params
    from editdecay.editing.core import TargetCache
    from editdecay.finetune.tasks import load_task

    base, tok = load_model(device="cpu")
    sel = decay_selection(base, tok, args.facts)
    pool = list({f.subject: f for f in sel.edit}.values())
    subjects = {f.subject for f in pool}
    decoys = [f for f in {f.subject: f for f in sel.intrinsic}.values() if f.subject not in subjects][:100]
    facts = pool + decoys
    targets = TargetCache()
    task = load_task("unstructured", tok, None, model=base, n_val=16, block_size=64, seed=0, exclude_facts=facts)
    done = set()
    if args.out.exists():
        rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        done = {(r["name"], r["stage"]) for r in rows}
    for editor_name, n in GRID:
        name = f"{editor_name}-{n}"
        if args.only and name not in args.only or all((name, s) in done for s in args.stages):
            continue
        edited = copy.deepcopy(base)
        editor = get_editor(editor_name, model=edited)
        if hasattr(editor, "target_cache"):
            editor.target_cache = targets
        hit = (study_edit(args.db, args.edit_cache, base, [f.case_id for f in pool[:n]], editor_name)
               if args.db and args.edit_cache and n == len(pool) else None)
        if hit is not None:
            values, truth, _, edit_s, _ = hit
            restore_params(edited, values)
        else:
            t = time.perf_counter()
            truth = editor.edit(edited, tok, pool[:n]).edited_layers(edited)
            edit_s = time.perf_counter() - t
        for stage in args.stages:
            if (name, stage) in done:
                continue
            suspect, ft_s = (edited, 0.0) if stage == "edited" else fine_tune(copy.deepcopy(edited), tok, task, stage)
            row = row_for(base, suspect, tok, pool[:n], decoys, truth, name=name, editor=editor_name, n=n, n_facts=len(pool[:n]),
                          stage=stage, edit_s=round(edit_s, 1), finetune_s=round(ft_s, 1))
            if args.save_diffs:
                save_diffs(args.save_diffs / f"{name}-{stage}.safetensors", base, suspect, truth)
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            del suspect


if __name__ == "__main__":
    main()
