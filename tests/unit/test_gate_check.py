"""Scoring the gate's calls: the verdict, its MLflow record and the report's running record,
the steps each branch trains for, on a real MLflow store (sqlite in a temp folder)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import pytest

from distill import registry
from distill.config import load_config
from distill.io import write_json
from flows.report import gate_calls, render_markdown, RunFacts
from tasks.gate_check import VERDICT, _log, _trained_branch, score_call, summary_line

ROOT = Path(__file__).resolve().parents[2]

DECISION = {"decision": "distill", "law_decision": "distill", "loss_margin": 0.12, "question": "data-limited",
            "scenario": "teacher-inference", "coefficients": "calibrated", "in_support": True,
            "supervised": {"loss": 4.62}, "distill": {"loss": 4.50},
            "train_steps": {"supervised": 300, "distill": 300}}


def test_a_right_call_has_no_regret():
    v = score_call(DECISION, {"supervised": 4.60, "distill": 4.52})
    assert v["right"] and v["better"] == "distill" and v["regret"] == 0.0 and not v["forced"]
    assert v["measured_margin"] == pytest.approx(0.08) and v["margin_error"] == pytest.approx(0.04)
    assert "RIGHT" in summary_line(v)


def test_a_wrong_call_reports_the_loss_it_gave_up_even_when_forced():
    forced = {**DECISION, "decision": "supervised"}  # gate.force overrode the law's distill
    v = score_call(forced, {"supervised": 4.50, "distill": 4.58})
    assert not v["right"] and v["call"] == "distill" and v["forced"] and v["better"] == "supervised"
    assert v["regret"] == pytest.approx(0.08) and v["measured_margin"] == pytest.approx(-0.08)
    assert "WRONG" in summary_line(v) and "0.0800 nats" in summary_line(v)


def test_the_train_report_must_be_the_decisions_branch():
    assert _trained_branch(DECISION, {"mode": "distill (offline, soft labels)"}) == "distill"
    with pytest.raises(ValueError, match="trained 'supervised' but gate/decision.json says 'distill'"):
        _trained_branch(DECISION, {"mode": "supervised"})


def test_the_record_in_mlflow_is_the_reports_running_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = registry.client(uri)
    exp = client.create_experiment("distill", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_tracking_uri(uri)
    try:
        for measured in ({"supervised": 4.60, "distill": 4.52}, {"supervised": 4.40, "distill": 4.45}):
            verdict = {**score_call(DECISION, measured), "trained_by_check": "supervised"}
            write_json(VERDICT, verdict)
            with mlflow.start_run(experiment_id=exp, run_name="gate-check", tags={"distill.stage": "gate-check"}):
                _log(verdict)
    finally:
        mlflow.set_tracking_uri(None)
    calls = gate_calls(client, exp)
    assert [c["right"] for c in calls] == [False, True]  # newest first
    assert calls[0]["regret"] == pytest.approx(0.05) and calls[0]["call"] == "distill"
    assert calls[0]["question"] == "data-limited"
    facts = RunFacts(tracking_uri=uri, experiment_id=exp, run_id="r", kind="pipeline", status="FINISHED",
                     gate_calls=calls)
    md = render_markdown(facts, "m")
    assert "1 of 2 checked calls right" in md and "| distill | data-limited | **no** | 4.4000 | 4.4500 |" in md
    empty = render_markdown(dataclasses.replace(facts, gate_calls=[]), "m")
    assert "None checked yet: `distill gate-check`" in empty


def test_compute_limited_decision_gives_distillation_fewer_steps(tmp_path):
    from distill.gate import GateQuery, decide
    from tasks.gate import branch_steps
    from tasks.train import with_branch_steps

    cfg = load_config("params.yaml")
    manifest = {"block_size": 128}
    # the paper's law at the embedded default's block and vocabulary sizes; only the accounting matters
    from distill.law import PAPER

    from distill.training import tokens_per_run

    tokens = tokens_per_run(cfg.train, 128, cfg.train.num_workers)
    kw = {"student_params": 1e5, "student_tokens": float(tokens), "teacher_params": 8e5, "teacher_tokens": 1.6e6,
          "n_ctx": 128, "n_vocab": 2048, "scenario": "teacher-inference"}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = decide(GateQuery(**kw), PAPER)
        compute = decide(GateQuery(question="compute-limited", **kw), PAPER)
    assert branch_steps(cfg, manifest, data) == {"supervised": cfg.train.steps, "distill": cfg.train.steps}
    steps = branch_steps(cfg, manifest, compute)
    per_step = tokens / cfg.train.steps
    assert steps["supervised"] == cfg.train.steps
    assert steps["distill"] == int(compute.distill.tokens // per_step) < cfg.train.steps
    # a scenario that charges the teacher nothing leaves both branches the same steps, at any
    # budget and student size (the tokens come back from FLOPs through floats)
    for n_s in (1e5, 54321.0, 3.3e6):
        for train_steps in (10, 299, 395):
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=train_steps))
            t = tokens_per_run(c.train, 128, c.train.num_workers)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                free = decide(GateQuery(question="compute-limited", **{**kw, "student_params": n_s,
                                                                      "student_tokens": float(t),
                                                                      "scenario": "best-case"}), PAPER)
            assert branch_steps(c, manifest, free) == {"supervised": train_steps, "distill": train_steps}
    trained = with_branch_steps(cfg, {"train_steps": steps}, "distill")
    assert trained.train.steps == steps["distill"] < cfg.train.steps
    assert trained.train.warmup_steps < trained.train.steps
    assert with_branch_steps(cfg, {}, "distill") is cfg  # a decision without train_steps: unchanged
    with pytest.raises(ValueError, match="train_steps.distill = 0"):
        with_branch_steps(cfg, {"train_steps": {"distill": 0}}, "distill")


def test_gate_check_of_a_branch_the_budget_leaves_no_steps_trains_nothing(tmp_path, monkeypatch):
    """Compute-limited, the teacher's costs took the whole budget: distillation was no choice,
    so the check trains nothing and records no call."""
    import tasks.gate_check as gate_check
    from distill.io import write_json

    monkeypatch.chdir(tmp_path)
    write_json(gate_check.DECISION, {"decision": "supervised", "train_steps": {"supervised": 300, "distill": 0}})
    write_json(gate_check.TRAIN_REPORT, {"mode": "supervised", "val_loss": 4.6})
    result = gate_check.run(load_config(ROOT / "params.yaml"))
    assert result == {"status": "infeasible", "trained_by_pipeline": "supervised", "infeasible": "distill"}
    assert not gate_check.CALLS.exists()
