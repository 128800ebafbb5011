"""Incremental and resumable labeling with a fixed tokenizer and teacher (as a real user has):
label, add documents, re-run → only the new blocks are labeled, and the result equals
labeling from scratch row for row; a labeling run killed mid-way resumes to the same rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.integration.conftest import BIN, TINY_PARAMS, deep_merge, make_project, run

PY = str(BIN / "python")
BLOCK = 32
INLINE_BLOCKS = 200


def corpus_files(n: int, start: int = 0) -> list[tuple[str, str]]:
    """``n`` documents: stdlib sources cut to a few hundred characters (deterministic)."""
    from distill.corpus import stdlib_files

    files = sorted(stdlib_files())[start:start + n]
    return [(f"doc{start + i:03d}.txt", p.read_text(encoding="utf-8", errors="replace")[:1500])
            for i, p in enumerate(files)]


def write_corpus(folder: Path, docs: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs:
        (folder / name).write_text(text)


@pytest.fixture(scope="module")
def fixed_models(tmp_path_factory):
    """A tokenizer folder and a tiny teacher folder, built once and then fixed."""
    from distill.config import ModelConfig
    from distill.models import build_llama, save_model
    from distill.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("fixed")
    texts = [t for _, t in corpus_files(40)]
    tok = train_bpe(texts, 320, root / "tokenizer")
    model = build_llama(ModelConfig(layers=1, d_model=32, heads=2), len(tok), BLOCK, seed=0,
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    save_model(model, tok, root / "teacher")
    return root


def labeling_project(path: Path, models: Path, corpus: Path) -> Path:
    params = deep_merge(TINY_PARAMS, {
        "data": {"source": str(corpus), "tokenizer": str(models / "tokenizer"), "max_documents": 0,
                 "max_doc_chars": 2000, "val_fraction": 0.15, "block_size": BLOCK, "shard_blocks": 24,
                 "tail_buckets": 8},
        "teacher": {"model": str(models / "teacher"), "layers": 1, "d_model": 32, "heads": 2},
        # the first labeling goes through the Ray Data pool, the added documents' few blocks
        # are labeled in-process: the equality test below compares the two paths row for row
        "label": {"batch_size": 8, "inline_blocks": INLINE_BLOCKS}})
    return make_project(path, params)


def stages(project: Path, *names: str) -> dict[str, subprocess.CompletedProcess]:
    return {n: run([PY, "-m", f"tasks.{n}"], cwd=project) for n in names}


def decide_distill(project: Path) -> None:
    """The gate's output, written directly: this test is about labeling, not the law."""
    (project / "gate").mkdir(exist_ok=True)
    (project / "gate/decision.json").write_text(json.dumps({"decision": "distill", "reason": "test"}))


def label_rows(folder: Path) -> dict[str, tuple]:
    """Every label row of the folder's manifest, keyed by block id (duplicates would fail)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows: dict[str, tuple] = {}
    for shard in manifest["shards"]:
        table = pq.read_table(folder / shard["label_file"]).to_pydict()
        for i, block in enumerate(table["block_id"]):
            assert block not in rows, f"block {block} labeled twice"
            rows[block] = tuple(np.asarray(table[c][i], np.float32).tobytes() if isinstance(table[c][i], list)
                                else table[c][i] for c in ("input_ids", "topk_ids", "topk_logprobs",
                                                           "rest_logprob", "loss_from", "length"))
    return rows


def train_block_ids(project: Path) -> set[str]:
    ids = set()
    for path in (project / "data/prepared/train").glob("shard-*.parquet"):
        ids.update(pq.read_table(path, columns=["block_id"]).column(0).to_pylist())
    return ids


@pytest.fixture(scope="module")
def incremental(tmp_path_factory, fixed_models, shared_ray):
    """Label 40 documents, add 4, re-label; keep both label folders' results."""
    root = tmp_path_factory.mktemp("incremental")
    corpus = root / "corpus"
    write_corpus(corpus, corpus_files(40))
    project = labeling_project(root / "project", fixed_models, corpus)
    stages(project, "prepare", "teacher")
    decide_distill(project)
    first_stdout = stages(project, "label")["label"].stdout
    first = json.loads((project / "data/labels/manifest.json").read_text())
    before = train_block_ids(project)
    write_corpus(corpus, corpus_files(4, start=40))
    stages(project, "prepare", "teacher")
    proc = stages(project, "label")["label"]
    return {"project": project, "first": first, "before": before, "after": train_block_ids(project),
            "second": json.loads((project / "data/labels/manifest.json").read_text()),
            "stdout": proc.stdout, "first_stdout": first_stdout}


def test_added_documents_label_only_new_blocks(incremental):
    new = incremental["after"] - incremental["before"]
    second = incremental["second"]
    assert 0 < len(new) < 0.5 * len(incremental["after"])
    assert second["labeled_now"] == len(new)
    assert second["reused"] == len(incremental["after"] & incremental["before"])
    assert second["blocks"] == len(incremental["after"]) and second["errors"] == 0
    assert f"labeling {len(new)} of {len(incremental['after'])} train blocks" in incremental["stdout"]
    # the full labeling used the Ray Data pool; the few new blocks were labeled in-process
    assert len(incremental["before"]) > INLINE_BLOCKS >= len(new)
    assert "in this process" not in incremental["first_stdout"]
    assert "labeling in this process" in incremental["stdout"]
    labels = label_rows(incremental["project"] / "data/labels")
    assert set(labels) == incremental["after"]  # no gaps, no stale rows


def test_incremental_labels_equal_labels_from_scratch(incremental, tmp_path):
    project = incremental["project"]
    incremental_rows = label_rows(project / "data/labels")
    shutil.move(project / "data/labels", tmp_path / "incremental")
    try:
        stages(project, "label")
        scratch = json.loads((project / "data/labels/manifest.json").read_text())
        assert scratch["labeled_now"] == scratch["blocks"] == len(incremental_rows)
        assert label_rows(project / "data/labels") == incremental_rows
        killed_and_resumed(project, tmp_path, label_rows(project / "data/labels"))
    finally:
        shutil.rmtree(project / "data/labels", ignore_errors=True)
        shutil.move(tmp_path / "incremental", project / "data/labels")


def killed_and_resumed(project: Path, tmp_path: Path, expected: dict) -> None:
    """SIGKILL the label stage once its first shard file exists, re-run: same rows as without."""
    shutil.move(project / "data/labels", tmp_path / "scratch")
    labels = project / "data/labels"
    for _ in range(3):
        kill_after_first_shard(project, labels)
        if not (labels / "manifest.json").exists():
            break
        # The tiny teacher labels the rest within milliseconds of the first shard: this run
        # finished before the kill landed, so it was no interruption. Try again.
        shutil.rmtree(labels)
    done = list(labels.glob("labels-*.parquet"))
    assert done and not (labels / "manifest.json").exists(), "the label stage was never interrupted"
    out = stages(project, "label")["label"].stdout
    resumed = json.loads((labels / "manifest.json").read_text())
    assert resumed["reused"] >= 24 and resumed["labeled_now"] == len(expected) - resumed["reused"], resumed
    assert f"({resumed['reused']} already labeled" in out, out
    assert label_rows(labels) == expected, "resumed labels differ from an uninterrupted run's"
    assert sorted(p.name for p in labels.glob("labels-*.parquet")) == \
        sorted(p.name for p in (tmp_path / "scratch").glob("labels-*.parquet"))


def kill_after_first_shard(project: Path, labels: Path) -> None:
    """Start the label stage and SIGKILL its process group once a label shard exists."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([PY, "-m", "tasks.label"], cwd=project, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(labels.glob("labels-*.parquet")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no label shard appeared"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_hard_soft_labels_through_the_stage(incremental):
    """Last (it replaces the soft labels): the stage in hard+soft mode writes prompt +
    generation rows with their masks and the generated positions' top-k."""
    import yaml

    project = incremental["project"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["label"].update(mode="hard+soft", prompt_tokens=8, max_new_tokens=8)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = stages(project, "label")["label"].stdout
    manifest = json.loads((project / "data/labels/manifest.json").read_text())
    assert manifest["settings"]["mode"] == "hard+soft" and manifest["errors"] == 0
    assert manifest["blocks"] == len(incremental["after"]) and "mode hard+soft" in out
    table = pq.read_table(project / "data/labels" / manifest["shards"][0]["label_file"])
    rows = table.to_pydict()
    assert set(rows["loss_from"]) == {7}
    assert all(9 <= n <= 16 for n in rows["length"])
    assert manifest["positions"] == sum(n - 1 - 7 for n in
                                        (x for s in manifest["shards"] for x in pq.read_table(
                                            project / "data/labels" / s["label_file"],
                                            columns=["length"]).column(0).to_pylist()))
    assert all(len(t) == (BLOCK - 1) * 8 for t in rows["topk_ids"])
    assert list(project.glob("data/labels/errors.parquet"))
