"""Second moments of several layers: one pass for all layers vs one pass per layer.

    python -m benchmarks.stats_one_pass [--layers 3-7] [--multiple 20] [--tokens N]

On the embedded model (SmolLM2-135M, d_k = 1536) over the offline default corpus.
"one_pass" is ``second_moments(layers=[3..7])``: one forward per batch, stopped inside
the highest layer; "per_layer" is ``second_moments(layers=[l])`` for each layer in turn
(each forward stopped inside its layer). Both use the same token plan, so the results
must agree (``max_rel_diff``). ``ratio`` = per_layer_s / one_pass_s. The expected ratio
is below the ratio of block forwards (sum of (l+1) vs top+1) because the float64
accumulation Σ k kᵀ costs the same in both.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from editdecay import load_model
from editdecay.editing.corpus import Corpus
from editdecay.editing.stats import key_width, second_moments


def _layers(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="3-7", help="Layers, e.g. 3-7 or 3,5,7.")
    ap.add_argument("--multiple", type=int, default=20, help="Token budget as a multiple of d_k.")
    ap.add_argument("--tokens", type=int, default=None, help="Token budget (overrides --multiple).")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(device="cpu")
    corpus = Corpus.offline_default()
    layers = _layers(args.layers)
    d_k = key_width(model, layers[0])
    tokens = args.tokens or args.multiple * d_k
    kw = dict(tokens=tokens, max_length=args.max_length, batch_size=args.batch_size, progress=False)

    second_moments(model, tok, [layers[0]], corpus, **{**kw, "tokens": min(tokens, 512)})  # warm-up
    t = time.perf_counter()
    together = second_moments(model, tok, layers, corpus, **kw)
    t_one = time.perf_counter() - t

    t_each, apart = {}, {}
    for layer in layers:
        t = time.perf_counter()
        apart[layer] = second_moments(model, tok, [layer], corpus, **kw)[layer]
        t_each[layer] = time.perf_counter() - t
    t_per = sum(t_each.values())

    diff = max(float((together[l] - apart[l]).abs().max() / apart[l].abs().max()) for l in layers)
    doc = {
        "model": "smollm2-135m (embedded)",
        "corpus": corpus.id,
        "layers": layers,
        "d_k": d_k,
        "tokens_per_layer": tokens,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "one_pass_s": t_one,
        "per_layer_s": t_per,
        "per_layer_breakdown_s": {str(l): t_each[l] for l in layers},
        "ratio": t_per / t_one,
        "block_forward_ratio": sum(l + 1 for l in layers) / (max(layers) + 1),
        "tokens_per_s_one_pass": tokens / t_one,
        "max_rel_diff": diff,
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
