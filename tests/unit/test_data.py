"""Corpus reading, the hash split, the tokenizer and block packing: deterministic and strict."""

import json

import numpy as np
import pytest

from distill.blocks import block_id, pack_blocks, pack_blocks_stable, read_blocks, write_block_shards
from distill.corpus import CorpusError, load_documents, normalise, split_by_hash, stdlib_files
from distill.io import sha256_file, sha256_tree
from distill.tokenizer import train_bpe

TEXTS = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * (3 + i % 5) for i in range(60)]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder


def test_normalise():
    assert normalise("a  \r\nb\t\r\n\n\n") == "a\nb"
    assert normalise("\u0065\u0301") == "\u00e9"  # NFC


def test_documents_dedup_and_count_undecodable(corpus):
    (corpus / "dup.txt").write_text(TEXTS[0] + "   \n")  # same after normalising
    (corpus / "bad.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    (corpus / "empty.txt").write_text("  \n")
    docs, stats = load_documents(str(corpus), "text", 10_000)
    assert len(docs) == len(TEXTS)
    assert stats.duplicates == 1 and stats.empty == 1
    assert stats.undecodable == [f"{corpus / 'bad.txt'}:1: not UTF-8 (invalid start byte)"]
    assert stats.undecodable_count == 1 and stats.empty_examples == [f"{corpus / 'empty.txt'}: empty"]
    assert [d.sha for d in docs] == sorted(d.sha for d in docs)


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS[:5]))
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": TEXTS[5:9]}), parquet)
    docs, stats = load_documents(str(tmp_path), "text", 10_000)
    assert len(docs) == 9 and stats.records_read == 9


def test_corpus_errors_name_the_cause(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_documents(str(tmp_path / "missing"), "text", 100)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.txt").write_text("\n")
    with pytest.raises(CorpusError, match="no usable documents"):
        load_documents(str(tmp_path / "e"), "text", 100)
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match=r"r.jsonl:1: no string field 'text'"):
        load_documents(str(bad), "text", 100)


def test_split_depends_on_content_not_order(corpus):
    docs, _ = load_documents(str(corpus), "text", 10_000)
    train, val = split_by_hash(docs, 0.2)
    train2, val2 = split_by_hash(list(reversed(docs)), 0.2)
    assert {d.sha for d in val} == {d.sha for d in val2}
    assert train and val and len(train) + len(val) == len(docs)


def test_stdlib_corpus_excludes_tests():
    files = stdlib_files()
    assert len(files) > 100
    assert not any("/test/" in str(f) or "/tests/" in str(f) for f in files)


def test_tokenizer_training_is_deterministic(tmp_path):
    train_bpe(TEXTS, 300, tmp_path / "a")
    train_bpe(TEXTS, 300, tmp_path / "b")
    assert sha256_file(tmp_path / "a" / "tokenizer.json") == sha256_file(tmp_path / "b" / "tokenizer.json")


def test_pack_blocks_concatenates_with_eos():
    blocks = pack_blocks([[1, 2, 3], [4, 5], [6]], eos_id=0, block_size=4)
    assert blocks.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]]  # the tail [0] is dropped
    assert blocks.dtype == np.int32


def test_block_shards_round_trip_and_same_bytes(tmp_path):
    blocks = np.arange(5 * 8, dtype=np.int32).reshape(5, 8)
    entries = write_block_shards(blocks, tmp_path / "a", shard_blocks=2)
    write_block_shards(blocks, tmp_path / "b", shard_blocks=2)
    assert [e["blocks"] for e in entries] == [2, 2, 1]
    ids, back = read_blocks(tmp_path / "a")
    assert np.array_equal(back, blocks) and len(set(ids)) == 5
    assert sha256_tree(tmp_path / "a") == sha256_tree(tmp_path / "b")


def test_corrupt_shard_names_its_file(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "shard-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="shard-00000.parquet: corrupt"):
        read_blocks(tmp_path / "s")


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 500, rng.integers(3, 60)).tolist() for _ in range(n)]
    return docs, [f"{rng.integers(0, 2**63):016x}{i:048x}" for i in range(n)]


def test_stable_packing_keeps_blocks_when_documents_are_added():
    """Adding 10 % documents leaves most old blocks unchanged (positional packing: almost none)."""
    docs, hashes = _docs(200)
    new_docs, new_hashes = _docs(20, seed=1)
    before = {block_id(b) for b in pack_blocks_stable(docs, hashes, 0, 16, tail_buckets=16)}
    after = pack_blocks_stable(docs + new_docs, hashes + new_hashes, 0, 16, tail_buckets=16)
    after_ids = {block_id(b) for b in after}
    kept = len(before & after_ids) / len(before)
    assert kept > 0.8, kept
    positional = ({block_id(b) for b in pack_blocks(docs, 0, 16)}
                  & {block_id(b) for b in pack_blocks(docs[:100] + new_docs + docs[100:], 0, 16)})
    assert len(positional) / len(before) < 0.7
    # every document's full blocks are its own: those of the old documents never change
    own = {block_id(b) for d in docs for b in pack_blocks([d], 0, 16)}
    assert own <= after_ids and own <= before


def test_stable_packing_ignores_document_order_and_covers_tokens():
    docs, hashes = _docs(50)
    a = pack_blocks_stable(docs, hashes, 0, 8, tail_buckets=4)
    order = np.random.default_rng(3).permutation(50)
    b = pack_blocks_stable([docs[i] for i in order], [hashes[i] for i in order], 0, 8, tail_buckets=4)
    assert np.array_equal(a, b) and a.dtype == np.int32 and a.shape[1] == 8
    total = sum(len(d) + 1 for d in docs)
    assert total - 4 * 8 < a.size <= total  # at most one partial block lost per bucket
    one = pack_blocks_stable([[1, 2, 3, 4, 5, 6, 7]], ["ab" * 32], 0, 4, tail_buckets=4)
    assert one.tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]]


def test_stable_packing_drops_repeated_blocks():
    doc = [5, 6, 7, 8] * 3
    blocks = pack_blocks_stable([doc, doc + [1]], ["a" * 64, "b" * 64], 0, 4, tail_buckets=1)
    assert len({tuple(b) for b in blocks.tolist()}) == len(blocks)


def test_manifest_records_document_hashes(tmp_path, monkeypatch):
    """prepare writes per-document hashes (origin, split, tokens) under ``documents``."""
    from distill.config import build_config
    from tasks.prepare import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(f"document number {i} " + "some words here " * (20 + i))
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"data": {"source": str(corpus), "vocab_size": 300, "block_size": 16,
                                 "val_fraction": 0.3, "tail_buckets": 4}})
    manifest = run(cfg, tmp_path / "prepared")
    hashes = manifest["documents"]["hashes"]
    assert len(hashes) == manifest["documents"]["total"] == 12
    assert {h["split"] for h in hashes.values()} == {"train", "val"}
    assert all(h["origin"].endswith(".txt") and h["tokens"] > 0 for h in hashes.values())
