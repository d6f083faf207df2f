"""Study store: schema, all-or-nothing units, resume, SIGKILL safety, export."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from editdecay.errors import EditdecayError
from editdecay.study import (
    CurvePoint,
    DownstreamRow,
    DriftRow,
    FactRow,
    MetricRow,
    Store,
    StoreError,
    StudySpec,
    TransitionRow,
    UnitRows,
    expand,
    export,
)
from editdecay.study.store import SCHEMA, SCHEMA_VERSION, UNIT_TABLES

SPEC = {"name": "store-test",
        "axes": {"editor": ["none", "rome"], "n_edits": 3, "protocol": ["batch", "single"], "ft_method": ["none", "lora"]}}


@pytest.fixture(scope="module")
def spec() -> StudySpec:
    return StudySpec.from_dict(json.loads(json.dumps(SPEC)), "store-test.yaml")


@pytest.fixture
def store(tmp_path, spec):
    s = Store(tmp_path / "study.db")
    s.upsert_trials(s.register_study(spec.name, spec.raw), expand(spec))
    yield s
    s.close()


def sid(store: Store) -> int:
    return store.study_id(SPEC["name"])


def unit_rows(n_facts: int = 4, tag: float = 0.0) -> UnitRows:
    return UnitRows(
        facts=[FactRow(f"c{i}", "edit", stage, "es", tag + i, output=f"out{i}")
               for i in range(n_facts) for stage in ("base", "edited", "step:10", "finetuned")],
        curves=[CurvePoint("val_loss", s, 3.0 - s / 100) for s in (0, 10, 20)],
        downstream=[DownstreamRow("finetuned", "boolq", "gen", 0.5, 10, 5, 0.9)],
        drift=[DriftRow("ed_vs_base", "distance", b, 0.1 * b, 4) for b in range(3)],
        transitions=[TransitionRow("c0", "erased", "Paris", "Rome", "Paris")],
        metrics=[MetricRow("steps", 20), MetricRow("stop_reason", text="max_steps")],
        info={"edited_layers": [5]},
    )


def test_schema(store, tmp_path):
    assert store.schema_version() == SCHEMA_VERSION
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    names = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert set(SCHEMA) <= names
    # reopening is idempotent; a newer schema is refused
    Store(tmp_path / "study.db").close()
    assert store.conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1
    with store.transaction() as c:
        c.execute("INSERT INTO schema_version VALUES (?, 'later')", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path / "study.db")


def test_register_and_upsert_idempotent(store, spec):
    assert store.register_study(spec.name, spec.raw) == sid(store)
    assert store.upsert_trials(sid(store), expand(spec)) == 0
    trials = store.trials(sid(store))
    assert [t["key"] for t in trials] == [t.key for t in expand(spec)]
    assert trials[0]["config"]["version"] == 1 and isinstance(trials[0]["points"], list)
    assert store.status_counts(sid(store))["pending"] == len(trials)


def test_write_unit_and_resume(store, spec):
    trials = expand(spec)
    whole = [t for t in trials if not t.per_fact]
    single = [t for t in trials if t.per_fact]
    assert whole and single
    pend = store.pending_trials(sid(store))
    assert len(pend) == len(trials)
    assert all(p.units == [""] for p in pend if p.key in {t.key for t in whole})
    assert all(p.units is None for p in pend if p.key in {t.key for t in single})
    assert len(store.pending_units(sid(store))) == len(whole)

    t = whole[0]
    store.mark_running(t.key, "")
    assert store.rows("trials", key=t.key)[0]["status"] == "running"
    store.write_unit(t.key, "", unit_rows(), seconds=1.5, provenance={"code": "abc"})
    assert store.is_done(t.key) and store.is_done(t.key, "")
    assert t.key not in {p.key for p in store.pending_trials(sid(store))}
    assert store.count("fact_outcomes", trial_key=t.key) == 16
    row = store.rows("trials", key=t.key)[0]
    assert row["seconds"] == 1.5 and json.loads(row["provenance_json"]) == {"code": "abc"}
    assert store.metrics(t.key, name="stop_reason")[0]["text"] == "max_steps"
    assert json.loads(store.units(t.key)[0]["info_json"]) == {"edited_layers": [5]}

    # protocol single: units come with the facts; the trial is done with its last unit
    s = single[0]
    with pytest.raises(StoreError, match="set_units"):
        store.write_unit(s.key, "c0", unit_rows())
    store.set_units(s.key, ["c0", "c1", "c2"])
    store.set_units(s.key, ["c0", "c1", "c2"])  # idempotent
    with pytest.raises(StoreError, match="differ"):
        store.set_units(s.key, ["c0", "c9"])
    store.write_unit(s.key, "c1", unit_rows(1))
    p = next(p for p in store.pending_trials(sid(store)) if p.key == s.key)
    assert p.units == ["c0", "c2"] and not store.is_done(s.key)
    store.write_unit(s.key, "c0", unit_rows(1))
    store.write_unit(s.key, "c2", unit_rows(1))
    assert store.is_done(s.key)
    assert s.key not in {u.trial_key for u in store.pending_units(sid(store))}


def test_write_unit_replaces_rows_and_nan_is_null(store, spec):
    t = next(t for t in expand(spec) if not t.per_fact)
    store.write_unit(t.key, "", unit_rows(4))
    store.write_unit(t.key, "", unit_rows(2, tag=100.0))
    assert store.count("fact_outcomes", trial_key=t.key) == 8
    assert min(r["value"] for r in store.fact_outcomes(t.key)) == 100.0
    store.write_unit(t.key, "", UnitRows(curves=[CurvePoint("val_loss", 0, float("nan"))]))
    assert store.curves(t.key)[0]["value"] is None
    assert all(store.count(tb, trial_key=t.key) == 0 for tb in UNIT_TABLES if tb != "curves")


class Exploding(list):
    """A row sequence that fails half-way through iteration."""

    def __iter__(self):
        for i, x in enumerate(super().__iter__()):
            if i == len(self) // 2:
                raise RuntimeError("disk on fire")
            yield x


def test_unit_is_all_or_nothing(store, spec):
    t = next(t for t in expand(spec) if not t.per_fact)
    rows = unit_rows(6)
    rows.curves = Exploding(rows.curves)  # facts are inserted, then curves fail mid-way
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.write_unit(t.key, "", rows)
    assert all(store.count(tb) == 0 for tb in UNIT_TABLES)
    assert not store.is_done(t.key, "") and not store.is_done(t.key)
    # a constraint violation after valid rows: also nothing
    bad = unit_rows(6)
    bad.transitions = [TransitionRow("c0", "stable"), TransitionRow("c1", "vanished")]
    with pytest.raises(sqlite3.IntegrityError):
        store.write_unit(t.key, "", bad)
    assert all(store.count(tb) == 0 for tb in UNIT_TABLES)
    assert store.units(t.key)[0]["status"] == "pending"
    # and a done unit keeps its rows when a rewrite fails
    store.write_unit(t.key, "", unit_rows(3))
    with pytest.raises(sqlite3.IntegrityError):
        store.write_unit(t.key, "", bad)
    assert store.count("fact_outcomes", trial_key=t.key) == 12 and store.is_done(t.key)


def test_failures_and_retries(store, spec):
    t = next(t for t in expand(spec) if not t.per_fact)
    store.mark_running(t.key, "")
    store.mark_failed(t.key, "", "ValueError: boom\nTraceback ...")
    row = store.rows("trials", key=t.key)[0]
    assert row["status"] == "failed" and row["error"] == "ValueError: boom"
    assert store.units(t.key)[0]["attempts"] == 1
    assert t.key in {p.key for p in store.pending_trials(sid(store))}
    assert t.key not in {p.key for p in store.pending_trials(sid(store), include_failed=False)}
    store.mark_running(t.key, "")
    store.write_unit(t.key, "", unit_rows(1))
    assert store.is_done(t.key) and store.rows("trials", key=t.key)[0]["error"] is None
    assert store.units(t.key)[0]["attempts"] == 2
    with pytest.raises(StoreError, match="no trial"):
        store.mark_failed("f" * 64, "", "x")
    with pytest.raises(StoreError, match="no column"):
        store.rows("curves", colour="red")


# --- SIGKILL --------------------------------------------------------------------------------
N_FACT_ROWS, N_CURVE = 3000, 40
WRITER = f"""
import sys, time
from editdecay.study.store import Store, UnitRows, FactRow, CurvePoint
store = Store(sys.argv[1])
stall = int(sys.argv[3])  # index of the unit that stalls half-way through its transaction

def facts(stall_here):
    for i in range({N_FACT_ROWS}):
        if stall_here and i == {N_FACT_ROWS} // 2:
            print("mid", flush=True)
            time.sleep(60)
        yield FactRow(f"c{{i}}", "edit", "edited", "es", i)

for k, u in enumerate(store.pending_units(int(sys.argv[2]))):
    store.mark_running(u.trial_key, u.unit_id)
    rows = UnitRows(facts=facts(k == stall), curves=[CurvePoint("val_loss", s, 1.0) for s in range({N_CURVE})],
                    info={{"unit": u.unit_id}})
    store.write_unit(u.trial_key, u.unit_id, rows, seconds=0.01)
    print(f"unit {{u.unit_id!r}}", flush=True)
print("finished", flush=True)
"""


def _kill_after(db, sid, n_lines: int, delay: float, stall: int = -1) -> list[str]:
    """Run the writer; SIGKILL it ``delay`` s after it printed ``n_lines`` lines."""
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(sid), str(stall)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []
    try:
        while len(lines) < n_lines:
            line = p.stdout.readline().strip()
            if not line or line == "finished":
                p.kill()
                raise AssertionError(f"writer ended early: {p.communicate()[1][-2000:]}")
            lines.append(line)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=30) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return lines


def _check_consistent(db) -> int:
    with Store(db) as s:
        assert s.integrity_check() == "ok"
        units = s.rows("units")
        done = {(u["trial_key"], u["unit_id"]) for u in units if u["status"] == "done"}
        counts = {}
        for tk, uid, n in s.conn.execute("SELECT trial_key, unit_id, COUNT(*) FROM fact_outcomes "
                                         "GROUP BY trial_key, unit_id"):
            counts[tk, uid] = n
        curves = {(tk, uid): n for tk, uid, n in s.conn.execute(
            "SELECT trial_key, unit_id, COUNT(*) FROM curves GROUP BY trial_key, unit_id")}
        assert set(counts) == done and set(curves) == done  # no rows of unfinished units
        assert all(counts[k] == N_FACT_ROWS and curves[k] == N_CURVE for k in done)  # no partial unit
        return len(done)


def test_sigkill_leaves_whole_units_only(tmp_path, spec):
    db = tmp_path / "kill.db"
    with Store(db) as s:
        sid = s.register_study(spec.name, spec.raw)
        trials = expand(spec)
        s.upsert_trials(sid, trials)
        for t in trials:
            if t.per_fact:
                s.set_units(t.key, [f"fact{i:04d}" for i in range(400)])
        total = len(s.pending_units(sid))
    # 1: killed inside the 4th unit's transaction, half of its rows inserted
    lines = _kill_after(db, sid, 4, 0.0, stall=3)
    assert lines[-1] == "mid"
    assert _check_consistent(db) == 3
    with Store(db) as s:  # the interrupted unit: running, no rows
        assert s.count("units", status="running") == 1
    # 2: resume (finished units are skipped), killed at an arbitrary moment
    _kill_after(db, sid, 2, 0.029)
    second = _check_consistent(db)
    assert 3 + 2 <= second < total
    with Store(db) as s:
        assert len(s.pending_units(sid)) == total - second
        assert s.count("units", status="running") <= 1
        # the unit interrupted by the first kill was redone by the second writer
        assert sum(u["attempts"] == 2 for u in s.rows("units") if u["status"] == "done") == 1


# --- export ---------------------------------------------------------------------------------
def test_export_csv_round_trip(store, spec, tmp_path):
    t = next(t for t in expand(spec) if not t.per_fact)
    store.write_unit(t.key, "", unit_rows(5))
    out = tmp_path / "csv"
    files = export(store.path, out, "csv")
    assert set(files) == set(SCHEMA)
    for table, path in files.items():
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        assert rows[0] == store.columns(table)
        assert len(rows) - 1 == store.count(table), table
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    with open(files["fact_outcomes"], newline="", encoding="utf-8") as f:
        first = next(csv.DictReader(f))
    assert first["trial_key"] == t.key and first["stage"] == "base" and float(first["value"]) == 0.0
    with pytest.raises(EditdecayError, match="unknown export format"):
        export(store.path, out, "xlsx")
    with pytest.raises(EditdecayError, match="no such study database"):
        export(tmp_path / "none.db", out)


def test_export_parquet(store, spec, tmp_path):
    t = next(t for t in expand(spec) if not t.per_fact)
    store.write_unit(t.key, "", unit_rows(2))
    try:
        import pyarrow.parquet as pq
    except ImportError:
        with pytest.raises(EditdecayError, match=r"parquet export needs pyarrow: pip install 'editdecay\[parquet\]'"):
            export(store.path, tmp_path / "pq", "parquet")
        assert not (tmp_path / "pq").exists() or not list((tmp_path / "pq").iterdir())
        return
    files = export(store.path, tmp_path / "pq", "parquet")
    for table, path in files.items():
        assert pq.read_table(path).num_rows == store.count(table)
