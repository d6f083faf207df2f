"""The ``commonsense`` task: LLM-Adapters ``{instruction, input, output, answer}`` records
or the HellaSwag text layout, in the Alpaca prompt with loss on all tokens; validation
is held out of the training records."""

from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from .base import Task, _as_paths, _expand, _field, _read_text, _records_task, read_json_records, register_task


HELLASWAG_INSTRUCTION = ("Please choose the correct ending to complete the given sentence: {ctx}\n\n"
                         "Ending1: {e0} Ending2: {e1} Ending3: {e2} Ending4: {e3}\n\n"
                         "Answer format: ending1/ending2/ending3/ending4")


def read_hellaswag_text(p: Path) -> list[dict[str, str]]:
    """LLM-Adapters records from the HellaSwag text layout (6 lines per task:
    ``activity_label: ctx``, label 0–3, endings 0–3)."""
    lines = _read_text(p).replace("\r\n", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{p}: {len(lines)} lines is not a multiple of 6 (HellaSwag text layout: context, label, 4 endings)")
    out = []
    for k in range(0, len(lines), 6):
        ctx, label, *ends = lines[k : k + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise DataError(f"{p}: record {k // 6} (line {k + 2}) field 'label' must be 0-3, got {label!r}")
        answer = f"ending{int(label) + 1}"
        out.append({"instruction": HELLASWAG_INSTRUCTION.format(ctx=ctx, e0=ends[0], e1=ends[1], e2=ends[2], e3=ends[3]),
                    "input": "", "output": f"the correct answer is {answer}", "answer": answer})
    return out


def read_commonsense(p: Path) -> list[dict[str, str]]:
    """LLM-Adapters records ``{instruction, input, output, answer}`` of a JSON/JSONL
    file (``input`` and ``answer`` optional), or the HellaSwag text layout (``.txt``)."""
    if p.suffix.lower() == ".txt":
        return read_hellaswag_text(p)
    out = []
    for i, rec in enumerate(read_json_records(p)):
        where = f"{p}: record {i}"
        out.append({"instruction": _field(rec, "instruction", where), "input": _field(rec, "input", where, required=False, default=""),
                    "output": _field(rec, "output", where), "answer": str(_field(rec, "answer", where, (str, int), required=False, default=""))})
    return out


def _load_commonsense(tok, data, *, n_train, n_val, cutoff, seed, hygiene_facts, stopwords, **_) -> Task:
    paths = _as_paths(data, "commonsense")
    files = [q for p in paths for q in (_expand([p], "commonsense", (), pattern="*/train.json") if p.is_dir() else [p])]
    records, per_file = [], {}
    for f in files:
        r = read_commonsense(f)
        per_file[str(f)] = len(r)
        records += r
    return _records_task("commonsense", tok, records, files, per_file, n_train=n_train, n_val=n_val, cutoff=cutoff,
                         seed=seed, hygiene_facts=hygiene_facts, stopwords=stopwords)


register_task("commonsense", loader=_load_commonsense, n_val=120, cutoff=256)
