"""`distill gate-check` on the tiny project: the gate asked the compute-limited question and
was forced to supervised, so the check labels with the label stage's code, trains the distill
branch on the steps the budget leaves it, records the verdict in MLflow and reports/, and
`distill report` shows it. Real DVC, Ray (the shared head), MLflow (sqlite)."""

from __future__ import annotations

import json

import pytest

from .conftest import BIN, TINY_PARAMS, copy_project, deep_merge, run

pytestmark = pytest.mark.integration


def test_gate_check_trains_the_other_branch_and_scores_the_call(tmp_path, shared_ray, base_project):
    params = deep_merge(TINY_PARAMS, {"gate": {"force": "supervised", "question": "compute-limited",
                                               "scenario": "teacher-inference"}})
    project = copy_project(base_project, tmp_path / "project", params)  # prepare, teacher run
    run([str(BIN / "dvc"), "repro"], cwd=project, timeout=1500)
    decision = json.loads((project / "gate/decision.json").read_text())
    assert decision["question"] == "compute-limited" and decision["scenario"] == "teacher-inference"
    assert decision["teacher_costs_charged"] is True and decision["decision"] == "supervised"
    steps = decision["train_steps"]
    assert steps["supervised"] == 20 and 0 < steps["distill"] < 20  # the teacher's logits cost steps
    assert json.loads((project / "data/labels/manifest.json").read_text())["status"] == "skipped"

    proc = run([str(BIN / "distill"), "gate-check"], cwd=project, timeout=900)
    assert "gate check: the gate's call" in proc.stdout
    verdict = json.loads((project / "reports/gate_check/verdict.json").read_text())
    assert verdict["trained_by_pipeline"] == "supervised" and verdict["trained_by_check"] == "distill"
    assert verdict["forced"] == (decision["law_decision"] != "supervised")
    assert verdict["call"] == decision["law_decision"]
    train_supervised = json.loads((project / "reports/train.json").read_text())
    train_distill = json.loads((project / "reports/gate_check/train_distill.json").read_text())
    assert train_distill["steps"] == steps["distill"] and train_distill["mode"].startswith("distill")
    assert verdict["measured"] == {"supervised": train_supervised["val_loss"],
                                   "distill": train_distill["val_loss"]}
    best = min(verdict["measured"], key=verdict["measured"].get)
    assert verdict["right"] == (verdict["call"] == best)
    labels = json.loads((project / "runs/gate_check/labels/manifest.json").read_text())
    assert labels["status"] == "complete"  # labeled by the check, not by the skipped stage
    assert len((project / "reports/gate_check/calls.jsonl").read_text().splitlines()) == 1

    proc = run([str(BIN / "distill"), "report"], cwd=project, timeout=300)
    report = (project / "reports/report.md").read_text()
    assert "## The gate's calls, checked" in report
    assert f"{int(verdict['right'])} of 1 checked calls right" in report
    assert (project / "dvc.lock").exists()
    status = run([str(BIN / "dvc"), "status"], cwd=project)
    assert "changed" not in status.stdout  # the check leaves the pipeline's outputs as they were
