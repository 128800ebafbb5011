"""The whole pipeline on a tiny config: by `dvc repro` and by the Prefect flow, with real
Ray (one shared local head), real DVC, real MLflow (sqlite) and real Prefect."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from .conftest import BIN, TINY_PARAMS, TINY_SWEEP_RUNS, calibrated_params, deep_merge, make_project, run

pytestmark = pytest.mark.integration

STAGES = ["prepare", "teacher", "calibrate", "gate", "label", "train", "evaluate"]


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")


def stage_runs(project: Path) -> list:
    client = mlflow_client(project)
    exp = client.get_experiment_by_name("distill")
    return client.search_runs([exp.experiment_id], max_results=100)


def lock_outs(project: Path) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}


@pytest.fixture(scope="module")
def repro_project(tmp_path_factory, shared_ray):
    """A tiny project after one full `dvc repro`."""
    project = make_project(tmp_path_factory.mktemp("repro") / "project", calibrated_params())
    proc = run([str(BIN / "dvc"), "repro"], cwd=project, timeout=1500)
    (project / "first_repro.log").write_text(proc.stdout + proc.stderr)
    return project


def test_dvc_repro_produces_every_output(repro_project):
    p = repro_project
    manifest = json.loads((p / "data/prepared/manifest.json").read_text())
    assert manifest["splits"]["train"]["blocks"] > 0 and manifest["tokenizer"]["vocab_size"] == 320
    teacher = json.loads((p / "models/teacher.json").read_text())
    assert (p / "models/teacher/model.safetensors").is_file()
    assert math.isfinite(teacher["val_loss"]) and teacher["tokens"] == 30 * 8 * 31
    decision = json.loads((p / "gate/decision.json").read_text())
    assert decision["decision"] == "distill" and "forced by gate.force" in decision["reason"]
    assert {"supervised", "distill", "coefficients", "in_support"} <= decision.keys()
    # The calibrate stage ran first, so the gate used its coefficients and the measured L_T.
    assert decision["coefficients"] == "calibrated"
    assert decision["distill"]["teacher_loss_source"] == "measured"
    assert decision["distill"]["teacher_loss"] == pytest.approx(teacher["val_loss"])
    assert "heldout_supervised" in decision["coefficients_quality"]
    assert (p / "gate/decision_map.png").stat().st_size > 1000
    labels = json.loads((p / "data/labels/manifest.json").read_text())
    assert labels["status"] == "complete" and labels["blocks"] == manifest["splits"]["train"]["blocks"]
    assert labels["settings"]["teacher_fingerprint"] == teacher["fingerprint"]
    assert (p / "models/student/model.safetensors").is_file()
    assert (p / "models/student/tokenizer.json").is_file()
    metrics = json.loads((p / "reports/metrics.json").read_text())
    assert metrics["decision"] == "distill"
    for key in ("student", "teacher"):
        assert math.isfinite(metrics[key]["val_loss"]) and metrics[key]["tokens_per_s"] > 0
    assert metrics["student"]["parameters"]["total"] < metrics["teacher"]["parameters"]["total"]
    assert 0 <= metrics["top1_agreement"] <= 1 and metrics["kl_teacher_student"] >= 0


def test_labels_match_the_teacher(repro_project):
    """Stored top-k log-probs equal a fresh forward pass of the teacher (float16 tolerance)."""
    import torch

    from distill.losses import topk_labels
    from distill.models import load_causal_lm

    p = repro_project
    labels = json.loads((p / "data/labels/manifest.json").read_text())
    table = pq.read_table(p / "data/labels" / labels["shards"][0]["label_file"]).slice(0, 4)
    ids = torch.tensor(np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)), dtype=torch.long)
    teacher = load_causal_lm(p / "models/teacher").eval()
    with torch.inference_mode():
        logits = teacher(input_ids=ids[:, :-1]).logits.flatten(0, 1)
    fresh = topk_labels(logits, 8, 1.0)
    stored = np.stack(table.column("topk_logprobs").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert np.allclose(stored.reshape(-1, 8), fresh.logprobs.numpy(), atol=1e-2)


def test_mlflow_has_stage_runs_and_registered_model(repro_project):
    runs = stage_runs(repro_project)
    points = [r for r in runs if "distill.calibration_point" in r.data.tags]
    runs = [r for r in runs if "distill.stage" in r.data.tags]
    assert sorted(r.data.tags["distill.stage"] for r in runs) == sorted(STAGES)
    calibrate = next(r for r in runs if r.data.tags["distill.stage"] == "calibrate")
    assert len(points) == TINY_SWEEP_RUNS and {r.data.tags["mlflow.parentRunId"] for r in points} == {calibrate.info.run_id}
    evaluate = next(r for r in runs if r.data.tags["distill.stage"] == "evaluate")
    assert evaluate.data.tags["distill.decision"] == "distill"
    assert evaluate.data.params["dvc.data/prepared"] == lock_outs(repro_project)["data/prepared"]
    assert "student.val_loss" in evaluate.data.metrics and "gate.predicted_student_loss" in evaluate.data.metrics
    assert evaluate.data.tags["mlflow.source.git.commit"] != "unknown"
    train = next(r for r in runs if r.data.tags["distill.stage"] == "train")
    assert "student/loss" in train.data.metrics  # logged by Ray Train's rank 0
    versions = mlflow_client(repro_project).search_model_versions("name='distill-student'")
    assert len(versions) == 1 and versions[0].run_id == evaluate.info.run_id


def test_second_repro_changes_nothing(repro_project):
    before = (repro_project / "dvc.lock").read_text()
    proc = run([str(BIN / "dvc"), "repro"], cwd=repro_project)
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in proc.stdout
    assert (repro_project / "dvc.lock").read_text() == before


def test_interrupted_labels_resume_without_gaps_or_duplicates(repro_project):
    """Lose one label shard (as a killed run would) and re-run: only it is redone, identically."""
    p = repro_project
    labels = json.loads((p / "data/labels/manifest.json").read_text())
    victim = p / "data/labels" / labels["shards"][-1]["label_file"]
    original = pq.read_table(victim)
    victim.unlink()
    (p / "data/labels/manifest.json").unlink()
    proc = run([str(BIN / "python"), "-m", "tasks.label"], cwd=p)
    lost = labels["shards"][-1]["blocks"]
    assert f"labeling {lost} of {labels['blocks']} train blocks" in proc.stdout
    again = pq.read_table(victim)
    assert again.column("block_id").to_pylist() == original.column("block_id").to_pylist()
    a = np.stack(again.column("topk_logprobs").to_numpy(zero_copy_only=False)).astype(np.float32)
    b = np.stack(original.column("topk_logprobs").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert np.allclose(a, b, atol=1e-2)
    redone = json.loads((p / "data/labels/manifest.json").read_text())
    assert redone["blocks"] == labels["blocks"] and redone["reused"] == labels["blocks"] - lost


def test_failed_stage_leaves_no_output_that_looks_complete(repro_project, tmp_path):
    p = repro_project
    empty = tmp_path / "no-model"
    empty.mkdir()
    params = yaml.safe_load((p / "params.yaml").read_text())
    params["teacher"]["model"] = str(empty)
    bad = tmp_path / "bad-params.yaml"
    bad.write_text(yaml.safe_dump(params))
    before = (p / "models/teacher.json").read_text()
    proc = run([str(BIN / "python"), "-m", "tasks.teacher", "--params", str(bad)], cwd=p, check=False)
    assert proc.returncode == 1
    assert f"{empty}: holds no Hugging Face model" in proc.stderr
    assert (p / "models/teacher.json").read_text() == before  # the old output is untouched


def test_bad_params_fail_before_any_work(repro_project, tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump(deep_merge(TINY_PARAMS, {"train": {"divergence": "kl"}})))
    proc = run([str(BIN / "python"), "-m", "tasks.train", "--params", str(bad)], cwd=repro_project, check=False)
    assert proc.returncode == 1 and "unknown key train.divergence" in proc.stderr


def test_prefect_flow_runs_the_same_dag(repro_project, tmp_path_factory, shared_ray, prefect_api, monkeypatch):
    """The Prefect flow, on the session's Prefect server, leaves the lock `dvc repro` leaves.
    Its project is made fresh (not a copy of the base): its prepare must run on its own for
    the determinism check below, and every stage's MLflow run must be its own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import pipeline

    project = make_project(tmp_path_factory.mktemp("flow") / "project", calibrated_params())
    monkeypatch.chdir(project)
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        summary = pipeline(root=str(project))
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert summary["decision"] == "distill" and math.isfinite(summary["student_val_loss"])
    flow_lock, repro_lock = (yaml.safe_load((d / "dvc.lock").read_text()) for d in (project, repro_project))
    assert flow_lock["stages"].keys() == repro_lock["stages"].keys()
    for stage in STAGES:  # same code, params and dependency structure
        assert flow_lock["stages"][stage]["params"] == repro_lock["stages"][stage]["params"]
        assert [d["path"] for d in flow_lock["stages"][stage]["deps"]] == \
               [d["path"] for d in repro_lock["stages"][stage]["deps"]]
    assert lock_outs(project)["data/prepared"] == lock_outs(repro_project)["data/prepared"]  # deterministic
    runs = stage_runs(project)
    parent = next(r for r in runs if r.data.tags.get("distill.flow") == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["distill.stage"] for r in children) == sorted(STAGES)
    assert mlflow_client(project).search_model_versions("name='distill-student'")
