"""The label stage with ``label.backend: vllm`` (vLLM's CPU build) through the Ray Data actor
pool: the labels equal the HF backend's on the same teacher within the tolerances of
tests/integration/test_vllm_labeler.py, the train stage trains on them, and a run killed
after its first shard resumes to the uninterrupted run's shards (the HF test's machinery).

The teacher's head size is 32 (d_model 64, 2 heads): vLLM's CPU kernels refuse the 16 of the
HF labeling tests' teacher.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tests.integration.test_labeling import (BLOCK, corpus_files, decide_distill, killed_and_resumed,
                                             label_rows, labeling_project, stages, write_corpus)

pytestmark = pytest.mark.integration
pytest.importorskip("vllm", reason="vLLM's CPU build is installed by `make test`")

TEACHER = {"layers": 1, "d_model": 64, "heads": 2}
VLLM_LABEL = {"backend": "vllm", "kv_cache_gib": 1, "enforce_eager": True}


def label_columns(folder) -> dict[str, dict]:
    """Every label row of a folder, keyed by block id, as arrays."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = {}
    for shard in manifest["shards"]:
        table = pq.read_table(folder / shard["label_file"]).to_pydict()
        for i, block in enumerate(table["block_id"]):
            rows[block] = {c: np.asarray(table[c][i]) for c in table if c != "block_id"}
    return rows


def set_label_params(project, **label) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["label"].update(label)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, shared_ray):
    """One project labeled twice from the same teacher: HF (in-process) and vLLM (Ray Data)."""
    from distill.config import ModelConfig
    from distill.models import build_llama, save_model
    from distill.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("vllm-stage")
    models = root / "models"
    tok = train_bpe([t for _, t in corpus_files(40)], 320, models / "tokenizer")
    model = build_llama(ModelConfig(**TEACHER), len(tok), BLOCK, seed=0, eos_id=tok.eos_token_id,
                        pad_id=tok.pad_token_id)
    save_model(model, tok, models / "teacher")
    write_corpus(root / "corpus", corpus_files(40))
    project = labeling_project(root / "project", models, root / "corpus")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["teacher"].update(TEACHER)
    params["label"]["inline_blocks"] = 100_000  # the HF reference: in this process
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    stages(project, "prepare", "teacher")
    decide_distill(project)
    stages(project, "label")
    shutil.move(project / "data/labels", root / "hf-labels")
    set_label_params(project, **VLLM_LABEL)
    out = stages(project, "label")["label"].stdout
    return {"project": project, "hf": root / "hf-labels", "stdout": out}


def test_vllm_stage_labels_equal_the_hf_stage_labels(labeled):
    vllm_dir = labeled["project"] / "data/labels"
    manifest = json.loads((vllm_dir / "manifest.json").read_text())
    hf_manifest = json.loads((labeled["hf"] / "manifest.json").read_text())
    assert "in this process" not in labeled["stdout"]  # the Ray Data actor pool ran vLLM
    assert manifest["errors"] == 0 and manifest["blocks"] == hf_manifest["blocks"] > 100
    # the same blocks in the same shards; the settings differ only in the labeler (backend and
    # its code), which the cache keys on, so the shard names differ
    assert sorted(s["blocks"] for s in manifest["shards"]) == sorted(s["blocks"] for s in hf_manifest["shards"])
    differ = {k for k in manifest["settings"] if manifest["settings"][k] != hf_manifest["settings"][k]}
    assert differ == {"backend", "code"}, differ
    assert not {s["label_file"] for s in manifest["shards"]} & {s["label_file"] for s in hf_manifest["shards"]}
    vllm_rows, hf_rows = label_columns(vllm_dir), label_columns(labeled["hf"])
    assert set(vllm_rows) == set(hf_rows)
    ids_same = []
    for block, hf in hf_rows.items():
        got = vllm_rows[block]
        for col in ("input_ids", "loss_from", "length"):
            assert np.array_equal(got[col], hf[col]), (block, col)
        assert abs(float(got["teacher_nll"]) - float(hf["teacher_nll"])) < 1e-5, block
        ids_same.append(np.mean(got["topk_ids"] == hf["topk_ids"]))
        for col in ("topk_logprobs", "rest_logprob"):  # float16 in the files: one rounding step
            assert np.allclose(got[col].astype(np.float32), hf[col].astype(np.float32),
                               rtol=2 ** -10, atol=1e-3), (block, col)
    assert np.mean(ids_same) > 0.98  # the tiny random teacher has near-ties in its top 8
    assert abs(manifest["teacher_train_nll"] - hf_manifest["teacher_train_nll"]) < 1e-5


def test_train_stage_trains_on_vllm_labels(labeled):
    project = labeled["project"]
    out = stages(project, "train")["train"].stdout
    report = json.loads((project / "reports/train.json").read_text())
    assert report["mode"] == "distill (offline, soft labels)" and "distill (offline" in out
    assert np.isfinite(report["val_loss"]) and len(report["history"]) >= 1


def test_killed_vllm_label_stage_resumes_to_the_same_shards(labeled, tmp_path):
    """Last (it replaces the label folder): as the HF test, through vLLM."""
    project = labeled["project"]
    killed_and_resumed(project, tmp_path, label_rows(project / "data/labels"))
