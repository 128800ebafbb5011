"""Raw corpus → normalised, de-duplicated documents split into train/val by content hash.

Everything here streams: a file is read in chunks, a long text is cut into pieces of at
most ``max_chars`` characters at paragraph boundaries (each piece a document of its own,
with its origin and character offset), and the scan that de-duplicates keeps only hashes
and counters in memory; the documents themselves are spilled to hash-partitioned files on
disk (:func:`scan_corpus`) and read back one document at a time, in hash order
(:func:`iter_partition`).
"""

from __future__ import annotations

import codecs
import functools
import heapq
import json
import os
import struct
import sysconfig
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from distill.io import sha256_bytes

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst"}
RECORD_SUFFIXES = {".jsonl", ".parquet"}
# Test suites are excluded from the stdlib corpus: they are large, repetitive and
# full of deliberately odd text (encodings, syntax errors).
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                        "__pycache__", "lib2to3", "turtledemo", "ensurepip"}
READ_CHUNK = 1 << 20        # bytes read from a text file at a time
EXAMPLES = 20               # dropped inputs named in the manifest (the counts are complete)
PARTITIONS = 256            # spill partitions by the hash's first byte: hash order = file order
_RECORD = struct.Struct("<32sQII")  # digest, offset, origin length, text length
NL = b"\n"


class CorpusError(ValueError):
    """The corpus is missing, empty or unreadable."""


@dataclass
class Document:
    """One normalised document (or a piece of a longer text) and its content hash.

    ``origin`` names the file (``path`` or ``path:line`` / ``path:row`` for records) and
    ``offset`` is the piece's first character in that text's normalised form (0 if whole).
    """

    text: str
    sha: str
    origin: str
    offset: int = 0


@dataclass
class CorpusStats:
    """What reading the corpus found (goes into the manifest): complete counts, and the
    first few dropped inputs by name (``path:line: why``)."""

    source: str
    files_read: int = 0
    records_read: int = 0
    texts: int = 0               # non-empty texts (files or records) read
    chars: int = 0               # their normalised characters, all of them
    split_texts: int = 0         # texts longer than max_doc_chars, cut into pieces
    pieces: int = 0              # documents produced (pieces included), before dedup
    duplicates: int = 0
    duplicate_chars: int = 0
    empty: int = 0
    undecodable_count: int = 0
    undecodable: list[str] = field(default_factory=list)
    empty_examples: list[str] = field(default_factory=list)

    def drop_undecodable(self, where: str) -> None:
        self.undecodable_count += 1
        if len(self.undecodable) < EXAMPLES:
            self.undecodable.append(where)

    def drop_empty(self, where: str) -> None:
        self.empty += 1
        if len(self.empty_examples) < EXAMPLES:
            self.empty_examples.append(where)

    def summary(self) -> str:
        """One line for the log: what arrived and what was dropped, with examples."""
        line = (f"{self.files_read} files, {self.records_read} records: {self.texts} texts, "
                f"{self.chars:,} characters ({self.split_texts} long texts split, {self.pieces} "
                f"documents); dropped {self.duplicates} duplicates ({self.duplicate_chars:,} "
                f"characters), {self.empty} empty, {self.undecodable_count} undecodable")
        for label, examples in (("undecodable", self.undecodable), ("empty", self.empty_examples)):
            if examples:
                more = "" if len(examples) < EXAMPLES else ", ..."
                line += f"\n  {label}: " + "; ".join(examples[:5]) + (more if len(examples) > 5 else "")
        return line


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


# ---------------------------------------------------------------- cutting long texts


def cut_point(text: str, start: int, max_chars: int) -> int:
    """Where the piece starting at ``start`` ends: after the last blank line in the second
    half of the next ``max_chars`` characters, else after the last line break there, else
    at ``max_chars`` (a character boundary). Pieces are therefore at least half full."""
    end = start + max_chars
    half = start + max_chars // 2
    i = text.rfind("\n\n", half, end)
    if i >= 0:
        return i + 2
    i = text.rfind("\n", half, end)
    if i >= 0:
        return i + 1
    return end


def split_text(text: str, max_chars: int) -> list[tuple[int, str]]:
    """``text`` as ``(offset, piece)`` pieces of at most ``max_chars`` characters, cut at
    paragraph boundaries (:func:`cut_point`); the pieces joined give ``text`` back."""
    pieces, pos = [], 0
    while len(text) - pos > max_chars:
        cut = cut_point(text, pos, max_chars)
        pieces.append((pos, text[pos:cut]))
        pos = cut
    if pos < len(text):
        pieces.append((pos, text[pos:]))
    return pieces


class _PieceCutter:
    """Cuts a normalised text that arrives in chunks into the same pieces as
    :func:`split_text` on the whole text, holding at most ~2 pieces in memory."""

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self.buffer = ""
        self.offset = 0        # offset of buffer[0] in the whole text

    def feed(self, chunk: str) -> Iterator[tuple[int, str]]:
        self.buffer += chunk
        pos = 0
        while len(self.buffer) - pos > self.max_chars:
            cut = cut_point(self.buffer, pos, self.max_chars)
            yield self.offset + pos, self.buffer[pos:cut]
            pos = cut
        self.buffer, self.offset = self.buffer[pos:], self.offset + pos

    def finish(self) -> Iterator[tuple[int, str]]:
        if self.buffer:
            yield self.offset, self.buffer
        self.buffer, self.offset = "", self.offset + len(self.buffer)


class _StreamNormaliser:
    """:func:`normalise` over a text that arrives in chunks: whole lines are normalised
    (NFC never composes across a line break), a trailing ``\\r`` waits for a possible
    ``\\n``, and blank lines are held back until text follows them (so that the trailing
    ones are dropped, like ``strip``).

    Linear in the text's length, whatever its shape: only the chunk that arrived is split
    into lines, the unfinished line is kept as a list of parts (joined once, when it ends),
    and a line longer than ``long_line`` (a file without line breaks: CJK text, base64)
    is passed on in part, each character of it looked at once (:meth:`_line_head`)."""

    def __init__(self, long_line: int = 1 << 22):
        self.parts: list[str] = []  # the last, unfinished line, in parts
        self.partial_chars = 0
        self.carry = ""         # a trailing "\r" waiting for a possible "\n"
        self.newlines = 0       # line breaks waiting for text
        self.started = False    # text seen (leading blank lines are dropped)
        self.long_line = long_line  # an unfinished line longer than this is passed on in part

    def feed(self, chunk: str, final: bool = False) -> str:
        text, self.carry = self.carry + chunk, ""
        if text.endswith("\r") and not final:
            text, self.carry = text[:-1], "\r"
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        tail = "" if final else lines.pop()
        out = []
        if lines:  # the unfinished line ends here
            lines[0] = "".join(self.parts) + lines[0]
            self.parts, self.partial_chars = [], 0
        for i, line in enumerate(lines):
            line = unicodedata.normalize("NFC", line).rstrip()
            if line:
                if self.started:
                    out.append("\n" * self.newlines)
                out.append(line)
                self.started, self.newlines = True, 0
            if not (final and i == len(lines) - 1):
                self.newlines += 1
        if tail:
            self.parts.append(tail)
            self.partial_chars += len(tail)
            if self.partial_chars > self.long_line:
                out.append(self._line_head())
        return "".join(out)

    def _line_head(self) -> str:
        """Pass on the head of a very long unfinished line, cut before a character at which
        NFC may restart (:func:`nfc_boundary`: a non-space starter that composes with
        nothing before it) and whose own trailing spaces are therefore inside the line
        (``rstrip`` keeps them too). Only the newest part is searched (from its end), so
        every character is looked at once; a part without such a character waits."""
        last = self.parts[-1]
        k = len(last) - 1
        while k >= 0 and not nfc_boundary(last[k]):
            k -= 1
        if k < 0 or (k == 0 and len(self.parts) == 1):
            return ""
        head = "".join(self.parts[:-1]) + last[:k]
        self.parts, self.partial_chars = [last[k:]], len(last) - k
        out = "\n" * self.newlines if self.started else ""
        self.started, self.newlines = True, 0
        return out + unicodedata.normalize("NFC", head)


def nfc_boundary(char: str) -> bool:
    """True if NFC of a text may be computed separately before and from ``char`` on, and
    ``char`` is not whitespace: an ASCII non-space character, or a starter (canonical
    combining class 0) that is never the second of a canonical composition and whose
    decomposition starts with such a starter (UAX #15's stable code points, conservatively)."""
    if char.isascii():
        return not char.isspace()
    if char.isspace() or unicodedata.combining(char):
        return False
    first = unicodedata.normalize("NFD", char)[0]
    return unicodedata.combining(first) == 0 and first not in _composition_seconds()


@functools.cache
def _composition_seconds() -> frozenset[str]:
    """Every character that is the second of a canonical two-character decomposition
    (it may compose with the character before it), and the Hangul vowel and trailing
    jamo (which compose algorithmically): computed once, from ``unicodedata``."""
    seconds = {chr(c) for c in range(0x1161, 0x1176)} | {chr(c) for c in range(0x11A8, 0x11C3)}
    for code in range(0x80, 0x110000):
        d = unicodedata.decomposition(chr(code))
        if d and not d.startswith("<"):
            parts = d.split()
            if len(parts) == 2:
                seconds.add(chr(int(parts[1], 16)))
    return frozenset(seconds)


# ---------------------------------------------------------------- reading sources


def iter_raw_texts(source: str, text_field: str,
                   stats: CorpusStats) -> Iterator[tuple[str, Iterator[str]]]:
    """Yield ``(origin, chunks)`` for every raw text of ``source``; ``chunks`` yields the
    text's normalised form in pieces (joined, they are ``normalise(text)``)."""
    if source == "stdlib":
        yield from _iter_files(stdlib_files(), text_field, stats)
    elif source.startswith("hf:"):
        for origin, text in iter_hf_texts(source[3:], text_field, stats):
            yield origin, iter([normalise(text)])
    else:
        yield from _iter_files(corpus_files(Path(source)), text_field, stats)


def corpus_files(path: Path) -> list[Path]:
    """The readable corpus files of a local file or folder, sorted; an unreadable folder
    or a file of another kind is an error naming it."""
    allowed = TEXT_SUFFIXES | RECORD_SUFFIXES
    if not path.exists():
        raise CorpusError(f"data.source: corpus path {path} does not exist; set data.source to "
                          f"a file or folder of {', '.join(sorted(allowed))} files, stdlib, or hf:<dataset>")
    if path.is_file():
        if path.suffix not in allowed:
            raise CorpusError(f"data.source: {path} has an unsupported suffix (allowed: "
                              f"{', '.join(sorted(allowed))}); rename it or convert it to one of these")
        return [path]
    return sorted(_walk(path, allowed))


def _walk(folder: Path, suffixes: set[str]) -> Iterator[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise CorpusError(f"{folder}: cannot list this corpus folder ({exc.strerror or exc}); "
                          f"make it readable (chmod +rx) or move it out of data.source") from exc
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():
            yield from _walk(path, suffixes)
        elif entry.is_file() and path.suffix in suffixes:
            yield path


def _iter_files(files: Iterable[Path], text_field: str,
                stats: CorpusStats) -> Iterator[tuple[str, Iterator[str]]]:
    for path in files:
        stats.files_read += 1
        if path.suffix == ".jsonl":
            for origin, text in _iter_jsonl(path, text_field, stats):
                yield origin, iter([normalise(text)])
        elif path.suffix == ".parquet":
            for origin, text in _iter_parquet(path, text_field, stats):
                yield origin, iter([normalise(text)])
        else:
            problem = text_file_problem(path)
            if problem:
                stats.drop_undecodable(problem)
                continue
            yield str(path), _normalised_chunks(path)


def _open(path: Path):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read this corpus file ({exc.strerror or exc}); "
                          f"make it readable or remove it from data.source") from exc


def text_file_problem(path: Path) -> str:
    """``''`` if ``path`` is UTF-8 text, else ``'path:line: why'`` (binary or undecodable).

    A pass of its own over the bytes (fast next to tokenising) so that no piece of a file
    is kept when a later part of it turns out to be unreadable."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with _open(path) as f:
        while chunk := f.read(READ_CHUNK):
            nul = chunk.find(b"\0")
            if nul >= 0:
                return f"{path}:{line + chunk.count(NL, 0, nul)}: binary (a NUL byte), not text"
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                at = line + chunk.count(NL, 0, max(exc.start, 0))
                return f"{path}:{at}: not UTF-8 ({exc.reason})"
            line += chunk.count(NL)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            return f"{path}:{line}: not UTF-8 ({exc.reason} at the end)"
    return ""


def _normalised_chunks(path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    norm = _StreamNormaliser()
    with _open(path) as f:
        while chunk := f.read(READ_CHUNK):
            text = norm.feed(decoder.decode(chunk))
            if text:
                yield text
    text = norm.feed(decoder.decode(b"", final=True), final=True)
    if text:
        yield text


def _iter_jsonl(path: Path, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    with _open(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                stats.drop_undecodable(f"{path}:{n}: not UTF-8 ({exc.reason})")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{n}: not valid JSON ({exc.msg}); fix or delete "
                                  f"this line") from exc
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CorpusError(f"{path}:{n}: no string field {text_field!r} (found {keys}); "
                                  f"set data.text_field to the field holding the text, or fix "
                                  f"this line")
            stats.records_read += 1
            yield f"{path}:{n}", record[text_field]


def _iter_parquet(path: Path, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise CorpusError(f"{path}: not a readable parquet file ({exc}); replace or remove it") from exc
    if text_field not in pf.schema_arrow.names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                          f"set data.text_field to the column holding the text")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                stats.records_read += 1
                yield f"{path}:{row}", text
            else:
                stats.drop_empty(f"{path}:row {row}: {text_field} is {type(text).__name__}")
            row += 1


def iter_hf_texts(spec: str, text_field: str, stats: CorpusStats,
                  batch_rows: int = 1000) -> Iterator[tuple[str, str]]:
    """The texts of ``hf:<dataset>[:<split>]``, streamed: a ``save_to_disk`` folder (read in
    batches from its memory-mapped arrow files), a local folder of data files in HF's layout
    (``load_dataset(folder, streaming=True)``, offline) or a Hub name (``streaming=True``,
    needs the network). ``text_field`` is checked before any text is read."""
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError("data.source hf:... needs the `datasets` package: pip install datasets") from exc
    datasets.disable_progress_bars()
    ds = _open_hf_dataset(datasets, name, split or "train")
    columns = ds.column_names
    if columns is None:  # a streamed json dataset learns its columns from its first record
        first = next(iter(ds), None)
        columns = [] if first is None else list(first)
    if text_field not in columns:
        raise CorpusError(f"data.source hf:{spec}: no column {text_field!r} (columns: {columns}); "
                          f"set data.text_field to the column holding the text")
    ds = ds.select_columns([text_field])
    rows = ds.iter(batch_size=batch_rows) if isinstance(ds, datasets.Dataset) else _batched(ds, batch_rows, text_field)
    n = 0
    for batch in rows:
        for text in batch[text_field]:
            if isinstance(text, str):
                stats.records_read += 1
                yield f"hf:{name}:{split or 'train'}:{n}", text
            else:
                stats.drop_empty(f"hf:{name}:{split or 'train'}:row {n}: {text_field} is "
                                 f"{type(text).__name__}")
            n += 1


def _open_hf_dataset(datasets, name: str, split: str):
    folder = Path(name)
    try:
        if (folder / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(str(folder))
            if split not in dd:
                raise CorpusError(f"data.source hf:{name}:{split}: no split {split!r} in this "
                                  f"save_to_disk folder (splits: {sorted(dd)}); write hf:{name}:<split>")
            return dd[split]
        if (folder / "state.json").is_file():
            return datasets.load_from_disk(str(folder))
        return datasets.load_dataset(str(folder) if folder.is_dir() else name, split=split,
                                     streaming=True)
    except CorpusError:
        raise
    except Exception as exc:  # datasets raises many types (missing files, network, formats)
        where = ("this local folder holds neither a save_to_disk dataset nor data files "
                 "(.parquet/.jsonl/.csv/.txt)" if folder.is_dir() else
                 "not a local folder, and loading it from the Hub failed (offline? save it with "
                 "Dataset.save_to_disk where there is network and set data.source: hf:<folder>)")
        raise CorpusError(f"data.source hf:{name}:{split}: {where}: {type(exc).__name__}: {exc}") from exc


def _batched(ds, size: int, text_field: str) -> Iterator[dict]:
    batch: list = []
    for record in ds:
        batch.append(record[text_field])
        if len(batch) == size:
            yield {text_field: batch}
            batch = []
    if batch:
        yield {text_field: batch}


# ---------------------------------------------------------------- documents


def iter_documents(source: str, text_field: str, max_chars: int,
                   stats: CorpusStats) -> Iterator[Document]:
    """Every normalised, non-empty text of ``source`` as documents of at most ``max_chars``
    characters (longer ones cut by :func:`split_text`, nothing dropped); not de-duplicated."""
    for origin, chunks in iter_raw_texts(source, text_field, stats):
        cutter = _PieceCutter(max_chars)
        pieces = 0
        for chunk in chunks:
            for offset, piece in cutter.feed(chunk):
                pieces += 1
                yield _document(piece, origin, offset)
        for offset, piece in cutter.finish():
            pieces += 1
            yield _document(piece, origin, offset)
        if not pieces:
            stats.drop_empty(f"{origin}: empty")
            continue
        stats.texts += 1
        stats.chars += cutter.offset  # the whole text's length: every piece counted
        stats.split_texts += pieces > 1
        stats.pieces += pieces


def _document(text: str, origin: str, offset: int) -> Document:
    return Document(text=text, sha=sha256_bytes(text.encode("utf-8")), origin=origin, offset=offset)


def is_val(sha: str, val_fraction: float) -> bool:
    """The hash split: the hash's *last* digits (the first ones choose the max_documents subset)."""
    return int(sha[-8:], 16) / 0x1_0000_0000 < val_fraction


def load_documents(source: str, text_field: str, max_doc_chars: int,
                   max_documents: int = 0) -> tuple[list[Document], CorpusStats]:
    """Read, normalise, cut and exact-dedup ``source`` in memory; documents come back sorted
    by hash (small corpora and tests; ``prepare`` streams through :func:`scan_corpus`).

    Sorting by content hash makes the result independent of file-system order, and
    ``max_documents`` then keeps a deterministic, well-spread subset.
    """
    stats = CorpusStats(source=source)
    seen: dict[str, Document] = {}
    for doc in iter_documents(source, text_field, max_doc_chars, stats):
        if doc.sha in seen:
            stats.duplicates += 1
            stats.duplicate_chars += len(doc.text)
            continue
        seen[doc.sha] = doc
    docs = [seen[k] for k in sorted(seen)]
    if max_documents:
        docs = docs[:max_documents]
    if not docs:
        raise CorpusError(no_documents_message(source, stats))
    return docs, stats


def no_documents_message(source: str, stats: CorpusStats) -> str:
    """The error for a corpus with nothing usable, naming what was found and dropped."""
    named = "; ".join((stats.undecodable + stats.empty_examples)[:5])
    return (f"data.source: corpus {source} holds no usable documents ({stats.files_read} files, "
            f"{stats.undecodable_count} undecodable, {stats.empty} empty"
            + (f": {named}" if named else "") + "); add UTF-8 text files or records with a "
            f"non-empty data.text_field")


def split_by_hash(docs: list[Document], val_fraction: float,
                  max_doc_chars: int = 0) -> tuple[list[Document], list[Document]]:
    """Train/val split decided by each document's hash, never by its position."""
    train, val = [], []
    for doc in docs:
        (val if is_val(doc.sha, val_fraction) else train).append(doc)
    check_split(len(train), len(val), val_fraction, max_doc_chars)
    return train, val


def check_split(train: int, val: int, val_fraction: float, max_doc_chars: int = 0) -> None:
    """Both splits need a document; the advice says what would give them one."""
    if train and val:
        return
    cut = (f", or lower data.max_doc_chars (now {max_doc_chars}) so long texts are cut into "
           f"more pieces" if max_doc_chars else "")
    raise CorpusError(f"data.val_fraction: {train + val} documents split into {train} train / "
                      f"{val} val; need at least one of each: add documents{cut}, or "
                      f"{'raise' if not val else 'lower'} data.val_fraction (now {val_fraction})")


# ---------------------------------------------------------------- the streaming scan


@dataclass
class ScanResult:
    """What :func:`scan_corpus` found: the spill partitions, counts and the tokenizer sample."""

    stats: CorpusStats
    partitions: list[Path]
    unique: int                  # distinct documents in the corpus
    threshold: str               # the largest hash kept (max_documents), "" = all
    sample: list[str]            # tokenizer-training texts: train documents in hash order
    sample_chars: int


def scan_corpus(source: str, text_field: str, max_chars: int, spill_dir: Path, *,
                max_documents: int, val_fraction: float, sample_chars: int) -> ScanResult:
    """One streaming pass: cut, hash and exact-dedup every document, spill it to the
    partition of its hash's first byte, and keep the tokenizer sample.

    Memory holds the set of hashes, counters and the sample (at most ``sample_chars``
    characters): the longest prefix, in hash order, of the kept train documents that fits
    (at least one document) — a deterministic, well-spread sample that is the whole train
    split of a small corpus.
    """
    stats = CorpusStats(source=source)
    spill_dir.mkdir(parents=True, exist_ok=True)
    paths = [spill_dir / f"part-{i:03d}.bin" for i in range(PARTITIONS)]
    files = [open(p, "wb") for p in paths]
    seen: set[bytes] = set()    # 32-byte digests (~100 bytes a document with the set's own)
    sample = _SamplePrefix(sample_chars)
    try:
        for doc in iter_documents(source, text_field, max_chars, stats):
            digest = bytes.fromhex(doc.sha)
            if digest in seen:
                stats.duplicates += 1
                stats.duplicate_chars += len(doc.text)
                continue
            seen.add(digest)
            origin, text = doc.origin.encode("utf-8"), doc.text.encode("utf-8")
            f = files[digest[0]]
            f.write(_RECORD.pack(digest, doc.offset, len(origin), len(text)))
            f.write(origin)
            f.write(text)
            if not is_val(doc.sha, val_fraction):
                sample.offer(doc.sha, doc.text)
    finally:
        for f in files:
            f.close()
    if not seen:
        raise CorpusError(no_documents_message(source, stats))
    threshold = ""
    if max_documents and max_documents < len(seen):
        threshold = heapq.nsmallest(max_documents, seen)[-1].hex()
    texts = sample.texts(threshold)
    return ScanResult(stats=stats, partitions=paths, unique=len(seen), threshold=threshold,
                      sample=texts, sample_chars=sum(map(len, texts)))


class _SamplePrefix:
    """The longest hash-ordered prefix of the offered texts within a character budget."""

    def __init__(self, budget: int):
        self.budget = budget
        self.heap: list[tuple[str, str]] = []   # (negated-order key, text): a max-heap by hash
        self.chars = 0
        self.cutoff = None                      # smallest hash evicted: later ones cannot enter

    def offer(self, sha: str, text: str) -> None:
        if self.cutoff is not None and sha >= self.cutoff:
            return
        heapq.heappush(self.heap, (_Desc(sha), text))
        self.chars += len(text)
        while self.chars > self.budget and len(self.heap) > 1:
            key, dropped = heapq.heappop(self.heap)
            self.chars -= len(dropped)
            self.cutoff = key.sha

    def texts(self, threshold: str) -> list[str]:
        kept = sorted((key.sha, text) for key, text in self.heap)
        return [text for sha, text in kept if not threshold or sha <= threshold]


class _Desc:
    """Reverses the order of a hash so ``heapq`` (a min-heap) pops the largest first."""

    __slots__ = ("sha",)

    def __init__(self, sha: str):
        self.sha = sha

    def __lt__(self, other: _Desc) -> bool:
        return self.sha > other.sha


def iter_partition(path: Path, threshold: str) -> Iterator[Document]:
    """The documents of one spill partition in hash order (those above ``threshold`` left out),
    one at a time: a first pass reads only the records' headers (hash, place in the file),
    they are sorted, and each text is read when its turn comes. Memory: ~100 bytes a
    document of the partition, whatever the texts' size (the reads come from the page
    cache: the partition was written just before)."""
    limit = bytes.fromhex(threshold) if threshold else None
    index = []
    with open(path, "rb") as f:
        pos = 0
        while header := f.read(_RECORD.size):
            digest, offset, n_origin, n_text = _RECORD.unpack(header)
            if limit is None or digest <= limit:
                index.append((digest, pos + _RECORD.size, offset, n_origin, n_text))
            pos += _RECORD.size + n_origin + n_text
            f.seek(pos)
        index.sort()
        for digest, at, offset, n_origin, n_text in index:
            f.seek(at)
            origin = f.read(n_origin).decode("utf-8")
            yield Document(text=f.read(n_text).decode("utf-8"), sha=digest.hex(), origin=origin,
                           offset=offset)
