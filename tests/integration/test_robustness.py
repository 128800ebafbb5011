"""Robustness of the production loop, with real processes: an unreachable MLflow store is
reported before any compute, a second run at the same time refuses cleanly while the first
completes, and a run that fails mid-way leaves the model registry as it was."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import (BIN, TINY_PARAMS, copy_project, deep_merge, free_port, make_project, run,
                       stop_process_group)

pytestmark = pytest.mark.integration

MODEL = "distill-student"


def distill_run(project: Path, *args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """`distill run` on the project, from the project's own copy of the code."""
    return run([sys.executable, "-m", "flows.cli", "run", "--root", str(project), *args],
               cwd=project, check=check, **kw)


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")


def registry_state(project: Path) -> tuple[list[tuple[str, str]], dict]:
    client = mlflow_client(project)
    versions = sorted((v.version, v.run_id) for v in client.search_model_versions(f"name='{MODEL}'"))
    return versions, dict(client.get_registered_model(MODEL).aliases)


def pipeline_runs(project: Path) -> list:
    client = mlflow_client(project)
    exp = client.get_experiment_by_name("distill")
    return client.search_runs([exp.experiment_id], "tags.`distill.flow` = 'pipeline'",
                              order_by=["attributes.start_time ASC"])


def test_unreachable_tracking_store_fails_before_any_compute(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    project = make_project(tmp_path / "project", deep_merge(TINY_PARAMS, {"mlflow": {"tracking_uri": uri}}))
    started = time.monotonic()
    proc = distill_run(project)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"MLflow tracking store {uri} is unreachable" in proc.stderr and "Nothing was run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 60, f"took {seconds:.0f} s"  # process start + imports on a busy 2-core box
    assert not (project / "data" / "prepared").exists() and not (project / "dvc.lock").exists()
    # The flow itself (what a deployment runs) refuses the same way, before its first stage.
    from distill.tracking import TrackingStoreError
    from flows.pipeline import pipeline

    monkeypatch.chdir(project)
    with pytest.raises(TrackingStoreError, match=uri):
        pipeline.fn(root=str(project))
    assert not (project / "data" / "prepared").exists()


@pytest.fixture(scope="module")
def contested_project(tmp_path_factory, shared_ray, prefect_api, base_project):
    """A tiny project whose pipeline run had a second run started beside it (flows on the
    session's Prefect server; the project a copy of the session's base: prepare and teacher
    already run, the first run still holds the lock through gate, label, train, evaluate)."""
    from flows.runlock import lock_path, read_holder

    project = copy_project(base_project, tmp_path_factory.mktemp("contested") / "project")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log = project.parent / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--root", str(project)],
                                 cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while read_holder(lock_path(project)).get("pid") != first.pid:  # watch, never take it
            assert first.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.5)
        second = distill_run(project)
        from flows.pipeline import pipeline
        from flows.runlock import PipelineBusyError

        try:  # the flow itself (a deployment's run) refuses too, after waiting a little
            cwd = Path.cwd()
            pipeline.fn(root=str(project), wait_for_lock=2)
            in_flow = None
        except PipelineBusyError as exc:
            in_flow = exc
        finally:
            os.chdir(cwd)
        first.wait(timeout=1500)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    return {"project": project, "first": first, "first_log": log.read_text(), "second": second,
            "in_flow": in_flow}


def test_second_run_refuses_at_once_naming_the_holder(contested_project):
    second, first = contested_project["second"], contested_project["first"]
    assert second.returncode == 2, second.stdout + second.stderr
    assert "another pipeline run is using this project" in second.stderr
    assert f"pid {first.pid}" in second.stderr and "Nothing was run" in second.stderr
    assert "Traceback" not in second.stderr and "Unable to acquire lock" not in second.stderr
    assert "after waiting 2 s" in str(contested_project["in_flow"])


def test_first_run_completes_with_a_consistent_lock(contested_project):
    p = contested_project["project"]
    assert contested_project["first"].returncode == 0, contested_project["first_log"][-6000:]
    lock = yaml.safe_load((p / "dvc.lock").read_text())
    assert set(lock["stages"]) >= {"prepare", "teacher", "gate", "label", "train", "evaluate"}
    status = run([str(BIN / "dvc"), "status"], cwd=p)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    versions, _ = registry_state(p)
    assert len(versions) == 1  # one run registered one student; the refused ones nothing
    runs = pipeline_runs(p)
    assert [r.info.status for r in runs] == ["FINISHED"]  # refused runs opened no MLflow run


def test_run_failing_in_train_leaves_the_champion_untouched(contested_project):
    from flows.runlock import is_locked

    p = contested_project["project"]
    client = mlflow_client(p)
    versions, aliases = registry_state(p)
    if "champion" not in aliases:  # whatever evaluate decided, pin a champion to watch
        client.set_registered_model_alias(MODEL, "champion", versions[0][0])
        aliases = dict(client.get_registered_model(MODEL).aliases)
    lock_before = yaml.safe_load((p / "dvc.lock").read_text())
    student_before = (p / "models/student/model.safetensors").read_bytes()
    train = p / "tasks" / "train.py"
    code = train.read_text()
    assert code.count('\nif __name__ == "__main__":') == 1
    train.write_text(code.replace('\nif __name__ == "__main__":', '''
def run(cfg, *args, **kwargs):  # injected by the test: training crashes mid-pipeline
    raise RuntimeError("injected failure in train")


if __name__ == "__main__":'''))
    proc = distill_run(p, timeout=1200)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "injected failure in train" in proc.stdout + proc.stderr
    assert "stage train failed" in proc.stderr
    assert "Running stage 'evaluate'" not in proc.stdout  # the run stopped at train
    assert registry_state(p) == (versions, aliases)  # no new version, aliases where they were
    lock_after = yaml.safe_load((p / "dvc.lock").read_text())
    assert lock_after["stages"]["train"] == lock_before["stages"]["train"]
    assert lock_after["stages"]["evaluate"] == lock_before["stages"]["evaluate"]
    # DVC removes a stage's (non-persistent) outputs before running it: the failed train left
    # no student in the workspace, or the old one; never a half-written one.
    student = p / "models/student/model.safetensors"
    assert not student.exists() or student.read_bytes() == student_before
    assert [r.info.status for r in pipeline_runs(p)] == ["FINISHED", "FAILED"]
    assert is_locked(p) is None  # a failed run releases the project


def test_mlflow_server_over_the_project_store_passes_the_check(tmp_path):
    """The README's `mlflow server` command over a project's store: the check passes and a
    pipeline-style parent run logged through it lands in the project's sqlite database."""
    import requests

    from distill.config import load_config
    from distill.tracking import check_tracking_store, ensure_experiment

    project = make_project(tmp_path / "project")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    store = project / "mlflow"
    server = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                               "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1",
                               "--port", str(port)], cwd=project, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(1)
        check_tracking_store(uri)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["mlflow"]["tracking_uri"] = uri
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        import mlflow

        experiment = ensure_experiment(load_config(project / "params.yaml"), project)
        with mlflow.start_run(experiment_id=experiment, tags={"distill.flow": "pipeline"}):
            mlflow.log_metric("x", 1.0)
    finally:
        stop_process_group(server)  # the server and the workers it started (SIGKILL after 30 s)
    (logged,) = pipeline_runs(project)
    assert logged.data.metrics["x"] == 1.0
