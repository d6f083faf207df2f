"""Wikidata relation ids for CounterFact prompt templates.

The offline CounterFact copy (EasyEdit schema: ``case_id, prompt, subject,
ground_truth, target_new, ...``) has lost ROME's ``relation_id`` field.  Each
record's *template* is its prompt with the subject replaced by ``{}``::

    template_of("The mother tongue of Danielle Darrieux is", "Danielle Darrieux")
    # -> "The mother tongue of {} is"

CounterFact has 218 such templates.  They come from the ParaRel templates that
ROME used per Wikidata relation, and most of them belong to exactly one relation
("The mother tongue of {} is" -> P103).  A few are *shared* by several relations,
e.g. "{} is located in" is used for continent (P30), country (P17),
administrative territory (P131) and location (P276).  The package table
``editdecay/facts/data/counterfact_relations.json`` lists, for every template,
either its single relation id or its candidate ids plus a default.

Resolving shared templates
--------------------------
The *object class* of a relation is the multiset of objects (``target_true`` and
``target_new``, compared case-insensitively) of the cases whose template is
unambiguous for that relation (see :meth:`RelationTable.build_classes`).  A case
with a shared template gets the candidate relation

1. whose class contains its ``target_true`` (rule ``"true"``);
2. if several do: the one whose class contains both objects (``"both"``), then
   the one with the larger overlap, i.e. more occurrences of the case's two
   objects in the class (``"overlap"``);
3. if none contains ``target_true``: the one containing ``target_new``, larger
   overlap first if several do (``"new"``);
4. otherwise the template's default (``"default"``); exact ties in step 2/3 also
   go to the default when it is among the tied candidates, else to the first
   tied candidate in table order (``"tie"``).

Cases with an unambiguous template get its relation (rule ``"unambiguous"``).

Classes are built from the cases passed to :meth:`RelationTable.assign`, so the
assignment works on any CounterFact subset; the bigger the subset, the better
the classes.  For small subsets -- down to a single case -- either pass classes
built once from the full dataset (``classes=table.build_classes(all_cases)``)
or rely on the *seeds*: short hand-written object lists in the table
(continents for P30, countries for P17 and P495, sports for P641, instruments
for P1303) that :meth:`~RelationTable.build_classes` always adds to the classes.
So ``RelationTable.load().assign([("{} is located in", "Europe", "Asia")])``
gives ``["P30"]`` with no other context.  A case no class speaks for gets the
template's default, chosen as the relation the remaining (non-seeded, e.g.
city or region) objects of that template mostly belong to on the full dataset.
Classes passed explicitly are used as given (seeds are not added to them).

Limitation: classes only see objects, so where two candidates share their
object vocabulary (P364/P407 both take languages, P131/P276 both take places,
P176/P178 both take companies) the larger class usually wins, e.g. most
"The language of {} is" cases become P364 although some are P407 in ROME.

The module keeps no state: :meth:`RelationTable.load` reads the JSON each time it
is called, so load the table once and reuse it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any, NamedTuple

__all__ = [
    "DATA_PACKAGE",
    "TABLE_RESOURCE",
    "RULES",
    "Assignment",
    "RelationTable",
    "TemplateEntry",
    "build_classes",
    "case_from_record",
    "normalize_object",
    "relation_label",
    "template_of",
]

DATA_PACKAGE = "editdecay.facts.data"
TABLE_RESOURCE = "counterfact_relations.json"

#: How :meth:`RelationTable.assign_detailed` decided a case (see the module doc).
RULES = ("unambiguous", "true", "both", "overlap", "new", "tie", "default")

# (template, target_true, target_new)
Case = tuple[str, str, str]
# relation id -> object -> number of occurrences (or a plain collection of objects)
Classes = Mapping[str, Mapping[str, int] | Collection[str]]


def normalize_object(obj: str) -> str:
    """Case- and whitespace-insensitive key used for object classes."""
    return " ".join(obj.split()).casefold()


def template_of(prompt: str, subject: str) -> str:
    """CounterFact template of a prompt: the first occurrence of ``subject`` replaced by ``{}``."""
    if not subject or subject not in prompt:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    return prompt.replace(subject, "{}", 1)


def case_from_record(record: Mapping[str, Any]) -> Case:
    """``(template, target_true, target_new)`` of an EasyEdit-style CounterFact record.

    Uses the keys ``prompt``, ``subject``, ``ground_truth`` and ``target_new``.
    """
    return (
        template_of(record["prompt"], record["subject"]),
        record["ground_truth"],
        record["target_new"],
    )


@dataclass(frozen=True)
class TemplateEntry:
    """Relations a template can express; ``default`` is one of ``candidates``."""

    candidates: tuple[str, ...]
    default: str

    @property
    def ambiguous(self) -> bool:
        return len(self.candidates) > 1


class Assignment(NamedTuple):
    """One case's relation id and the rule (one of :data:`RULES`) that chose it."""

    relation: str
    rule: str


class RelationTable:
    """Template -> Wikidata relation table for CounterFact (immutable).

    Build it with :meth:`load` (the package table) or :meth:`from_dict`.
    """

    def __init__(
        self,
        labels: Mapping[str, str],
        templates: Mapping[str, TemplateEntry],
        seeds: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        labels = dict(labels)
        templates = dict(templates)
        for template, entry in templates.items():
            if not entry.candidates or entry.default not in entry.candidates:
                raise ValueError(f"template {template!r}: default {entry.default!r} is not a candidate")
            if len(set(entry.candidates)) != len(entry.candidates):
                raise ValueError(f"template {template!r}: duplicate candidates {entry.candidates}")
            unknown = [rid for rid in entry.candidates if rid not in labels]
            if unknown:
                raise ValueError(f"template {template!r}: relation ids without a label: {unknown}")
        seed_sets: dict[str, frozenset[str]] = {}
        for rid, objects in (seeds or {}).items():
            if rid not in labels:
                raise ValueError(f"seed relation {rid!r} has no label")
            seed_sets[rid] = frozenset(normalize_object(o) for o in objects)
        self._labels: Mapping[str, str] = MappingProxyType(labels)
        self._templates: Mapping[str, TemplateEntry] = MappingProxyType(templates)
        self._seeds: Mapping[str, frozenset[str]] = MappingProxyType(seed_sets)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls) -> RelationTable:
        """The package table (``counterfact_relations.json`` in :data:`DATA_PACKAGE`)."""
        text = resources.files(DATA_PACKAGE).joinpath(TABLE_RESOURCE).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RelationTable:
        """Table from the JSON layout of ``counterfact_relations.json``.

        ``templates`` maps a template to a relation id or to
        ``{"candidates": [...], "default": id}``; ``object_lists`` names lists of
        objects and ``seeds`` maps a relation id to the names of the lists whose
        objects are added to its class.
        """
        try:
            labels = data["labels"]
            raw_templates = data["templates"]
        except KeyError as exc:
            raise ValueError(f"relation table lacks the {exc.args[0]!r} section") from None
        templates: dict[str, TemplateEntry] = {}
        for template, spec in raw_templates.items():
            if isinstance(spec, str):
                templates[template] = TemplateEntry((spec,), spec)
            elif isinstance(spec, Mapping) and "candidates" in spec and "default" in spec:
                templates[template] = TemplateEntry(tuple(spec["candidates"]), spec["default"])
            else:
                raise ValueError(f"template {template!r}: expected a relation id or candidates+default")
        lists = data.get("object_lists", {})
        seeds: dict[str, list[str]] = {}
        for rid, names in data.get("seeds", {}).items():
            objects: list[str] = []
            for name in [names] if isinstance(names, str) else names:
                if name not in lists:
                    raise ValueError(f"seed list {name!r} of {rid} is not in object_lists")
                objects.extend(lists[name])
            seeds[rid] = objects
        return cls(labels, templates, seeds)

    # ---------------------------------------------------------------- lookups
    @property
    def relation_ids(self) -> tuple[str, ...]:
        """All relation ids with a label, in numeric order (P17, P19, ..., P1412)."""
        return tuple(sorted(self._labels, key=lambda rid: (len(rid), rid)))

    @property
    def templates(self) -> tuple[str, ...]:
        return tuple(self._templates)

    def __contains__(self, template: object) -> bool:
        return template in self._templates

    def __len__(self) -> int:
        return len(self._templates)

    def entry(self, template: str) -> TemplateEntry:
        """The table entry of ``template``; :class:`ValueError` if it is not in the table."""
        try:
            return self._templates[template]
        except KeyError:
            raise ValueError(f"unknown CounterFact template {template!r}") from None

    def candidates(self, template: str) -> tuple[str, ...]:
        return self.entry(template).candidates

    def label(self, rid: str) -> str:
        """Short Wikidata label of a relation id, e.g. ``"P17"`` -> ``"country"``."""
        try:
            return self._labels[rid]
        except KeyError:
            raise ValueError(f"unknown relation id {rid!r}") from None

    @property
    def seeds(self) -> Mapping[str, frozenset[str]]:
        """Hand-written (normalized) objects always added to some relations' classes."""
        return self._seeds

    # ----------------------------------------------------------- assignment
    def build_classes(self, cases: Iterable[Sequence[str]], *, seeds: bool = True) -> dict[str, Counter[str]]:
        """Object classes from the cases with an unambiguous template.

        Returns ``{relation id: Counter(normalized object -> occurrences)}``
        counting ``target_true`` and ``target_new`` of every such case, plus (if
        ``seeds``) one occurrence of each seed object.  Raises :class:`ValueError`
        on a template that is not in the table.
        """
        classes: dict[str, Counter[str]] = {}
        for template, target_true, target_new in cases:
            entry = self.entry(template)
            if entry.ambiguous:
                continue
            bucket = classes.setdefault(entry.default, Counter())
            bucket[normalize_object(target_true)] += 1
            bucket[normalize_object(target_new)] += 1
        if seeds:
            for rid, objects in self._seeds.items():
                classes.setdefault(rid, Counter()).update(objects)
        return classes

    def assign(self, cases: Sequence[Sequence[str]], classes: Classes | None = None) -> list[str]:
        """One relation id per ``(template, target_true, target_new)`` case.

        ``classes`` defaults to :meth:`build_classes` of ``cases``; pass classes
        built from a larger set (e.g. the full dataset) for small subsets.  A
        mapping of relation id to a plain collection of objects is accepted too.
        Raises :class:`ValueError` naming the first unknown template.
        """
        return [a.relation for a in self.assign_detailed(cases, classes)]

    def assign_detailed(self, cases: Sequence[Sequence[str]], classes: Classes | None = None) -> list[Assignment]:
        """Like :meth:`assign`, with the rule that decided each case."""
        cases = list(cases)
        counts = self.build_classes(cases) if classes is None else _coerce_classes(classes)
        out: list[Assignment] = []
        for template, target_true, target_new in cases:
            entry = self.entry(template)
            if not entry.ambiguous:
                out.append(Assignment(entry.default, "unambiguous"))
            else:
                out.append(_resolve(entry, normalize_object(target_true), normalize_object(target_new), counts))
        return out


def _coerce_classes(classes: Mapping[str, Any]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for rid, objects in classes.items():
        bucket: Counter[str] = Counter()
        if isinstance(objects, Mapping):
            for obj, n in objects.items():
                if n > 0:
                    bucket[normalize_object(obj)] += int(n)
        elif isinstance(objects, str):
            raise TypeError(f"classes[{rid!r}] must be a collection of objects, not a string")
        else:
            bucket.update(normalize_object(o) for o in objects)
        out[rid] = bucket
    return out


def _resolve(entry: TemplateEntry, true: str, new: str, classes: Mapping[str, Counter[str]]) -> Assignment:
    empty: Counter[str] = Counter()

    def count(rid: str, obj: str) -> int:
        return classes.get(rid, empty)[obj]

    def pick(pool: list[str], rule: str) -> Assignment:
        score = {rid: count(rid, true) + count(rid, new) for rid in pool}
        best = max(score.values())
        top = [rid for rid in pool if score[rid] == best]
        if len(top) == 1:
            return Assignment(top[0], rule)
        return Assignment(entry.default if entry.default in top else top[0], "tie")

    with_true = [rid for rid in entry.candidates if count(rid, true)]
    if len(with_true) == 1:
        return Assignment(with_true[0], "true")
    if with_true:
        with_both = [rid for rid in with_true if count(rid, new)]
        if len(with_both) == 1:
            return Assignment(with_both[0], "both")
        return pick(with_both or with_true, "overlap")
    with_new = [rid for rid in entry.candidates if count(rid, new)]
    if with_new:
        return pick(with_new, "new")
    return Assignment(entry.default, "default")


def build_classes(cases: Iterable[Sequence[str]], table: RelationTable | None = None) -> dict[str, Counter[str]]:
    """:meth:`RelationTable.build_classes` of ``table`` (default: the package table)."""
    return (table or RelationTable.load()).build_classes(cases)


def relation_label(rid: str, table: RelationTable | None = None) -> str:
    """Short label of a Wikidata relation id (``"P103"`` -> ``"native language"``).

    Loads the package table when ``table`` is not given; in loops, load the
    table once and call :meth:`RelationTable.label`.
    """
    return (table or RelationTable.load()).label(rid)
