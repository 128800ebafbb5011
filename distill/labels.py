"""The soft-label format: top-k teacher log-probs per position, compact parquet shards.

One row per block of T tokens (P = T-1 predicted positions, K kept tokens):

=================  ====================  ==========================================
column             type                  content
=================  ====================  ==========================================
block_id           string                content hash of the block (cache key)
input_ids          list<int32>   [T]     the block's tokens
topk_ids           list<int32>   [P·K]   teacher's top-k token ids per position
topk_logprobs      list<float16> [P·K]   their log-probs at the label temperature
rest_logprob       list<float16> [P]     log of the mass outside the top k
teacher_nll        float32               teacher's mean NLL of the real next tokens
=================  ====================  ==========================================

The settings that make labels usable (teacher fingerprint, tokenizer hash, k,
temperature, mode) are stored in the parquet schema metadata of every shard; training
refuses shards whose settings differ from its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.io import sha256_bytes

FORMAT_VERSION = 1
META_KEY = b"distill.labels"
LABEL_SCHEMA = pa.schema([
    ("block_id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("topk_ids", pa.list_(pa.int32())),
    ("topk_logprobs", pa.list_(pa.float16())),
    ("rest_logprob", pa.list_(pa.float16())),
    ("teacher_nll", pa.float32()),
])


@dataclass(frozen=True)
class LabelSettings:
    """What a label shard was made with; must match the training run's settings."""

    teacher_fingerprint: str
    tokenizer_hash: str
    k: int
    temperature: float
    mode: str = "soft"
    format: int = FORMAT_VERSION

    def key(self, source_hash: str) -> str:
        """Content address of the labels of one source shard under these settings."""
        return sha256_bytes((json.dumps(asdict(self), sort_keys=True) + source_hash).encode())[:20]


def settings_for_run(top_k: int, temperature: float, teacher: dict, manifest: dict) -> LabelSettings:
    """The label settings a run uses: from ``teacher.json``, the prepared manifest and the
    ``distill`` params (k capped at the vocabulary). The label stage writes them and the
    train stage demands them, so both must build them here."""
    return LabelSettings(teacher_fingerprint=teacher["fingerprint"],
                         tokenizer_hash=manifest["tokenizer"]["hash"],
                         k=min(top_k, manifest["tokenizer"]["vocab_size"]),
                         temperature=temperature)


def plan_label_shards(settings: LabelSettings, manifest: dict) -> list[dict]:
    """Each prepared train shard with the content-addressed name of its label file."""
    return [{**s, "key": settings.key(s["hash"]), "label_file": f"labels-{settings.key(s['hash'])}.parquet"}
            for s in manifest["splits"]["train"]["shards"]]


def _list_array(flat: np.ndarray, rows: int, dtype: pa.DataType) -> pa.ListArray:
    width = flat.size // rows if rows else 0
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1), type=dtype))


def labels_table(batch: dict[str, np.ndarray], settings: LabelSettings) -> pa.Table:
    """A batch of labeled blocks (2-D numpy columns) → an arrow table with the settings attached."""
    rows = len(batch["block_id"])
    table = pa.table({
        "block_id": pa.array([str(b) for b in batch["block_id"]], type=pa.string()),
        "input_ids": _list_array(np.asarray(batch["input_ids"], np.int32), rows, pa.int32()),
        "topk_ids": _list_array(np.asarray(batch["topk_ids"], np.int32), rows, pa.int32()),
        "topk_logprobs": _list_array(np.asarray(batch["topk_logprobs"], np.float16), rows, pa.float16()),
        "rest_logprob": _list_array(np.asarray(batch["rest_logprob"], np.float16), rows, pa.float16()),
        "teacher_nll": pa.array(np.asarray(batch["teacher_nll"], np.float32)),
    }, schema=LABEL_SCHEMA)
    return table.replace_schema_metadata({META_KEY: json.dumps(asdict(settings)).encode()})


def write_label_shard(table: pa.Table, path: Path) -> None:
    """Write one shard atomically: a partial file never carries the final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd", use_dictionary=False)
    tmp.replace(path)


def read_label_settings(path: str | Path) -> LabelSettings:
    """The settings recorded in a label shard; a shard without them names its file."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ValueError(f"{path}: corrupt or unreadable label shard: {exc}") from exc
    if META_KEY not in meta:
        raise ValueError(f"{path}: not a label shard (no {META_KEY.decode()} metadata)")
    return LabelSettings(**json.loads(meta[META_KEY]))


def check_label_settings(paths: list[Path], expected: LabelSettings) -> None:
    """Refuse labels made with other settings than the training run's, naming what differs."""
    for path in paths:
        found = read_label_settings(path)
        if found != expected:
            diff = {k: (v, getattr(expected, k)) for k, v in asdict(found).items()
                    if v != getattr(expected, k)}
            detail = ", ".join(f"{k}: labels have {a!r}, run wants {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{path}: label settings do not match this run ({detail}); "
                             f"re-run the label stage")
