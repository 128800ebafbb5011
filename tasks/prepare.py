"""Stage ``prepare``: raw corpus → tokenizer + train/val token blocks (parquet) + manifest.

Deterministic: the same corpus and ``data`` params give the same bytes. Streaming: memory
holds one encode batch (``data.batch_chars``), the tokenizer sample
(``data.tokenizer_sample_chars``) and what grows with the corpus: hashes and counters
(~100 bytes a document for dedup, ~0.5 kB a document in the manifest's index, 16 bytes a
block for the block dedup):

1. scan: read, normalise, cut long texts into pieces, exact-dedup by hash, spill each
   document to the partition of its hash (:func:`distill.corpus.scan_corpus`);
2. order: each partition's headers sorted by hash and its documents read back one at a
   time, the ``max_documents`` subset and the split decided, written as parquet in
   bounded row groups (hash order = file order);
3. train the tokenizer on the bounded sample the scan kept;
4. tokenise and pack (:func:`distill.blocks.tokenise_and_pack`), in this process or on
   Ray Data (``data.engine``): documents arrive in hash order and the writers pack them
   exactly as :func:`distill.blocks.pack_blocks_stable` would, shards written as they fill.
"""

from __future__ import annotations

import dataclasses
import hashlib
import resource
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill.blocks import DOCUMENT_SCHEMA, StableBlockWriter, iter_packed_rows, tokenise_and_pack
from distill.config import Config, DataConfig
from distill.corpus import check_split, is_val, iter_partition, scan_corpus
from distill.io import atomic_dir, write_json
from distill.tokenizer import encoder_json, load_tokenizer, tokenizer_hash, train_bpe
from tasks.common import PREPARED, log_to_mlflow, stage_main

SPLITS = ("train", "val")


@dataclasses.dataclass
class Ordered:
    """The documents kept, as hash-ordered parquet files, and their counts."""

    files: list[Path]
    documents: dict[str, int]
    chars: int
    documents_hash: str


def run(cfg: Config, out: Path = PREPARED) -> dict:
    """Build ``out`` (tokenizer/, train/, val/, manifest.json); returns the manifest."""
    d = cfg.data
    clock, peaks = [time.perf_counter()], []
    with atomic_dir(out) as tmp:
        spill = tmp / ".spill"
        scan = scan_corpus(d.source, d.text_field, d.max_doc_chars, spill / "docs",
                           max_documents=d.max_documents, val_fraction=d.val_fraction,
                           sample_chars=d.tokenizer_sample_chars if d.tokenizer == "bpe" else 0)
        stats = scan.stats
        print(f"corpus {d.source}: {stats.summary()}")
        clock.append(time.perf_counter())
        peaks.append(peak_rss_mb())
        ordered = order_documents(scan.partitions, scan.threshold, d.val_fraction, spill / "ordered",
                                  d.batch_chars)
        clock.append(time.perf_counter())
        peaks.append(peak_rss_mb())
        total = sum(ordered.documents.values())
        check_split(ordered.documents["train"], ordered.documents["val"], d.val_fraction, d.max_doc_chars)
        print(f"corpus {d.source}: {total} documents ({ordered.documents['train']} train / "
              f"{ordered.documents['val']} val, {ordered.chars:,} characters)")
        tokenizer = build_tokenizer(cfg, scan.sample, tmp / "tokenizer")
        sample = ({"documents": len(scan.sample), "chars": scan.sample_chars,
                   "limit_chars": d.tokenizer_sample_chars} if d.tokenizer == "bpe" else None)
        scan.sample = []  # the BPE is trained: free the sample before packing
        clock.append(time.perf_counter())
        peaks.append(peak_rss_mb())
        engine = choose_engine(d, ordered.chars)
        print(f"tokenise and pack: {engine} engine")
        splits, index = pack_splits(cfg, engine, ordered, encoder_json(tokenizer),
                                    tokenizer.eos_token_id, tmp, spill / "tails")
        shutil.rmtree(spill)
        clock.append(time.perf_counter())
        peaks.append(peak_rss_mb())
        manifest = {
            "source": d.source,
            # per-document content hashes (→ origin, offset, split, tokens): what changed between runs
            "documents": {"total": total, **ordered.documents, "hashes": index},
            "documents_hash": ordered.documents_hash,
            "corpus": dataclasses.asdict(stats),
            "tokenizer": {"hash": tokenizer_hash(tmp / "tokenizer"), "vocab_size": len(tokenizer),
                          "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id,
                          "sample": sample},
            "engine": engine,
            "block_size": d.block_size,
            "splits": splits,
        }
        write_json(tmp / "manifest.json", manifest)  # the completion marker, written last
    print(f"prepared {splits['train']['blocks']} train / {splits['val']['blocks']} val blocks of "
          f"{d.block_size} tokens, vocabulary {len(tokenizer)}")
    phases = dict(zip(("scan", "order", "tokenizer", "pack"), (b - a for a, b in zip(clock, clock[1:]))))
    print("prepare seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    # the process's peak so far at the end of each phase: which one sets it
    print("prepare peak RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in zip(phases, peaks)))
    log_to_mlflow(params={"data": dataclasses.asdict(d)},
                  metrics={"documents": {k: manifest["documents"][k] for k in ("total", *SPLITS)},
                           "blocks": {k: v["blocks"] for k, v in splits.items()},
                           "tokens": {k: v["tokens"] for k, v in splits.items()},
                           "undecodable": stats.undecodable_count, "duplicates": stats.duplicates,
                           "empty": stats.empty, "split_texts": stats.split_texts})
    return manifest


def order_documents(partitions: list[Path], threshold: str, val_fraction: float,
                    out_dir: Path, batch_chars: int) -> Ordered:
    """Each spill partition in hash order, with its split, as one parquet file written in
    batches of at most 1024 documents or ``batch_chars`` characters (memory: one batch and
    the partition's hashes); the files in order hold the documents in hash order."""
    out_dir.mkdir(parents=True)
    files, counts, chars = [], dict.fromkeys(SPLITS, 0), 0
    digest = hashlib.sha256()   # over the kept hashes in order: the documents' identity
    for i, part in enumerate(partitions):
        path = out_dir / f"docs-{i:03d}.parquet"
        writer, batch, batch_size = None, [], 0
        for doc in iter_partition(part, threshold):
            split = "val" if is_val(doc.sha, val_fraction) else "train"
            counts[split] += 1
            digest.update(doc.sha.encode())
            chars += len(doc.text)
            batch.append((doc.sha, doc.origin, doc.offset, split, doc.text))
            batch_size += len(doc.text)
            if len(batch) == 1024 or batch_size >= batch_chars:
                writer = _write_documents(writer, path, batch)
                batch, batch_size = [], 0
        if batch:
            writer = _write_documents(writer, path, batch)
        part.unlink()
        if writer is not None:
            writer.close()
            files.append(path)
    return Ordered(files=files, documents=counts, chars=chars, documents_hash=digest.hexdigest())


def _write_documents(writer: pq.ParquetWriter | None, path: Path,
                     rows: list[tuple]) -> pq.ParquetWriter:
    """Append ``rows`` (sha, origin, offset, split, text) to ``path`` as one row group."""
    writer = writer or pq.ParquetWriter(path, DOCUMENT_SCHEMA, compression="none")
    columns = list(zip(*rows))
    writer.write_table(pa.table(dict(zip(DOCUMENT_SCHEMA.names, map(list, columns))),
                                schema=DOCUMENT_SCHEMA))
    return writer


def peak_rss_mb() -> float:
    """This process's own peak resident memory so far, MB: ``VmHWM`` of /proc/self/status.
    Not ``ru_maxrss``: Linux carries the parent's peak into a child over fork/vfork + exec,
    so a stage started by a 1 GB process would report 1 GB (``ru_maxrss`` is the fallback
    where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def choose_engine(d: DataConfig, chars: int) -> str:
    """``data.engine``, with ``auto`` = Ray Data above ``data.ray_above_mb`` of text."""
    if d.engine != "auto":
        return d.engine
    return "ray" if chars > d.ray_above_mb * 1e6 else "local"


def pack_splits(cfg: Config, engine: str, ordered: Ordered, tokenizer_json: str, eos_id: int,
                out: Path, spill: Path) -> tuple[dict, dict]:
    """Tokenise the hash-ordered documents and pack each split into shards under ``out``;
    returns the splits' manifest entries and the documents' index."""
    d = cfg.data
    files, chars, documents = ordered.files, ordered.chars, sum(ordered.documents.values())
    writers = {name: StableBlockWriter(out / name, d.block_size, d.shard_blocks, d.tail_buckets,
                                       spill / name) for name in SPLITS}
    tokens = dict.fromkeys(SPLITS, 0)
    index = {}
    if engine == "ray":
        # Ray Data batches by rows: as many as make data.batch_chars of an average document
        rows = max(1, round(d.batch_chars * documents / max(chars, 1)))
        batches = iter_packed_ray(cfg, files, tokenizer_json, eos_id, rows)
    else:
        batches = iter_packed_local(files, tokenizer_json, eos_id, d)
    for table in batches:
        for row, full, tail in iter_packed_rows(table, d.block_size):
            writers[row["split"]].add_document(row["sha"], full, tail)
            tokens[row["split"]] += row["tokens"] + 1
            index[row["sha"]] = {"origin": row["origin"], "offset": row["offset"],
                                 "split": row["split"], "tokens": row["tokens"]}
    splits = {}
    for name, writer in writers.items():
        shards = writer.finish()
        if writer.blocks == 0:
            raise ValueError(f"data.block_size: the {name} split has {tokens[name]} tokens, less "
                             f"than one block of {d.block_size}; lower data.block_size or add text")
        splits[name] = {"documents": sum(1 for v in index.values() if v["split"] == name),
                        "tokens": tokens[name], "blocks": writer.blocks, "shards": shards}
    return splits, index


def iter_packed_local(files: list[Path], tokenizer_json: str, eos_id: int,
                      d: DataConfig) -> Iterator[pa.Table]:
    """:func:`tokenise_and_pack` over the documents in this process, in batches of about
    ``data.batch_chars`` characters across the files (small partitions would starve the
    tokenizer's threads; the encoder's output costs ~100 bytes a token). A batch ends at
    the document that fills it (at most one document, ``max_doc_chars``, over): parquet
    batches are cut, since 64 long documents would make a batch of 12 M characters."""
    pending, chars = [], 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            lengths = pc.utf8_length(batch.column("text")).to_numpy(zero_copy_only=False)
            start = 0
            for i, n in enumerate(lengths.tolist()):
                chars += n
                if chars >= d.batch_chars:
                    pending.append(batch.slice(start, i + 1 - start))
                    yield tokenise_and_pack(pa.Table.from_batches(pending), tokenizer_json, eos_id,
                                            d.block_size)
                    pending, chars, start = [], 0, i + 1
            if start < len(batch):
                pending.append(batch.slice(start))
    if pending:
        yield tokenise_and_pack(pa.Table.from_batches(pending), tokenizer_json, eos_id, d.block_size)


def iter_packed_ray(cfg: Config, files: list[Path], tokenizer_json: str, eos_id: int,
                    rows_per_batch: int) -> Iterator[pa.Table]:
    """:func:`tokenise_and_pack` on Ray Data (``read_parquet`` → ``map_batches``), results
    in the documents' order. The files must be readable by every node (shared storage on
    a cluster; a local Ray on this machine always can)."""
    import ray

    from distill.raylocal import init_ray

    init_ray(cfg.ray)
    options = ray.data.DataContext.get_current().execution_options
    kept, options.preserve_order = options.preserve_order, True   # the packing needs hash order
    try:
        ds = ray.data.read_parquet([str(p) for p in files], shuffle=None)
        ds = ds.map_batches(tokenise_and_pack, batch_format="pyarrow",
                            batch_size=rows_per_batch,
                            fn_kwargs={"tokenizer_json": tokenizer_json, "eos_id": eos_id,
                                       "block_size": cfg.data.block_size})
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)
    finally:
        options.preserve_order = kept


def build_tokenizer(cfg: Config, train_texts: list[str], out_dir: Path):
    """Train the byte-level BPE (``data.tokenizer: bpe``) or copy a local HF tokenizer."""
    if cfg.data.tokenizer == "bpe":
        return train_bpe(train_texts, cfg.data.vocab_size, out_dir)
    tok = load_tokenizer(cfg.data.tokenizer, cfg.teacher.trust_remote_code)
    tok.save_pretrained(str(out_dir))
    return tok


def main() -> None:
    """``python -m tasks.prepare``."""
    stage_main("prepare", run)


if __name__ == "__main__":
    main()
