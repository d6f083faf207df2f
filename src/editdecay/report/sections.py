"""The report's sections: one function per table or figure of the seeds' reference card.

Each function takes a :class:`~editdecay.report.data.StudyData` and returns a
:class:`Section` (title, Markdown notes, figures, tables, and — when the study holds no
data for it — a note naming the spec axes that would produce it). Every rate is shown
as ``estimate [95% bootstrap interval] n=…``; ES/PS/NS and downstream accuracies in
percent (seed 001), retention as fractions (seed 000). Each function is registered with
``@section(id, title, source)`` (:mod:`~editdecay.report.registry`), which holds its id,
title and source; :func:`build_sections` runs the registered sections in report order
and never raises: a section that fails reports its error instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .common import Figure, Section, Table  # noqa: F401 - the section objects' public home stays here
from .data import StudyData
from .registry import registered

# importing the section modules registers their sections in report order (overview, seed 000,
# seed 001, reproduction check, findings, preservation, re-edit); their names stay importable here
from .overview import headline, overview, retention_curves, summary_rows  # noqa: F401
from .seed000 import (  # noqa: F401
    s000_fig2, s000_fig3a, s000_fig3b, s000_fig4, s000_fig5, s000_table1, s000_table3, s000_table4, selection_stats,
)
from .seed001 import (  # noqa: F401
    s001_fig2, s001_fig3, s001_fig9, s001_fig67, s001_t1, s001_t2, s001_t3, s001_t4, s001_t5, s001_t6, s001_t14,
    s001_t15, s001_t20, ttest_groups,
)
from .repro import matches, published_values, reproduction  # noqa: F401
from .findings import budget_section, findings_section  # noqa: F401, E402
from .preserve import preserve_section  # noqa: F401, E402
from .reedit import reedit_section  # noqa: F401, E402

log = logging.getLogger(__name__)

#: ``(id, function)`` of every section registered when this module loaded, in report order
#: (kept for compatibility; the registry itself is :func:`~editdecay.report.registry.registered`).
SECTIONS: tuple[tuple[str, Callable[[StudyData], Section]], ...] = tuple((s.id, s.fn) for s in registered())


def build_sections(d: StudyData) -> list[Section]:
    """Every registered section in report order; a section that raises becomes an error note."""
    out = []
    for spec in registered():
        try:
            out.append(spec.fn(d))
        except Exception as e:
            log.exception("report section %s failed", spec.id)
            out.append(Section(spec.id, spec.title, spec.source, error=f"{type(e).__name__}: {e}",
                               missing=f"this section failed to render ({type(e).__name__}: {e})"))
    return out


def summary_table(db: str | Path | StudyData, *, study: str | int | None = None) -> list[dict[str, str]]:
    """Headline rows for the terminal: ``trial``, ``kind``, ``key``, ``status``,
    ``n_edits``, ``edited_retention`` (edited → after FT with intervals and n),
    ``intrinsic_retention``, ``es`` (percent), ``stop_reason`` — all strings."""
    if isinstance(db, StudyData):
        return summary_rows(db)
    d = StudyData(db, study=study)
    try:
        return summary_rows(d)
    finally:
        d.close()
