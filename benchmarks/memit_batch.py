"""Seconds for a MEMIT batch of 20 facts on the embedded model, and for the
second-moment pass over its layers.

    python -m benchmarks.memit_batch [--n 20]

Facts: the first ``n`` confidence-filtered CounterFact validation facts (distinct
subjects) when ../shared is present, else built-in facts. The statistics pass runs in a
fresh temporary cache so it is really computed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from editdecay import load_model
from editdecay.editing import get_editor
from editdecay.editing.protocols import run_batch
from editdecay.editing.stats_provider import default_covariances
from editdecay.facts.datasets import load_facts
from editdecay.facts.selection import confidence_filter

from .common import SHARED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    model, tok = load_model(device="cpu")
    cf = SHARED / "counterfact" / "counterfact-val.json"
    pool = load_facts(cf)[:800] if cf.exists() else load_facts("", format="builtin")
    passed = [f for f, o in zip(pool, confidence_filter(model, tok, pool)) if o.passed]
    facts = list({f.subject: f for f in passed}.values())[: args.n]
    editor = get_editor("memit", model=model)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        covs = default_covariances(model, tok, editor.hparams.layers, cache_dir=tmp)
        t_stats = time.perf_counter() - t
    editor._cov = dict(covs)
    t = time.perf_counter()
    editor.templates(model, tok)
    t_templates = time.perf_counter() - t
    res = run_batch(editor, model, tok, facts)
    doc = res.to_json("derived")
    edit_s = res.results[0].seconds
    res.restore(model)
    print(json.dumps({
        "n_facts": len(facts), "layers": editor.hparams.layers, "threads": torch.get_num_threads(),
        "stats_tokens_per_layer": 20 * 1536, "stats_s": t_stats, "templates_s": t_templates,
        "edit_s": edit_s, "pre": doc["pre"], "post": doc["post"],
    }, indent=2))


if __name__ == "__main__":
    main()
