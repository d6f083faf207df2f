"""One budget-point probe (``FactProbe(scores=True)``): reusing the probe's greedy
decisions of the rewrite prompts in ``score_facts`` against deciding them a second time.

    python -m benchmarks.budget_probe [--n-edit 100] [--n-intrinsic 200]

"twice" is the earlier path: the probe decodes edited + intrinsic prompts, then
``score_facts`` decodes the edited prompts again before its teacher-forced pass. "reuse"
passes the probe's results (``score_facts(decided=...)``). The scores must be identical;
the ratio twice/reuse is the saving per budget point (a budget curve pays it at every point).
"""

from __future__ import annotations

import argparse
import json

from editdecay import load_model
from editdecay.evaluate.metrics import score_facts
from editdecay.facts.datasets import load_facts
from editdecay.finetune.callbacks import FactProbe

from .common import SHARED, best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-edit", type=int, default=100)
    ap.add_argument("--n-intrinsic", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    model, tok = load_model(device="cpu")
    facts = load_facts(SHARED / "counterfact" / "counterfact-edit.json")[: args.n_edit + args.n_intrinsic]
    edit, intrinsic = facts[: args.n_edit], facts[args.n_edit:]
    probe = FactProbe(model, tok, edit, intrinsic, scores=True)
    retention_only = FactProbe(model, tok, edit, intrinsic)

    def as_rows(sc):
        return [{"es": f.es, "ps": f.ps, "ns": f.ns, "success": f.success, "margin": f.margin} for f in sc.facts]

    def twice():
        retention_only(model)
        return as_rows(score_facts(model, tok, edit, mode=probe.mode, prob=probe.prob, prober=probe.prober))

    def reuse():
        return probe(model)["scores"]

    same = twice() == reuse()
    t_twice, t_reuse = best_of(twice, args.repeat), best_of(reuse, args.repeat)
    print(json.dumps({"n_edit": len(edit), "n_intrinsic": len(intrinsic), "identical_scores": same,
                      "twice_s": round(t_twice, 3), "reuse_s": round(t_reuse, 3),
                      "ratio": round(t_twice / t_reuse, 3)}))
    if not same:
        raise SystemExit("scores differ between the two paths")


if __name__ == "__main__":
    main()
