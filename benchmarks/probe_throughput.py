"""Probe throughput vs a raw batched forward of the same model and batches.

    python -m benchmarks.probe_throughput [--n 256] [--batch-size 32]

"raw" is ``model(input_ids, attention_mask)`` with full logits on exactly the batches
the prober builds (same order, same padding): the cost of one plain forward over the
prompts. "greedy" is the retention probe (decodes on through stop tokens with the KV
cache); "masked_argmax" is one step. Ratios > 1 mean the probe beats a plain forward
(it unembeds only the last position). Also reported: achieved GFLOP/s of the raw
forward as a fraction of a measured fp32 matmul peak.
"""

from __future__ import annotations

import argparse
import json

import torch

from editdecay import Prober, load_model

from .common import best_of, measured_fp32_peak, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    model, tok = load_model(device="cpu")
    source, texts = prompts(args.n)
    prober = Prober(model, tok, batch_size=args.batch_size)
    seqs = prober.encode(texts)
    batches = [(ids, mask) for _, ids, mask, _ in prober._batches(seqs)]

    @torch.inference_mode()
    def raw():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)

    raw()  # warm-up
    t_raw = best_of(raw, args.repeat)
    t_greedy = best_of(lambda: prober.probe(texts, k=0, mode="greedy"), args.repeat)
    t_masked = best_of(lambda: prober.probe(texts, k=0, mode="masked_argmax"), args.repeat)
    steps = [r.first_non_stop.steps for r in prober.probe(texts, k=0)]

    tokens = sum(int(m.sum()) for _, m in batches)
    padded = sum(m.numel() for _, m in batches)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    vocab, d = model.get_output_embeddings().weight.shape
    flops = 2 * padded * (n_params + vocab * d)  # matmul FLOPs of the raw forward (attention scores ignored)
    peak = measured_fp32_peak()
    doc = {
        "source": source,
        "n_prompts": len(texts),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "tokens": tokens,
        "padded_tokens": padded,
        "mean_greedy_steps": sum(steps) / len(steps),
        "raw_s": t_raw,
        "greedy_s": t_greedy,
        "masked_argmax_s": t_masked,
        "ratio_greedy_vs_raw": t_raw / t_greedy,
        "ratio_masked_vs_raw": t_raw / t_masked,
        "raw_gflops": flops / t_raw / 1e9,
        "measured_peak_gflops": peak,
        "raw_fraction_of_peak": flops / t_raw / 1e9 / peak,
    }
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
