"""The Ray Data engine of ``prepare`` writes the same bytes as the in-process one."""

from __future__ import annotations

import random

import pytest

from distill.config import build_config
from distill.io import read_json, sha256_tree

pytestmark = pytest.mark.integration


def write_corpus(folder, seed=0):
    """Files of seeded random words: many small ones and one long one that gets cut."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(400)] + ["def", "return", "the", "and", "of"]
    folder.mkdir()
    for i in range(40):
        paras = ["\n".join(" ".join(rng.choices(words, k=rng.randint(3, 12)))
                           for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 8))]
        (folder / f"doc{i:03d}.txt").write_text("\n\n".join(paras) + "\n")
    (folder / "long.txt").write_text("\n\n".join(" ".join(rng.choices(words, k=50)) for _ in range(400)))


def test_ray_engine_writes_the_same_bytes(tmp_path, monkeypatch, shared_ray):
    import ray

    from tasks.prepare import run

    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    monkeypatch.chdir(tmp_path)
    base = {"source": str(corpus), "vocab_size": 400, "block_size": 32, "shard_blocks": 64,
            "val_fraction": 0.2, "tail_buckets": 4, "max_doc_chars": 3000, "batch_chars": 5000}
    local = run(build_config({"data": {**base, "engine": "local"}}), tmp_path / "local")
    try:
        on_ray = run(build_config({"data": {**base, "engine": "ray", "batch_chars": 3000}}),
                     tmp_path / "ray")
    finally:
        ray.shutdown()
    assert local["engine"] == "local" and on_ray["engine"] == "ray"
    assert local["corpus"]["split_texts"] == 1 and local["splits"]["train"]["blocks"] > 64
    for part in ("train", "val", "tokenizer"):
        assert sha256_tree(tmp_path / "local" / part) == sha256_tree(tmp_path / "ray" / part), part
    manifests = [read_json(tmp_path / side / "manifest.json") for side in ("local", "ray")]
    for m in manifests:
        m.pop("engine")
    assert manifests[0] == manifests[1]
