"""The calibration on a tiny prepared project: the Prefect flow (`distill calibrate`) with real
Ray (the shared head), DVC and MLflow; a forced re-run skips every finished point; the gate
then uses the calibrated coefficients with the measured teacher loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from .conftest import BIN, TINY_SWEEP_CONFIGS, TINY_SWEEP_RUNS, calibrated_params, copy_project, run

pytestmark = pytest.mark.integration

N_CONFIGS, N_RUNS = TINY_SWEEP_CONFIGS, TINY_SWEEP_RUNS


def mlflow_runs(project: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("distill")
    return client.search_runs([exp.experiment_id], max_results=200)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, shared_ray, prefect_api, base_project):
    """A tiny project after `distill calibrate` (prepare, teacher, calibrate through DVC), on
    the session's Prefect server; a copy of the session's base, so DVC finds prepare and
    teacher done and the flow runs calibrate."""
    project = copy_project(base_project, tmp_path_factory.mktemp("calibrate") / "project", calibrated_params())
    proc = run([str(BIN / "distill"), "calibrate", "--root", str(project)], cwd=project, timeout=1200)
    (project / "calibrate.log").write_text(proc.stdout + proc.stderr)
    return project, proc.stdout + proc.stderr


def test_flow_runs_the_stages_calibrate_needs_and_writes_the_fit(calibrated):
    project, out = calibrated
    assert f"{N_RUNS} points, 0 already finished (skipped), {N_RUNS} to run" in out
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"prepare", "teacher", "calibrate"}  # nothing after it ran
    coefs = json.loads((project / "gate/coefficients.json").read_text())
    assert coefs["name"] == "calibrated" and coefs["distillation"] is not None
    q = coefs["quality"]
    assert q["supervised_points"] == 7 and q["distillation_points"] == 11  # 10% held out per kind
    assert q["configurations"] == N_CONFIGS and q["points"] == N_RUNS and q["seeds"] == 2
    assert q["heldout_supervised"]["n"] == 1 and q["heldout_distill"]["n"] == 1
    assert q["margin_pairs_fitted"] >= 1 and math.isfinite(q["margin_error_fitted"])
    for kind in ("supervised", "distill"):
        assert math.isfinite(q[f"heldout_{kind}"]["mean_abs"])
    assert set(q["supervised_intervals_95"]) == {"E", "A", "B", "alpha", "beta", "gamma"}
    teacher = json.loads((project / "models/teacher.json").read_text())
    lo, hi = coefs["support"]["teacher_loss"]
    assert lo < hi and lo <= teacher["val_loss"] * 1.001  # the pipeline's teacher is one of them
    points = json.loads((project / "gate/calibration_points.json").read_text())["points"]
    assert len(points) == N_CONFIGS and sum(p["heldout"] for p in points) == 2
    assert all(len(p["L_runs"]) == 2 and p["L"] == sum(p["L_runs"]) / 2 for p in points)
    assert all(math.isfinite(p["L"]) and math.isfinite(p["predicted"]) for p in points)
    assert (project / "gate/calibration.png").stat().st_size > 5000
    assert len(list((project / "runs/calibrate/points").glob("*.json"))) == N_RUNS


def test_each_point_is_a_child_run_of_the_calibrate_stage(calibrated):
    project, _ = calibrated
    runs = mlflow_runs(project)
    flow = next(r for r in runs if r.data.tags.get("distill.flow") == "calibrate")
    stage = next(r for r in runs if r.data.tags.get("distill.stage") == "calibrate")
    assert stage.data.tags["mlflow.parentRunId"] == flow.info.run_id
    points = [r for r in runs if "distill.calibration_point" in r.data.tags]
    assert len(points) == N_RUNS
    assert {r.data.tags["mlflow.parentRunId"] for r in points} == {stage.info.run_id}
    assert all("L" in r.data.metrics and "N" in r.data.metrics for r in points)
    assert "calibrate_heldout_supervised_mean_abs" in stage.data.metrics


def test_forced_rerun_skips_every_finished_point(calibrated):
    project, _ = calibrated
    before = (project / "gate/coefficients.json").read_text()
    proc = run([str(BIN / "dvc"), "repro", "--force", "--single-item", "calibrate"], cwd=project, timeout=600)
    assert f"{N_RUNS} points, {N_RUNS} already finished (skipped), 0 to run" in proc.stdout
    assert (project / "gate/coefficients.json").read_text() == before  # same points, same fit


def test_gate_uses_the_calibrated_coefficients_and_measured_teacher_loss(calibrated):
    project, _ = calibrated
    run([str(BIN / "dvc"), "repro", "--single-item", "gate"], cwd=project, timeout=600)
    decision = json.loads((project / "gate/decision.json").read_text())
    teacher = json.loads((project / "models/teacher.json").read_text())
    assert decision["coefficients"] == "calibrated"
    assert decision["distill"]["teacher_loss_source"] == "measured"
    assert decision["distill"]["teacher_loss"] == pytest.approx(teacher["val_loss"])
    assert decision["coefficients_quality"]["heldout_distill"]["n"] == 1
    assert "margin_error_fitted" in decision["coefficients_quality"]
    assert math.isfinite(decision["supervised"]["loss"]) and math.isfinite(decision["distill"]["loss"])
