"""Token blocks: packing documents into fixed-length blocks and parquet shard I/O."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.io import sha256_bytes

BLOCK_SCHEMA = pa.schema([("block_id", pa.string()), ("input_ids", pa.list_(pa.int32()))])
PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": False, "write_statistics": False}


def pack_blocks(token_lists: list[list[int]], eos_id: int, block_size: int) -> np.ndarray:
    """Concatenate documents (each followed by EOS) and cut into ``[n, block_size]`` int32.

    The tail shorter than one block is dropped. (Positional packing: adding a document
    shifts every later block; the prepare stage uses :func:`pack_blocks_stable`.)
    """
    stream = _eos_stream(token_lists, eos_id)
    n = stream.size // block_size
    return stream[: n * block_size].reshape(n, block_size)


def _eos_stream(token_lists: list[list[int]], eos_id: int) -> np.ndarray:
    """The documents' tokens, each document followed by EOS, as one int32 array."""
    total = sum(len(t) + 1 for t in token_lists)
    stream = np.empty(total, dtype=np.int32)
    pos = 0
    for toks in token_lists:
        stream[pos:pos + len(toks)] = toks
        stream[pos + len(toks)] = eos_id
        pos += len(toks) + 1
    return stream


def pack_blocks_stable(token_lists: list[list[int]], doc_hashes: list[str], eos_id: int,
                       block_size: int, tail_buckets: int) -> np.ndarray:
    """Pack documents into ``[n, block_size]`` int32 blocks that survive added documents.

    Each document (its tokens + EOS) gives its full blocks on its own, so they depend on
    that document only. The leftover tails (shorter than a block) go, by document hash,
    into ``tail_buckets`` buckets; each bucket concatenates its tails in hash order and is
    cut into blocks (its last partial block is dropped). A new document therefore changes
    only tail blocks of its own bucket (those after it in hash order): the label cache,
    keyed by block content, relabels only those and the new document's own blocks.
    Documents are taken in hash order, so the result does not depend on input order.
    Identical blocks are kept once (the first).
    """
    if len(token_lists) != len(doc_hashes):
        raise ValueError(f"{len(token_lists)} documents but {len(doc_hashes)} hashes")
    order = sorted(range(len(doc_hashes)), key=lambda i: doc_hashes[i])
    full: list[np.ndarray] = []
    tails: list[list[np.ndarray]] = [[] for _ in range(tail_buckets)]
    for i in order:
        stream = _eos_stream([token_lists[i]], eos_id)
        n = stream.size // block_size
        if n:
            full.append(stream[: n * block_size].reshape(n, block_size))
        if stream.size > n * block_size:
            tails[int(doc_hashes[i][8:16], 16) % tail_buckets].append(stream[n * block_size:])
    for bucket in tails:
        if bucket:
            joined = np.concatenate(bucket)
            n = joined.size // block_size
            full.append(joined[: n * block_size].reshape(n, block_size))
    blocks = np.concatenate(full) if full else np.empty((0, block_size), np.int32)
    return unique_blocks(blocks)


def unique_blocks(blocks: np.ndarray) -> np.ndarray:
    """``blocks`` without repeats (first occurrence kept, order otherwise unchanged)."""
    seen: set[bytes] = set()
    keep = []
    for i, row in enumerate(blocks):
        key = row.tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return blocks[keep] if len(keep) < len(blocks) else blocks


def block_id(block: np.ndarray) -> str:
    """Content hash of one block (its int32 bytes): the key of the label cache."""
    return sha256_bytes(np.ascontiguousarray(block, dtype=np.int32).tobytes())[:32]


def write_block_shards(blocks: np.ndarray, out_dir: Path, shard_blocks: int) -> list[dict]:
    """Write ``blocks`` as ``shard-XXXXX.parquet`` files; return one manifest entry per shard."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [write_shard(blocks[start:start + shard_blocks], out_dir, start // shard_blocks)
            for start in range(0, len(blocks), shard_blocks)]


def write_shard(chunk: np.ndarray, out_dir: Path, index: int, ids: list[str] | None = None) -> dict:
    """Write one ``shard-XXXXX.parquet`` of ``chunk`` (``[n, block_size]``); its manifest entry."""
    ids = ids if ids is not None else [block_id(b) for b in chunk]
    # the list column from the flat values and row offsets (one copy; a list of row arrays
    # costs a Python object a block): the same array, so the same parquet bytes
    offsets = pa.array(np.arange(len(chunk) + 1, dtype=np.int32) * chunk.shape[1])
    values = pa.array(np.ascontiguousarray(chunk, dtype=np.int32).reshape(-1))
    table = pa.table({"block_id": ids, "input_ids": pa.ListArray.from_arrays(offsets, values)},
                     schema=BLOCK_SCHEMA)
    name = f"shard-{index:05d}.parquet"
    pq.write_table(table, out_dir / name, **PARQUET_OPTIONS)
    return {"file": name, "blocks": len(chunk), "hash": sha256_bytes("".join(ids).encode())}


def document_blocks(tokens, eos_id: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One document's tokens + EOS as ``(full blocks [n, block_size], tail)`` int32: the
    blocks it gives on its own, and the leftover (shorter than a block) for its tail bucket."""
    stream = _eos_stream([tokens], eos_id)
    n = stream.size // block_size
    return stream[: n * block_size].reshape(n, block_size), stream[n * block_size:]


def tail_bucket(doc_hash: str, tail_buckets: int) -> int:
    """The tail bucket of a document (by its hash, so added documents disturb few buckets)."""
    return int(doc_hash[8:16], 16) % tail_buckets


class BlockIdSet:
    """A set of block ids (:func:`block_id`: 128-bit hex) in 16 bytes each: a sorted pair of
    int64 arrays (the id's two halves, offset to signed) and a small Python set of the
    newest ids, merged into the arrays when it holds ``buffer`` of them. A Python set of
    the id strings costs ~150 bytes an id: 600 MB for the 4 M blocks of a 1 GB corpus."""

    def __init__(self, buffer: int = 1 << 16):
        self.hi = np.empty(0, np.int64)
        self.lo = np.empty(0, np.int64)
        self.recent: set[str] = set()
        self.buffer = buffer

    def __len__(self) -> int:
        return self.hi.size + len(self.recent)

    def add(self, bid: str) -> bool:
        """Add ``bid``; False if it was already there."""
        if bid in self.recent:
            return False
        hi, lo = _id_halves(bid)
        i = int(np.searchsorted(self.hi, hi))
        while i < self.hi.size and self.hi[i] == hi:
            if self.lo[i] == lo:
                return False
            i += 1
        self.recent.add(bid)
        if len(self.recent) >= self.buffer:
            self._merge()
        return True

    def _merge(self) -> None:
        """Insert the newest ids into the sorted arrays (a linear merge: one new copy of
        each array, no sort of the whole)."""
        halves = np.array(sorted(_id_halves(b) for b in self.recent), np.int64).reshape(-1, 2)
        at = np.searchsorted(self.hi, halves[:, 0], side="right")
        self.hi = np.insert(self.hi, at, halves[:, 0])
        self.lo = np.insert(self.lo, at, halves[:, 1])
        self.recent = set()


def _id_halves(bid: str) -> tuple[np.int64, np.int64]:
    """A 128-bit hex id as two int64 (each 64-bit half shifted into the signed range)."""
    return np.int64(int(bid[:16], 16) - (1 << 63)), np.int64(int(bid[16:32], 16) - (1 << 63))


class StableBlockWriter:
    """:func:`pack_blocks_stable` + :func:`write_block_shards` for a stream of documents
    that arrives in hash order, in bounded memory: full blocks go to shards as they fill,
    tails to one spill file per bucket (read back in slices), and only the ids of the blocks
    written (to drop repeats; 16 bytes each, :class:`BlockIdSet`) grow with the corpus. The
    shards are byte for byte those of the in-memory pair.
    """

    def __init__(self, out_dir: Path, block_size: int, shard_blocks: int, tail_buckets: int,
                 spill_dir: Path):
        self.out_dir, self.block_size, self.shard_blocks = out_dir, block_size, shard_blocks
        out_dir.mkdir(parents=True, exist_ok=True)
        spill_dir.mkdir(parents=True, exist_ok=True)
        self.tail_paths = [spill_dir / f"tails-{i:05d}.bin" for i in range(tail_buckets)]
        self.tail_files = [open(p, "wb") for p in self.tail_paths]
        self.seen = BlockIdSet()
        self.pending: list[np.ndarray] = []
        self.pending_ids: list[str] = []
        self.shards: list[dict] = []
        self.last_hash = ""

    def add_document(self, doc_hash: str, full: np.ndarray, tail: np.ndarray) -> None:
        """One document's full blocks and tail (:func:`document_blocks`); hashes must rise."""
        if doc_hash <= self.last_hash:
            raise ValueError(f"documents out of hash order: {doc_hash} after {self.last_hash}")
        self.last_hash = doc_hash
        self.add_blocks(full)
        if tail.size:
            self.tail_files[tail_bucket(doc_hash, len(self.tail_files))].write(
                np.ascontiguousarray(tail, dtype=np.int32).tobytes())

    def add_blocks(self, blocks: np.ndarray) -> None:
        """Append blocks (repeats of blocks already written are dropped), writing full shards."""
        for block in blocks:
            bid = block_id(block)
            if not self.seen.add(bid):
                continue
            self.pending.append(block)
            self.pending_ids.append(bid)
            if len(self.pending) == self.shard_blocks:
                self._flush()

    def finish(self) -> list[dict]:
        """Pack the tail buckets, write the last shard; the shards' manifest entries."""
        for f in self.tail_files:
            f.close()
        for path in self.tail_paths:
            for blocks in _file_blocks(path, self.block_size):
                self.add_blocks(blocks)
            path.unlink()
        if self.pending:
            self._flush()
        return self.shards

    @property
    def blocks(self) -> int:
        """Blocks written or pending so far."""
        return len(self.seen)

    def _flush(self) -> None:
        chunk = np.stack(self.pending).astype(np.int32, copy=False)
        self.shards.append(write_shard(chunk, self.out_dir, len(self.shards), self.pending_ids))
        self.pending, self.pending_ids = [], []


def _file_blocks(path: Path, block_size: int, rows: int = 8192) -> Iterator[np.ndarray]:
    """The int32 tokens of ``path`` cut into ``[n, block_size]`` blocks, ``rows`` at a time
    (the last partial block dropped): the blocks of the whole file, in bounded memory."""
    with open(path, "rb") as f:
        while True:
            tokens = np.fromfile(f, dtype=np.int32, count=rows * block_size)
            n = tokens.size // block_size
            if n:
                yield tokens[: n * block_size].reshape(n, block_size)
            if tokens.size < rows * block_size:
                return


def shard_paths(split_dir: str | Path) -> list[Path]:
    """The parquet shards of one split, in order; an empty or missing split is an error."""
    split_dir = Path(split_dir)
    paths = sorted(split_dir.glob("shard-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"{split_dir}: no parquet shards (run the prepare stage)")
    return paths


def read_blocks(split_dir: str | Path, limit: int = 0) -> tuple[list[str], np.ndarray]:
    """All blocks of a split as ``(block_ids, int32 [n, block_size])`` (first ``limit`` if set)."""
    ids: list[str] = []
    arrays = []
    for path in shard_paths(split_dir):
        for ids_part, arr in iter_shard_blocks(path):
            ids.extend(ids_part)
            arrays.append(arr)
            if limit and len(ids) >= limit:
                return ids[:limit], np.concatenate(arrays)[:limit]
    return ids, np.concatenate(arrays)


def iter_shard_blocks(path: Path) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield ``(block_ids, blocks)`` of one shard; a corrupt shard names its file."""
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError variants for corrupt files
        raise ValueError(f"{path}: corrupt or unreadable parquet shard: {exc}") from exc
    ids = table.column("block_id").to_pylist()
    flat = table.column("input_ids").combine_chunks().flatten().to_numpy()
    yield ids, flat.reshape(len(ids), -1).astype(np.int32, copy=False)


DOCUMENT_SCHEMA = pa.schema([("sha", pa.string()), ("origin", pa.string()), ("offset", pa.int64()),
                             ("split", pa.string()), ("text", pa.string())])


def tokenise_and_pack(batch: pa.Table, tokenizer_json: str, eos_id: int, block_size: int) -> pa.Table:
    """Documents (:data:`DOCUMENT_SCHEMA`) → each one's token count, full blocks (flat)
    and tail (:func:`document_blocks`). Per document, so it gives the same rows however
    the documents are batched: the in-process and the Ray Data engines share it."""
    from distill.tokenizer import encode_texts

    token_lists = encode_texts(tokenizer_json, batch.column("text").to_pylist())
    full, tails = [], []
    for toks in token_lists:
        blocks, tail = document_blocks(toks, eos_id, block_size)
        full.append(blocks.reshape(-1))
        tails.append(tail)
    return pa.table({
        "sha": batch.column("sha"), "origin": batch.column("origin"),
        "offset": batch.column("offset"), "split": batch.column("split"),
        "tokens": pa.array([len(t) for t in token_lists], pa.int64()),
        "full": _list_array(full), "tail": _list_array(tails)})


def _list_array(arrays: list[np.ndarray]) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.empty(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32, copy=False)))


def iter_packed_rows(table: pa.Table, block_size: int) -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
    """The rows of a :func:`tokenise_and_pack` table as ``(fields, full blocks, tail)``."""
    fields = table.select(["sha", "origin", "offset", "split", "tokens"]).to_pylist()
    columns = []
    for name in ("full", "tail"):
        col = table.column(name).combine_chunks()
        columns.append((col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=False)))
    (f_off, f_val), (t_off, t_val) = columns
    for i, row in enumerate(fields):
        yield (row, f_val[f_off[i]:f_off[i + 1]].reshape(-1, block_size),
               t_val[t_off[i]:t_off[i + 1]])
