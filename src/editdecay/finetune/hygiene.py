"""Data hygiene (seed 000 §4.1): keep the probed facts out of the fine-tuning data.

A training document is dropped when it contains any *fact word*: a non-stop word of a
probed prompt (the rewrite prompt with the subject filled in, and its paraphrases) or of
the true target. Words are lower-cased runs of letters and digits (text is split at
whitespace, punctuation and underscores) and match whole words only: "Paris" drops
"PARIS, France" but not "Parisian". Stop words are the NLTK list of
:func:`~editdecay.facts.stopwords.load_stopwords`.

:func:`hygiene_filter` filters against the union of the facts' words (protocol
``batch``); :func:`per_fact_hygiene` gives each fact its own kept list (protocol
``single``), indexing the documents' words once. Over a union of many facts the
filter can remove most of a corpus (150 facts remove ~90% of C4): a
:class:`HygieneWarning` is issued when more than :data:`WARN_FRACTION` is dropped.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..facts.record import FactRecord
from ..facts.stopwords import load_stopwords

log = logging.getLogger(__name__)

#: Dropping more than this fraction of the documents issues a :class:`HygieneWarning`.
WARN_FRACTION = 0.2

_WORD = re.compile(r"[^\W_]+")


class HygieneWarning(UserWarning):
    """More than :data:`WARN_FRACTION` of the documents were dropped."""


def words(text: str) -> set[str]:
    """The distinct lower-cased words of ``text`` (split at whitespace and punctuation)."""
    return set(_WORD.findall(text.lower()))


def fact_words(facts: Iterable[FactRecord], stopwords: frozenset[str] | None = None, *,
               include_new: bool = False) -> frozenset[str]:
    """Non-stop words of the facts' rewrite prompts (subject filled), paraphrases and
    true targets (and new targets when ``include_new``)."""
    stop = load_stopwords() if stopwords is None else stopwords
    out: set[str] = set()
    for f in facts:
        texts = [f.text, *f.paraphrases]
        if f.target_true:
            texts.append(f.target_true)
        if include_new and f.target_new:
            texts.append(f.target_new)
        for t in texts:
            out |= words(t)
    return frozenset(w for w in out if w not in stop)


@dataclass(frozen=True)
class HygieneReport:
    """What a hygiene filter dropped."""

    n_docs: int
    n_dropped: int
    n_words: int = field(metadata={"help": "Size of the fact-word set filtered against."})
    words: tuple[str, ...] = field(default=(), repr=False, metadata={"help": "The fact words, sorted."})

    @property
    def n_kept(self) -> int:
        return self.n_docs - self.n_dropped

    @property
    def fraction(self) -> float:
        """Fraction of the documents dropped (0 for no documents)."""
        return self.n_dropped / self.n_docs if self.n_docs else 0.0

    def to_dict(self) -> dict:
        return {"n_docs": self.n_docs, "n_kept": self.n_kept, "n_dropped": self.n_dropped,
                "fraction_dropped": self.fraction, "n_words": self.n_words, "words": list(self.words)}


class WordIndex:
    """Inverted index word → ids of the documents that contain it (built once)."""

    def __init__(self, docs: Sequence[str]) -> None:
        self.n_docs = len(docs)
        self.postings: dict[str, list[int]] = {}
        for i, d in enumerate(docs):
            for w in words(d):
                self.postings.setdefault(w, []).append(i)

    def containing(self, ws: Iterable[str]) -> set[int]:
        """Ids of the documents that contain any of ``ws``."""
        hit: set[int] = set()
        for w in ws:
            hit.update(self.postings.get(w, ()))
        return hit


def _warn(report: HygieneReport, what: str) -> None:
    if report.fraction > WARN_FRACTION:
        msg = (f"data hygiene dropped {report.n_dropped} of {report.n_docs} documents "
               f"({report.fraction:.0%}) {what}; more than {WARN_FRACTION:.0%}")
        log.warning(msg)
        warnings.warn(msg, HygieneWarning, stacklevel=3)


def hygiene_keep(docs: Sequence[str], facts: Sequence[FactRecord], stopwords: frozenset[str] | None = None, *,
                 include_new: bool = False, index: WordIndex | None = None) -> tuple[list[int], HygieneReport]:
    """Indices of the documents that contain no fact word of any fact, and the report."""
    ws = fact_words(facts, stopwords, include_new=include_new)
    index = index or WordIndex(docs)
    dropped = index.containing(ws)
    report = HygieneReport(len(docs), len(dropped), len(ws), tuple(sorted(ws)))
    _warn(report, f"for the words of {len(facts)} facts")
    return [i for i in range(len(docs)) if i not in dropped], report


def hygiene_filter(docs: Sequence[str], facts: Sequence[FactRecord], stopwords: frozenset[str] | None = None, *,
                   include_new: bool = False) -> tuple[list[str], HygieneReport]:
    """The documents that contain no fact word of any of ``facts`` (in order), and the report."""
    keep, report = hygiene_keep(docs, facts, stopwords, include_new=include_new)
    return [docs[i] for i in keep], report


def per_fact_hygiene(docs: Sequence[str], facts: Sequence[FactRecord], stopwords: frozenset[str] | None = None, *,
                     include_new: bool = False) -> list[tuple[list[int], HygieneReport]]:
    """Per fact (protocol ``single``): the indices of the documents without that fact's
    words, and its report. The documents' words are indexed once; one warning sums up
    the facts for which more than :data:`WARN_FRACTION` was dropped."""
    stop = load_stopwords() if stopwords is None else stopwords
    index = WordIndex(docs)
    out = []
    for f in facts:
        ws = fact_words([f], stop, include_new=include_new)
        dropped = index.containing(ws)
        out.append(([i for i in range(len(docs)) if i not in dropped],
                    HygieneReport(len(docs), len(dropped), len(ws), tuple(sorted(ws)))))
    heavy = [f.case_id for f, (_, r) in zip(facts, out) if r.fraction > WARN_FRACTION]
    if heavy:
        worst = max(r.fraction for _, r in out)
        msg = (f"data hygiene dropped more than {WARN_FRACTION:.0%} of {len(docs)} documents for "
               f"{len(heavy)} of {len(facts)} facts (at most {worst:.0%}; e.g. {', '.join(heavy[:3])})")
        log.warning(msg)
        warnings.warn(msg, HygieneWarning, stacklevel=2)
    return out
