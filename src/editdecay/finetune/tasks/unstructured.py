"""The ``unstructured`` task: raw text (C4 JSONL ``{text}``, WikiText ``.raw``, ``.txt``)
packed into blocks, loss on every token; validation is a fixed sample of the training
blocks. Default data: the offline stdlib corpus."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ...errors import DataError
from ...torch_utils import pad_id
from .base import Example, Task, _as_paths, _expand, _hash_files, _hygiene, _read_text, _split_from_train, register_task


_WIKITEXT_HEADING = re.compile(r" ?= (?!=)(.+?)(?<!=) = ?")


def read_wikitext(p: Path) -> list[str]:
    """WikiText raw text split into articles: CRLF → LF; an article starts at a
    top-level heading line `` = Title = `` between blank lines (the blank-line rule
    keeps equation lines such as `` = 1 henry and capacitance C = `` inside articles)."""
    lines = _read_text(p).replace("\r\n", "\n").split("\n")
    heads = [i for i, line in enumerate(lines) if _WIKITEXT_HEADING.fullmatch(line)
             and (i == 0 or not lines[i - 1].strip()) and (i + 1 == len(lines) or not lines[i + 1].strip())]
    if not heads:
        raise DataError(f"{p}: no WikiText top-level heading (' = Title = ' between blank lines) found")
    bounds = ([0] if "\n".join(lines[: heads[0]]).strip() else []) + heads + [len(lines)]
    return [doc for a, b in zip(bounds, bounds[1:]) if (doc := "\n".join(lines[a:b]).strip())]


def read_documents(p: Path) -> list[str]:
    """Documents of one text file: ``.raw``/``.tokens`` WikiText articles, else
    :meth:`Corpus.from_path` (``.txt``, ``.jsonl`` ``{text}``, ``.json``)."""
    from ...editing.corpus import Corpus

    if p.suffix.lower() in (".raw", ".tokens"):
        return read_wikitext(p)
    return list(Corpus.from_path(p))


def _load_unstructured(tok, data, *, n_train, n_val, block_size, seed, hygiene_facts, stopwords, **_) -> Task:
    from ...editing.corpus import Corpus
    from ..data import pack_blocks

    if data is None:
        corpus = Corpus.offline_default()
        docs, source, sha = list(corpus), corpus.id, corpus.sha256
        info: dict[str, Any] = {"files": {}}
    else:
        files = _expand(_as_paths(data, "unstructured"), "unstructured", (".txt", ".jsonl", ".json", ".raw", ".tokens"))
        docs = []
        per_file = {}
        for f in files:
            d = read_documents(f)
            per_file[str(f)] = len(d)
            docs += d
        source, sha, info = ", ".join(map(str, files)), _hash_files(files), {"files": per_file}
    keep, report = _hygiene(docs, hygiene_facts, stopwords)
    kept = [docs[i] for i in keep]
    blocks = pack_blocks(tok, kept, block_size)
    if not blocks:
        raise DataError(f"{source}: the text ({len(kept)} documents) gives no block of {block_size} tokens")
    train, val = _split_from_train(blocks, n_train, n_val, seed)
    info.update({"n_documents": len(docs), "n_documents_kept": len(kept), "n_blocks": len(blocks),
                 "block_size": block_size, "hygiene": report.to_dict() if report else None})
    def ex(b: list[int]) -> Example:
        t = tuple(b)
        return Example(t, t)

    return Task("unstructured", "loss", [ex(b) for b in train], [ex(b) for b in val], pad_id(tok), source, sha, info)


register_task("unstructured", loader=_load_unstructured, n_val=64)
