"""Stage ``prepare``: raw corpus → tokenizer + train/val token blocks (parquet) + manifest.

Deterministic: the same corpus and ``data`` params give the same bytes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from distill.blocks import pack_blocks_stable, write_block_shards
from distill.config import Config, DataConfig
from distill.corpus import load_documents, split_by_hash
from distill.io import atomic_dir, sha256_bytes, write_json
from distill.tokenizer import load_tokenizer, tokenizer_hash, train_bpe
from tasks.common import PREPARED, log_to_mlflow, stage_main


def run(cfg: Config, out: Path = PREPARED) -> dict:
    """Build ``out`` (tokenizer/, train/, val/, manifest.json); returns the manifest."""
    d = cfg.data
    docs, stats = load_documents(d.source, d.text_field, d.max_doc_chars, d.max_documents)
    train_docs, val_docs = split_by_hash(docs, d.val_fraction)
    print(f"corpus {d.source}: {len(docs)} documents ({len(train_docs)} train / {len(val_docs)} val), "
          f"{stats.duplicates} duplicates dropped, {len(stats.undecodable)} undecodable files skipped")
    with atomic_dir(out) as tmp:
        tokenizer = build_tokenizer(cfg, [doc.text for doc in train_docs], tmp / "tokenizer")
        splits, index = {}, {}
        for name, split_docs in (("train", train_docs), ("val", val_docs)):
            splits[name], index[name] = write_split(tokenizer, split_docs, d, tmp / name)
        manifest = {
            "source": d.source,
            # per-document content hashes (→ origin, split, tokens): what changed between runs
            "documents": {"total": len(docs), "train": len(train_docs), "val": len(val_docs),
                          "hashes": {**index["train"], **index["val"]}},
            "documents_hash": sha256_bytes("".join(doc.sha for doc in docs).encode()),
            "corpus": {**dataclasses.asdict(stats), "undecodable_count": len(stats.undecodable)},
            "tokenizer": {"hash": tokenizer_hash(tmp / "tokenizer"), "vocab_size": len(tokenizer),
                          "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id},
            "block_size": d.block_size,
            "splits": splits,
        }
        write_json(tmp / "manifest.json", manifest)  # the completion marker, written last
    print(f"prepared {splits['train']['blocks']} train / {splits['val']['blocks']} val blocks of "
          f"{d.block_size} tokens, vocabulary {len(tokenizer)}")
    log_to_mlflow(params={"data": dataclasses.asdict(d)},
                  metrics={"documents": {k: manifest["documents"][k] for k in ("total", "train", "val")},
                           "blocks": {k: v["blocks"] for k, v in splits.items()},
                           "tokens": {k: v["tokens"] for k, v in splits.items()},
                           "undecodable": len(stats.undecodable), "duplicates": stats.duplicates})
    return manifest


def build_tokenizer(cfg: Config, train_texts: list[str], out_dir: Path):
    """Train the byte-level BPE (``data.tokenizer: bpe``) or copy a local HF tokenizer."""
    if cfg.data.tokenizer == "bpe":
        return train_bpe(train_texts, cfg.data.vocab_size, out_dir)
    tok = load_tokenizer(cfg.data.tokenizer, cfg.teacher.trust_remote_code)
    tok.save_pretrained(str(out_dir))
    return tok


def write_split(tokenizer, docs, d: DataConfig, out_dir: Path) -> tuple[dict, dict]:
    """Tokenise, pack (stable under added documents) and write one split; returns its
    manifest entry and its documents' index (hash → origin, split, tokens)."""
    token_lists = tokenizer([doc.text for doc in docs], add_special_tokens=False)["input_ids"]
    blocks = pack_blocks_stable(token_lists, [doc.sha for doc in docs], tokenizer.eos_token_id,
                                d.block_size, d.tail_buckets)
    if len(blocks) == 0:
        raise ValueError(f"data.block_size: {out_dir.name} split has "
                         f"{sum(map(len, token_lists))} tokens, less than one block of {d.block_size}")
    shards = write_block_shards(blocks, out_dir, d.shard_blocks)
    index = {doc.sha: {"origin": doc.origin, "split": out_dir.name, "tokens": len(toks)}
             for doc, toks in zip(docs, token_lists)}
    return ({"documents": len(docs), "tokens": int(sum(len(t) + 1 for t in token_lists)),
             "blocks": int(len(blocks)), "shards": shards}, index)


def main() -> None:
    """``python -m tasks.prepare``."""
    stage_main("prepare", run)


if __name__ == "__main__":
    main()
