"""Stop words S of the retention probe (seed 000): NLTK's 179-word English list, plus
any token whose stripped text is empty or only punctuation."""

from __future__ import annotations

import hashlib
import unicodedata
from importlib.resources import files


def load_stopwords() -> frozenset[str]:
    """The 179 NLTK English stop words (lower case), shipped as package data."""
    text = files("editdecay.facts.data").joinpath("stopwords_en.txt").read_text(encoding="utf-8")
    return frozenset(w.strip() for w in text.splitlines() if w.strip())


def stopwords_hash(words: frozenset[str] | None = None) -> str:
    """Short SHA-256 of the sorted stop-word list, recorded with every probe result."""
    words = load_stopwords() if words is None else words
    return hashlib.sha256("\n".join(sorted(words)).encode()).hexdigest()[:16]


def is_stop_text(text: str, words: frozenset[str]) -> bool:
    """True if ``text`` (a decoded token) is a stop word, empty, or only punctuation."""
    s = text.strip().lower()
    if not s:
        return True
    if all(unicodedata.category(c).startswith("P") for c in s):
        return True
    return s in words
