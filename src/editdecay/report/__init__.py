"""Reports on a study database: Markdown + self-contained HTML + PNG figures.

>>> paths = build_report("study.db", "report/")       # report.md, report.html, figures/*.png
>>> for row in summary_table("study.db"): print(row["trial"], row["edited_retention"])

Sections regenerate the tables and figures of the seeds' reference card (see
:data:`~editdecay.report.sections.SECTIONS`); every rate carries its 95% bootstrap
interval and n; a section without data names the spec axes that would produce it.
"""

from __future__ import annotations

from .data import ReportError, StudyData, TrialInfo
from .render import ReportPaths, build_report, render_html, render_markdown
from .sections import (
    SECTIONS,
    Figure,
    Section,
    Table,
    build_sections,
    published_values,
    summary_table,
)

__all__ = [
    "SECTIONS",
    "Figure",
    "ReportError",
    "ReportPaths",
    "Section",
    "StudyData",
    "Table",
    "TrialInfo",
    "build_report",
    "build_sections",
    "published_values",
    "render_html",
    "render_markdown",
    "summary_table",
]
