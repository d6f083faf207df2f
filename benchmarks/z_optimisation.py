"""Target-vector (z) optimisation: editdecay's batched core vs the reference approach.

    python -m benchmarks.z_optimisation [--n 20] [--steps 5]

Reference approach (ROME/MEMIT repositories): one request at a time; every step runs a
full forward over all its template prompts and takes full logits (log-softmax over
every position and the whole vocabulary). editdecay: all requests in one optimisation,
the prefix before the subject's last token in a KV cache, logits only at target and KL
positions. Both run the same number of steps (no early stop) on the same templates;
the JSON reports seconds, the speed-up and the largest relative difference of z.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from editdecay import load_model
from editdecay.editing import get_editor
from editdecay.editing.core import TargetConfig, _build_rows, _pad, optimise_targets
from editdecay.facts.datasets import load_facts
from editdecay.models.arch import get_arch

from .common import SHARED


def reference_z(model, tok, req, templates, cfg: TargetConfig) -> torch.Tensor:
    """One request, full forward and full logits each step (the reference loop)."""
    spec = get_arch(model)
    module = model.get_submodule(spec.rewrite_module_name(cfg.layer))
    rows = _build_rows(tok, [req], templates, cfg.kl_prompts)
    ids, mask = _pad(rows.ids, tok.pad_token_id, "cpu")
    n = len(rows.ids)
    subj = torch.tensor(rows.subj)
    delta = torch.zeros(spec.weight_out_in(module).shape[0], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    state = {}

    def hook(m, args, out):
        if "h" not in state:
            state["h"] = out[0, subj[0]].detach().clone()
        return out.index_put((torch.arange(n), subj), delta.expand(n, -1), accumulate=True)

    for p in model.parameters():
        p.requires_grad_(False)
    handle = module.register_forward_hook(hook)
    try:
        for it in range(cfg.steps):
            opt.zero_grad()
            logp = model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)  # full logits
            nll, kl = 0.0, 0.0
            for i in range(n):
                if rows.is_kl[i]:
                    cur = logp[i, rows.subj[i]]
                    state.setdefault(("kl", i), cur.detach())
                    kl = kl + (cur.exp() * (cur - state[("kl", i)])).sum() / len(cfg.kl_prompts)
                else:
                    t = torch.tensor(rows.tgt_ids[i])
                    nll = nll - logp[i, rows.tgt_pos[i]].gather(1, t[:, None]).sum() / len(t) / rows.n_templates
            loss = nll + cfg.kl_factor * kl + cfg.weight_decay * delta.norm() / state["h"].norm() ** 2
            if it == cfg.steps - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                max_norm = cfg.clamp_norm_factor * state["h"].norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
    return state["h"] + delta.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    model, tok = load_model(device="cpu")
    cf = SHARED / "counterfact" / "counterfact-val.json"
    facts = (load_facts(cf) if cf.exists() else load_facts("", format="builtin"))[: args.n]
    editor = get_editor("rome", model=model)
    templates = editor.templates(model, tok)
    cfg = TargetConfig(layer=editor.hparams.layers[0], steps=args.steps, loss_threshold=-1.0)

    t = time.perf_counter()
    z_ours, _, _ = optimise_targets(model, tok, facts, templates, cfg)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    z_ref = torch.stack([reference_z(model, tok, f, templates, cfg) for f in facts])
    t_ref = time.perf_counter() - t
    rel = ((z_ours - z_ref).norm(dim=1) / z_ref.norm(dim=1)).max().item()
    print(json.dumps({
        "n_requests": len(facts), "templates": len(templates), "steps": args.steps, "threads": torch.get_num_threads(),
        "editdecay_s": t_ours, "reference_s": t_ref, "speedup": t_ref / t_ours, "max_relative_z_difference": rel,
    }, indent=2))


if __name__ == "__main__":
    main()
