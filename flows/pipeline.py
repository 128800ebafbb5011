"""The pipeline as a Prefect flow: each DVC stage, in DAG order, as a Prefect task.

Stages run through ``dvc repro --single-item <stage>``, so a flow run and a plain
``dvc repro`` leave the same ``dvc.lock`` and outputs, and an unchanged stage is skipped
by DVC. The flow adds what DVC lacks: retries for the stages whose failures can be
transient (they resume: labels are content-addressed, training checkpoints), one parent
MLflow run with each stage's run as its child, and a closing summary.

Before any compute it checks what would make the run fail late (params, the DVC project,
the MLflow store) and takes the project's pipeline lock, so a second run at the same time
refuses at once instead of failing between two stages. A stage that fails stops the run
before the stages after it: evaluate (which registers the student and moves aliases)
never runs after a failed train. The parent run logs the data version it used and what
changed since the previous pipeline run (``flows/lineage.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task

from distill.config import Config, load_config
from distill.io import read_json
from distill.tracking import PARENT_RUN_ENV, check_tracking_store, ensure_experiment, git_commit, tracking_uri
from flows.lineage import NO_BASELINE, log_lineage, untracked_source_warning
from flows.runlock import lock_path, pipeline_lock
from flows.storage import configure_dvc_remote
from tasks.common import DECISION, LABELS, METRICS, STUDENT_DIR, TEACHER_JSON, quiet_telemetry

RETRIES = {"label": 2, "train": 1}


class StageFailed(RuntimeError):
    """A DVC stage of the pipeline exited non-zero."""


def stage_needs(dvc_yaml: Path = Path("dvc.yaml")) -> dict[str, set[str]]:
    """Each stage of ``dvc.yaml`` (in file order) → the stages whose outs it reads."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    outs = {name: [_path(o) for o in s.get("outs", []) + s.get("metrics", [])] for name, s in stages.items()}
    return {name: {other for other, paths in outs.items() if other != name and any(
        _within(_path(dep), out) for dep in s.get("deps", []) for out in paths)}
        for name, s in stages.items()}


def stage_order(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Stages of ``dvc.yaml`` in dependency order (a stage after every stage whose outs it reads)."""
    needs = stage_needs(dvc_yaml)
    stages = list(needs)
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
        raise StageFailed(f"stage {stage} failed (dvc repro exit code {proc.returncode}); "
                          f"see its output above")
    seconds = time.perf_counter() - started
    logger.info(f"stage {stage}: {status} in {seconds:.1f} s")
    return {"stage": stage, "status": status, "seconds": seconds}


def preflight(root: Path) -> Config:
    """What must hold before any compute: valid params, a DVC project, a usable MLflow store."""
    cfg = load_config(root / "params.yaml")
    lock_path(root)
    check_tracking_store(tracking_uri(cfg, root))
    configure_dvc_remote(root, cfg)  # <storage.root>/dvc, where storage.root is set
    if warning := untracked_source_warning(root, cfg.data.source):
        print(f"warning: {warning}", file=sys.stderr)
    return cfg


@flow(name="distill-pipeline", log_prints=False)
def pipeline(root: str = ".", wait_for_lock: float = 0.0) -> dict:
    """Run every stage in DAG order under one parent MLflow run; returns the summary.

    ``wait_for_lock``: seconds to wait for another run of this project to finish (0 = refuse).
    """
    quiet_telemetry()
    root_path = Path(root).resolve()
    os.chdir(root_path)
    cfg = preflight(root_path)  # fails before any work on bad params or an unusable store
    with pipeline_lock(root_path, wait_for_lock, run_label=_flow_run_label()):
        return _run_stages(cfg, root_path)


def _run_stages(cfg: Config, root_path: Path) -> dict:
    import mlflow

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
        lineage = log_lineage(root_path, cfg.data.source, stages)
        summary = build_summary(stages, parent.info.run_id, lineage)
        mlflow.log_dict(summary, "summary.json")
        mlflow.log_metrics({f"stage_seconds.{s['stage']}": s["seconds"] for s in stages})
    print_summary(summary)
    return summary


def _flow_run_label() -> str:
    from prefect.runtime import flow_run

    return f"Prefect flow run {flow_run.name}" if flow_run.id else ""


def build_summary(stages: list[dict], run_id: str, lineage: dict | None = None) -> dict:
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
        # The per-document hashes stay in the logged data_version.json, not in the summary.
        **({"data_version": {k: v for k, v in lineage["data_version"].items() if k != "document_hashes"},
            "changes": lineage["changes"]} if lineage else {}),
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
    if "data_version" in s:
        table.add_row("data version", f"data/prepared {s['data_version']['prepared_md5']} "
                                      f"({s['data_version']['documents']} documents)")
        table.add_row("since previous run", describe_changes(s["changes"]))
    table.add_row("MLflow parent run", s["mlflow_run_id"])
    Console().print(table)


def describe_changes(c: dict) -> str:
    """One line: what changed in the data (and labeling) since the previous pipeline run."""
    if c["first_run"]:
        head = "first pipeline run of this experiment"
    elif c["method"] == NO_BASELINE:
        head = f"previous run {c['previous_run']} logged no data version"
    else:
        head = (f"+{c['documents_added']} / -{c['documents_removed']} documents ({c['method']}), "
                f"data {'changed' if c['data_changed'] else 'unchanged'}")
    labels = c.get("labels", {})
    if "labeled_now" in labels:
        head += f"; labels: {labels['labeled_now']} labeled now, {labels['reused']} reused"
    return head
