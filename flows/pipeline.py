"""The pipeline as a Prefect flow: each DVC stage, in DAG order, as a Prefect task.

Stages run through ``dvc repro --single-item <stage>``, so a flow run and a plain
``dvc repro`` leave the same ``dvc.lock`` and outputs, and an unchanged stage is skipped
by DVC. The flow adds what DVC lacks: retries for the stages whose failures can be
transient (they resume: labels are content-addressed, training checkpoints), one parent
MLflow run with each stage's run as its child, and a closing summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task

from distill.config import load_config
from distill.io import read_json
from distill.tracking import PARENT_RUN_ENV, ensure_experiment, git_commit
from tasks.common import DECISION, LABELS, METRICS, STUDENT_DIR, TEACHER_JSON, quiet_telemetry

RETRIES = {"label": 2, "train": 1}


def stage_order(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Stages of ``dvc.yaml`` in dependency order (a stage after every stage whose outs it reads)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    outs = {name: [_path(o) for o in s.get("outs", []) + s.get("metrics", [])] for name, s in stages.items()}
    needs = {name: {other for other, paths in outs.items() if other != name and any(
        _within(_path(dep), out) for dep in s.get("deps", []) for out in paths)}
        for name, s in stages.items()}
    order: list[str] = []
    while len(order) < len(stages):
        ready = [n for n in stages if n not in order and needs[n] <= set(order)]
        if not ready:
            raise ValueError(f"{dvc_yaml}: the stages' deps form a cycle")
        order.extend(ready[:1])
    return order


def _path(entry) -> str:
    return next(iter(entry)) if isinstance(entry, dict) else entry


def _within(dep: str, out: str) -> bool:
    return dep == out or dep.startswith(out.rstrip("/") + "/") or out.startswith(dep.rstrip("/") + "/")


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, env: dict[str, str]) -> dict:
    """``dvc repro --single-item <stage>``; output streams through; failure raises naming the stage."""
    logger = get_run_logger()
    started = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro", "--single-item", stage], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
    status = "ran"
    for line in proc.stdout:
        sys.stdout.write(line)
        if "didn't change, skipping" in line:
            status = "unchanged"
        elif "is cached - skipping run" in line:
            status = "restored from DVC's run cache"
    if proc.wait() != 0:
        raise RuntimeError(f"stage {stage} failed (dvc repro exit code {proc.returncode}); "
                           f"see its output above")
    seconds = time.perf_counter() - started
    logger.info(f"stage {stage}: {status} in {seconds:.1f} s")
    return {"stage": stage, "status": status, "seconds": seconds}


@flow(name="distill-pipeline", log_prints=False)
def pipeline(root: str = ".") -> dict:
    """Run every stage in DAG order under one parent MLflow run; returns the summary."""
    import mlflow

    quiet_telemetry()
    root_path = Path(root).resolve()
    os.chdir(root_path)
    cfg = load_config(root_path / "params.yaml")  # fails before any work on bad params
    experiment = ensure_experiment(cfg, root_path)
    with mlflow.start_run(experiment_id=experiment, run_name="pipeline",
                          tags={"distill.flow": "pipeline",
                                "mlflow.source.git.commit": git_commit(root_path) or "unknown"}) as parent:
        env = {**os.environ, PARENT_RUN_ENV: parent.info.run_id,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        stages = []
        for stage in stage_order(root_path / "dvc.yaml"):
            stages.append(run_stage.with_options(retries=RETRIES.get(stage, 0),
                                                 retry_delay_seconds=5)(stage, env))
        summary = build_summary(stages, parent.info.run_id)
        mlflow.log_dict(summary, "summary.json")
        mlflow.log_metrics({f"stage_seconds.{s['stage']}": s["seconds"] for s in stages})
    print_summary(summary)
    return summary


def build_summary(stages: list[dict], run_id: str) -> dict:
    """Decision, losses and where things are, from the stages' outputs."""
    decision, metrics = read_json(DECISION), read_json(METRICS)
    labels = read_json(LABELS / "manifest.json")
    return {
        "mlflow_run_id": run_id,
        "stages": stages,
        "decision": decision["decision"],
        "reason": decision["reason"],
        "predicted": {"supervised": decision["supervised"]["loss"], "distill": decision["distill"]["loss"]},
        "teacher_val_loss": read_json(TEACHER_JSON)["val_loss"],
        "student_val_loss": metrics["student"]["val_loss"],
        "kl_teacher_student": metrics["kl_teacher_student"],
        "labels": labels.get("status"),
        "student_model": str(STUDENT_DIR.resolve()),
    }


def print_summary(s: dict) -> None:
    """A closing table in the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="distillation pipeline", show_header=False)
    for stage in s["stages"]:
        table.add_row(f"stage {stage['stage']}", f"{stage['status']} ({stage['seconds']:.1f} s)")
    table.add_row("decision", f"{s['decision']}: {s['reason']}")
    table.add_row("teacher val loss", f"{s['teacher_val_loss']:.4f} nats/token")
    table.add_row("student val loss", f"{s['student_val_loss']:.4f} nats/token")
    table.add_row("KL(teacher‖student)", f"{s['kl_teacher_student']:.4f}")
    table.add_row("student model", s["student_model"])
    table.add_row("MLflow parent run", s["mlflow_run_id"])
    Console().print(table)
