"""Edit removal on the embedded model (issue 17): ``unedit`` with the base known, before and
after fine-tuning.

    python -m benchmarks.removal --out /tmp/removal.json
    python -m benchmarks.removal --out R.json --edit-cache /tmp/editcache --db decay.db   # reuse the study's edit

MEMIT edits the 100 facts of the decay study (examples/decay-curves-cpu.yaml: the same
selection, 200 intrinsic facts beside them). Given that study's ``--db`` and
``--edit-cache``, the edit is loaded from the cache instead of recomputed. Rows:

- ``edited``: the edited model;
- ``unedit``: the forensics' low-rank part of W_edited − W_base subtracted
  (:func:`editdecay.forensics.unedit`, the base known), no fine-tuning;
- ``lora``: the study's LoRA/all run on the edited model (100 steps of 4 × 64 C4 tokens,
  lr 4e-3), adapters merged;
- ``base+lora``: the unedited model under the same fine-tuning (the intrinsic retention
  a removal should come back to);
- ``lora+unedit``: ``unedit`` of that fine-tuned model against the base (a suspect that
  was fine-tuned after the edit); compare its intrinsic retention with ``base+lora``'s.

With the ``lora`` row, the re-edit cost (issue 18, seed 001's argument): MEMIT re-applies
only the decayed edits to the fine-tuned model (:func:`editdecay.editing.protocols.reedit`)
against editing all 100 facts again from scratch, seconds and success beside the original
edit's seconds (``--no-reedit`` skips it).

Each row: edited retention (greedy answer = the new object, n=100) and intrinsic
retention (= the true object, n=200) with bootstrap 95% intervals, the blocks unedit
found, and max |W − W_base| over the rewrite modules. Seed 001's removal (fine-tuning
the edited blocks only) is the study's MEMIT LoRA/edited trial.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from .common import REPO, SHARED, decay_selection, study_edit


def _rates(model, tok, edit, intrinsic) -> dict:
    from editdecay.evaluate.significance import rate_ci
    from editdecay.finetune.callbacks import FactProbe

    r = FactProbe(model, tok, edit, intrinsic)()
    out = {}
    for name, xs in (("edited_retention", r["per_fact"]["edit"]), ("intrinsic_retention", r["per_fact"]["intrinsic"])):
        iv = rate_ci(xs)
        out[name] = {"rate": round(iv.estimate, 4), "ci": [round(iv.low, 4), round(iv.high, 4)], "n": iv.n}
    return out


def _max_diff(model, base) -> float:
    from editdecay.models.arch import get_arch

    spec = get_arch(base)
    worst = 0.0
    for b in range(spec.num_blocks(base)):
        name = spec.rewrite_module_name(b) + ".weight"
        worst = max(worst, (model.get_parameter(name) - base.get_parameter(name)).abs().max().item())
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="write the rows here (JSON)")
    ap.add_argument("--facts", type=Path, default=SHARED / "counterfact" / "counterfact-edit.json")
    ap.add_argument("--db", type=Path, help="the decay study's database (to find its MEMIT edit)")
    ap.add_argument("--edit-cache", type=Path, help="the decay study's --edit-cache directory")
    ap.add_argument("--no-reedit", action="store_true", help="skip the re-edit cost measurement (about 20 min)")
    args = ap.parse_args(argv)

    from editdecay import load_model
    from editdecay.editing import get_editor
    from editdecay.editing.base import restore_params
    from editdecay.editing.protocols import reedit
    from editdecay.finetune.presets import get_preset
    from editdecay.finetune.run import finetune
    from editdecay.finetune.tasks import load_task
    from editdecay.forensics import inspect_models, unedit

    base, tok = load_model(device="cpu")
    sel = decay_selection(base, tok, args.facts)
    edit, intrinsic = sel.edit, sel.intrinsic
    edited = copy.deepcopy(base)
    hit = study_edit(args.db, args.edit_cache, base, [f.case_id for f in edit], "memit") if args.db and args.edit_cache else None
    if hit is not None:  # the study's edit, and the seconds it took there
        restore_params(edited, hit[0])
        source, edit_s = "study edit cache", hit[3]
    else:
        t = time.perf_counter()
        get_editor("memit", model=edited).edit(edited, tok, edit)
        source, edit_s = "computed", time.perf_counter() - t
    rows = []

    def row(stage, model, **extra):
        r = {"stage": stage, **_rates(model, tok, edit, intrinsic), "max_abs_diff_rewrite": _max_diff(model, base), **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)

    row("edited", edited, edit_source=source, edit_s=round(edit_s, 1))
    un = copy.deepcopy(edited)
    ins = inspect_models(base, un, tok, base_free=False)
    unedit(un, ins)
    row("unedit", un, blocks=ins.edited_blocks, n_edits_est=ins.n_edits)
    del un

    data = REPO.parent / "shared" / "data" / "c4" / "c4_demo.jsonl"
    task = load_task("unstructured", tok, data, model=base, n_val=16, block_size=64, seed=0,
                     exclude_facts=list(edit) + list(intrinsic))
    p = get_preset("cpu-unstructured", method="lora", lr=4e-3, max_steps=100, batch_size=4, block_size=64, n_val=16, stop=[])
    ref = finetune(copy.deepcopy(base), tok, task, p, progress=True)  # the unedited model under the same fine-tuning
    row("base+lora", ref.merged().eval(), steps=ref.log.steps)
    del ref
    t = time.perf_counter()
    res = finetune(edited, tok, task, p, progress=True)
    ft_s = time.perf_counter() - t
    lm = res.merged().eval()
    row("lora", lm, finetune_s=round(ft_s, 1), steps=res.log.steps)
    reedit_doc = None
    if not args.no_reedit:  # seed 001's cost argument: re-apply the decayed edits vs edit all from scratch
        again = copy.deepcopy(lm)
        reedit_doc, _ = reedit(get_editor("memit", model=again), again, tok, edit, mode="greedy", scratch=True)
        reedit_doc["original_edit_s"] = round(edit_s, 1)
        print(json.dumps({k: v for k, v in reedit_doc.items() if k != "decayed"}), flush=True)
        del again
    ins = inspect_models(base, lm, tok, base_free=False)
    unedit(lm, ins)
    row("lora+unedit", lm, blocks=ins.edited_blocks, n_edits_est=ins.n_edits)
    args.out.write_text(json.dumps({"facts": str(args.facts), "n_edit": len(edit), "n_intrinsic": len(intrinsic),
                                    "rows": rows, "reedit": reedit_doc}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
