"""The label format: teacher labels per block, compact parquet shards, one schema for all modes.

One row per labeled block of T tokens (P = T-1 predicted positions, K kept tokens):

=================  ====================  ==========================================
column             type                  content
=================  ====================  ==========================================
block_id           string                content hash of the source block (cache key)
input_ids          list<int32>   [T]     the training row: the block (soft) or prompt +
                                         teacher generation, padded (hard modes)
topk_ids           list<int32>   [P·K]   teacher's top-k token ids per position
                                         (empty in ``hard`` mode: K = 0)
topk_logprobs      list<float16> [P·K]   their log-probs at the label temperature
rest_logprob       list<float16> [P]     log of the mass outside the top k ([0] in hard)
teacher_nll        float32               teacher's mean NLL of the real next tokens of the
                                         block (soft) or of the prompt (hard modes)
loss_from          int32                 first position p with a loss (0 in soft mode;
                                         prompt_tokens-1 in hard modes)
length             int32                 tokens of the row before padding; positions
                                         p ≥ length-1 carry no loss
=================  ====================  ==========================================

Label kinds (``kind``): ``topk`` as above; ``sampled`` (RS-KD): each position holds
N = ``samples`` draws from the teacher at τ as K = N distinct ids (drawn ids first, the
row filled with undrawn ids) in ``topk_ids``, log(count / N) in ``topk_logprobs`` (−inf
for count 0; float16 holds it closely enough to give the count back exactly, see
:func:`distill.losses.exact_sample_frequencies`) and −inf in ``rest_logprob``.

Position p predicts token p+1; training puts the ignore index on targets outside
``loss_from ≤ p < length-1``. In ``hard+soft`` mode the top-k of masked positions is a
filler (a valid uniform distribution) that the loss never reads.

The settings that make labels usable (teacher fingerprint, tokenizer hash, k,
temperature, mode, generation settings, the backend and dtype that ran the teacher, and the
fingerprint of the labeler's code, :mod:`distill.provenance`) are stored in the parquet
schema metadata of every shard; training refuses shards whose settings differ from its own.

The label folder is a cache keyed by block and settings: a shard holds any set of blocks, is
named by the hash of its block ids and the settings, and is never rewritten in place. Shards
of up to ``KEEP_SETTINGS`` settings live side by side (the most recently used ones), so
switching a setting back reuses its labels. :func:`plan_labels` says which wanted blocks have
no label yet and which shards hold stale rows (to be compacted by copying rows, no teacher
needed).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distill.io import sha256_bytes
from distill.provenance import code_fingerprint

FORMAT_VERSION = 3  # 2: loss_from/length columns, hard modes, generation settings; 3: backend,
                    # dtype and the labeler's code fingerprint in the settings, exact teacher
                    # rest (format-2 rests are log(1 − Σ kept)), sampled (RS-KD) label kind
KEEP_SETTINGS = 3   # label settings whose shards the folder keeps (the most recently used)
META_KEY = b"distill.labels"
LABEL_SCHEMA = pa.schema([
    ("block_id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("topk_ids", pa.list_(pa.int32())),
    ("topk_logprobs", pa.list_(pa.float16())),
    ("rest_logprob", pa.list_(pa.float16())),
    ("teacher_nll", pa.float32()),
    ("loss_from", pa.int32()),
    ("length", pa.int32()),
])
ERROR_SCHEMA = pa.schema([("block_id", pa.string()), ("reason", pa.string())])
MODES = ("soft", "hard", "hard+soft")


@dataclass(frozen=True)
class LabelSettings:
    """What a label shard was made with; must match the training run's settings."""

    teacher_fingerprint: str
    tokenizer_hash: str
    k: int
    temperature: float
    mode: str = "soft"
    generation: str = ""  # hard modes: canonical JSON of the generation settings
    backend: str = "hf"   # the resolved backend (hf or vllm): their numerics differ
    dtype: str = "float32"
    code: str = ""        # fingerprint of the labeler's code (labeler_code_fingerprint)
    format: int = FORMAT_VERSION
    kind: str = "topk"    # topk | sampled (RS-KD draws; then k = samples)
    samples: int = 0      # sampled: draws per position
    sample_seed: int = 0  # sampled: the draws are seeded per block from this

    def key(self, source_hash: str) -> str:
        """Content address of the labels of one source shard under these settings."""
        return sha256_bytes((json.dumps(asdict(self), sort_keys=True) + source_hash).encode())[:20]


def settings_for_run(top_k: int, temperature: float, teacher: dict, manifest: dict,
                     label=None, seed: int = 0, kind: str = "topk", samples: int = 0) -> LabelSettings:
    """The label settings a run uses: from ``teacher.json``, the prepared manifest, the
    ``distill`` params (k capped at the vocabulary; ``kind`` and ``samples`` of sampled
    labels, whose k is then ``samples``) and the ``label`` params (mode and generation,
    backend, dtype; ``None`` = the defaults: soft). The label stage writes them and the train
    stage demands them, so both must build them here."""
    from distill.config import LabelConfig
    from distill.teachers import resolve_backend

    label = label if label is not None else LabelConfig(mode="soft")
    sampled = kind == "sampled"
    # sampling needs the teacher's full softmax, which only HF gives (vLLM: top k): `auto`
    # means HF for sampled labels. Decided here only, so the key names the labeler that runs.
    backend = "hf" if sampled and label.backend == "auto" else resolve_backend(label.backend, temperature)
    width = samples if sampled else top_k
    return LabelSettings(teacher_fingerprint=teacher["fingerprint"],
                         tokenizer_hash=manifest["tokenizer"]["hash"],
                         k=0 if label.mode == "hard" else min(width, manifest["tokenizer"]["vocab_size"]),
                         temperature=temperature, mode=label.mode,
                         generation=generation_settings(label, seed) if label.mode != "soft" else "",
                         backend=backend, dtype=label.dtype, code=labeler_code_fingerprint(backend),
                         kind=kind, samples=samples if sampled else 0,
                         sample_seed=seed if sampled else 0)


def labeler_code_fingerprint(backend: str) -> str:
    """The fingerprint of the code that makes a label: the backend's labeler and what it
    imports, and this module (the format). Other code never changes a label's values."""
    if backend not in ("hf", "vllm"):
        raise ValueError(f"label backend {backend!r} is not one of: hf, vllm")
    return code_fingerprint(f"distill.teachers.{backend}", "distill.labels")


def generation_settings(label, seed: int) -> str:
    """Canonical JSON of what decides a teacher generation (part of the cache key)."""
    sampled = label.sampling == "sample"
    return json.dumps({"prompt_tokens": label.prompt_tokens, "max_new_tokens": label.max_new_tokens,
                       "sampling": label.sampling,
                       "temperature": label.gen_temperature if sampled else None,
                       "top_p": label.top_p if sampled else None,
                       "seed": seed if sampled else None}, sort_keys=True)


def shard_name(settings: LabelSettings, block_ids: list[str]) -> str:
    """Content-addressed file name of a label shard holding ``block_ids`` (in that order)."""
    return f"labels-{settings.key(sha256_bytes(''.join(block_ids).encode()))}.parquet"


@dataclass
class LabelPlan:
    """What the label stage must do to have exactly the wanted blocks labeled."""

    missing: list[str]                 # wanted block ids without a label, in wanted order
    keep: dict[str, list[str]]         # shard file → its block ids, all wanted
    compact: dict[str, list[str]]      # shard file → the wanted ids it holds (it holds others too)
    drop: list[str]                    # shard files holding no wanted block

    @property
    def cached(self) -> int:
        """Wanted blocks that already have labels."""
        return sum(map(len, self.keep.values())) + sum(map(len, self.compact.values()))


def plan_labels(wanted: list[str], index: dict[str, list[str]]) -> LabelPlan:
    """Compare the wanted block ids with the shards' contents (``index``: file → ids).

    A block labeled in several shards (not made by this stage, but possible after manual
    copies) counts once: the first shard in name order keeps it, the others are compacted.
    """
    wanted_set = set(wanted)
    owner: dict[str, str] = {}
    keep, compact, drop = {}, {}, []
    for name in sorted(index):
        ids = index[name]
        mine = [b for b in ids if b in wanted_set and b not in owner]
        for b in mine:
            owner[b] = name
        if not mine:
            drop.append(name)
        elif len(mine) == len(ids):
            keep[name] = ids
        else:
            compact[name] = mine
    missing = [b for b in dict.fromkeys(wanted) if b not in owner]
    return LabelPlan(missing=missing, keep=keep, compact=compact, drop=drop)


def index_label_shards(out: Path, settings: LabelSettings) -> tuple[dict[str, list[str]], list[Path]]:
    """The shards under ``out`` made with ``settings`` (file name → block ids) and the other
    files (other settings, leftovers of interrupted writes) that no run with these settings
    can use."""
    index: dict[str, list[str]] = {}
    other: list[Path] = []
    for path in sorted(out.glob("*labels-*.parquet*")):
        if path.name.startswith(".") or path.suffix != ".parquet":
            other.append(path)
            continue
        try:
            same = read_label_settings(path) == settings
        except ValueError:  # a corrupt or foreign file is no cache entry: replaced by labeling
            same = False
        if same:
            index[path.name] = pq.read_table(path, columns=["block_id"]).column(0).to_pylist()
        else:
            other.append(path)
    return index, other


def mark_used(out: Path, names: list[str]) -> None:
    """Record that the shards ``names`` were used now (their modification time), which ranks
    their settings first when the folder keeps only ``KEEP_SETTINGS`` settings."""
    now = time.time()
    for name in names:
        os.utime(out / name, (now, now))


def retention_plan(other: list[Path], keep_settings: int = KEEP_SETTINGS) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Of the files no run with the current settings can use (``index_label_shards``' second
    result), those to keep as the cache of other settings — every shard of the ``keep_settings
    - 1`` most recently used other settings — and those to remove, each with the reason."""
    groups: dict[LabelSettings, list[Path]] = {}
    remove: list[tuple[Path, str]] = []
    for path in other:
        if path.name.startswith(".") or path.suffix != ".parquet":
            remove.append((path, "leftover of an interrupted write"))
            continue
        try:
            groups.setdefault(read_label_settings(path), []).append(path)
        except ValueError as exc:
            remove.append((path, f"not a usable label shard ({exc})"))
    ranked = sorted(groups, key=lambda s: max(p.stat().st_mtime for p in groups[s]), reverse=True)
    keep = [p for s in ranked[:max(0, keep_settings - 1)] for p in groups[s]]
    for settings in ranked[max(0, keep_settings - 1):]:
        remove += [(p, f"settings not used in the last {keep_settings} settings kept "
                       f"(label.mode {settings.mode}, backend {settings.backend}, dtype {settings.dtype})")
                   for p in groups[settings]]
    return keep, remove


def compact_shard(out: Path, name: str, keep_ids: list[str], settings: LabelSettings) -> str:
    """Rewrite shard ``name`` with only the rows of ``keep_ids`` (copied, no teacher); returns
    the new shard's name. The old file is removed after the new one is complete."""
    table = pq.read_table(out / name)
    wanted = set(keep_ids)
    mask = pa.array([b in wanted for b in table.column("block_id").to_pylist()])
    kept = table.filter(mask)
    new = shard_name(settings, kept.column("block_id").to_pylist())
    write_label_shard(kept.replace_schema_metadata(table.schema.metadata), out / new)
    if new != name:
        (out / name).unlink()
    return new


def write_error_table(errors: list[dict], path: Path) -> None:
    """The blocks that could not be labeled (block_id, reason), atomically, as parquet."""
    table = pa.table({"block_id": [e["block_id"] for e in errors],
                      "reason": [e["reason"] for e in errors]}, schema=ERROR_SCHEMA)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def _list_array(flat: np.ndarray, rows: int, dtype: pa.DataType) -> pa.ListArray:
    width = flat.size // rows if rows else 0
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1), type=dtype))


def labels_table(batch: dict[str, np.ndarray], settings: LabelSettings) -> pa.Table:
    """A batch of labeled blocks (2-D numpy columns) → an arrow table with the settings attached.

    ``loss_from`` and ``length`` default to the whole block (soft labels)."""
    rows = len(batch["block_id"])
    ids = np.asarray(batch["input_ids"], np.int32).reshape(rows, -1)
    loss_from = batch.get("loss_from", np.zeros(rows, np.int32))
    length = batch.get("length", np.full(rows, ids.shape[1], np.int32))
    table = pa.table({
        "block_id": pa.array([str(b) for b in batch["block_id"]], type=pa.string()),
        "input_ids": _list_array(ids, rows, pa.int32()),
        "topk_ids": _list_array(np.asarray(batch["topk_ids"], np.int32), rows, pa.int32()),
        "topk_logprobs": _list_array(np.asarray(batch["topk_logprobs"], np.float16), rows, pa.float16()),
        "rest_logprob": _list_array(np.asarray(batch["rest_logprob"], np.float16), rows, pa.float16()),
        "teacher_nll": pa.array(np.asarray(batch["teacher_nll"], np.float32)),
        "loss_from": pa.array(np.asarray(loss_from, np.int32)),
        "length": pa.array(np.asarray(length, np.int32)),
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
    found = json.loads(meta[META_KEY])
    if found.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: label format {found.get('format')}, this code reads format "
                         f"{FORMAT_VERSION}; re-run the label stage")
    try:
        return LabelSettings(**found)
    except TypeError as exc:  # fields this code does not know (made by other code, same format)
        raise ValueError(f"{path}: label settings {sorted(found)} are not readable by this code "
                         f"({exc}); re-run the label stage") from exc


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
