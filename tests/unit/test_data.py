"""Corpus reading, the hash split, the tokenizer and block packing: deterministic and strict."""

import json

import numpy as np
import pytest

from distill.blocks import pack_blocks, read_blocks, write_block_shards
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
    assert stats.undecodable == [str(corpus / "bad.txt")]
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
