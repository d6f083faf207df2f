"""Export a study database: one file per table, CSV or Parquet, written atomically.

>>> export("study.db", "out/", format="csv")   # out/trials.csv, out/fact_outcomes.csv, …

CSV: a header row, then one row per record; NULL is the empty field, JSON columns stay
JSON text. Parquet (needs ``pyarrow``: ``pip install 'editdecay[parquet]'``): INTEGER →
int64, REAL → float64, TEXT → string, NULL → null. Every file is written to a temporary
sibling and renamed into place, so an interrupted export never leaves a partial file.
"""

from __future__ import annotations

import csv
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..errors import EditdecayError
from .store import SCHEMA, Store

FORMATS = ("csv", "parquet")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _write_csv(store: Store, table: str, path: Path) -> int:
    tmp = _tmp(path)
    n = 0
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(store.columns(table))
            for row in store.iter_table(table):
                w.writerow(["" if v is None else v for v in row])
                n += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise EditdecayError("parquet export needs pyarrow: pip install 'editdecay[parquet]' "
                             "(or use --format csv)") from None
    return pa, pq


def _write_parquet(store: Store, table: str, path: Path) -> int:
    pa, pq = _pyarrow()
    kinds = {"INTEGER": pa.int64(), "REAL": pa.float64()}
    types = store.column_types(table)
    schema = pa.schema([(c, kinds.get(t, pa.string())) for c, t in types.items()])
    rows = list(store.iter_table(table))
    cols = {c: [r[i] for r in rows] for i, c in enumerate(types)}
    tbl = pa.Table.from_pydict(cols, schema=schema)
    tmp = _tmp(path)
    try:
        pq.write_table(tbl, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(rows)


def export(db: str | os.PathLike | Store, out_dir: str | os.PathLike, format: str = "csv",
           tables: Sequence[str] | None = None) -> dict[str, Path]:
    """Write each table of ``db`` (all of them unless ``tables``) to
    ``out_dir/<table>.<csv|parquet>``; returns table → file. Raises
    :class:`~editdecay.errors.EditdecayError` for an unknown format or table, a missing
    database, or Parquet without pyarrow."""
    if format not in FORMATS:
        raise EditdecayError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    names = list(SCHEMA) if tables is None else list(tables)
    unknown = [t for t in names if t not in SCHEMA]
    if unknown:
        raise EditdecayError(f"unknown table(s) {', '.join(unknown)}: use any of {', '.join(SCHEMA)}")
    if format == "parquet":
        _pyarrow()  # fail before writing anything
    own = not isinstance(db, Store)
    if own and not Path(db).is_file():
        raise EditdecayError(f"{db}: no such study database")
    store = Store(db) if own else db
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    try:
        for t in names:
            path = out / f"{t}.{format}"
            (_write_csv if format == "csv" else _write_parquet)(store, t, path)
            written[t] = path
    finally:
        if own:
            store.close()
    return written


__all__ = ["FORMATS", "export"]
