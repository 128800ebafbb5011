"""MLflow helpers: the store's absolute location, the experiment, stage runs under a parent."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill.config import Config
from distill.storage import mlflow_artifacts_uri

PARENT_RUN_ENV = "DISTILL_PARENT_RUN_ID"
# How long the pre-flight check waits for an HTTP tracking server. MLflow's own client
# retries a dead server with back-off for minutes; the check must answer in seconds.
STORE_CHECK_TIMEOUT_S = 5.0


class TrackingStoreError(RuntimeError):
    """The MLflow tracking store cannot be reached or written."""


def tracking_uri(cfg: Config, root: Path | None = None) -> str:
    """``mlflow.tracking_uri`` or sqlite under ``<root>/mlflow/`` with an absolute path."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    root = (root or Path.cwd()).resolve()
    (root / "mlflow").mkdir(exist_ok=True)
    return f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"


def artifact_root(cfg: Config, root: Path | None = None) -> str:
    """Absolute artifact location, so artifacts never land in ``./mlruns`` of some cwd."""
    return mlflow_artifacts_uri(cfg, ((root or Path.cwd()).resolve() / "mlflow" / "artifacts").as_uri())


def ensure_experiment(cfg: Config, root: Path | None = None) -> str:
    """Point MLflow at the store and create the experiment once; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg, root))
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=artifact_root(cfg, root))


def check_tracking_store(uri: str, timeout_s: float = STORE_CHECK_TIMEOUT_S) -> None:
    """Fail fast, naming ``uri`` and the fix, when the tracking store is unreachable or unwritable.

    Meant to run before any compute: ``http(s)`` gets one bounded request to the server's
    ``/health`` endpoint, ``sqlite`` a write transaction on the database file; other
    schemes (databases through SQLAlchemy, Databricks) are left to MLflow itself.
    """
    if uri.startswith(("http://", "https://")):
        _check_http_store(uri, timeout_s)
    elif uri.startswith("sqlite:"):
        _check_sqlite_store(uri, timeout_s)


def _store_error(uri: str, problem: str) -> TrackingStoreError:
    return TrackingStoreError(
        f"MLflow tracking store {uri} {problem}. Nothing was run. Start the server "
        f"(`mlflow server --backend-store-uri sqlite:///$PWD/mlflow/mlflow.db --artifacts-destination "
        f"$PWD/mlflow/artifacts --host 127.0.0.1 --port 5000`), or set mlflow.tracking_uri in "
        f"params.yaml to a store that is up (\"\" = the project's own sqlite store under mlflow/).")


def _check_http_store(uri: str, timeout_s: float) -> None:
    import requests

    url = uri.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=timeout_s)
    except requests.RequestException as exc:
        raise _store_error(uri, f"is unreachable ({type(exc).__name__}: {exc})") from exc
    if response.status_code != 200:
        raise _store_error(uri, f"answered {url} with HTTP {response.status_code}, not an MLflow "
                                f"tracking server that is up")


def _check_sqlite_store(uri: str, timeout_s: float) -> None:
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.parent.is_dir():
        raise _store_error(uri, f"is unusable: its folder {path.parent} does not exist")
    try:
        # A write transaction: proves the file (and its folder, for the journal) is writable.
        with contextlib.closing(sqlite3.connect(path, timeout=timeout_s)) as db:
            db.execute("BEGIN IMMEDIATE")
            db.rollback()
    except sqlite3.Error as exc:
        raise _store_error(uri, f"is not writable ({exc})") from exc


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
