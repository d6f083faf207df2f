"""Study specs: YAML → typed, validated settings → a grid of trials.

A spec names axes (model × dataset × editor × edit layers × n_edits × protocol × task ×
fine-tuning method × layer policy × seed); the grid is their product minus ``exclude``
rules. Each grid point resolves to a *config*: the settings that determine its results
(editor preset and hyperparameters, fine-tuning preset with overrides, selection,
evaluation). A :class:`Trial` is one distinct config; its ``key`` is the SHA-256 of the
config's canonical JSON, so grid points whose results cannot differ share one trial:

- editor ``none`` (or ``n_edits: 0``) is the zero-edit baseline: n_edits is 0 and the
  protocol, edit layers and editor settings drop out; the dataset drops out too (seed
  001: zero-edit settings are identical across datasets) — the trial probes the
  intrinsic sets of every dataset on the axis;
- ``ft_method: none`` is the no-fine-tune baseline: task and layer policy drop out.

Errors are one line naming the file, the field path and the allowed values::

    demo.yaml: axes.ft_method[1]: 'lorra' is not one of full, lora, dora, none

See ``docs/study-store.md`` for the YAML format and ``examples/demo.yaml``.

Modules: :mod:`.validate` (field paths and coercions), :mod:`.schema` (the settings
blocks, each parsing itself), :mod:`.expand` (grid, trials, keys), :mod:`.cost` (cost
estimate and plan text), :mod:`.docs` (the key reference of ``docs/study-store.md``).
"""

from .cost import CostModel, estimate_cost, format_plan, precision_lines
from .expand import (
    CONFIG_VERSION,
    KINDS,
    PRESERVE_FIELDS,
    Trial,
    Unit,
    canonical_json,
    config_hash,
    expand,
    stage_seed,
)
from .schema import (
    AXES,
    BLOCKS,
    BUILTIN_DATASET,
    DOWNSTREAM_OPTIONS,
    DOWNSTREAM_STAGES,
    DRIFT_PROMPTS,
    NONE,
    POLICY_FORMS,
    TASKS,
    Axes,
    DatasetSource,
    DownstreamSettings,
    DriftSettings,
    EditorSettings,
    FinetuneSettings,
    OverrideRule,
    ProbeSettings,
    ReeditSettings,
    Resources,
    SelectionSettings,
    StudySpec,
    layers_label,
)
from .validate import SpecError, field_defaults, yaml_keys

__all__ = [
    "AXES", "BLOCKS", "BUILTIN_DATASET", "CONFIG_VERSION", "DOWNSTREAM_OPTIONS", "DOWNSTREAM_STAGES", "DRIFT_PROMPTS",
    "KINDS", "NONE", "POLICY_FORMS", "PRESERVE_FIELDS", "TASKS", "Axes", "CostModel", "DatasetSource",
    "DownstreamSettings", "DriftSettings", "EditorSettings", "FinetuneSettings", "OverrideRule", "ProbeSettings",
    "ReeditSettings", "Resources", "SelectionSettings", "SpecError", "StudySpec", "Trial", "Unit", "canonical_json",
    "config_hash", "estimate_cost", "expand", "field_defaults", "format_plan", "layers_label", "precision_lines",
    "stage_seed", "yaml_keys",
]
