"""Render sections as Markdown (figures as PNG files beside it) and as one self-contained
HTML file (figures as base64 ``data:`` URIs, inline CSS, no external assets)."""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from .data import StudyData
from .sections import Section, Table, build_sections

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d232a;background:#fafbfc}
main{max-width:1180px;margin:0 auto;padding:1.2rem 2rem 4rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.4rem;border-bottom:1px solid #d7dde3;padding-bottom:.25rem}
.source{color:#5b6875;font-size:.85rem;margin-top:-.3rem}
nav ol{columns:2;font-size:.85rem;padding-left:1.2rem}nav a{color:#1f5fa8;text-decoration:none}
nav .empty a{color:#8a96a3}
table{border-collapse:collapse;font-size:.78rem;margin:.6rem 0 1rem;background:#fff;display:block;overflow-x:auto}
th,td{border:1px solid #d7dde3;padding:.25rem .45rem;text-align:left;vertical-align:top;white-space:nowrap}
th{background:#eef2f6}caption{caption-side:top;text-align:left;font-size:.8rem;color:#5b6875;padding:.2rem 0}
figure{margin:.8rem 0}figure img{max-width:100%;border:1px solid #e3e8ed;background:#fff}
figcaption{font-size:.8rem;color:#5b6875}
.missing{background:#fff8e1;border-left:4px solid #f2c14e;padding:.5rem .8rem;font-size:.88rem}
.error{background:#fdecea;border-left:4px solid #d9534f;padding:.5rem .8rem;font-size:.88rem}
code{background:#eef2f6;padding:0 .2rem;border-radius:3px}
"""

#: Marks the body once every image decoded (for headless-browser checks):
#: ``data-images`` = number of images, ``data-images-ok`` = "true" when all have a width.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-images-ok', ok ? 'true' : 'false');
});
"""


@dataclass
class ReportPaths:
    """Files written by :func:`build_report`."""

    markdown: Path
    html: Path
    figures: list[Path] = field(default_factory=list)


# --- Markdown ------------------------------------------------------------------------------------
def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Table) -> str:
    lines = []
    if t.caption:
        lines.append(f"*{t.caption}*\n")
    lines.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
    lines.append("|" + "---|" * len(t.columns))
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def render_markdown(title: str, sections: Sequence[Section], figure_files: dict[str, str], subtitle: str = "") -> str:
    """The report as Markdown; ``figure_files`` maps ``section id/figure name`` to relative paths."""
    out = [f"# {title}", ""]
    if subtitle:
        out += [subtitle, ""]
    out += ["## Contents", ""]
    out += [f"{i}. [{s.title}](#{s.id}){'' if s.has_data else ' — no data'}" for i, s in enumerate(sections, 1)]
    for s in sections:
        out += ["", f'<a id="{s.id}"></a>', f"## {s.title}", ""]
        if s.source:
            out += [f"*Regenerates: {s.source}*", ""]
        if s.markdown:
            out += [s.markdown, ""]
        if s.missing:
            out += [f"> **No data{'' if not s.has_data else ' (partly)'}:** {s.missing}", ""]
        for f in s.figures:
            out += [f"![{f.caption or f.name}]({figure_files[f'{s.id}/{f.name}']})", ""]
            if f.caption:
                out += [f"*{f.caption}*", ""]
        for t in s.tables:
            out += [table_markdown(t), ""]
    return "\n".join(out).rstrip() + "\n"


# --- HTML -----------------------------------------------------------------------------------------
def _inline(text: str) -> str:
    """Escape, then the little Markdown the sections use: `code`, **bold**, *italic*."""
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])", r"<em>\1</em>", s)


def _paragraphs(text: str) -> str:
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if lines and all(ln.lstrip().startswith("- ") for ln in lines):
            out.append("<ul>" + "".join(f"<li>{_inline(ln.lstrip()[2:])}</li>" for ln in lines) + "</ul>")
        elif block.strip():
            out.append(f"<p>{_inline(' '.join(lines))}</p>")
    return "\n".join(out)


def table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in t.rows)
    cap = f"<caption>{_inline(t.caption)}</caption>" if t.caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """One self-contained HTML document (images as base64 PNG data URIs)."""
    toc = "".join(f'<li class="{"" if s.has_data else "empty"}"><a href="#{s.id}">{html.escape(s.title)}</a>'
                  f'{"" if s.has_data else " — no data"}</li>' for s in sections)
    parts = [(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
             f'<meta name="viewport" content="width=device-width, initial-scale=1">'
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"),
             '<body data-report="editdecay"><main>', f"<h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="source">{_inline(subtitle)}</p>')
    parts.append(f"<nav><h2>Contents</h2><ol>{toc}</ol></nav>")
    for s in sections:
        parts.append(f'<section id="{html.escape(s.id)}" data-has-data="{str(s.has_data).lower()}">')
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.source:
            parts.append(f'<p class="source">Regenerates: {html.escape(s.source)}</p>')
        if s.markdown:
            parts.append(_paragraphs(s.markdown))
        if s.missing:
            cls = "error" if s.error else "missing"
            parts.append(f'<p class="{cls}"><strong>No data{"" if not s.has_data else " (partly)"}:</strong> '
                         f"{_inline(s.missing)}</p>")
        for f in s.figures:
            b64 = base64.b64encode(f.png).decode("ascii")
            alt = html.escape(f.caption or f.name)
            parts.append(f'<figure><img alt="{alt}" data-figure="{html.escape(f.name)}" '
                         f'src="data:image/png;base64,{b64}"><figcaption>{alt}</figcaption></figure>')
        parts += [table_html(t) for t in s.tables]
        parts.append("</section>")
    parts.append(f"</main><script>{CHECK_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


# --- the report -------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def build_report(db: str | os.PathLike, out_dir: str | os.PathLike, *, title: str | None = None,
                 study: str | int | None = None, n_boot: int = 10_000, seed: int = 0) -> ReportPaths:
    """Write ``report.md``, ``report.html`` (self-contained) and ``figures/*.png`` for
    the study database ``db`` into ``out_dir``. ``study`` restricts to one study (name
    or id; default every trial in the database); ``n_boot``/``seed`` set the bootstrap."""
    d = StudyData(db, study=study, n_boot=n_boot, seed=seed)
    try:
        sections = build_sections(d)
        names = sorted({s["name"] for s in d.studies}) if study is None else [str(study)]
        title = title or ("editdecay report: " + (", ".join(names) if names else Path(db).name))
        subtitle = (f"Database `{Path(db)}` · {len(d.trials)} trials · generated "
                    f"{datetime.now(UTC).isoformat(timespec='seconds')}")
    finally:
        d.close()
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    paths: list[Path] = []
    for i, s in enumerate(sections, 1):
        for f in s.figures:
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f.name)
            name = f"{i:02d}-{stem}.png"
            while f"figures/{name}" in files.values():
                name = name.replace(".png", "_.png")
            p = fig_dir / name
            _atomic_write(p, f.png)
            files[f"{s.id}/{f.name}"] = f"figures/{name}"
            paths.append(p)
    md, page = out / "report.md", out / "report.html"
    _atomic_write(md, render_markdown(title, sections, files, subtitle))
    _atomic_write(page, render_html(title, sections, subtitle))
    return ReportPaths(md, page, paths)
