"""FactRecord: one fact to probe or edit, in every dataset's terms."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError


@dataclass(frozen=True)
class Neighbor:
    """A neighbourhood prompt (about another subject) and its correct answer."""

    prompt: str
    target: str


@dataclass(frozen=True)
class FactRecord:
    """A fact (subject, relation, object) with its counterfactual and test prompts.

    ``prompt`` is a template with one ``{}`` for the subject, ending right before the
    object; ``paraphrases`` are full prompts (subject filled in); ``neighborhood``
    prompts are about other subjects and carry their own answers (for CounterFact the
    true object of this fact). ``target_true`` is None where a dataset has no true
    object (zsRE in the ``memit`` preset).
    """

    case_id: str
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    relation_id: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Neighbor, ...] = ()
    source: str = ""
    metric: str = field(default="counterfact", metadata={"help": "'counterfact' (ES/PS/NS by probability) or 'zsre' (token accuracy)."})

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "subject": self.subject,
            "prompt": self.prompt,
            "relation_id": self.relation_id,
            "target_true": self.target_true,
            "target_new": self.target_new,
            "paraphrases": list(self.paraphrases),
            "neighborhood": [{"prompt": n.prompt, "target": n.target} for n in self.neighborhood],
            "source": self.source,
            "metric": self.metric,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "record") -> "FactRecord":
        """Build and validate from :meth:`to_dict` output; errors name ``where`` and the field."""
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected an object, got {type(d).__name__}")

        def get(name, types, required=True, default=None):
            if name not in d or d[name] is None:
                if required:
                    raise DataError(f"{where}: field {name!r} is missing")
                return default
            v = d[name]
            if not isinstance(v, types):
                raise DataError(f"{where}: field {name!r} must be {_tname(types)}, got {type(v).__name__}")
            return v

        subject = get("subject", str)
        prompt = get("prompt", str)
        if prompt.count("{}") != 1:
            if subject and subject in prompt:  # a filled prompt: rebuild the template
                prompt = prompt.replace(subject, "{}", 1)
            else:
                raise DataError(f"{where}: field 'prompt' must contain one '{{}}' for the subject (or the subject itself)")
        paraphrases = get("paraphrases", list, required=False, default=[])
        for j, p in enumerate(paraphrases):
            if not isinstance(p, str):
                raise DataError(f"{where}: field 'paraphrases[{j}]' must be a string")
        neigh = []
        for j, n in enumerate(get("neighborhood", list, required=False, default=[])):
            if not (isinstance(n, dict) and isinstance(n.get("prompt"), str) and isinstance(n.get("target"), str)):
                raise DataError(f"{where}: field 'neighborhood[{j}]' must be {{\"prompt\": str, \"target\": str}}")
            neigh.append(Neighbor(n["prompt"], n["target"]))
        metric = get("metric", str, required=False, default="counterfact")
        if metric not in ("counterfact", "zsre"):
            raise DataError(f"{where}: field 'metric' must be 'counterfact' or 'zsre', got {metric!r}")
        case_id = d.get("case_id")
        if case_id is None:
            raise DataError(f"{where}: field 'case_id' is missing")
        return cls(
            case_id=str(case_id),
            subject=subject,
            prompt=prompt,
            target_new=get("target_new", str),
            target_true=get("target_true", str, required=False),
            relation_id=get("relation_id", str, required=False),
            paraphrases=tuple(paraphrases),
            neighborhood=tuple(neigh),
            source=get("source", str, required=False, default=""),
            metric=metric,
        )


def facts_hash(facts: list[FactRecord]) -> str:
    """Short SHA-256 of a fact list's canonical JSON (order matters)."""
    h = hashlib.sha256()
    for f in facts:
        h.update(json.dumps(f.to_dict(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _tname(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {str: "a string", list: "a list", dict: "an object", int: "an integer"}
    return " or ".join(names.get(t, t.__name__) for t in types)
