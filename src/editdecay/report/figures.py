"""Report figures: matplotlib's Agg canvas straight to PNG bytes (no pyplot, no global state).

Each function takes plain numbers (estimates with interval bounds) and returns the PNG
bytes; the sections attach them to :class:`~editdecay.report.sections.Figure`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator

DPI = 100


@dataclass
class Line:
    """One series: ``y`` over ``x`` with an optional interval band (``low``/``high``)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    style: str = "-"
    color: str | None = None
    marker: str | None = "o"


@dataclass
class Panel:
    """One axes: lines, labels and shaded x-spans (e.g. the edited blocks)."""

    title: str
    lines: list[Line]
    xlabel: str = ""
    ylabel: str = ""
    ylim: tuple[float, float] | None = None
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    """(x from, x to, label) regions shaded behind the lines."""
    xticks: Sequence[float] | None = None
    xticklabels: Sequence[str] | None = None


def _png(fig: MplFigure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


def line_panels(panels: Sequence[Panel], *, ncols: int = 2, title: str = "", panel_size: tuple[float, float] = (4.6, 3.1)
                ) -> bytes:
    """A grid of line plots with interval bands."""
    n = max(1, len(panels))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = MplFigure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows + (0.4 if title else 0)), dpi=DPI,
                    layout="constrained")
    axs = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, p in zip(axs, panels):
        for lo, hi, lab in p.spans:
            ax.axvspan(lo, hi, color="#f2c14e", alpha=0.25, lw=0, label=lab or None)
        for ln in p.lines:
            x = np.asarray(ln.x, dtype=float)
            y = np.asarray([_nan(v) for v in ln.y])
            art = ax.plot(x, y, ln.style, color=ln.color, marker=ln.marker, ms=3.5, lw=1.6, label=ln.label)[0]
            if ln.low is not None and ln.high is not None:
                lo = np.asarray([_nan(v) for v in ln.low])
                hi = np.asarray([_nan(v) for v in ln.high])
                ax.fill_between(x, lo, hi, color=art.get_color(), alpha=0.15, lw=0)
        xs = [float(v) for ln in p.lines for v in ln.x]
        if xs and all(v.is_integer() for v in xs) and p.xticks is None:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(p.title, fontsize=9)
        ax.set_xlabel(p.xlabel, fontsize=8)
        ax.set_ylabel(p.ylabel, fontsize=8)
        if p.ylim:
            ax.set_ylim(*p.ylim)
        if p.xticks is not None:
            ax.set_xticks(list(p.xticks))
            if p.xticklabels is not None:
                ax.set_xticklabels(list(p.xticklabels), fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if p.lines or p.spans:
            ax.legend(fontsize=6.5, loc="best")
    for ax in axs[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def bar_chart(groups: Sequence[str], series: Sequence[tuple[str, Sequence[tuple[float, float, float] | None]]], *,
              ylabel: str, title: str = "", ylim: tuple[float, float] | None = None) -> bytes:
    """Grouped bars with interval error bars; ``series`` = (name, one (estimate, low,
    high) or None per group)."""
    ng, ns = max(1, len(groups)), max(1, len(series))
    width = min(12.0, max(5.0, 0.35 * ng * ns + 2.0))
    fig = MplFigure(figsize=(width, 3.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    w = 0.8 / ns
    x = np.arange(ng)
    for i, (name, vals) in enumerate(series):
        est = np.array([math.nan if v is None else v[0] for v in vals])
        lo = np.array([math.nan if v is None else v[1] for v in vals])
        hi = np.array([math.nan if v is None else v[2] for v in vals])
        err = np.vstack([np.nan_to_num(est - lo), np.nan_to_num(hi - est)])
        ax.bar(x + (i - (ns - 1) / 2) * w, np.nan_to_num(est), w, yerr=err, capsize=2, label=name,
               error_kw={"lw": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels(list(groups), rotation=25 if ng > 3 else 0, ha="right" if ng > 3 else "center", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return _png(fig)


def heatmap(values: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], *, title: str = "",
            cbar_label: str = "", annotations: Sequence[Sequence[str]] | None = None, cmap: str = "viridis_r",
            vmin: float | None = None, vmax: float | None = None) -> bytes:
    """A matrix as a coloured grid with optional per-cell text (NaN cells blank)."""
    m = np.array([[_nan(v) for v in r] for r in values], dtype=float).reshape(len(rows), len(cols))
    fig = MplFigure(figsize=(max(4.0, 1.1 * len(cols) + 2.5), max(2.4, 0.45 * len(rows) + 1.4)), dpi=DPI,
                    layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(list(cols), fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(list(rows), fontsize=7)
    if annotations is not None:
        for i, r in enumerate(annotations):
            for j, text in enumerate(r):
                if text:
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black",
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.6, "lw": 0})
    fig.colorbar(im, ax=ax, label=cbar_label)
    if title:
        ax.set_title(title, fontsize=10)
    return _png(fig)
