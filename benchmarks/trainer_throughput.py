"""Trainer tokens/s, with evaluation and fact probes, against a bare torch loop on the
same model, adapters, data and batches (goal: ratio >= 0.9).

    python -m benchmarks.trainer_throughput [--steps 40] [--eval-every 20] [--method lora]

Both runs start from the same LoRA-wrapped embedded model state and see the same
batches (``--batch-size`` blocks of ``--block-size`` tokens of the offline corpus). The
trainer evaluates the validation loss (8 blocks) and probes 8 + 8 built-in facts
(retention, top-3 tokens, token categories) at step 0, every ``--eval-every`` steps and
at the end; its wall time includes all of that. Tokens/s counts training tokens only.
The two runs alternate for ``--rounds`` rounds and the fastest of each is kept (other
load on the machine hits both alike); the evaluation share is reported separately.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import time

import torch

from editdecay import load_model
from editdecay.editing.corpus import Corpus
from editdecay.facts.datasets import load_facts
from editdecay.finetune import FinetuneConfig, TrainConfig, prepare_model, train
from editdecay.finetune.callbacks import FactProbe
from editdecay.finetune.data import batch_stream, eval_loss, pack_blocks, split_validation


def bare_loop(model, batches, steps: int, lr: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.train()
    t = time.perf_counter()
    for _ in range(steps):
        b = next(batches)
        opt.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    base, tok = load_model(device="cpu")
    blocks = pack_blocks(tok, itertools.islice(Corpus.offline_default(), 3000), args.block_size)
    val = split_validation(blocks, 8)
    facts = load_facts("", format="builtin")
    edit, intrinsic = facts[:8], facts[8:16]
    tokens = args.steps * args.batch_size * args.block_size
    lr = 1e-4

    m0, _, _ = prepare_model(copy.deepcopy(base), FinetuneConfig(method=args.method, policy="all"))
    bare_loop(m0, batch_stream(blocks, args.batch_size), 2, lr)  # warm-up (allocator, kernels)
    del m0
    t_bare, t_train, t_eval, n_evals = math.inf, math.inf, 0.0, 0
    for _ in range(args.rounds):
        m1, _, _ = prepare_model(copy.deepcopy(base), FinetuneConfig(method=args.method, policy="all"))
        t_bare = min(t_bare, bare_loop(m1, batch_stream(blocks, args.batch_size), args.steps, lr))
        del m1
        m2, names, _ = prepare_model(copy.deepcopy(base), FinetuneConfig(method=args.method, policy="all"))
        inner = m2.get_base_model() if hasattr(m2, "get_base_model") else m2
        probe = FactProbe(inner, tok, edit, intrinsic, pool=facts)
        t = time.perf_counter()
        log = train(m2, batch_stream(blocks, args.batch_size), TrainConfig(lr=lr, max_steps=args.steps, eval_every=args.eval_every),
                    evaluate=lambda m: {"loss": eval_loss(m, val)}, probes=[probe], trainable=names, progress=False)
        elapsed = time.perf_counter() - t
        if elapsed < t_train:
            t_train, t_eval, n_evals = elapsed, log.eval_seconds, len(log.val)
        del m2
    out = {
        "method": args.method, "steps": args.steps, "eval_every": args.eval_every, "evaluations": n_evals,
        "batch": [args.batch_size, args.block_size], "threads": torch.get_num_threads(),
        "bare_tokens_per_s": round(tokens / t_bare, 1), "trainer_tokens_per_s": round(tokens / t_train, 1),
        "ratio": round(t_bare / t_train, 3),
        "seconds_per_evaluation": round(t_eval / max(n_evals, 1), 2),
        "ratio_training_steps_only": round(t_bare / (t_train - t_eval), 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
