"""Re-edit cost (seed 001's argument, measured): after fine-tuning, re-apply only the
decayed edits, against editing every fact from scratch on the fine-tuned model and
against the original edit (the study's ``reedit`` stage)."""

from __future__ import annotations

from .common import Section, Table, _no_data, _rate_iv
from .data import StudyData, fmt
from .registry import meta, order_of, section


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


@section("reedit", "Re-edit cost after fine-tuning", "seed 001 (cost of re-editing), issue 18",
         order=order_of("retention_curves") + 0.75)
def reedit_section(d: StudyData):
    """Shows, per edit+ft trial with the re-edit stage, the decayed facts, the re-edit's editor, seconds and
    success on them, ES of all facts after fine-tuning → after re-editing, editing every fact from scratch on the
    fine-tuned model, and the original edit's seconds; from the units' ``reedit`` info and the ``edit_seconds``
    metric rows."""

    sid, title, src = meta(reedit_section)
    rows = []
    for t in d.of_kind("edit+ft"):
        for doc in d.unit_info(t, "reedit"):
            orig = [r["value"] for r in d.metric_rows(t.key, "edit_seconds") if r["value"] is not None]
            re_, sc = doc["reedit"], doc.get("scratch")
            k_dec = round(re_["decayed"]["success"] * re_["decayed"]["n"]) if re_["decayed"]["n"] else 0
            rows.append([t.label, f"{len(doc['decayed'])}/{doc['n_facts']}", doc.get("editor", t.editor),
                         _secs(re_["seconds"]),
                         fmt(_rate_iv(d, k_dec, re_["decayed"]["n"])) if re_["decayed"]["n"] else "—",
                         f"{doc['finetuned']['success']:.2f} → {re_['all']['success']:.2f}",
                         _secs(sc["seconds"]) if sc else "—", f"{sc['all']['success']:.2f}" if sc else "—",
                         _secs(orig[0] if orig else None)])
    if not rows:
        return _no_data(sid, title, src, "needs the re-edit stage: reedit: {editor: null, scratch: true} on "
                        "edit+ft trials")
    sec = Section(sid, title, src, "Decayed = edited facts whose ES fails after fine-tuning. The re-edit "
                  "applies the editor to them alone on the fine-tuned model; 'from scratch' edits every fact "
                  "again on the fine-tuned model; 'original' is the first edit on the base model. Seconds are "
                  "editor time (target optimisation and the update), success = ES on the rewrite prompt.")
    sec.tables.append(Table(["trial", "decayed", "re-edit editor", "re-edit s", "success on decayed",
                             "ES all: FT → re-edited", "from scratch s", "ES all from scratch", "original edit s"],
                            rows))
    return sec
