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
    entries = []
    for start in range(0, len(blocks), shard_blocks):
        chunk = blocks[start:start + shard_blocks]
        ids = [block_id(b) for b in chunk]
        table = pa.table({"block_id": ids,
                          "input_ids": pa.array(list(chunk), type=pa.list_(pa.int32()))},
                         schema=BLOCK_SCHEMA)
        name = f"shard-{start // shard_blocks:05d}.parquet"
        pq.write_table(table, out_dir / name, **PARQUET_OPTIONS)
        entries.append({"file": name, "blocks": len(chunk),
                        "hash": sha256_bytes("".join(ids).encode())})
    return entries


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
