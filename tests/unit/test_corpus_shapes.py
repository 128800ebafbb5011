"""Corpora of other shapes: one big file, long documents, bad inputs named by file and line,
and the streaming pieces (normaliser, cutter, block writer) equal to their in-memory forms."""

import dataclasses
import json
import os
import random

import numpy as np
import pytest

from distill.blocks import (BlockIdSet, StableBlockWriter, document_blocks, pack_blocks_stable,
                            write_block_shards)
from distill.corpus import (CorpusError, CorpusStats, _PieceCutter, _StreamNormaliser,
                            iter_documents, iter_partition, load_documents, normalise, scan_corpus, split_text)
from distill.io import sha256_tree

WORDS = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta", "theta", "iota", "kappa",
         "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon"]


def book(chars: int, seed: int = 0) -> str:
    """A seeded text of about ``chars`` characters: paragraphs of lines of words, with
    trailing spaces and CRLF line ends here and there (normalising changes it)."""
    rng = random.Random(seed)
    paras, size = [], 0
    while size < chars:
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(4, 14))) + rng.choice(["", "  ", "\t"])
                 for _ in range(rng.randint(1, 9))]
        para = rng.choice(["\n", "\r\n"]).join(lines)
        paras.append(para)
        size += len(para) + 2
    return "\n\n".join(paras)


def test_one_big_file_prepares_into_train_and_val_with_every_character(tmp_path, monkeypatch):
    from distill.config import build_config
    from tasks.prepare import run

    raw = book(2_000_000)
    path = tmp_path / "book.txt"
    path.write_text(raw, newline="")
    assert path.stat().st_size >= 2_000_000
    text = normalise(raw)
    stats = CorpusStats(source=str(path))
    pieces = list(iter_documents(str(path), "text", 20_000, stats))
    assert "".join(p.text for p in pieces) == text          # nothing cut off, nothing added
    assert sum(len(p.text) for p in pieces) == len(text) == stats.chars
    assert [p.offset for p in pieces] == list(np.cumsum([0] + [len(p.text) for p in pieces[:-1]]))
    assert all(p.text.endswith("\n\n") for p in pieces[:-1])  # cut at paragraph boundaries
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"data": {"source": str(path), "max_doc_chars": 20_000, "vocab_size": 300,
                                 "val_fraction": 0.1, "block_size": 64, "engine": "local"}})
    manifest = run(cfg, tmp_path / "prepared")
    docs = manifest["documents"]
    assert docs["train"] > 0 and docs["val"] > 0 and docs["total"] == len(pieces)
    assert manifest["corpus"]["chars"] == len(text) and manifest["corpus"]["split_texts"] == 1
    assert sorted(v["offset"] for v in docs["hashes"].values()) == [p.offset for p in pieces]
    assert {v["origin"] for v in docs["hashes"].values()} == {str(path)}


def test_a_long_record_is_split_not_cut(tmp_path):
    long = "\n\n".join(f"paragraph {i} " + "word " * 30 for i in range(200))
    one_line = "".join(chr(97 + i % 26) for i in range(2500))
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"text": long}) + "\n" + json.dumps({"text": one_line}) + "\n")
    docs, stats = load_documents(str(path), "text", 1000)
    by_origin = {}
    for doc in sorted(docs, key=lambda d: (d.origin, d.offset)):
        by_origin.setdefault(doc.origin, []).append(doc)
    assert "".join(d.text for d in by_origin[f"{path}:1"]) == normalise(long)
    assert all(len(d.text) <= 1000 for d in docs) and stats.split_texts == 2
    assert all(d.text.endswith("\n\n") for d in by_origin[f"{path}:1"][:-1])
    # a line longer than a piece is cut at a character boundary, still nothing lost
    assert [len(d.text) for d in by_origin[f"{path}:2"]] == [1000, 1000, 500]


def test_cut_prefers_paragraphs_then_lines_then_characters():
    text = "a" * 60 + "\n\n" + "b" * 30 + "\n" + "c" * 100
    assert [p for _, p in split_text(text, 80)][0] == "a" * 60 + "\n\n"
    assert split_text("b" * 50 + "\n" + "c" * 40, 80)[0][1] == "b" * 50 + "\n"
    assert [len(p) for _, p in split_text("z" * 170, 80)] == [80, 80, 10]


def test_streamed_normalise_and_cut_equal_the_whole_text():
    rng = random.Random(1)
    # CJK, Hangul jamo that compose (L+V, LV+T), an ideographic space: the long-line cuts
    alphabet = ["a", "b", " ", "\t", "\n", "\r", "\r\n", "e\u0301", "\u0301", "x  ", "\u4e00",
                "\u1100", "\u1161", "\uac00", "\u11a8", "\u3000", "\u212b", "\u0344"]
    for _ in range(2000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        norm, out, i = _StreamNormaliser(long_line=rng.randint(1, 20)), [], 0
        while i < len(raw):
            k = rng.randint(1, 7)
            out.append(norm.feed(raw[i:i + k]))
            i += k
        out.append(norm.feed("", final=True))
        text = normalise(raw)
        assert "".join(out) == text, repr(raw)
        size = rng.randint(2, 12)
        cutter, pieces, j = _PieceCutter(size), [], 0
        while j < len(text):
            k = rng.randint(1, 9)
            pieces += cutter.feed(text[j:j + k])
            j += k
        pieces += cutter.finish()
        assert pieces == split_text(text, size)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", ["cjk", "base64", "combining"])
def test_a_long_line_without_spaces_is_cut_in_linear_time(tmp_path, shape):
    """A one-line file with no ASCII whitespace (CJK text, base64) or no character NFC may
    restart at: 4 M characters read 4 kB at a time (2 000 to 3 000 reads) with a
    256-character long-line limit. A normaliser that rescans its unfinished line at each
    read does billions of character steps (many minutes); a linear one takes a second."""
    rng = random.Random(3)
    n = 4_000_000
    if shape == "cjk":
        text = "".join(chr(0x4E00 + rng.randrange(20_000)) for _ in range(n))
    elif shape == "base64":
        import base64
        text = base64.b64encode(rng.randbytes(n * 3 // 4)).decode()
    else:  # only combining marks after one letter: no cut point at all until the end
        text = "a" + "\u0301" * (n - 1)
    raw = text.encode()
    norm, cutter, pieces = _StreamNormaliser(long_line=256), _PieceCutter(200_000), []
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")()
    for i in range(0, len(raw), 4096):
        pieces += cutter.feed(norm.feed(decoder.decode(raw[i:i + 4096])))
    pieces += cutter.feed(norm.feed(decoder.decode(b"", final=True), final=True))
    pieces += cutter.finish()
    whole = normalise(text)
    assert "".join(p for _, p in pieces) == whole          # every character accounted for
    assert [o for o, _ in pieces] == list(range(0, len(whole), 200_000))
    assert max(len(p) for _, p in pieces) == 200_000


def test_stable_block_writer_equals_the_in_memory_packing(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 50, rng.integers(1, 90)).tolist() for _ in range(120)]
    docs.append(docs[3][:])  # repeated blocks are dropped the same way
    hashes = [f"{rng.integers(0, 2**63):016x}{i:048x}" for i in range(len(docs))]
    blocks = pack_blocks_stable(docs, hashes, 0, 8, tail_buckets=3)
    write_block_shards(blocks, tmp_path / "memory", shard_blocks=10)
    writer = StableBlockWriter(tmp_path / "stream", 8, 10, 3, tmp_path / "spill")
    for h, toks in sorted(zip(hashes, docs)):
        writer.add_document(h, *document_blocks(toks, 0, 8))
    writer.finish()
    assert writer.blocks == len(blocks)
    assert sha256_tree(tmp_path / "memory") == sha256_tree(tmp_path / "stream")
    with pytest.raises(ValueError, match="out of hash order"):
        w = StableBlockWriter(tmp_path / "x", 8, 10, 3, tmp_path / "spill2")
        w.add_document("b" * 64, *document_blocks([1], 0, 8))
        w.add_document("a" * 64, *document_blocks([1], 0, 8))


def test_block_id_set_is_a_set_across_merges():
    rng = random.Random(5)
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(3000)]
    ids += [f"{0:016x}{i:016x}" for i in range(50)] + [f"{2**64 - 1:016x}{i:016x}" for i in range(50)]
    ids_set, seen = BlockIdSet(buffer=64), set()          # many merges; equal first halves
    for bid in ids + ids[::7] + rng.sample(ids, 500):
        assert ids_set.add(bid) == (bid not in seen), bid
        seen.add(bid)
    assert len(ids_set) == len(seen) == 3100


def test_scan_partitions_come_back_in_hash_order_without_loading_them(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    texts = {f"{i}.txt": book(2000, seed=i) for i in range(300)}
    for name, text in texts.items():
        (folder / name).write_text(text)
    scan = scan_corpus(str(folder), "text", 10_000, tmp_path / "s", max_documents=120,
                       val_fraction=0.2, sample_chars=0)
    docs, _ = load_documents(str(folder), "text", 10_000, max_documents=120)
    streamed = [doc for part in scan.partitions for doc in iter_partition(part, scan.threshold)]
    assert scan.unique == 300 and scan.threshold == docs[-1].sha
    assert streamed == docs                     # texts, origins, offsets; in hash order


def test_local_encode_batches_hold_batch_chars(tmp_path):
    """A batch ends at the document that fills ``data.batch_chars``, however the parquet
    batches run (64 documents of 200 000 characters would be 12.8 M in one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill.blocks import DOCUMENT_SCHEMA
    from distill.config import build_config
    from distill.tokenizer import encoder_json, train_bpe
    from tasks.prepare import iter_packed_local

    texts = [book(rng_size, seed=i) for i, rng_size in enumerate([900, 2500, 300] * 60)]
    rows = {"sha": [f"{i:064x}" for i in range(len(texts))], "origin": ["x"] * len(texts),
            "offset": [0] * len(texts), "split": ["train"] * len(texts), "text": texts}
    pq.write_table(pa.table(rows, schema=DOCUMENT_SCHEMA), tmp_path / "d.parquet", row_group_size=100)
    tok = train_bpe(texts[:20], 300, tmp_path / "tok")
    d = build_config({"data": {"batch_chars": 5000, "block_size": 16}}).data
    tables = list(iter_packed_local([tmp_path / "d.parquet"], encoder_json(tok), tok.eos_token_id, d))
    sizes = [sum(len(texts[int(sha, 16)]) for sha in t.column("sha").to_pylist()) for t in tables]
    assert sum(t.num_rows for t in tables) == len(texts)
    assert all(5000 <= n < 5000 + max(map(len, texts)) for n in sizes[:-1]), sizes


def test_tokenizer_sample_is_a_bounded_hash_ordered_prefix(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    for i in range(50):
        (folder / f"{i}.txt").write_text(book(3000, seed=i))
    whole = scan_corpus(str(folder), "text", 10_000, tmp_path / "s1", max_documents=0,
                        val_fraction=0.2, sample_chars=10**9)
    small = scan_corpus(str(folder), "text", 10_000, tmp_path / "s2", max_documents=0,
                        val_fraction=0.2, sample_chars=40_000)
    assert 0 < small.sample_chars <= 40_000 < whole.sample_chars
    assert small.sample == whole.sample[:len(small.sample)]           # a prefix in hash order
    assert whole.sample_chars < sum(len(book(3000, seed=i)) for i in range(50))  # val left out


# ---------------------------------------------------------------- bad inputs name file and line


def test_empty_file_is_named(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(CorpusError, match=r"no usable documents .*1 empty: .*empty.txt: empty"):
        load_documents(str(tmp_path), "text", 1000)


def test_binary_file_is_named_with_its_line(tmp_path):
    (tmp_path / "ok.txt").write_text("fine text here")
    (tmp_path / "blob.txt").write_bytes(b"line one\nline two\nthree\x00\x01\x02")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\nsecond\n")
    docs, stats = load_documents(str(tmp_path), "text", 1000)
    assert len(docs) == 1
    assert stats.undecodable == [f"{tmp_path / 'blob.txt'}:3: binary (a NUL byte), not text",
                                 f"{tmp_path / 'latin1.txt'}:1: not UTF-8 (invalid continuation byte)"]
    assert "undecodable: " in stats.summary() and "blob.txt:3" in stats.summary()


def test_jsonl_line_without_the_text_field_is_named(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "a"}\n\n{"body": "b"}\n')
    with pytest.raises(CorpusError, match=r"r.jsonl:3: no string field 'text' \(found \['body'\]\); "
                                          r"set data.text_field"):
        load_documents(str(path), "text", 1000)
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(CorpusError, match=r"r.jsonl:2: not valid JSON"):
        load_documents(str(path), "text", 1000)


def test_unreadable_folder_is_named(tmp_path, monkeypatch):
    locked = tmp_path / "corpus" / "locked"
    locked.mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("text")
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads any folder: make listing this one fail as it would for a user
        real = os.scandir

        def scandir(path):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        with pytest.raises(CorpusError, match=r"locked: cannot list this corpus folder "
                                              r"\(Permission denied\); make it readable"):
            load_documents(str(tmp_path / "corpus"), "text", 1000)
    finally:
        locked.chmod(0o755)


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("text")
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    real_open = open

    def deny(path, *args, **kwargs):  # root reads any file: fail as it would for a user
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(CorpusError, match=r"locked.txt: cannot read this corpus file "
                                          r"\(Permission denied\); make it readable"):
        load_documents(str(tmp_path), "text", 1000)


def test_dropped_text_is_counted_in_the_manifest_and_printed(tmp_path, monkeypatch, capsys):
    """Duplicates, empty texts (a file, a jsonl record) and undecodable files: each counted
    in the manifest, with the first few named by file and line, and printed."""
    from distill.config import build_config
    from tasks.prepare import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i:02d}.txt").write_text(book(2000, seed=i))
    (corpus / "copy.txt").write_text(book(2000, seed=0))
    (corpus / "blank.md").write_text("\n  \n")
    (corpus / "blob.txt").write_bytes(b"one\ntwo\x00")
    (corpus / "r.jsonl").write_text(json.dumps({"text": book(500, seed=99)}) + "\n"
                                    + json.dumps({"text": "  "}) + "\n")
    monkeypatch.chdir(tmp_path)
    manifest = run(build_config({"data": {"source": str(corpus), "vocab_size": 300, "block_size": 16,
                                          "val_fraction": 0.2, "max_documents": 0}}),
                   tmp_path / "out")
    c = manifest["corpus"]
    assert (c["duplicates"], c["empty"], c["undecodable_count"]) == (1, 2, 1)
    assert c["empty_examples"] == [f"{corpus / 'blank.md'}: empty", f"{corpus / 'r.jsonl'}:2: empty"]
    assert c["undecodable"] == [f"{corpus / 'blob.txt'}:2: binary (a NUL byte), not text"]
    assert manifest["documents"]["total"] == 13
    printed = capsys.readouterr().out
    assert "dropped 1 duplicates" in printed and "2 empty, 1 undecodable" in printed
    assert "blob.txt:2: binary" in printed and "r.jsonl:2: empty" in printed


def test_single_document_split_advice_is_actionable(tmp_path):
    from distill.corpus import split_by_hash

    (tmp_path / "one.txt").write_text("just one short document")
    docs, _ = load_documents(str(tmp_path), "text", 1000)
    with pytest.raises(CorpusError, match=r"add documents, or lower data.max_doc_chars \(now 1000\)"):
        split_by_hash(docs, 0.1, 1000)


def test_added_documents_leave_the_blocks_of_the_others(tmp_path, monkeypatch):
    """With a fixed tokenizer, adding documents keeps every full block of the old ones (the
    label cache relabels only the new documents' blocks and a few tail blocks)."""
    import shutil

    from distill.blocks import read_blocks
    from distill.config import build_config
    from tasks.prepare import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i:02d}.txt").write_text(book(2500, seed=i))
    monkeypatch.chdir(tmp_path)
    data = {"source": str(corpus), "vocab_size": 300, "block_size": 32, "val_fraction": 0.2,
            "tail_buckets": 8, "max_doc_chars": 1500}
    run(build_config({"data": data}), tmp_path / "first")
    shutil.copytree(tmp_path / "first" / "tokenizer", tmp_path / "tok")
    fixed = {**data, "tokenizer": str(tmp_path / "tok")}
    before = set(read_blocks(tmp_path / "first" / "train")[0])
    for i in range(30, 33):
        (corpus / f"{i:02d}.txt").write_text(book(2500, seed=i))
    run(build_config({"data": fixed}), tmp_path / "second")
    after = set(read_blocks(tmp_path / "second" / "train")[0])
    assert len(before & after) / len(before) > 0.85


def test_streaming_prepare_writes_the_bytes_of_the_in_memory_one(tmp_path, monkeypatch):
    """The streamed stage = the in-memory path it replaced (load all, split, train the BPE on
    the train texts, tokenise with the HF tokenizer, pack, write) when no text is cut."""
    from distill.config import build_config
    from distill.corpus import split_by_hash
    from distill.tokenizer import train_bpe
    from tasks.prepare import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i:02d}.txt").write_text(book(1500 + 97 * i, seed=i))
    (corpus / "dup.txt").write_text(book(1500, seed=0))
    monkeypatch.chdir(tmp_path)
    d = build_config({"data": {"source": str(corpus), "vocab_size": 300, "block_size": 16,
                               "val_fraction": 0.2, "tail_buckets": 4, "shard_blocks": 50,
                               "max_documents": 30, "batch_chars": 4000}}).data
    manifest = run(build_config({"data": dataclasses.asdict(d)}), tmp_path / "stream")
    docs, _ = load_documents(d.source, d.text_field, d.max_doc_chars, d.max_documents)
    train, val = split_by_hash(docs, d.val_fraction)
    tok = train_bpe([doc.text for doc in train], d.vocab_size, tmp_path / "memory" / "tokenizer")
    for name, split in (("train", train), ("val", val)):
        ids = tok([doc.text for doc in split], add_special_tokens=False)["input_ids"]
        blocks = pack_blocks_stable(ids, [doc.sha for doc in split], tok.eos_token_id,
                                    d.block_size, d.tail_buckets)
        write_block_shards(blocks, tmp_path / "memory" / name, d.shard_blocks)
    for part in ("train", "val", "tokenizer"):
        assert sha256_tree(tmp_path / "stream" / part) == sha256_tree(tmp_path / "memory" / part)
    assert manifest["documents"]["total"] == 30 and manifest["corpus"]["duplicates"] == 1
