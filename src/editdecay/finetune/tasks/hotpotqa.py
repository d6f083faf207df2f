"""The ``hotpotqa`` task: HotpotQA JSON(L), question + supporting sentences → answer, the
commonsense recipe (Alpaca prompt, loss on all tokens, held-out validation)."""

from __future__ import annotations

from typing import Any

from ...errors import DataError
from .base import Task, _as_paths, _expand, _field, _records_task, alpaca_prompt, read_json_records, register_task


def hotpot_support(rec: Any, where: str) -> tuple[list[tuple[str, list[str]]], int, int]:
    """The supporting sentences of a HotpotQA record grouped by title (in order of
    first mention), how many supporting-fact entries were found and how many there
    are. Entries are ``[title, sent_id]`` looked up in ``context`` ``[[title, [sents]]]``,
    or AMOR's ``[title, [sent_ids], [sents], doc]`` (its sentences used when the title
    is not in the context). Out-of-range ids and unknown titles are skipped."""
    ctx: dict[str, list[str]] = {}
    for j, c in enumerate(_field(rec, "context", where, list)):
        if not (isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and isinstance(c[1], list)):
            raise DataError(f"{where}: field 'context[{j}]' must be [title, [sentences]]")
        ctx.setdefault(c[0], c[1])
    groups: dict[str, dict[int, str]] = {}
    found = 0
    sfs = _field(rec, "supporting_facts", where, list)
    for j, sf in enumerate(sfs):
        if not (isinstance(sf, list) and len(sf) >= 2 and isinstance(sf[0], str)
                and (isinstance(sf[1], int) or (isinstance(sf[1], list) and all(isinstance(x, int) for x in sf[1])))):
            raise DataError(f"{where}: field 'supporting_facts[{j}]' must be [title, sent_id] or [title, [sent_ids], ...]")
        title, ids = sf[0], ([sf[1]] if isinstance(sf[1], int) else sf[1])
        if title in ctx:
            sents = {i: ctx[title][i] for i in ids if 0 <= i < len(ctx[title])}
        elif len(sf) >= 3 and isinstance(sf[2], list) and len(sf[2]) == len(ids):
            sents = {i: s for i, s in zip(ids, sf[2]) if isinstance(s, str)}
        else:
            sents = {}
        if sents:
            found += 1
            groups.setdefault(title, {}).update(sents)
    return [(t, [g[i] for i in sorted(g)]) for t, g in groups.items()], found, len(sfs)


def _cut_tokens(tok, text: str, n: int) -> tuple[str, int]:
    """``text`` cut after its first ``n`` tokens (at a character offset), and its token count."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= n:
        return text, len(enc["input_ids"])
    return (text[: enc["offset_mapping"][n - 1][1]] if n > 0 else ""), n


def _load_hotpotqa(tok, data, *, n_train, n_val, cutoff, seed, hygiene_facts, stopwords, context_tokens=160, **_) -> Task:
    files = _expand(_as_paths(data, "hotpotqa"), "hotpotqa", (".json", ".jsonl"))
    records, per_file = [], {}
    no_support = partial = cut = 0
    for f in files:
        recs = read_json_records(f)
        per_file[str(f)] = len(recs)
        for i, rec in enumerate(recs):
            where = f"{f}: record {i}"
            q, a = _field(rec, "question", where), _field(rec, "answer", where)
            groups, found, wanted = hotpot_support(rec, where)
            if not groups:
                no_support += 1
                continue
            partial += found < wanted
            context = "\n".join(f"{t}: " + " ".join(s.strip() for s in sents) for t, sents in groups)
            ctx, n_ctx = _cut_tokens(tok, context, context_tokens) if context_tokens is not None else (context, None)
            for _ in range(4):  # shorten the context until prompt + answer + EOS fit the cutoff
                over = len(tok(alpaca_prompt(q, ctx, a))["input_ids"]) + 1 - cutoff
                if over <= 0 or not ctx:
                    break
                n_ctx = n_ctx if n_ctx is not None else _cut_tokens(tok, ctx, 10**9)[1]
                ctx, n_ctx = _cut_tokens(tok, ctx, max(0, n_ctx - over))
            cut += ctx != context
            records.append({"instruction": q, "input": ctx, "output": a, "answer": a})
    if not records:
        raise DataError(f"{', '.join(map(str, files))}: no record has a supporting sentence in its context")
    extra = {"n_records": sum(per_file.values()), "n_no_support_dropped": no_support, "n_partial_support": partial, "n_context_cut": cut,
             "context_tokens": context_tokens}
    return _records_task("hotpotqa", tok, records, files, per_file, n_train=n_train, n_val=n_val, cutoff=cutoff,
                         seed=seed, hygiene_facts=hygiene_facts, stopwords=stopwords, extra_info=extra)


register_task("hotpotqa", loader=_load_hotpotqa, n_val=50, cutoff=256)
