"""Downstream evaluation modes on the embedded model: parse rate, accuracy and time.

    python -m benchmarks.downstream_modes [--task ARC-Easy] [--n 200] [--gen alpaca,chat+prefix]

Generative variants are ``style`` or ``style+prefix`` (the response primed with "the
correct answer is"), styles as in :func:`editdecay.evaluate.downstream.build_prompt`.
Log-likelihood variants are ``style/target`` (prompt context in that style, option
text or label scored) or ``cloze``; mean and sum normalisation are read off the same
token log-probabilities. Prints one line per variant, then one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

from editdecay import load_model
from editdecay.evaluate.downstream import (
    ANSWER_PREFIX,
    DownstreamConfig,
    evaluate_items,
    load_task,
    score_options,
)

from .common import SHARED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="ARC-Easy")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gen", default="alpaca,alpaca+prefix,chat,chat+prefix", help="comma-separated variants ('' for none)")
    ap.add_argument("--ll", default="alpaca/text,alpaca/label,chat/text,chat/label,cloze",
                    help="comma-separated ll variants ('' for none)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_model(device="cpu")
    items = load_task(args.task, SHARED / "commonsense")[: args.n]
    out: dict = {"task": args.task, "n": len(items), "gold": dict(Counter(it.answer for it in items)), "gen": {}, "ll": {}}
    for variant in filter(None, args.gen.split(",")):
        style, _, prefix = variant.partition("+")
        cfg = DownstreamConfig(mode="gen", batch_size=args.batch_size, prompt_style=style,
                               response_prefix=ANSWER_PREFIX if prefix else "")
        r = evaluate_items(items, cfg, model=model, tok=tok, progress=False)
        out["gen"][variant] = {"parse_rate": r.parse_rate, "accuracy": r.accuracy, "seconds": round(r.seconds, 1),
                               "predicted": dict(Counter(r.predictions)), "examples": (r.responses or [])[:3]}
        print(variant, out["gen"][variant], flush=True)
    for variant in filter(None, args.ll.split(",")):
        style, _, target = variant.partition("/")
        context = "cloze" if style == "cloze" else "prompt"
        style, target = ("alpaca", "text") if context == "cloze" else (style, target)
        cache: dict = {}

        def scorer(cs, conts, cache=cache):
            t = time.perf_counter()
            cache["scores"] = score_options(model, tok, cs, conts, batch_size=args.batch_size)
            cache["seconds"] = time.perf_counter() - t
            return cache["scores"]

        for norm in ("mean", "sum"):
            cfg = DownstreamConfig(mode="ll", batch_size=args.batch_size, prompt_style=style, ll_norm=norm,
                                   ll_target=target, ll_context=context)
            fn = scorer if "scores" not in cache else (lambda cs, conts, cache=cache: cache["scores"])
            r = evaluate_items(items, cfg, model=model, tok=tok, score_fn=fn, progress=False)
            key = f"{variant}/{norm}"
            out["ll"][key] = {"accuracy": r.accuracy, "first40": sum(
                                  p == g for p, g in zip(r.predictions[:40], r.gold[:40])) / min(40, r.n),
                              "seconds": round(cache["seconds"], 1),
                              "predicted": dict(Counter(r.predictions))}
            print(key, out["ll"][key], flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
