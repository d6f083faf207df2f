"""The ``sft`` task: chat ``messages`` or Alpaca ``{instruction, input, output}`` records,
loss on the assistant responses (end-of-turn token included); validation is a fixed
sample of the training conversations."""

from __future__ import annotations

from pathlib import Path

from ...errors import DataError, EditdecayError
from ...torch_utils import pad_id
from .base import (
    ALPACA_PROMPT, Example, Task, _as_paths, _eos, _expand, _field, _hash_files, _hygiene, _split_from_train,
    read_json_records, register_task,
)


#: End-of-turn markers of common chat templates (labelled like EOS when present).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


def read_conversations(p: Path) -> list[list[dict[str, str]]]:
    """Conversations of a JSON/JSONL file: records with ``messages`` (a list of
    ``{role, content}``) or Alpaca ``{instruction, input, output}``, converted to
    ``[user: instruction + ("\\n\\n" + input if input), assistant: output]``."""
    out = []
    for i, rec in enumerate(read_json_records(p)):
        where = f"{p}: record {i}"
        if isinstance(rec, dict) and "messages" in rec:
            msgs = _field(rec, "messages", where, list)
            conv = []
            for j, m in enumerate(msgs):
                w = f"{where}: messages[{j}]"
                conv.append({"role": _field(m, "role", w), "content": _field(m, "content", w)})
            if not any(m["role"] == "assistant" for m in conv):
                raise DataError(f"{where}: field 'messages' has no assistant message")
        elif isinstance(rec, dict) and "instruction" in rec:
            instr = _field(rec, "instruction", where)
            inp = _field(rec, "input", where, required=False, default="")
            conv = [{"role": "user", "content": instr + ("\n\n" + inp if inp else "")},
                    {"role": "assistant", "content": _field(rec, "output", where)}]
        else:
            got = f"keys {', '.join(map(repr, rec))}" if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{where}: expected field 'messages' or Alpaca fields 'instruction'/'output', got {got}")
        out.append(conv)
    return out


def _end_ids(tok) -> set[int]:
    vocab = tok.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def _render_steps(tok, conv: list[dict[str, str]], use_template: bool) -> list[tuple[str, bool]]:
    """Cumulative renderings of a conversation: ``(text so far, the part added since the
    previous step is a response)``. Chat template: the prefix with the generation
    prompt, then with the assistant message. Otherwise the Alpaca layout (a system
    message replaces its preamble), EOS text after each response."""
    steps: list[tuple[str, bool]] = []
    if use_template:
        def render(msgs, gen):
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        for i, m in enumerate(conv):
            if m["role"] == "assistant":
                steps.append((render(conv[:i], True), False))
                steps.append((render(conv[: i + 1], False), True))
        if conv[-1]["role"] != "assistant":
            steps.append((render(conv, False), False))
        return steps
    pre = ALPACA_PROMPT.split("\n\n### Instruction")[0]
    text = ""
    for m in conv:
        if m["role"] == "system":
            pre = m["content"]
        elif m["role"] == "assistant":
            steps.append((text + "### Response:\n", False))
            text += "### Response:\n" + m["content"] + (tok.eos_token or "")
            steps.append((text, True))
            text += "\n\n"
        else:
            text += f"### Instruction:\n{m['content']}\n\n"
    return [(pre + "\n\n" + t, flag) for t, flag in steps]


def sft_example(tok, conv: list[dict[str, str]], cutoff: int, use_template: bool,
                end_ids: set[int] | None = None) -> Example | None:
    """Tokenise a conversation with labels on the assistant responses only.

    Every cumulative rendering is tokenised and its boundary is the longest common
    prefix with the full tokenisation, so template tokens never leak into the labels.
    A response is labelled up to and including its last EOS / end-of-turn token
    (tokens after it, e.g. a newline, are not); a final response without one gets EOS
    appended. Truncated to ``cutoff``; None when no labelled token survives."""
    end_ids = _end_ids(tok) if end_ids is None else end_ids
    steps = _render_steps(tok, conv, use_template)
    special = not use_template  # chat templates render BOS themselves
    toks = [list(ids) for ids in tok([s for s, _ in steps], add_special_tokens=special)["input_ids"]]
    full = toks[-1]
    ids, labels = list(full), [-100] * len(full)
    prev = 0
    for k, ((_, is_resp), t) in enumerate(zip(steps, toks)):
        b = 0
        while b < min(len(t), len(full)) and t[b] == full[b]:
            b += 1
        b = max(b, prev)
        if is_resp and b > prev:
            span = list(range(prev, b))
            ends = [j for j in span if full[j] in end_ids]
            if ends:
                span = [j for j in span if j <= ends[-1]]
            for j in span:
                labels[j] = full[j]
            if not ends and k == len(steps) - 1:
                ids.append(_eos(tok))
                labels.append(ids[-1])
        prev = b
    ids, labels = ids[:cutoff], labels[:cutoff]
    if all(x == -100 for x in labels):
        return None
    return Example(tuple(ids), tuple(labels))


def _load_sft(tok, data, *, n_train, n_val, cutoff, seed, hygiene_facts, stopwords, use_chat_template=None, **_) -> Task:
    files = _expand(_as_paths(data, "sft"), "sft", (".json", ".jsonl"))
    convs: list[list[dict[str, str]]] = []
    per_file = {}
    for f in files:
        c = read_conversations(f)
        per_file[str(f)] = len(c)
        convs += c
    keep, report = _hygiene(["\n".join(m["content"] for m in c) for c in convs], hygiene_facts, stopwords)
    convs = [convs[i] for i in keep]
    has_template = bool(getattr(tok, "chat_template", None))
    use = has_template if use_chat_template is None else bool(use_chat_template)
    if use and not has_template:
        raise EditdecayError("the tokenizer has no chat template (use the Alpaca layout: use_chat_template=False)")
    train_c, _ = _split_from_train(convs, n_train, 0, seed)
    end_ids = _end_ids(tok)
    examples = [sft_example(tok, c, cutoff, use, end_ids) for c in train_c]
    train = [e for e in examples if e is not None]
    if not train:
        raise DataError(f"{', '.join(map(str, files))}: no conversation keeps a response token within {cutoff} tokens")
    _, val = _split_from_train(train, None, n_val, seed)
    info = {"files": per_file, "n_records": len(convs) + (report.n_dropped if report else 0), "cutoff": cutoff,
            "layout": "chat-template" if use else "alpaca", "n_dropped_no_response": len(examples) - len(train),
            "n_truncated": sum(len(e.input_ids) >= cutoff for e in train),
            "hygiene": report.to_dict() if report else None}
    return Task("sft", "loss", train, val, pad_id(tok), ", ".join(map(str, files)), _hash_files(files), info)


register_task("sft", loader=_load_sft, n_val=64, cutoff=512)
