"""On-disk cache location and atomic writes.

The cache root is ``$EDITDECAY_CACHE`` when set, else the user cache directory
(``~/.cache/editdecay`` on Linux). Artefacts are written into a temporary sibling
directory and renamed into place, so an interrupted write never leaves a half-written
entry behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs

ENV_VAR = "EDITDECAY_CACHE"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """The cache root: ``override``, else ``$EDITDECAY_CACHE``, else the user cache dir."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return platformdirs.user_cache_path("editdecay")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that is renamed to ``final`` on success.

    If ``final`` appeared meanwhile (another process won the race) the temporary copy is
    discarded; on error it is removed and the exception propagates.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
