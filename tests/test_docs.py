"""The user guide: generated preset tables are current, relative Markdown links resolve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
LINK = re.compile(r"\]\(([^)\s]+?)\)")


def test_preset_tables_are_current():
    res = subprocess.run([sys.executable, str(DOCS / "gen_presets.py"), "--check"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"preset tables are stale (run python docs/gen_presets.py):\n{res.stdout}{res.stderr}"


def _markdown_files() -> list[Path]:
    return sorted(DOCS.glob("*.md")) + [REPO / "README.md"]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_markdown_links_resolve(path: Path):
    missing = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # URLs (http:, mailto:, ...) and same-page anchors
        file = target.split("#", 1)[0]
        if not file.endswith(".md"):
            continue
        if not (path.parent / file).is_file():
            missing.append(target)
    assert not missing, f"{path.relative_to(REPO)}: links to missing files: {missing}"


def test_guide_pages_exist():
    for name in ("facts", "edit", "finetune", "evaluate", "studies", "reports"):
        assert (DOCS / f"{name}.md").is_file(), name
