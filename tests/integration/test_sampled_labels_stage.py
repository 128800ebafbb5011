"""Sampled (RS-KD) labels through the real label and train stages: the stage writes sampled
shards (ids + log-frequencies, empty rest), a second run labels nothing (the cache), and the
train stage accepts them (its settings check includes the kind) and trains a finite student."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import yaml

from tests.integration.test_labeling import (  # noqa: F401  (fixed_models is a fixture)
    corpus_files, decide_distill, fixed_models, labeling_project, stages, write_corpus)

SAMPLES = 8


def test_sampled_labels_label_and_train_stages(tmp_path, fixed_models, shared_ray):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, corpus_files(12))
    project = labeling_project(tmp_path / "project", fixed_models, corpus)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["distill"].update(label_kind="sampled", samples=SAMPLES)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    stages(project, "prepare", "teacher")
    decide_distill(project)
    stages(project, "label")
    manifest = json.loads((project / "data/labels/manifest.json").read_text())
    settings = manifest["settings"]
    assert (settings["kind"], settings["samples"], settings["k"]) == ("sampled", SAMPLES, SAMPLES)
    table = pq.read_table(project / "data/labels" / manifest["shards"][0]["label_file"]).to_pydict()
    lp = np.asarray(table["topk_logprobs"][0], np.float32).reshape(-1, SAMPLES)
    counts = np.exp(lp.astype(np.float64)) * SAMPLES  # float16 log-frequencies: counts to ~1e-3
    assert np.allclose(counts, np.round(counts), atol=1e-2) and (np.round(counts).sum(-1) == SAMPLES).all()
    assert np.isneginf(np.asarray(table["rest_logprob"][0], np.float32)).all()
    again = stages(project, "label")["label"].stdout
    assert "labeling 0 of" in again
    stages(project, "train")
    report = json.loads((project / "reports/train.json").read_text())
    assert np.isfinite(report["val_loss"]) and "soft labels" in report["mode"]
