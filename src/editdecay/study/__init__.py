"""Studies: specs (YAML → typed grid of trials), the SQLite study store, export."""

from .export import export
from .spec import (
    AXES,
    CostModel,
    SpecError,
    StudySpec,
    Trial,
    Unit,
    config_hash,
    estimate_cost,
    expand,
    format_plan,
    stage_seed,
)
from .store import (
    CurvePoint,
    DownstreamRow,
    DriftRow,
    FactRow,
    MetricRow,
    PendingTrial,
    Store,
    StoreError,
    TransitionRow,
    UnitRows,
)

__all__ = [
    "AXES",
    "CostModel",
    "CurvePoint",
    "DownstreamRow",
    "DriftRow",
    "FactRow",
    "MetricRow",
    "PendingTrial",
    "SpecError",
    "Store",
    "StoreError",
    "StudySpec",
    "TransitionRow",
    "Trial",
    "Unit",
    "UnitRows",
    "config_hash",
    "estimate_cost",
    "expand",
    "export",
    "format_plan",
    "stage_seed",
]
