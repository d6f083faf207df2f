"""The shared core of the hypernetwork editors (MEND, MALMEN).

Both editors read the same two factors at each edit module (a linear map W, stored
(out, in) here whatever the checkpoint's orientation): the module's input ``x`` (the
*key*) and the gradient ``δ`` of the edit loss with respect to its output (the
*value gradient*), at the target tokens (``token: ans``) or at every real token
(``token: all``). Their plain gradient is ∇W = Σ δ xᵀ. A small per-shape network
maps (x, δ) to pseudo-factors (x̃, δ̃); the editors differ only in how those become a
weight shift (``mend.py``: ΔW = −lr Σ δ̃ x̃ᵀ; ``malmen.py``: a least-squares solve
over all edits at once).

This package holds everything else (``params``, ``capture``, ``nets``, ``editor``, ``train``):

- :func:`edit_module_names`, :func:`capture_factors`: hooks that read (x, δ) per
  edit module for a batch of requests in one forward/backward pass. The edit loss of
  a request is the mean NLL of its target tokens (teacher-forced, ``split_target``);
  the losses of a batch are summed, so a request's factors do not depend on what it
  is batched with.
- :class:`RunningNorm`, :class:`ResidualBlock`, :class:`FactorNet`,
  :class:`HyperNet`: one network per weight shape over the concatenation [x, δ],
  standardised by running statistics of the training factors (Welford, float64),
  residual low-rank blocks with per-module scale/shift (MEND's ``IDMLP`` with
  ``shared: true``; MALMEN's ``MALMENBlock``), identity-initialised; one learned edit
  learning rate per module (and MALMEN's λ). With ``denormalize`` (default) the
  network's output is mapped back through the statistics, so an untrained network
  returns the raw factors exactly and the untrained editor is a plain gradient step.
  (The references feed the *standardised* factors forward; ``denormalize: false``
  reproduces that, which the paper presets use with the papers' learning rates.)
- :class:`HypernetEditor`: ``edit`` (capture → shifts → W += ΔW via snapshot /
  ``finish_edit``, bit-exact restore), checkpoints as ``hypernet.safetensors`` +
  ``config.json``.
- :func:`train_hypernet`: the training loop. One step on a batch of ``train_batch``
  training facts, edited in independent groups of ``group_size`` (1: single edits, as
  MEND's reference; MALMEN's reference edits its whole batch at once), all rows
  (rewrite, paraphrase and neighbourhood prompts) in one padded batch:
  (1) one forward/backward: the edit factors (rewrite prompt → target_new), the
  pre-edit distribution at the neighbourhood answers, and the outputs of the blocks
  below the lowest edit block, recorded; (2) ΔW per group without gradient, applied
  through forward hooks (x ↦ Wx + ΔW x, each group's rows its own shift) in a second
  pass that replays the recorded lower blocks (they do not depend on ΔW) and computes
  only the blocks from the lowest edit block on, and the gradient G of
  ``cedit``·NLL(target_new | paraphrases [and the rewrite prompt]) +
  ``cloc``·KL(p_pre ‖ p_post at the neighbourhood answers) with respect to ΔW (kept in
  low-rank form where it is); (3) ΔW recomputed with gradient from the cached factors
  and ⟨ΔW, G⟩ back-propagated into the network (and through MALMEN's solve). This
  two-stage scheme is MALMEN's (``editor/base.py``); it equals back-propagating the
  meta-loss through the edit, without holding the language model's graph and the
  network's together.
  A validation curve (ES/PS/NS of single edits on held-out facts) is computed every
  ``eval_every`` steps, starting with the untrained network; the best network by
  ``early_stop`` is kept, training stops after ``patience`` validations without
  improvement; optimizer, step, sampler and RNG state are saved for ``--resume``.
"""
from .capture import (
    Factors, Shift, _Batch, _batch, _capture, _lowest_block, _record_prefix, _replay_prefix, _row_mean,
    _target_logprobs, capture_factors, frozen, shifted,
)
from .editor import HypernetEditor, _atomic, _state_tensors
from .nets import FactorNet, HyperNet, ResidualBlock, RunningNorm, shape_key
from .params import (
    CONFIG_FILE, EARLY_STOP, FORMAT, ROLES, STATE_DIR, STRUCTURAL, TOKENS, WEIGHTS_FILE, HypernetHyperParams,
    derive_from_preset, edit_module_names, module_shape, read_checkpoint_config, resolve_hparams,
)
from .train import (
    TrainReport, _load_optimizer, _metrics, _rows_mask, _Sampler, _save_optimizer, _score_pairs, _step_rows,
    _StepRows, _val_score, make_optimizer, score_edits, train_hypernet, train_step, validate,
)

__all__ = [
    # params
    "CONFIG_FILE", "EARLY_STOP", "FORMAT", "ROLES", "STATE_DIR", "STRUCTURAL", "TOKENS", "WEIGHTS_FILE",
    "HypernetHyperParams", "derive_from_preset", "edit_module_names", "module_shape", "read_checkpoint_config",
    "resolve_hparams",
    # capture
    "Factors", "Shift", "_Batch", "_batch", "_capture", "_lowest_block", "_record_prefix", "_replay_prefix",
    "_row_mean", "_target_logprobs", "capture_factors", "frozen", "shifted",
    # nets
    "FactorNet", "HyperNet", "ResidualBlock", "RunningNorm", "shape_key",
    # editor
    "HypernetEditor", "_atomic", "_state_tensors",
    # train
    "TrainReport", "_Sampler", "_StepRows", "_load_optimizer", "_metrics", "_rows_mask", "_save_optimizer",
    "_score_pairs", "_step_rows", "_val_score", "make_optimizer", "score_edits", "train_hypernet", "train_step",
    "validate",
]
