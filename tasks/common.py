"""What every stage shares: the output layout, config loading, and the ``main()`` wrapper."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.config import Config, ConfigError, load_config
from distill.io import write_json
from distill.tracking import flatten, stage_run, tracking_uri

PREPARED = Path("data/prepared")
TEACHER_DIR = Path("models/teacher")
TEACHER_JSON = Path("models/teacher.json")
DECISION = Path("gate/decision.json")
DECISION_MAP = Path("gate/decision_map.png")
COEFFICIENTS = Path("gate/coefficients.json")
LABELS = Path("data/labels")
STUDENT_DIR = Path("models/student")
TRAIN_REPORT = Path("reports/train.json")
METRICS = Path("reports/metrics.json")
REPORTS = Path("reports")
RUNS = Path("runs")

TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0",
                 "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
                 "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 # Prefect's temporary server migrates a fresh database on first start:
                 # 20 s (the default) is too short on a 2-core machine.
                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def calibration_skip_reason(cfg: Config) -> str:
    """Why the calibrate stage has no sweep to run ('' when it has): only the gate's
    ``gate.coefficients: auto`` reads the fit (the stage and ``distill calibrate`` ask here)."""
    if cfg.gate.coefficients == "auto":
        return ""
    return (f"gate.coefficients = {cfg.gate.coefficients}: the calibrate stage only sweeps for "
            "gate.coefficients: auto (the gate would not read the fit); set it to auto to calibrate")


def write_skipped(stage: str, path: Path, reason: str) -> dict:
    """The explicit output of a stage with nothing to do, ``{"status": "skipped", "reason"}``
    at ``path``, said on stdout; returns it."""
    result = {"status": "skipped", "reason": reason}
    write_json(path, result)
    print(f"{stage} stage skipped: {reason}")
    return result


def quiet_telemetry() -> None:
    """Turn every tool's telemetry off and set offline defaults (entry points call this, never import)."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def stage_main(stage: str, run: Callable[[Config], Any], argv: list[str] | None = None) -> None:
    """Parse ``--params``, validate the config, run the stage; a known error exits 1 with its message."""
    quiet_telemetry()
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}")
    parser.add_argument("--params", default="params.yaml", help="parameters file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        cfg = load_config(args.params)
        with stage_run(cfg, stage):
            run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error in stage {stage}: {exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    print(f"stage {stage} done in {time.perf_counter() - started:.1f} s")


def log_to_mlflow(params: dict | None = None, metrics: dict | None = None,
                  artifacts: list[Path] | None = None, artifact_dir: str | None = None) -> None:
    """Log into the active stage run; outside ``stage_main`` (a plain ``run()`` call) there is none."""
    import mlflow

    if mlflow.active_run() is None:
        return
    if params:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
    if metrics:
        mlflow.log_metrics({k: float(v) for k, v in flatten(metrics).items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for path in artifacts or []:
        if Path(path).exists():
            mlflow.log_artifact(str(path), artifact_path=artifact_dir)


def mlflow_target(cfg: Config) -> dict:
    """Where Ray Train's rank 0 logs training metrics: the active stage run, if any."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return {}
    return {"tracking_uri": tracking_uri(cfg), "mlflow_run_id": run.info.run_id}
