"""The study store: one SQLite file holding studies, trials, units and every result row.

Schema (version :data:`SCHEMA_VERSION`) is documented in ``docs/study-store.md``. The
store is crash-safe for one writer: every unit's rows and its ``done`` status are
written in one ``BEGIN IMMEDIATE … COMMIT`` transaction (WAL journal), so a killed
process leaves either the whole unit or nothing. Trials are keyed by their config hash
and may belong to several studies (a re-planned spec reuses finished trials).

>>> store = Store("study.db")
>>> sid = store.register_study(spec.name, spec.raw)
>>> store.upsert_trials(sid, trials)
>>> for t in store.pending_trials(sid): ...
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from ..errors import EditdecayError
from .spec import Trial, Unit, canonical_json, config_hash

SCHEMA_VERSION = 1
STATUSES = ("pending", "running", "done", "failed")
FACT_SETS = ("edit", "intrinsic")
TRANSITIONS = ("stable", "erased", "emergent", "impossible")
DRIFT_MEASURES = ("distance", "cosine")

#: DDL of schema version 1, table by table (export order).
SCHEMA: dict[str, str] = {
    "schema_version": """
CREATE TABLE IF NOT EXISTS schema_version (
  version INTEGER NOT NULL,
  applied TEXT NOT NULL
)""",
    "studies": """
CREATE TABLE IF NOT EXISTS studies (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  spec_json TEXT NOT NULL,
  spec_hash TEXT NOT NULL,
  created TEXT NOT NULL,
  UNIQUE (name, spec_hash)
)""",
    "trials": """
CREATE TABLE IF NOT EXISTS trials (
  key TEXT PRIMARY KEY,
  kind TEXT NOT NULL,
  config_json TEXT NOT NULL,
  axes_json TEXT NOT NULL,
  n_units INTEGER,
  status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending','running','done','failed')),
  error TEXT,
  started TEXT,
  finished TEXT,
  seconds REAL,
  provenance_json TEXT,
  created TEXT NOT NULL
)""",
    "study_trials": """
CREATE TABLE IF NOT EXISTS study_trials (
  study_id INTEGER NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
  trial_key TEXT NOT NULL REFERENCES trials(key) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  points_json TEXT NOT NULL,
  PRIMARY KEY (study_id, trial_key)
)""",
    "units": """
CREATE TABLE IF NOT EXISTS units (
  trial_key TEXT NOT NULL REFERENCES trials(key) ON DELETE CASCADE,
  unit_id TEXT NOT NULL DEFAULT '',
  status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending','running','done','failed')),
  error TEXT,
  attempts INTEGER NOT NULL DEFAULT 0,
  started TEXT,
  finished TEXT,
  seconds REAL,
  info_json TEXT,
  PRIMARY KEY (trial_key, unit_id)
)""",
    "fact_outcomes": """
CREATE TABLE IF NOT EXISTS fact_outcomes (
  trial_key TEXT NOT NULL,
  unit_id TEXT NOT NULL,
  dataset TEXT NOT NULL DEFAULT '',
  case_id TEXT NOT NULL,
  fact_set TEXT NOT NULL CHECK (fact_set IN ('edit','intrinsic')),
  stage TEXT NOT NULL CHECK (stage IN ('base','edited','finetuned') OR stage GLOB 'step:[0-9]*'),
  metric TEXT NOT NULL,
  value REAL,
  output TEXT,
  PRIMARY KEY (trial_key, unit_id, dataset, case_id, fact_set, stage, metric),
  FOREIGN KEY (trial_key, unit_id) REFERENCES units(trial_key, unit_id) ON DELETE CASCADE
)""",
    "curves": """
CREATE TABLE IF NOT EXISTS curves (
  trial_key TEXT NOT NULL,
  unit_id TEXT NOT NULL,
  name TEXT NOT NULL,
  step INTEGER NOT NULL,
  value REAL,
  PRIMARY KEY (trial_key, unit_id, name, step),
  FOREIGN KEY (trial_key, unit_id) REFERENCES units(trial_key, unit_id) ON DELETE CASCADE
)""",
    "downstream": """
CREATE TABLE IF NOT EXISTS downstream (
  trial_key TEXT NOT NULL,
  unit_id TEXT NOT NULL,
  stage TEXT NOT NULL CHECK (stage IN ('base','edited','finetuned')),
  task TEXT NOT NULL,
  mode TEXT NOT NULL CHECK (mode IN ('gen','ll')),
  accuracy REAL,
  n INTEGER NOT NULL,
  correct INTEGER,
  parse_rate REAL,
  seconds REAL,
  PRIMARY KEY (trial_key, unit_id, stage, task, mode),
  FOREIGN KEY (trial_key, unit_id) REFERENCES units(trial_key, unit_id) ON DELETE CASCADE
)""",
    "drift": """
CREATE TABLE IF NOT EXISTS drift (
  trial_key TEXT NOT NULL,
  unit_id TEXT NOT NULL,
  pair TEXT NOT NULL,
  measure TEXT NOT NULL CHECK (measure IN ('distance','cosine')),
  block INTEGER NOT NULL,
  value REAL,
  n_prompts INTEGER,
  PRIMARY KEY (trial_key, unit_id, pair, measure, block),
  FOREIGN KEY (trial_key, unit_id) REFERENCES units(trial_key, unit_id) ON DELETE CASCADE
)""",
    "transitions": """
CREATE TABLE IF NOT EXISTS transitions (
  trial_key TEXT NOT NULL,
  unit_id TEXT NOT NULL,
  dataset TEXT NOT NULL DEFAULT '',
  case_id TEXT NOT NULL,
  transition TEXT NOT NULL CHECK (transition IN ('stable','erased','emergent','impossible')),
  base_output TEXT,
  edited_output TEXT,
  finetuned_output TEXT,
  PRIMARY KEY (trial_key, unit_id, dataset, case_id),
  FOREIGN KEY (trial_key, unit_id) REFERENCES units(trial_key, unit_id) ON DELETE CASCADE
)""",
    "metrics": """
CREATE TABLE IF NOT EXISTS metrics (
  trial_key TEXT NOT NULL,
  unit_id TEXT NOT NULL,
  stage TEXT NOT NULL DEFAULT '',
  name TEXT NOT NULL,
  value REAL,
  text TEXT,
  PRIMARY KEY (trial_key, unit_id, stage, name),
  FOREIGN KEY (trial_key, unit_id) REFERENCES units(trial_key, unit_id) ON DELETE CASCADE
)""",
    "artefacts": """
CREATE TABLE IF NOT EXISTS artefacts (
  key TEXT PRIMARY KEY,
  kind TEXT NOT NULL,
  path TEXT NOT NULL,
  trial_key TEXT REFERENCES trials(key) ON DELETE SET NULL,
  meta_json TEXT,
  created TEXT NOT NULL
)""",
}
INDEXES = (
    "CREATE INDEX IF NOT EXISTS study_trials_by_trial ON study_trials(trial_key)",
    "CREATE INDEX IF NOT EXISTS units_by_status ON units(status)",
)
#: Tables holding a unit's result rows (replaced as a whole by :meth:`Store.write_unit`).
UNIT_TABLES = ("fact_outcomes", "curves", "downstream", "drift", "transitions", "metrics")


class StoreError(EditdecayError):
    """The study database is unusable or a call contradicts its contents."""


def now() -> str:
    """UTC timestamp, ISO 8601 with seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _num(v: Any) -> float | None:
    """A float for a REAL column; NaN and None become NULL."""
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


# --- rows -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FactRow:
    """One metric of one fact at one stage (``base``, ``edited``, ``step:N``, ``finetuned``);
    ``output`` holds text (greedy output, decided token, top-k JSON)."""

    case_id: str
    fact_set: str
    stage: str
    metric: str
    value: float | None = None
    output: str | None = None
    dataset: str = ""


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """One point of a named curve (``val_loss``, ``train_loss``, ``retention_new``, …)."""

    name: str
    step: int
    value: float | None


@dataclass(frozen=True, slots=True)
class DownstreamRow:
    """Accuracy of one model stage on one downstream task."""

    stage: str
    task: str
    mode: str
    accuracy: float | None
    n: int
    correct: int | None = None
    parse_rate: float | None = None
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class DriftRow:
    """One block's drift: ``measure`` ``distance`` (‖h_A − h_B‖₂, pairs as
    ``NORM_PAIRS``) or ``cosine`` (pairs as ``COSINE_PAIRS``), raw values."""

    pair: str
    measure: str
    block: int
    value: float | None
    n_prompts: int | None = None


@dataclass(frozen=True, slots=True)
class TransitionRow:
    """A fact's edit → fine-tune transition with the three stages' greedy outputs."""

    case_id: str
    transition: str
    base_output: str | None = None
    edited_output: str | None = None
    finetuned_output: str | None = None
    dataset: str = ""


@dataclass(frozen=True, slots=True)
class MetricRow:
    """A scalar (``value``) or label (``text``) of a unit, e.g. ``steps``,
    ``stop_reason``, ``es`` at stage ``edited``."""

    name: str
    value: float | None = None
    text: str | None = None
    stage: str = ""


@dataclass
class UnitRows:
    """Everything one unit writes; :meth:`Store.write_unit` stores it atomically."""

    facts: Sequence[FactRow] = field(default_factory=list)
    curves: Sequence[CurvePoint] = field(default_factory=list)
    downstream: Sequence[DownstreamRow] = field(default_factory=list)
    drift: Sequence[DriftRow] = field(default_factory=list)
    transitions: Sequence[TransitionRow] = field(default_factory=list)
    metrics: Sequence[MetricRow] = field(default_factory=list)
    info: Mapping[str, Any] | None = None
    """Unit-level JSON (edited layers, dropped facts, stop reason, …)."""

    def counts(self) -> dict[str, int]:
        return {"fact_outcomes": len(self.facts), "curves": len(self.curves), "downstream": len(self.downstream),
                "drift": len(self.drift), "transitions": len(self.transitions), "metrics": len(self.metrics)}


@dataclass(frozen=True)
class PendingTrial:
    """A trial of a study that is not done. ``units``: its unfinished unit ids, or None
    while a ``single`` trial's facts are not registered (:meth:`Store.set_units`)."""

    key: str
    kind: str
    config: dict[str, Any]
    units: list[str] | None


# --- the store ------------------------------------------------------------------------------
class Store:
    """A study database (SQLite, WAL, foreign keys on). One connection per process: a
    store used after ``fork`` reopens its connection. Safe for one writer at a time
    (other processes may read)."""

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self.init_schema()

    # connection ------------------------------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                c = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
                c.row_factory = sqlite3.Row
                c.execute("PRAGMA foreign_keys = ON")
                mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                c.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable against process crashes
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{self.path}: not a usable SQLite database ({e})") from None
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not switch to WAL journal mode (got {mode})")
            self._conn, self._pid = c, os.getpid()
        return self._conn

    def close(self) -> None:
        """Close this process's connection."""
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back on any exception."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    # schema --------------------------------------------------------------------------------
    def init_schema(self) -> int:
        """Create the tables if needed; returns the schema version. A database written by
        a newer schema raises :class:`StoreError`."""
        with self.transaction() as c:
            c.execute(SCHEMA["schema_version"])
            row = c.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0]
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {version} is newer than this editdecay's "
                                 f"({SCHEMA_VERSION}); upgrade editdecay")
            for name, ddl in SCHEMA.items():
                if name != "schema_version":
                    c.execute(ddl)
            for ddl in INDEXES:
                c.execute(ddl)
            if version is None:
                c.execute("INSERT INTO schema_version (version, applied) VALUES (?, ?)", (SCHEMA_VERSION, now()))
                version = SCHEMA_VERSION
        return int(version)

    def schema_version(self) -> int:
        return int(self.conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    # studies and trials ------------------------------------------------------------------------
    def register_study(self, name: str, spec: Mapping[str, Any]) -> int:
        """The id of the study (name, spec); created if new. ``spec`` is the spec mapping
        (e.g. ``StudySpec.raw``)."""
        spec_json = canonical_json(spec)
        h = config_hash(spec)
        with self.transaction() as c:
            row = c.execute("SELECT id FROM studies WHERE name = ? AND spec_hash = ?", (name, h)).fetchone()
            if row is not None:
                return int(row[0])
            cur = c.execute("INSERT INTO studies (name, spec_json, spec_hash, created) VALUES (?, ?, ?, ?)",
                            (name, spec_json, h, now()))
            return int(cur.lastrowid)

    def upsert_trials(self, study_id: int, trials: Sequence[Trial]) -> int:
        """Add ``trials`` to the study (in order); new trials start ``pending``. Whole-trial
        units are registered now; a ``single`` trial's units come with :meth:`set_units`.
        Returns the number of trials that were new to the database."""
        new = 0
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM studies WHERE id = ?", (study_id,)).fetchone() is None:
                raise StoreError(f"{self.path}: no study with id {study_id}")
            for pos, t in enumerate(trials):
                if config_hash(t.config) != t.key:
                    raise StoreError(f"trial {t.short}: key does not match its config")
                cur = c.execute(
                    "INSERT OR IGNORE INTO trials (key, kind, config_json, axes_json, n_units, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (t.key, t.kind, canonical_json(t.config), canonical_json(t.axes),
                     None if t.per_fact else 1, now()))
                new += cur.rowcount
                if not t.per_fact:
                    c.execute("INSERT OR IGNORE INTO units (trial_key, unit_id) VALUES (?, '')", (t.key,))
                c.execute("INSERT INTO study_trials (study_id, trial_key, position, points_json) VALUES (?, ?, ?, ?) "
                          "ON CONFLICT (study_id, trial_key) DO UPDATE SET position = excluded.position, "
                          "points_json = excluded.points_json",
                          (study_id, t.key, pos, canonical_json(list(t.points))))
        return new

    def set_units(self, trial_key: str, unit_ids: Sequence[str]) -> None:
        """Register the units of a trial (a ``single`` trial's case ids, once its facts
        are selected). Registering a different set than before raises StoreError."""
        ids = [str(u) for u in unit_ids]
        if len(set(ids)) != len(ids):
            raise StoreError(f"trial {trial_key[:12]}: duplicate unit ids")
        with self.transaction() as c:
            row = c.execute("SELECT n_units FROM trials WHERE key = ?", (trial_key,)).fetchone()
            if row is None:
                raise StoreError(f"no trial {trial_key[:12]} in {self.path}")
            have = {r[0] for r in c.execute("SELECT unit_id FROM units WHERE trial_key = ?", (trial_key,))}
            if row[0] is not None and have != set(ids):
                raise StoreError(f"trial {trial_key[:12]}: units already registered differ from the given ones "
                                 f"({len(have)} vs {len(ids)}); did the fact selection change?")
            c.executemany("INSERT OR IGNORE INTO units (trial_key, unit_id) VALUES (?, ?)",
                          [(trial_key, u) for u in ids])
            c.execute("UPDATE trials SET n_units = ? WHERE key = ?", (len(ids), trial_key))
            self._refresh_trial(c, trial_key)

    # progress ------------------------------------------------------------------------------
    def mark_running(self, trial_key: str, unit_id: str = "") -> None:
        """Record that a unit starts (attempts + 1); the trial becomes ``running``."""
        with self.transaction() as c:
            self._ensure_unit(c, trial_key, unit_id)
            c.execute("UPDATE units SET status = 'running', started = ?, attempts = attempts + 1, error = NULL "
                      "WHERE trial_key = ? AND unit_id = ? AND status != 'done'", (now(), trial_key, unit_id))
            c.execute("UPDATE trials SET status = 'running', started = COALESCE(started, ?), error = NULL "
                      "WHERE key = ? AND status != 'done'", (now(), trial_key))

    def write_unit(self, trial_key: str, unit_id: str, rows: UnitRows, *, seconds: float | None = None,
                   provenance: Mapping[str, Any] | None = None) -> None:
        """Replace the unit's result rows by ``rows`` and mark it ``done``, all in one
        transaction; when it was the trial's last unit the trial becomes ``done``.
        ``provenance`` (JSON) is stored on the trial. Any error leaves nothing written."""
        with self.transaction() as c:
            self._ensure_unit(c, trial_key, unit_id)
            for table in UNIT_TABLES:
                c.execute(f"DELETE FROM {table} WHERE trial_key = ? AND unit_id = ?", (trial_key, unit_id))
            k = (trial_key, unit_id)
            c.executemany(
                "INSERT INTO fact_outcomes (trial_key, unit_id, dataset, case_id, fact_set, stage, metric, value, "
                "output) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((*k, r.dataset, str(r.case_id), r.fact_set, r.stage, r.metric, _num(r.value), r.output)
                 for r in rows.facts))
            c.executemany("INSERT INTO curves (trial_key, unit_id, name, step, value) VALUES (?, ?, ?, ?, ?)",
                          ((*k, r.name, int(r.step), _num(r.value)) for r in rows.curves))
            c.executemany(
                "INSERT INTO downstream (trial_key, unit_id, stage, task, mode, accuracy, n, correct, parse_rate, "
                "seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                ((*k, r.stage, r.task, r.mode, _num(r.accuracy), int(r.n), r.correct, _num(r.parse_rate),
                  _num(r.seconds)) for r in rows.downstream))
            c.executemany(
                "INSERT INTO drift (trial_key, unit_id, pair, measure, block, value, n_prompts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                ((*k, r.pair, r.measure, int(r.block), _num(r.value), r.n_prompts) for r in rows.drift))
            c.executemany(
                "INSERT INTO transitions (trial_key, unit_id, dataset, case_id, transition, base_output, "
                "edited_output, finetuned_output) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                ((*k, r.dataset, str(r.case_id), r.transition, r.base_output, r.edited_output, r.finetuned_output)
                 for r in rows.transitions))
            c.executemany("INSERT INTO metrics (trial_key, unit_id, stage, name, value, text) "
                          "VALUES (?, ?, ?, ?, ?, ?)",
                          ((*k, r.stage, r.name, _num(r.value), r.text) for r in rows.metrics))
            c.execute("UPDATE units SET status = 'done', error = NULL, finished = ?, seconds = ?, info_json = ? "
                      "WHERE trial_key = ? AND unit_id = ?",
                      (now(), _num(seconds), None if rows.info is None else canonical_json(rows.info),
                       trial_key, unit_id))
            if provenance is not None:
                c.execute("UPDATE trials SET provenance_json = ? WHERE key = ?", (canonical_json(provenance), trial_key))
            self._refresh_trial(c, trial_key)

    def mark_failed(self, trial_key: str, unit_id: str, error: str) -> None:
        """Record a unit's failure (first line of ``error``); its rows are untouched
        (a failed unit has none unless it was done before). The trial becomes ``failed``."""
        line = (str(error).strip().splitlines() or ["error"])[0][:2000]
        with self.transaction() as c:
            self._ensure_unit(c, trial_key, unit_id)
            c.execute("UPDATE units SET status = 'failed', error = ?, finished = ? "
                      "WHERE trial_key = ? AND unit_id = ? AND status != 'done'", (line, now(), trial_key, unit_id))
            c.execute("UPDATE trials SET status = 'failed', error = ? WHERE key = ? AND status != 'done'",
                      (f"unit {unit_id!r}: {line}" if unit_id else line, trial_key))

    def set_provenance(self, trial_key: str, provenance: Mapping[str, Any]) -> None:
        """Store a trial's provenance JSON (code version, seeds, corpus ids, …)."""
        with self.transaction() as c:
            if c.execute("UPDATE trials SET provenance_json = ? WHERE key = ?",
                         (canonical_json(provenance), trial_key)).rowcount == 0:
                raise StoreError(f"no trial {trial_key[:12]} in {self.path}")

    def add_artefact(self, key: str, kind: str, path: str | os.PathLike, *, trial_key: str | None = None,
                     meta: Mapping[str, Any] | None = None) -> None:
        """Record (or replace) an artefact on disk (saved model, adapter, selection, states)."""
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO artefacts (key, kind, path, trial_key, meta_json, created) "
                      "VALUES (?, ?, ?, ?, ?, ?)",
                      (key, kind, str(path), trial_key, None if meta is None else canonical_json(meta), now()))

    def _ensure_unit(self, c: sqlite3.Connection, trial_key: str, unit_id: str) -> None:
        if c.execute("SELECT 1 FROM units WHERE trial_key = ? AND unit_id = ?", (trial_key, unit_id)).fetchone():
            return
        row = c.execute("SELECT n_units FROM trials WHERE key = ?", (trial_key,)).fetchone()
        if row is None:
            raise StoreError(f"no trial {trial_key[:12]} in {self.path}")
        raise StoreError(f"trial {trial_key[:12]} has no unit {unit_id!r}"
                         + (" (register a single trial's facts with set_units first)" if row[0] is None else ""))

    @staticmethod
    def _refresh_trial(c: sqlite3.Connection, trial_key: str) -> None:
        """Mark the trial done when all its registered units are done."""
        n_units, done, secs = c.execute(
            "SELECT t.n_units, COALESCE(SUM(u.status = 'done'), 0), SUM(u.seconds) FROM trials t "
            "LEFT JOIN units u ON u.trial_key = t.key WHERE t.key = ? GROUP BY t.key", (trial_key,)).fetchone()
        if n_units is not None and done == n_units:
            c.execute("UPDATE trials SET status = 'done', error = NULL, finished = ?, seconds = ? WHERE key = ?",
                      (now(), secs, trial_key))

    # queries -----------------------------------------------------------------------------
    def is_done(self, trial_key: str, unit_id: str | None = None) -> bool:
        """Whether the trial (``unit_id`` None) or one of its units is done."""
        if unit_id is None:
            row = self.conn.execute("SELECT status FROM trials WHERE key = ?", (trial_key,)).fetchone()
        else:
            row = self.conn.execute("SELECT status FROM units WHERE trial_key = ? AND unit_id = ?",
                                    (trial_key, unit_id)).fetchone()
        return row is not None and row[0] == "done"

    def pending_trials(self, study_id: int, *, include_failed: bool = True) -> list[PendingTrial]:
        """The study's trials that are not done, in plan order, with their unfinished
        units. Units left ``running`` by a killed process count as pending."""
        skip = ("done",) if include_failed else ("done", "failed")
        rows = self.conn.execute(
            "SELECT t.key, t.kind, t.config_json, t.n_units FROM study_trials s JOIN trials t ON t.key = s.trial_key "
            f"WHERE s.study_id = ? AND t.status NOT IN ({','.join('?' * len(skip))}) ORDER BY s.position",
            (study_id, *skip)).fetchall()
        out = []
        for key, kind, cfg, n_units in rows:
            units = None
            if n_units is not None:
                units = [r[0] for r in self.conn.execute(
                    f"SELECT unit_id FROM units WHERE trial_key = ? AND status NOT IN ({','.join('?' * len(skip))}) "
                    "ORDER BY rowid", (key, *skip))]
            out.append(PendingTrial(key, kind, json.loads(cfg), units))
        return out

    def pending_units(self, study_id: int, *, include_failed: bool = True) -> list[Unit]:
        """Registered units of the study that are not done (plan order; a ``single``
        trial whose facts are not registered yet contributes none — see
        :meth:`pending_trials`)."""
        return [Unit(t.key, u) for t in self.pending_trials(study_id, include_failed=include_failed)
                for u in (t.units or [])]

    def studies(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT id, name, spec_hash, created FROM studies ORDER BY id")]

    def study_id(self, name: str) -> int | None:
        """The latest study of that name, or None."""
        row = self.conn.execute("SELECT MAX(id) FROM studies WHERE name = ?", (name,)).fetchone()
        return None if row[0] is None else int(row[0])

    def trials(self, study_id: int | None = None) -> list[dict[str, Any]]:
        """Trials (of a study, in plan order) with ``config`` and ``axes`` parsed."""
        if study_id is None:
            rows = self.conn.execute("SELECT * FROM trials ORDER BY created, key").fetchall()
        else:
            rows = self.conn.execute("SELECT t.*, s.points_json FROM study_trials s JOIN trials t ON t.key = s.trial_key "
                                     "WHERE s.study_id = ? ORDER BY s.position", (study_id,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            for col in ("config_json", "axes_json", "provenance_json", "points_json"):
                if col in d:
                    v = d.pop(col)
                    d[col.removesuffix("_json")] = None if v is None else json.loads(v)
            out.append(d)
        return out

    def status_counts(self, study_id: int) -> dict[str, int]:
        """Number of the study's trials per status."""
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self.conn.execute("SELECT t.status, COUNT(*) FROM study_trials s JOIN trials t "
                                           "ON t.key = s.trial_key WHERE s.study_id = ? GROUP BY t.status",
                                           (study_id,)):
            counts[status] = n
        return counts

    def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        """Rows of ``table`` matching the equality filters, as dicts.

        >>> store.rows("fact_outcomes", trial_key=k, stage="finetuned", metric="es")
        """
        cols = self.columns(table)
        bad = [k for k in where if k not in cols]
        if bad:
            raise StoreError(f"table {table} has no column(s) {', '.join(bad)}; columns: {', '.join(cols)}")
        sql = f"SELECT * FROM {table}"
        if where:
            sql += " WHERE " + " AND ".join(f"{k} = ?" for k in where)
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY rowid", tuple(where.values()))]

    def units(self, trial_key: str) -> list[dict[str, Any]]:
        return self.rows("units", trial_key=trial_key)

    def fact_outcomes(self, trial_key: str, **where: Any) -> list[dict[str, Any]]:
        return self.rows("fact_outcomes", trial_key=trial_key, **where)

    def curves(self, trial_key: str, **where: Any) -> list[dict[str, Any]]:
        return self.rows("curves", trial_key=trial_key, **where)

    def downstream(self, trial_key: str, **where: Any) -> list[dict[str, Any]]:
        return self.rows("downstream", trial_key=trial_key, **where)

    def drift(self, trial_key: str, **where: Any) -> list[dict[str, Any]]:
        return self.rows("drift", trial_key=trial_key, **where)

    def transitions(self, trial_key: str, **where: Any) -> list[dict[str, Any]]:
        return self.rows("transitions", trial_key=trial_key, **where)

    def metrics(self, trial_key: str, **where: Any) -> list[dict[str, Any]]:
        return self.rows("metrics", trial_key=trial_key, **where)

    def count(self, table: str, **where: Any) -> int:
        """Number of rows of ``table`` matching the equality filters."""
        cols = self.columns(table)
        bad = [k for k in where if k not in cols]
        if bad:
            raise StoreError(f"table {table} has no column(s) {', '.join(bad)}")
        sql = f"SELECT COUNT(*) FROM {table}" + (" WHERE " + " AND ".join(f"{k} = ?" for k in where) if where else "")
        return int(self.conn.execute(sql, tuple(where.values())).fetchone()[0])

    def columns(self, table: str) -> list[str]:
        """Column names of a schema table."""
        if table not in SCHEMA:
            raise StoreError(f"unknown table {table!r}: one of {', '.join(SCHEMA)}")
        return [r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")]

    def column_types(self, table: str) -> dict[str, str]:
        """Column name → declared SQLite type of a schema table."""
        if table not in SCHEMA:
            raise StoreError(f"unknown table {table!r}: one of {', '.join(SCHEMA)}")
        return {r[1]: str(r[2]).upper() for r in self.conn.execute(f"PRAGMA table_info({table})")}

    def iter_table(self, table: str, batch: int = 10_000) -> Iterator[tuple[Any, ...]]:
        """All rows of a schema table as tuples (column order of :meth:`columns`)."""
        self.columns(table)
        cur = self.conn.execute(f"SELECT * FROM {table} ORDER BY rowid")
        while chunk := cur.fetchmany(batch):
            yield from (tuple(r) for r in chunk)

    def integrity_check(self) -> str:
        """``ok`` or SQLite's first complaint (``PRAGMA integrity_check``)."""
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])


__all__ = [
    "SCHEMA", "SCHEMA_VERSION", "STATUSES", "TRANSITIONS", "UNIT_TABLES", "CurvePoint", "DownstreamRow", "DriftRow",
    "FactRow", "MetricRow", "PendingTrial", "Store", "StoreError", "TransitionRow", "UnitRows",
]
