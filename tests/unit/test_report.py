"""``distill report`` on a real MLflow store (sqlite in a temp folder), with runs laid out as
the pipeline flow leaves them: a parent run and its stage runs."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from distill import registry
from distill.registry import Evaluation
from flows.report import find_latest_run, gather, render_markdown, report

MODEL = "student-under-test"
DECISION = {"decision": "distill", "reason": "distill: predicted 4.10 vs 4.30 for supervised",
            "coefficients": "calibrated", "in_support": True,
            "supervised": {"loss": 4.3}, "distill": {"loss": 4.1}}


def metrics(student: float) -> dict:
    return {"student": {"val_loss": student, "perplexity": 2.718 ** student, "ece": 0.02,
                        "parameters": {"total": 1000}},
            "teacher": {"val_loss": 3.5, "perplexity": 33.1, "ece": 0.03, "parameters": {"total": 8000}},
            "kl_teacher_student": 0.4, "top1_agreement": 0.5, "top5_agreement": 0.8,
            "student_speedup": 2.5}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = registry.client(uri)
    exp = client.create_experiment("distill", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, exp


def pipeline_run(client, exp, student_loss: float | None, status: str = "FINISHED") -> tuple[str, str | None]:
    """A parent run with gate/train/evaluate children; evaluate only when ``student_loss``."""
    parent = client.create_run(exp, tags={"distill.flow": "pipeline"}, run_name="pipeline")
    pid = parent.info.run_id
    stages = ["gate", "train"] + (["evaluate"] if student_loss is not None else [])
    evaluate_id = None
    for stage in stages:
        child = client.create_run(exp, run_name=stage, tags={"distill.stage": stage,
                                                             "mlflow.parentRunId": pid})
        cid = child.info.run_id
        if stage == "evaluate":
            evaluate_id = cid
            client.log_dict(cid, metrics(student_loss), "metrics.json")
            client.log_dict(cid, DECISION, "decision.json")
            if not client.search_registered_models(f"name='{MODEL}'"):
                client.create_registered_model(MODEL)
            version = client.create_model_version(MODEL, f"runs:/{cid}/student", run_id=cid).version
            registry.assign_alias(client, MODEL, version, Evaluation(student_loss, "d1.dir", 32), cid)
        client.set_terminated(cid, "FINISHED" if stage != "train" or status == "FINISHED" else "FAILED")
    client.set_terminated(pid, status)
    return pid, evaluate_id


def test_report_of_a_worse_second_run(store, tmp_path):
    uri, client, exp = store
    pipeline_run(client, exp, 4.0)
    parent, evaluate_id = pipeline_run(client, exp, 4.2)
    out = tmp_path / "reports" / "report.md"
    console = Console(file=io.StringIO(), width=120)
    md = report(uri, "distill", MODEL, out=out, console=console)
    assert out.read_text() == md
    assert f"pipeline run `{parent}`, finished" in md
    assert "**distill** — distill: predicted 4.10 vs 4.30 for supervised" in md
    assert "| predicted by the gate | 4.3000 | 4.1000 |" in md
    assert "| actual student (distill) | — | 4.2000 |" in md
    assert "predicted − actual (student, distill): -0.1000" in md
    assert "student 1,000 parameters, teacher 8,000; the student is 2.5× faster" in md
    assert "top-5 80.0%" in md and "student 0.020, teacher 0.030" in md
    assert "version 2 → **challenger**" in md and "does not beat champion version 1" in md
    assert "Champion before this run: version 1 (val loss 4.0000); champion now: version 1." in md
    assert f"evaluate run: `{evaluate_id}`" in md and f"tracking URI: `{uri}`" in md
    assert "Distillation run report" in console.file.getvalue()  # printed too
    logged = client.download_artifacts(parent, "report.md", str(tmp_path / "dl"))
    assert open(logged).read() == md  # logged to the pipeline's parent run


def test_a_run_that_failed_before_evaluate_says_the_champion_is_untouched(store):
    uri, client, exp = store
    pipeline_run(client, exp, 4.0)
    failed, _ = pipeline_run(client, exp, None, status="FAILED")
    facts = gather(client, "distill", MODEL)
    assert facts.run_id == failed and facts.evaluate_run_id is None
    md = render_markdown(facts, MODEL)
    assert "failed" in md.splitlines()[0] and "train (failed)" in md
    assert "No evaluation in this run" in md and "champion was left untouched (champion now: version 1)" in md


def test_a_finished_flow_that_skipped_evaluate_reports_the_last_evaluation(store):
    uri, client, exp = store
    _, evaluate_id = pipeline_run(client, exp, 4.0)
    pipeline_run(client, exp, None, status="FINISHED")  # DVC found evaluate unchanged
    facts = gather(client, "distill", MODEL)
    assert facts.evaluate_run_id == evaluate_id and facts.evaluate_reused
    assert f"results below are those of evaluate run `{evaluate_id}`" in render_markdown(facts, MODEL)


def test_a_standalone_evaluate_run_after_the_flow_is_the_latest(store):
    uri, client, exp = store
    pipeline_run(client, exp, 4.0)
    alone = client.create_run(exp, tags={"distill.stage": "evaluate"}).info.run_id
    assert find_latest_run(client, exp).info.run_id == alone


def test_no_runs_or_no_experiment_is_a_clear_error(store):
    uri, client, exp = store
    with pytest.raises(ValueError, match="no pipeline or evaluate run in experiment 'distill'"):
        gather(client, "distill", MODEL)
    with pytest.raises(ValueError, match="MLflow experiment 'other' does not exist"):
        gather(client, "other", MODEL)
