"""Text corpora for second-moment statistics.

A :class:`Corpus` is an ordered, immutable sequence of documents (strings) with an id
and the SHA-256 of its content; both go into every cache key and provenance record.
Sources:

- :meth:`Corpus.from_path` — ``.txt``, ``.jsonl`` (field ``text``) or ``.json`` (a list
  of strings or of ``{"text": ...}`` objects);
- :meth:`Corpus.offline_default` — docstrings of a fixed list of standard-library
  modules plus the ``help()`` topics: real English text on every machine with Python,
  no network;
- :meth:`Corpus.from_texts` — documents given in memory;
- :meth:`Corpus.from_hf` — a Hugging Face dataset (needs ``datasets`` and, usually, the
  network);
- :meth:`Corpus.external` — a corpus known only by id and hash (statistics imported from
  elsewhere, e.g. ROME's published ``.npz`` files); it has no documents.

The hash covers the document sequence (each document's length and UTF-8 bytes, in
order), not the file bytes: the same documents give the same hash in any file format.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, EditdecayError

log = logging.getLogger(__name__)

#: Standard-library modules whose docstrings make up :meth:`Corpus.offline_default`
#: (sorted; modules missing from a Python build are skipped, which changes the hash).
STDLIB_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "builtins", "bz2", "calendar", "cmd",
    "codecs", "collections", "collections.abc", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest",
    "email", "email.message", "email.utils", "enum", "filecmp", "fileinput", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http", "http.client", "http.cookiejar",
    "http.cookies", "http.server", "imaplib", "importlib", "inspect", "io", "ipaddress",
    "itertools", "json", "locale", "logging", "logging.handlers", "lzma", "mailbox",
    "math", "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pdb",
    "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "quopri",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "statistics",
    "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave",
    "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)
#: Docstrings shorter than this (characters, after cleaning) are left out.
MIN_DOCSTRING_CHARS = 40


def _content_sha256(docs: Iterable[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


@dataclass(frozen=True)
class Corpus:
    """An ordered sequence of text documents with an id and a content hash.

    Iterating yields the documents (strings) in their fixed order. Two corpora are
    equal when their id and hash are.
    """

    id: str = field(metadata={"help": "Human-readable name, e.g. 'stdlib-docstrings-py3.11' or 'file:wiki.txt'."})
    sha256: str = field(metadata={"help": "SHA-256 of the document sequence (or of the source, for external corpora)."})
    documents: tuple[str, ...] | None = field(default=None, repr=False, compare=False,
                                              metadata={"help": "The documents; None for an external corpus."})

    def __iter__(self) -> Iterator[str]:
        if self.documents is None:
            raise DataError(
                f"corpus {self.id!r} is external (known only by id and hash): it has no documents to read; "
                "its statistics must come from a cache entry"
            )
        return iter(self.documents)

    def __len__(self) -> int:
        return 0 if self.documents is None else len(self.documents)

    @property
    def n_chars(self) -> int:
        """Total characters over all documents."""
        return sum(len(d) for d in self.documents or ())

    # --- constructors -----------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: Iterable[str], id: str = "inline") -> Corpus:
        """A corpus of the given documents (empty or whitespace-only ones dropped)."""
        docs = tuple(t for t in texts if t and t.strip())
        return cls(id=id, sha256=_content_sha256(docs), documents=docs)

    @classmethod
    def external(cls, id: str, sha256: str) -> Corpus:
        """A corpus known only by id and hash (e.g. imported statistics); not iterable."""
        return cls(id=id, sha256=sha256, documents=None)

    @classmethod
    def from_path(cls, path: str | os.PathLike, id: str | None = None) -> Corpus:
        """Read a corpus file; the id defaults to ``file:<file name>``.

        - ``.txt``: if a blank line separates two non-empty lines anywhere, documents are
          the blank-line-separated paragraphs (line breaks inside kept), so one long text
          wrapped into lines becomes paragraphs; otherwise every non-empty line is one
          document.
        - ``.jsonl``: one JSON object per non-empty line with a string field ``text``.
        - ``.json``: a list of strings or of objects with a string field ``text``.

        Malformed input raises :class:`DataError` naming the file, record and field.
        """
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"corpus file {str(p)!r} does not exist")
        suffix = p.suffix.lower()
        try:
            raw = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None
        if suffix == ".txt":
            docs = _split_txt(raw)
        elif suffix == ".jsonl":
            docs = _read_jsonl(p, raw)
        elif suffix == ".json":
            docs = _read_json(p, raw)
        else:
            raise DataError(f"{p}: unsupported corpus format {suffix or '(no suffix)'!r}: use .txt, .jsonl or .json")
        corpus = cls.from_texts(docs, id=id or f"file:{p.name}")
        if not corpus.documents:
            raise DataError(f"{p}: the corpus has no non-empty documents")
        log.info("corpus %s: %d documents, %d characters", corpus.id, len(corpus), corpus.n_chars)
        return corpus

    @classmethod
    def offline_default(cls) -> Corpus:
        """Docstrings of :data:`STDLIB_MODULES` and their public classes, functions and
        methods (modules sorted, names sorted), then the language-reference topics that
        ``help()`` shows (``pydoc_data.topics``, sorted by key): real English text,
        deterministic, de-duplicated, no network (about 1.3 MB, 0.3 M tokens, on Python 3.11).

        The id names the Python minor version (``stdlib-docstrings-py3.11``); the hash
        covers the text, so a different patch release with edited docstrings gets a
        different cache key too.
        """
        docs = _stdlib_docstrings(tuple(STDLIB_MODULES))
        vi = sys.version_info
        return cls(id=f"stdlib-docstrings-py{vi.major}.{vi.minor}", sha256=_content_sha256(docs), documents=docs)

    @classmethod
    def from_hf(cls, name: str, config: str | None = None, split: str = "train", field: str = "text",
                limit: int | None = None) -> Corpus:
        """The ``field`` of the first ``limit`` records (all when None) of a Hugging Face
        dataset split. Needs the ``datasets`` package and the dataset in its cache or the
        network; raises :class:`EditdecayError` when unavailable."""
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise EditdecayError(
                f"Corpus.from_hf({name!r}) needs the 'datasets' package (pip install datasets); "
                "offline, use Corpus.offline_default() or a local file"
            ) from None
        from datasets import load_dataset

        try:
            ds = load_dataset(name, config, split=split)
        except Exception as e:  # noqa: BLE001 - network / hub failures reported as one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EditdecayError(
                f"cannot load dataset {name!r} (config {config!r}, split {split!r}): {first}; "
                "offline, use Corpus.offline_default() or a local file"
            ) from e
        if field not in ds.column_names:
            raise DataError(f"dataset {name!r} split {split!r} has no field {field!r} (fields: {', '.join(ds.column_names)})")
        n = len(ds) if limit is None else min(limit, len(ds))
        docs = list((ds.select(range(n)) if n < len(ds) else ds)[field])
        for i, v in enumerate(docs):
            if not isinstance(v, str):
                raise DataError(f"dataset {name!r} split {split!r}: record {i} field {field!r} is not a string")
        cid = f"hf:{name}" + (f"/{config}" if config else "") + f":{split}:{field}" + (f":{n}" if limit is not None else "")
        return cls.from_texts(docs, id=cid)


# --- file formats ----------------------------------------------------------------------

_BLANK_SPLIT = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def _split_txt(raw: str) -> list[str]:
    text = raw.replace("\r\n", "\n").strip("\n")
    if _BLANK_SPLIT.search(text):
        return [para.strip("\n") for para in _BLANK_SPLIT.split(text) if para.strip()]
    return [line for line in text.split("\n") if line.strip()]


def _text_of(p: Path, rec, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        raise DataError(f"{p}: {where} is a {type(rec).__name__}, expected a string or an object with field 'text'")
    if "text" not in rec:
        raise DataError(f"{p}: {where} has no field 'text'")
    if not isinstance(rec["text"], str):
        raise DataError(f"{p}: {where} field 'text' is a {type(rec['text']).__name__}, expected a string")
    return rec["text"]


def _read_jsonl(p: Path, raw: str) -> list[str]:
    docs = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {i} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}: line {i} is a {type(rec).__name__}, expected an object with field 'text'")
        docs.append(_text_of(p, rec, f"line {i}"))
    return docs


def _read_json(p: Path, raw: str) -> list[str]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{p}: top level is a {type(data).__name__}, expected a list of strings or of objects with field 'text'")
    return [_text_of(p, rec, f"record {i}") for i, rec in enumerate(data)]


# --- the offline default ---------------------------------------------------------------

@functools.cache
def _stdlib_docstrings(modules: tuple[str, ...]) -> tuple[str, ...]:
    with warnings.catch_warnings():  # e.g. typing.io / typing.re are deprecated aliases
        warnings.simplefilter("ignore", DeprecationWarning)
        return _collect_docstrings(modules)


def _owned_by(obj, module: str, default: bool = True) -> bool:
    """Defined in ``module`` or its submodules (so methods other packages monkeypatch
    onto standard-library classes, e.g. transformers' ``Logger.warning_once``, stay out)."""
    fn = obj.fget if isinstance(obj, property) else obj
    owner = getattr(fn, "__module__", None)
    if not isinstance(owner, str):
        return default  # C method descriptors carry no module (and cannot be patched in)
    return owner == module or owner.startswith(module + ".")


def _collect_docstrings(modules: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    docs: list[str] = []

    def add(obj) -> None:
        d = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        if not d:
            return
        d = inspect.cleandoc(d)
        if len(d) >= MIN_DOCSTRING_CHARS and d not in seen:
            seen.add(d)
            docs.append(d)

    for name in sorted(modules):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            log.info("offline corpus: standard-library module %s is not available, skipped", name)
            continue
        add(mod)
        for attr in sorted(a for a in dir(mod) if not a.startswith("_")):
            obj = getattr(mod, attr, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if not _owned_by(obj, mod.__name__, default=False):
                continue  # re-exported from elsewhere: documented where it is defined
            add(obj)
            if inspect.isclass(obj):
                for meth in sorted(a for a in vars(obj) if not a.startswith("_")):
                    member = vars(obj)[meth]
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if (inspect.isfunction(member) or inspect.ismethoddescriptor(member)
                            or isinstance(member, property)) and _owned_by(member, mod.__name__):
                        add(member)
    try:
        from pydoc_data.topics import topics
    except ImportError:
        log.info("offline corpus: pydoc_data.topics is not available, skipped")
        topics = {}
    for key in sorted(topics):
        text = topics[key].strip()
        if len(text) >= MIN_DOCSTRING_CHARS and text not in seen:
            seen.add(text)
            docs.append(text)
    return tuple(docs)
