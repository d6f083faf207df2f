"""Loaders: CounterFact (ROME and EasyEdit formats), zsRE (MEND format), FactRecord
JSON/JSONL, and the built-in fact set. ``load_facts`` detects the format.

Malformed input raises :class:`~editdecay.errors.DataError` with one line naming the
file, the record index and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import DataError
from .record import FactRecord, Neighbor

FORMATS = ("auto", "counterfact-rome", "counterfact-easyedit", "zsre", "records", "builtin")
ZSRE_PRESETS = ("memit", "easyedit")


def load_facts(path: str | Path, format: str = "auto", *, zsre_preset: str = "memit") -> list[FactRecord]:
    """Load facts from a file, or from every ``*.json``/``*.jsonl`` file of a directory
    (sorted by name). ``format`` is one of :data:`FORMATS`; ``auto`` looks at the keys
    of the first record. ``zsre_preset``: ``memit`` (target_new = answers[0], no true
    target) or ``easyedit`` (target_new = alt, target_true = answers[0])."""
    if format == "builtin":
        from .builtin import load_builtin_facts

        return [FactRecord.from_dict(d, where=f"builtin fact {i}") for i, d in enumerate(load_builtin_facts())]
    if format not in FORMATS:
        raise DataError(f"unknown fact format {format!r}: use one of {', '.join(FORMATS)}")
    if zsre_preset not in ZSRE_PRESETS:
        raise DataError(f"unknown zsRE preset {zsre_preset!r}: use one of {', '.join(ZSRE_PRESETS)}")
    p = Path(path)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix in (".json", ".jsonl") and q.is_file())
        if not files:
            raise DataError(f"{p}: no .json or .jsonl files in this directory")
        out: list[FactRecord] = []
        for f in files:
            out.extend(load_facts(f, format, zsre_preset=zsre_preset))
        return out
    records = read_records(p)
    if not records:
        raise DataError(f"{p}: no records")
    fmt = detect_format(records[0], p) if format == "auto" else format
    convert = _CONVERTERS[fmt]
    facts = []
    for i, r in enumerate(records):
        where = f"{p}: record {i}"
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected an object, got {type(r).__name__}")
        facts.append(convert(r, where, zsre_preset))
    if fmt == "counterfact-easyedit":
        facts = _assign_relations(facts, p)
    return facts


def read_records(path: Path) -> list[Any]:
    """A JSON list, or JSON Lines (one object per line)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        return data
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON on line {n}: {e.msg}") from None
    return out


def detect_format(record: Any, path: Path) -> str:
    if isinstance(record, dict):
        keys = set(record)
        if "requested_rewrite" in keys:
            return "counterfact-rome"
        if {"ground_truth", "rephrase_prompt"} <= keys or {"ground_truth", "locality_prompt"} <= keys:
            return "counterfact-easyedit"
        if {"src", "answers"} <= keys:
            return "zsre"
        if {"subject", "prompt", "target_new"} <= keys:
            return "records"
    raise DataError(
        f"{path}: record 0: cannot tell the format (expected CounterFact 'requested_rewrite', "
        "EasyEdit 'ground_truth', zsRE 'src'/'answers', or FactRecord 'subject'/'prompt'/'target_new' fields)"
    )


# --- converters ----------------------------------------------------------------------------

def _field(r: dict, name: str, where: str, types=str) -> Any:
    if name not in r or r[name] is None:
        raise DataError(f"{where}: field {name!r} is missing")
    v = r[name]
    if not isinstance(v, types):
        raise DataError(f"{where}: field {name!r} must be a {getattr(types, '__name__', 'value')}, got {type(v).__name__}")
    return v


def _template(prompt: str, subject: str, where: str, field: str = "prompt") -> str:
    if prompt.count("{}") == 1:
        return prompt
    if subject not in prompt:
        raise DataError(f"{where}: field {field!r} does not contain the subject {subject!r}")
    return prompt.replace(subject, "{}", 1)


def _target_str(v: Any, where: str, name: str) -> str:
    if isinstance(v, dict):
        v = v.get("str")
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string (or {{\"str\": ...}})")
    return v


def _from_rome(r: dict, where: str, _preset: str) -> FactRecord:
    rw = _field(r, "requested_rewrite", where, dict)
    w = f"{where}: requested_rewrite"
    subject = _field(rw, "subject", w)
    truth = _target_str(rw.get("target_true"), where, "requested_rewrite.target_true")
    neigh = r.get("neighborhood_prompts", [])
    paras = r.get("paraphrase_prompts", [])
    for name, lst in (("paraphrase_prompts", paras), ("neighborhood_prompts", neigh)):
        if not isinstance(lst, list) or not all(isinstance(x, (str, dict)) for x in lst):
            raise DataError(f"{where}: field {name!r} must be a list of strings")
    return FactRecord(
        case_id=str(r.get("case_id", where.rsplit(" ", 1)[-1])),
        subject=subject,
        prompt=_template(_field(rw, "prompt", w), subject, where, "requested_rewrite.prompt"),
        target_true=truth,
        target_new=_target_str(rw.get("target_new"), where, "requested_rewrite.target_new"),
        relation_id=rw.get("relation_id"),
        paraphrases=tuple(p if isinstance(p, str) else p.get("prompt", "") for p in paras),
        neighborhood=tuple(Neighbor(p if isinstance(p, str) else p.get("prompt", ""), truth) for p in neigh),
        source="counterfact",
    )


def _from_easyedit(r: dict, where: str, _preset: str) -> FactRecord:
    subject = _field(r, "subject", where)
    truth = _field(r, "ground_truth", where)
    neigh = ()
    if r.get("locality_prompt"):
        neigh = (Neighbor(_field(r, "locality_prompt", where), _field(r, "locality_ground_truth", where)),)
    return FactRecord(
        case_id=str(_field(r, "case_id", where, (int, str))),
        subject=subject,
        prompt=_template(_field(r, "prompt", where), subject, where),
        target_true=truth,
        target_new=_field(r, "target_new", where),
        paraphrases=(_field(r, "rephrase_prompt", where),) if r.get("rephrase_prompt") else (),
        neighborhood=neigh,
        source="counterfact",
    )


def _from_zsre(r: dict, where: str, preset: str) -> FactRecord:
    subject = _field(r, "subject", where)
    answers = _field(r, "answers", where, list)
    if not answers or not isinstance(answers[0], str):
        raise DataError(f"{where}: field 'answers' must be a non-empty list of strings")
    src = _field(r, "src", where)
    if preset == "memit":
        new, true = answers[0], None
    else:
        new, true = _field(r, "alt", where), answers[0]
    loc, loc_ans = r.get("loc"), r.get("loc_ans")
    neigh = ()
    if loc:
        if not isinstance(loc_ans, str):
            raise DataError(f"{where}: field 'loc_ans' must be a string when 'loc' is given")
        neigh = (Neighbor(loc + "?" if preset == "memit" else loc, loc_ans),)
    return FactRecord(
        case_id=str(r.get("case_id", where.rsplit(" ", 1)[-1])),
        subject=subject,
        prompt=_template(src, subject, where, "src"),
        target_true=true,
        target_new=new,
        paraphrases=(_field(r, "rephrase", where),) if r.get("rephrase") else (),
        neighborhood=neigh,
        source=f"zsre-{preset}",
        metric="zsre",
    )


def _from_records(r: dict, where: str, _preset: str) -> FactRecord:
    return FactRecord.from_dict(r, where=where)


_CONVERTERS: dict[str, Callable[[dict, str, str], FactRecord]] = {
    "counterfact-rome": _from_rome,
    "counterfact-easyedit": _from_easyedit,
    "zsre": _from_zsre,
    "records": _from_records,
}


def _assign_relations(facts: list[FactRecord], path: Path) -> list[FactRecord]:
    """Fill relation ids from the template table (the EasyEdit copy has none)."""
    from dataclasses import replace

    from .relations import RelationTable

    table = RelationTable.load()
    try:
        ids = table.assign([(f.prompt, f.target_true, f.target_new) for f in facts])
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    return [replace(f, relation_id=rid) for f, rid in zip(facts, ids)]


def write_facts(facts: list[FactRecord], path: str | Path) -> None:
    """Write FactRecords as JSON Lines (atomically: temp file, then rename)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for fact in facts:
            f.write(json.dumps(fact.to_dict(), ensure_ascii=False) + "\n")
    tmp.replace(p)
