"""The built-in fact set: a small CounterFact-style dataset shipped with the package.

The package resource ``editdecay/facts/data/builtin_facts.yaml`` is a compact table:
one entry per Wikidata relation with a prompt template, paraphrase templates and
``[subject, object]`` pairs.  :func:`load_builtin_facts` expands it into fact
records (plain dicts, the same shape as :meth:`FactRecord.to_dict` minus
``metric``)::

    {"case_id": "builtin-P36-0", "subject": "France",
     "prompt": "The capital of {} is the city of", "relation_id": "P36",
     "target_true": "Paris", "target_new": "New Delhi",
     "paraphrases": ["The capital city of France is", ...],
     "neighborhood": [{"prompt": "Louvre is a famous landmark in the city of", "target": "Paris"}, ...],
     "source": "builtin"}

How the derived fields are chosen (all deterministic; nothing depends on the
process, the hash seed or the call order):

* ``target_new`` -- a *same-relation* counterfactual: another object of the
  relation's object pool, drawn with a generator seeded by the case id.  Objects
  that start like the true one (same first word or same first three letters,
  e.g. "United States" for "United Kingdom") are avoided, so the two answers
  differ at their first token.
* ``neighborhood`` -- as in CounterFact, prompts about *other* subjects whose
  correct answer is this fact's true object: the main template of any relation
  filled with any other subject whose object is the same string ("Louvre is a
  famous landmark in the city of" -> Paris for "The capital of France is the
  city of" -> Paris).
  Subjects that contain, or are contained in, the fact's subject are skipped.
  At most :data:`MAX_NEIGHBORS` are drawn; a fact with fewer than
  :data:`MIN_NEIGHBORS` candidates is left out of the output.
* ``paraphrases`` -- the relation's paraphrase templates with the subject
  filled in.

``case_id`` is ``builtin-<relation id>-<n>`` with ``n`` the fact's position in
its relation's list in the table, so ids stay stable when other facts are
dropped.  The table is read and validated on every call (about 0.1 s);
the module keeps no state.
"""

from __future__ import annotations

import random
import re
from importlib.resources import files
from typing import Any

import yaml

from ..errors import DataError

__all__ = [
    "DATA_PACKAGE",
    "TABLE_RESOURCE",
    "SOURCE",
    "MIN_NEIGHBORS",
    "MAX_NEIGHBORS",
    "MIN_PARAPHRASES",
    "load_builtin_facts",
    "builtin_relations",
]

DATA_PACKAGE = "editdecay.facts.data"
TABLE_RESOURCE = "builtin_facts.yaml"
#: Value of the ``source`` field of every built-in record.
SOURCE = "builtin"
#: Facts with fewer neighbourhood prompts than this are dropped.
MIN_NEIGHBORS = 2
#: At most this many neighbourhood prompts per fact (CounterFact has 10).
MAX_NEIGHBORS = 10
#: Each relation needs at least this many paraphrase templates.
MIN_PARAPHRASES = 2

_RELATION_KEYS = ("id", "label", "template", "paraphrases", "facts")
_RELATION_ID = re.compile(r"P[1-9][0-9]*")


def load_builtin_facts() -> list[dict[str, Any]]:
    """All built-in fact records, in table order (relation by relation).

    Returns a new list of new dicts on every call; the output is identical from
    call to call.  Raises :class:`~editdecay.errors.DataError` if the table is
    malformed.
    """
    relations = _read_table()

    # Every (main prompt, object) of the table, grouped by object string: the
    # neighbourhood pool.  Table order, so the pool is deterministic.
    by_object: dict[str, list[tuple[str, str]]] = {}
    for rel in relations:
        for subject, obj in rel["facts"]:
            by_object.setdefault(obj, []).append((subject, _fill(rel["template"], subject)))

    records: list[dict[str, Any]] = []
    for rel in relations:
        rid = rel["id"]
        pool = list(dict.fromkeys(obj for _, obj in rel["facts"]))
        for n, (subject, obj) in enumerate(rel["facts"]):
            case_id = f"builtin-{rid}-{n}"
            candidates = list(dict.fromkeys(
                prompt for other, prompt in by_object[obj] if not _same_subject(subject, other)))
            if len(candidates) < MIN_NEIGHBORS:
                continue
            chosen = random.Random(f"{case_id}|neighborhood").sample(
                candidates, min(MAX_NEIGHBORS, len(candidates)))
            records.append({
                "case_id": case_id,
                "subject": subject,
                "prompt": rel["template"],
                "relation_id": rid,
                "target_true": obj,
                "target_new": _counterfactual(case_id, obj, pool),
                "paraphrases": [_fill(t, subject) for t in rel["paraphrases"]],
                "neighborhood": [{"prompt": p, "target": obj} for p in chosen],
                "source": SOURCE,
            })
    return records


def builtin_relations() -> dict[str, dict[str, Any]]:
    """Relation id -> ``{"label", "template", "paraphrases"}`` for the built-in table.

    Table order; a new dict on every call.
    """
    return {
        rel["id"]: {"label": rel["label"], "template": rel["template"], "paraphrases": list(rel["paraphrases"])}
        for rel in _read_table()
    }


# --------------------------------------------------------------------------- helpers


def _fill(template: str, subject: str) -> str:
    return template.replace("{}", subject, 1)


def _same_subject(a: str, b: str) -> bool:
    """True if one subject contains the other (case-insensitive): not a neighbour."""
    a, b = a.casefold(), b.casefold()
    return a in b or b in a


def _starts_alike(a: str, b: str) -> bool:
    """Whether two objects likely share their first token (same first word or 3 letters)."""
    a, b = a.casefold(), b.casefold()
    return a.split()[0] == b.split()[0] or a[:3] == b[:3]


def _counterfactual(case_id: str, true: str, pool: list[str]) -> str:
    """Another object of the same relation, seeded by the case id."""
    others = [o for o in pool if o != true]
    distinct = [o for o in others if not _starts_alike(o, true)]
    return random.Random(f"{case_id}|target_new").choice(distinct or others)


def _read_table() -> list[dict[str, Any]]:
    """Parse and validate the YAML table; return its relations (facts as tuples)."""
    where = f"{DATA_PACKAGE}/{TABLE_RESOURCE}"
    try:
        text = files(DATA_PACKAGE).joinpath(TABLE_RESOURCE).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise DataError(f"{where}: built-in fact table not found ({e})") from e
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        doc = yaml.load(text, Loader=loader)  # noqa: S506 -- a safe loader
    except yaml.YAMLError as e:
        raise DataError(f"{where}: not valid YAML: {e}") from e
    return _validate(doc, where)


def _validate(doc: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(doc, dict) or set(doc) != {"relations"}:
        raise DataError(f"{where}: expected a mapping with the single key 'relations'")
    rels = doc["relations"]
    if not isinstance(rels, list) or not rels:
        raise DataError(f"{where}: 'relations' must be a non-empty list")

    out: list[dict[str, Any]] = []
    seen_ids: set[str] = set()
    for k, rel in enumerate(rels):
        at = f"{where}: relations[{k}]"
        if not isinstance(rel, dict):
            raise DataError(f"{at}: expected a mapping, got {type(rel).__name__}")
        missing = [key for key in _RELATION_KEYS if key not in rel]
        extra = sorted(str(key) for key in rel if key not in _RELATION_KEYS)
        if missing or extra:
            raise DataError(f"{at}: missing keys {missing}, unknown keys {extra}"
                            f" (expected {list(_RELATION_KEYS)})")
        rid = rel["id"]
        if not isinstance(rid, str) or not _RELATION_ID.fullmatch(rid):
            raise DataError(f"{at}: 'id' must be a Wikidata property id like 'P36', got {rid!r}")
        if rid in seen_ids:
            raise DataError(f"{at}: duplicate relation id {rid!r}")
        seen_ids.add(rid)
        at = f"{where}: relation {rid}"
        label = rel["label"]
        if not isinstance(label, str) or not label.strip():
            raise DataError(f"{at}: 'label' must be a non-empty string")

        template = _check_template(rel["template"], f"{at}: 'template'")
        paras = rel["paraphrases"]
        if not isinstance(paras, list) or len(paras) < MIN_PARAPHRASES:
            raise DataError(f"{at}: 'paraphrases' must be a list of at least {MIN_PARAPHRASES} templates")
        paras = [_check_template(p, f"{at}: paraphrases[{j}]") for j, p in enumerate(paras)]
        if len(set(paras)) != len(paras) or template in paras:
            raise DataError(f"{at}: the template and paraphrases must all differ")

        facts = rel["facts"]
        if not isinstance(facts, list) or not facts:
            raise DataError(f"{at}: 'facts' must be a non-empty list of [subject, object] pairs")
        pairs: list[tuple[str, str]] = []
        subjects: set[str] = set()
        for j, fact in enumerate(facts):
            fat = f"{at}: facts[{j}]"
            if not (isinstance(fact, list) and len(fact) == 2):
                raise DataError(f"{fat}: expected a [subject, object] pair, got {fact!r}")
            subject, obj = (_check_text(x, f"{fat} {name}") for x, name in zip(fact, ("subject", "object")))
            if subject in subjects:
                raise DataError(f"{fat}: duplicate subject {subject!r}")
            if subject == obj:
                raise DataError(f"{fat}: subject and object are the same ({subject!r})")
            subjects.add(subject)
            pairs.append((subject, obj))
        if len({obj for _, obj in pairs}) < 2:
            raise DataError(f"{at}: needs at least two distinct objects (for counterfactuals)")
        out.append({"id": rid, "label": label.strip(), "template": template,
                    "paraphrases": tuple(paras), "facts": tuple(pairs)})
    return out


def _check_template(t: Any, at: str) -> str:
    if not isinstance(t, str):
        raise DataError(f"{at}: must be a string, got {type(t).__name__}")
    if t.count("{}") != 1:
        raise DataError(f"{at}: must contain exactly one '{{}}' for the subject: {t!r}")
    if t != t.strip() or not t.replace("{}", "").strip():
        raise DataError(f"{at}: must have text around '{{}}' and no leading/trailing whitespace: {t!r}")
    if t.endswith("{}"):
        raise DataError(f"{at}: must end with the words before the object, not with the subject: {t!r}")
    return t


def _check_text(x: Any, at: str) -> str:
    if not isinstance(x, str):  # e.g. an unquoted number or yes/no in the YAML
        raise DataError(f"{at}: must be a string, got {type(x).__name__} {x!r} (quote it in the YAML)")
    if not x.strip() or x != x.strip() or "{}" in x or "\n" in x:
        raise DataError(f"{at}: must be non-empty text without surrounding whitespace or '{{}}': {x!r}")
    return x
