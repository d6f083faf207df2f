"""Teacher-forced scoring with shared sequences vs one sequence per (prompt, target) pair.

    python -m benchmarks.score_sharing [--n 100] [--repeat 3]

The pairs are those ``score_facts`` builds for the first ``n`` CounterFact facts (rewrite,
paraphrase and neighbourhood prompts, each with its true and new object): the probe of every
fine-tuning budget point. ``shared`` reads a fact's one-token objects off one sequence.
Prints sequences, tokens and the best-of-``repeat`` seconds of each, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time

from editdecay import Prober, load_model
from editdecay.evaluate.metrics import split_target
from editdecay.evaluate.probes import carrier_sequences

from .common import SHARED


def pairs_of(tok, facts):
    out = []
    for f in facts:
        for p in (f.text, *f.paraphrases):
            out += [split_target(tok, p, f.target_new), split_target(tok, p, f.target_true)]
        for n in f.neighborhood:
            out += [split_target(tok, n.prompt, n.target), split_target(tok, n.prompt, f.target_new)]
    return out


def main() -> None:
    from editdecay.facts.datasets import load_facts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model, tok = load_model()
    facts = load_facts(SHARED / "counterfact" / "counterfact-edit.json")[: args.n]
    pairs = pairs_of(tok, facts)
    prober = Prober(model, tok, progress=False)
    seqs, _ = carrier_sequences(pairs)
    row = {"facts": len(facts), "pairs": len(pairs), "sequences_shared": len(seqs),
           "tokens_per_pair": sum(len(c) + len(t) for c, t in pairs), "tokens_shared": sum(map(len, seqs))}
    for share in (False, True):
        best = float("inf")
        for _ in range(args.repeat):
            t = time.perf_counter()
            prober.score_targets(pairs, share=share)
            best = min(best, time.perf_counter() - t)
        row["seconds_" + ("shared" if share else "per_pair")] = round(best, 2)
    row["speedup"] = round(row["seconds_per_pair"] / row["seconds_shared"], 2)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
