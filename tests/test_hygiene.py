"""Data hygiene: fact words, whole-word matching, union and per-fact filters, warnings."""

from __future__ import annotations

import warnings

import pytest

from editdecay.facts.record import FactRecord
from editdecay.finetune.hygiene import (
    HygieneWarning, WordIndex, fact_words, hygiene_filter, hygiene_keep, per_fact_hygiene, words,
)

F1 = FactRecord(case_id="1", subject="Danielle Darrieux", prompt="The mother tongue of {} is",
                target_new="English", target_true="French", paraphrases=("Danielle Darrieux's native language is",))
F2 = FactRecord(case_id="2", subject="France", prompt="The capital of {} is the city of",
                target_new="Rome", target_true="Paris")
DOCS = [
    "She speaks French fluently.",           # 0: 'french' (F1 true target)
    "An English breakfast by the seaside.",  # 1: 'english' is only F1's NEW target: kept
    "PARIS, the capital.",                   # 2: case-insensitive, punctuation split (F2)
    "Parisian cafes are nice.",              # 3: whole words only: 'parisian' != 'paris'
    "It is what it is, and that's it.",      # 4: stop words only
    "A tongue-tied speaker.",                # 5: hyphen splits: 'tongue' (F1 prompt)
]


def test_fact_words_are_the_non_stop_words_of_prompts_paraphrases_and_true_targets():
    assert fact_words([F1]) == {"mother", "tongue", "danielle", "darrieux", "native", "language", "french"}
    assert fact_words([F2]) == {"capital", "france", "city", "paris"}
    assert "english" in fact_words([F1], include_new=True)
    assert words("That's it: tongue-tied_x 42!") == {"that", "s", "it", "tongue", "tied", "x", "42"}


def test_union_filter_drops_exactly_the_hand_checked_documents():
    with pytest.warns(HygieneWarning, match="3 of 6 documents"):
        kept, report = hygiene_filter(DOCS, [F1, F2])
    assert kept == [DOCS[1], DOCS[3], DOCS[4]]
    assert (report.n_docs, report.n_dropped, report.n_kept, report.fraction) == (6, 3, 3, 0.5)
    assert report.n_words == 11 and report.to_dict()["fraction_dropped"] == 0.5
    with pytest.warns(HygieneWarning):
        keep, _ = hygiene_keep(DOCS, [F1, F2])
    assert keep == [1, 3, 4]


def test_per_fact_filter_and_warning_threshold():
    with pytest.warns(HygieneWarning, match="for 1 of 2 facts"):
        res = per_fact_hygiene(DOCS, [F1, F2])
    assert [k for k, _ in res] == [[1, 2, 3, 4], [0, 1, 3, 4, 5]]
    assert [r.n_dropped for _, r in res] == [2, 1]   # 2/6 > 20% warns; 1/6 does not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept, report = hygiene_filter(DOCS, [F2])    # 1 of 6 dropped: no warning
    assert report.n_dropped == 1 and DOCS[2] not in kept
    idx = WordIndex(DOCS)
    assert idx.containing({"paris", "french"}) == {0, 2}
