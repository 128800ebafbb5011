"""MLflow helpers: the store's absolute location, the experiment, stage runs under a parent."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill.config import Config

PARENT_RUN_ENV = "DISTILL_PARENT_RUN_ID"


def tracking_uri(cfg: Config, root: Path | None = None) -> str:
    """``mlflow.tracking_uri`` or sqlite under ``<root>/mlflow/`` with an absolute path."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    root = (root or Path.cwd()).resolve()
    (root / "mlflow").mkdir(exist_ok=True)
    return f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"


def artifact_root(cfg: Config, root: Path | None = None) -> str:
    """Absolute artifact location, so artifacts never land in ``./mlruns`` of some cwd."""
    return ((root or Path.cwd()).resolve() / "mlflow" / "artifacts").as_uri()


def ensure_experiment(cfg: Config, root: Path | None = None) -> str:
    """Point MLflow at the store and create the experiment once; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=artifact_root(cfg, root))


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, root: Path | None = None) -> Iterator[Any]:
    """An MLflow run for one stage: a child of the flow's run when ``DISTILL_PARENT_RUN_ID`` is set."""
    import mlflow

    exp_id = ensure_experiment(cfg, root)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    tags = {"distill.stage": stage, "mlflow.source.git.commit": git_commit(root) or "unknown"}
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent,
                          nested=parent is not None, tags=tags) as run:
        yield run


def git_commit(root: Path | None = None) -> str | None:
    """The current git commit of the project, or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or Path.cwd(),
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (for ``log_params``)."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
