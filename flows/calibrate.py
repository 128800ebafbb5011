"""The calibration as a Prefect flow: the ``calibrate`` DVC stage and the stages it needs.

Each stage runs through ``dvc repro --single-item`` (the pipeline flow's ``run_stage``), so a
flow run and ``dvc repro calibrate`` leave the same ``dvc.lock``; finished sweep points are
skipped by the stage itself (content-addressed store under ``runs/calibrate``), so a retry
after an interruption runs only what is missing. One parent MLflow run holds the stages'
runs, and under the calibrate stage's run one child run per sweep point.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prefect import flow

from distill.config import Config
from distill.io import read_json
from distill.tracking import PARENT_RUN_ENV, ensure_experiment, git_commit
from flows.pipeline import preflight, run_stage, stage_needs, stage_order
from flows.runlock import pipeline_lock
from tasks.common import COEFFICIENTS, calibration_skip_reason, quiet_telemetry

RETRIES = {"calibrate": 1}


def stages_up_to(target: str, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """``target`` and every stage it depends on (transitively), in DAG order."""
    needs = stage_needs(dvc_yaml)
    if target not in needs:
        raise ValueError(f"{dvc_yaml}: no stage {target!r} (stages: {', '.join(needs)})")
    needed, frontier = {target}, [target]
    while frontier:
        for other in needs[frontier.pop()] - needed:
            needed.add(other)
            frontier.append(other)
    return [s for s in stage_order(dvc_yaml) if s in needed]


def check_calibration_wanted(cfg: Config, params: Path) -> None:
    """Asked to calibrate where the stage would skip its sweep, say so rather than run it."""
    if reason := calibration_skip_reason(cfg):
        raise ValueError(f"{params}: {reason}")


@flow(name="distill-calibrate", log_prints=False)
def calibrate(root: str = ".") -> dict:
    """Run the calibration (and the stages before it) under one parent MLflow run; returns
    the fitted set's quality (held-out errors, point counts)."""
    import mlflow

    quiet_telemetry()
    root_path = Path(root).resolve()
    os.chdir(root_path)
    cfg = preflight(root_path)  # fails before any work on bad params or an unusable store
    check_calibration_wanted(cfg, root_path / "params.yaml")
    experiment = ensure_experiment(cfg, root_path)
    # The pipeline's lock: a calibration and a pipeline run never drive DVC in one project at once.
    tags = {"distill.flow": "calibrate", "mlflow.source.git.commit": git_commit(root_path) or "unknown"}
    with pipeline_lock(root_path, 0.0, run_label="calibrate"), \
            mlflow.start_run(experiment_id=experiment, run_name="calibrate-flow", tags=tags) as parent:
        env = {**os.environ, PARENT_RUN_ENV: parent.info.run_id,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        stages = [run_stage.with_options(retries=RETRIES.get(stage, 0), retry_delay_seconds=5)(stage, env)
                  for stage in stages_up_to("calibrate", root_path / "dvc.yaml")]
        quality = read_json(COEFFICIENTS)["quality"]
        mlflow.log_dict({"stages": stages, "quality": quality}, "calibration_summary.json")
    for kind in ("supervised", "distill"):
        err = quality.get(f"heldout_{kind}")
        if err:
            print(f"held-out {kind}: mean |rel. error| {100 * err['mean_abs']:.2f}% over {err['n']} points")
    return {"stages": stages, "quality": quality}
