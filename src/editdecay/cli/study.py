"""Study commands: ``demo``, ``plan``, ``run``, ``report`` and ``export``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import DeviceOpt, JsonOpt
from .output import nan_to_none, print_table


def demo(
    out: Annotated[Optional[Path], typer.Option(help="Output directory (demo.db, report/); default: the editdecay cache's demo folder.")] = None,
    full: Annotated[bool, typer.Option(help="A larger run: 24 facts per editor and longer fine-tuning (about 4x the time).")] = False,
    device: DeviceOpt = None,
) -> None:
    """The one-command demo: a complete small study on the embedded model, offline.

    Selects built-in facts the model knows, edits 8 of them with ROME and with MEMIT (and
    keeps a no-edit baseline), fine-tunes each model with LoRA under the layer policies
    `all` and `non-edited` on real English text shipped with Python, probes the edited
    and intrinsic facts during training, and writes the report. Resumable: rerunning
    with the same --out skips finished work.
    """
    from importlib.resources import files

    import yaml

    from ..cache import cache_root
    from ..report import build_report, summary_table
    from ..study import StudySpec
    from ..study.runner import run_study

    out = out or cache_root() / "demo"
    raw = yaml.safe_load(files("editdecay.study").joinpath("demo.yaml").read_text(encoding="utf-8"))
    if full:
        raw["name"] = "demo-full"
        raw["axes"]["n_edits"] = 24
        raw["selection"]["n_intrinsic"] = 24
        raw["finetune"]["overrides"]["max_steps"] = 2 * raw["finetune"]["overrides"]["max_steps"]
    spec = StudySpec.from_dict(raw, "demo.yaml", base_dir=out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / f"{spec.name}.db"
    typer.echo(f"editdecay demo: {len(spec.expand())} trials on the embedded model; results in {db}", err=True)
    summary = run_study(spec, db, device=device)
    paths = build_report(db, out / "report", title="editdecay demo: do edits survive fine-tuning?")
    rows = summary_table(db)
    cols = [c for c in ("trial", "edited_retention", "intrinsic_retention", "es") if rows and c in rows[0]]
    print_table("edited vs intrinsic retention (95% bootstrap intervals)", [c.replace("_", " ") for c in cols],
                [[str(r[c]) for c in cols] for r in rows],
                f"{summary.done} units run, {summary.failed} failed, {summary.seconds / 60:.1f} min",
                *[f"[red]failed[/red] {e}" for e in summary.errors], f"report: {paths.html}", overflow="fold")


def plan(
    spec: Annotated[Path, typer.Argument(help="Study spec (YAML).", show_default=False)],
    as_json: JsonOpt = False,
) -> None:
    """Print a study's trials and an estimated cost before anything runs.

    JSON schema: {"study": str, "grid_points": int, "trials": [trial dicts with key,
    kind, axes, config, points], "cost": {counts and cpu_seconds}}.
    """
    from ..study import StudySpec, estimate_cost, format_plan

    s = StudySpec.from_yaml(spec)
    trials = s.expand()
    cost = estimate_cost(trials)
    if as_json:
        typer.echo(json.dumps(nan_to_none({"study": s.name, "grid_points": s.grid_size(),
                                           "trials": [t.to_dict() for t in trials], "cost": cost})))
        return
    typer.echo(format_plan(s, trials, cost))


def run(
    spec: Annotated[Path, typer.Argument(help="Study spec (YAML).", show_default=False)],
    db: Annotated[Optional[Path], typer.Option(help="Study database (default: SPEC's name with .db beside it).")] = None,
    executor: Annotated[str, typer.Option(help="local | ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Address of a running Ray cluster (default: start a local one).")] = None,
    max_parallel: Annotated[int, typer.Option(min=1, help="Units in flight at once (Ray actors).")] = 1,
    device: DeviceOpt = None,
    edit_cache: Annotated[Optional[Path], typer.Option(help="Keep every computed edit in this folder and load an edit found there instead of editing again (same editor settings, facts, model and editdecay version; shared by studies and runs).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run every unfinished unit of a study; finished units are skipped, failures are
    recorded and the study goes on.

    JSON schema: {"db": str, "study_id": int, "done": int, "failed": int, "seconds":
    float, "errors": [str], "status": {status: count}}.
    """
    from ..study import Store, StudySpec
    from ..study.runner import run_study

    s = StudySpec.from_yaml(spec)
    db = db or spec.with_suffix(".db")
    summary = run_study(s, db, executor=executor, max_parallel=max_parallel, ray_address=ray_address, device=device,
                        edit_cache=edit_cache)
    with Store(db) as store:
        status = store.status_counts(summary.study_id)
    doc = {"db": str(db), "study_id": summary.study_id, "done": summary.done, "failed": summary.failed,
           "seconds": round(summary.seconds, 1), "errors": summary.errors, "status": status}
    if as_json:
        typer.echo(json.dumps(doc))
        return
    typer.echo(f"{summary.done} units done, {summary.failed} failed in {summary.seconds:.0f} s; trials {status}; results in {db}")
    for e in summary.errors:
        typer.echo(f"  failed {e}", err=True)


def report(
    db: Annotated[Path, typer.Argument(help="Study database.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output directory (report.md, report.html, figures/).")],
    study: Annotated[Optional[str], typer.Option(help="Only this study (name or id) of the database.")] = None,
    title: Annotated[Optional[str], typer.Option(help="Report title.")] = None,
) -> None:
    """Markdown + self-contained HTML report regenerating the seeds' tables and figures
    from a study database; every rate with its bootstrap 95% interval and n."""
    from ..report import build_report

    paths = build_report(db, out, title=title, study=study)
    typer.echo(f"wrote {paths.markdown}, {paths.html} and {len(paths.figures)} figures")


def export_cmd(
    db: Annotated[Path, typer.Argument(help="Study database.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: DB's name without suffix + '-export').")] = None,
    format: Annotated[str, typer.Option("--format", help="csv | parquet.")] = "csv",
) -> None:
    """Write every table of a study database to OUT/<table>.<format>."""
    from ..study import export

    out = out or db.with_name(db.stem + "-export")
    files = export(db, out, format=format)
    typer.echo(f"wrote {len(files)} tables to {out}")
