"""Raw corpus → normalised, de-duplicated documents split into train/val by content hash."""

from __future__ import annotations

import json
import sysconfig
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from distill.io import sha256_bytes

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
RECORD_SUFFIXES = {".jsonl", ".parquet"}
# Test suites are excluded from the stdlib corpus: they are large, repetitive and
# full of deliberately odd text (encodings, syntax errors).
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                        "__pycache__", "lib2to3", "turtledemo", "ensurepip"}


class CorpusError(ValueError):
    """The corpus is missing, empty or unreadable."""


@dataclass
class Document:
    """One normalised document and its content hash."""

    text: str
    sha: str
    origin: str


@dataclass
class CorpusStats:
    """What reading the corpus found (goes into the manifest)."""

    source: str
    files_read: int = 0
    records_read: int = 0
    undecodable: list[str] = field(default_factory=list)
    empty: int = 0
    duplicates: int = 0
    truncated: int = 0


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's own ``.py`` files, tests and vendored packages excluded."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts[:-1]
        if any(p in STDLIB_EXCLUDED_DIRS or p.startswith("test") for p in parts):
            continue
        files.append(path)
    return sorted(files)


def normalise(text: str) -> str:
    """NFC, Unix newlines, no trailing spaces, no leading/trailing blank lines."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def iter_raw_texts(source: str, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    """Yield ``(origin, text)`` for every raw document of ``source``."""
    if source == "stdlib":
        yield from _iter_files(stdlib_files(), text_field, stats)
    elif source.startswith("hf:"):
        yield from _iter_hf_dataset(source[3:], text_field, stats)
    else:
        path = Path(source)
        if not path.exists():
            raise CorpusError(f"data.source: corpus path {path} does not exist")
        if path.is_file():
            if path.suffix not in TEXT_SUFFIXES | RECORD_SUFFIXES:
                allowed = ", ".join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))
                raise CorpusError(f"data.source: {path} has an unsupported suffix (allowed: {allowed})")
            files = [path]
        else:
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix in TEXT_SUFFIXES | RECORD_SUFFIXES)
        yield from _iter_files(files, text_field, stats)


def _iter_files(files: list[Path], text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    for path in files:
        stats.files_read += 1
        if path.suffix == ".jsonl":
            yield from _iter_jsonl(path, text_field, stats)
        elif path.suffix == ".parquet":
            yield from _iter_parquet(path, text_field, stats)
        else:
            try:
                yield str(path), path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                stats.undecodable.append(str(path))


def _iter_jsonl(path: Path, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError:
        stats.undecodable.append(str(path))
        return
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise CorpusError(f"{path}:{n}: no string field {text_field!r} (data.text_field)")
        stats.records_read += 1
        yield f"{path}:{n}", record[text_field]


def _iter_parquet(path: Path, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[text_field])
    except Exception as exc:  # pyarrow raises several types for corrupt files or columns
        raise CorpusError(f"{path}: cannot read column {text_field!r} (data.text_field): {exc}") from exc
    for n, text in enumerate(table.column(text_field).to_pylist()):
        if isinstance(text, str):
            stats.records_read += 1
            yield f"{path}:{n}", text


def _iter_hf_dataset(spec: str, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError("data.source hf:... needs the `datasets` package (pip install datasets)") from exc
    ds = datasets.load_dataset(name, split=split or "train")
    for n, record in enumerate(ds):
        stats.records_read += 1
        yield f"{name}:{n}", record[text_field]


def load_documents(source: str, text_field: str, max_doc_chars: int,
                   max_documents: int = 0) -> tuple[list[Document], CorpusStats]:
    """Read, normalise and exact-dedup ``source``; documents come back sorted by hash.

    Sorting by content hash makes the result independent of file-system order, and
    ``max_documents`` then keeps a deterministic, well-spread subset.
    """
    stats = CorpusStats(source=source)
    seen: dict[str, Document] = {}
    for origin, raw in iter_raw_texts(source, text_field, stats):
        text = normalise(raw)
        if not text:
            stats.empty += 1
            continue
        if len(text) > max_doc_chars:
            text, stats.truncated = text[:max_doc_chars], stats.truncated + 1
        sha = sha256_bytes(text.encode("utf-8"))
        if sha in seen:
            stats.duplicates += 1
            continue
        seen[sha] = Document(text=text, sha=sha, origin=origin)
    docs = [seen[k] for k in sorted(seen)]
    if max_documents:
        docs = docs[:max_documents]
    if not docs:
        raise CorpusError(f"data.source: corpus {source} holds no usable documents "
                          f"({stats.files_read} files, {len(stats.undecodable)} undecodable, "
                          f"{stats.empty} empty)")
    return docs, stats


def split_by_hash(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Train/val split decided by each document's hash, never by its position."""
    train, val = [], []
    for doc in docs:
        # The hash's *last* digits: the first ones already chose the max_documents subset.
        (val if int(doc.sha[-8:], 16) / 0x1_0000_0000 < val_fraction else train).append(doc)
    if not train or not val:
        raise CorpusError(f"data.val_fraction: {len(docs)} documents split into {len(train)} train "
                          f"/ {len(val)} val; need at least one of each (more documents or "
                          f"another val_fraction)")
    return train, val
