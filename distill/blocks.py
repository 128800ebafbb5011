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

    The tail shorter than one block is dropped.
    """
    total = sum(len(t) + 1 for t in token_lists)
    stream = np.empty(total, dtype=np.int32)
    pos = 0
    for toks in token_lists:
        stream[pos:pos + len(toks)] = toks
        stream[pos + len(toks)] = eos_id
        pos += len(toks) + 1
    n = total // block_size
    return stream[: n * block_size].reshape(n, block_size)


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
