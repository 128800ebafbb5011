"""Schedules, against a real Prefect server on loopback started here.

1. `distill serve --cron`: the deployment is registered with its cron schedule, the
   server's scheduler puts the next Mondays 03:00 on the calendar, a run triggered by hand
   (`run_deployment`, what `prefect deployment run` does) runs the whole tiny pipeline to a
   Completed state in the served process.
2. The README's other way, `prefect.yaml`: `prefect work-pool create`, `prefect deploy`,
   `prefect worker start`, `prefect deployment run`, on the project the first test already
   ran (DVC skips every stage, so this run proves the loop and completes fast).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import BIN, ROOT, copy_project, start_prefect_server, stop_process_group

pytestmark = pytest.mark.integration

SERVED = "distill-pipeline/served"
DEPLOYED = "distill-pipeline/weekly"  # prefect.yaml's deployment
CRON = "0 3 * * 1"


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(1)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out or exited waiting for {what}\n{tail}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free loopback port, with its own PREFECT_HOME and a
    scheduler that looks every 5 s (the cron's runs appear within the test)."""
    proc, url, env = start_prefect_server(tmp_path_factory.mktemp("prefect-server"),
                                          PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    try:
        yield url, env
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def project(tmp_path_factory, base_project):
    """A copy of the session's base project (prepare and teacher already run)."""
    return copy_project(base_project, tmp_path_factory.mktemp("scheduled") / "project")


def test_served_deployment_has_its_schedule_and_runs_the_pipeline(prefect_server, shared_ray, project):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, env = prefect_server
    log = project.parent / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--root", str(project),
                                  "--cron", CRON, "--name", "served"], cwd=project, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            deployment = wait_until(lambda: _deployment(client, SERVED), 180, "the served deployment", serve, log)
            assert [s.schedule.cron for s in deployment.schedules] == [CRON]
            assert deployment.schedules[0].active and deployment.parameters == {"root": str(project)}
            assert f"prefect deployment run '{SERVED}'" in log.read_text()

            flow_run = run_deployment(SERVED, timeout=0)  # what `prefect deployment run` does
            final = wait_until(lambda: _final(client, flow_run.id), 1200, "the triggered run", serve, log)
            assert final.state.is_completed(), f"{final.state}\n{log.read_text()[-6000:]}"
            # The server's scheduler has put the cron's next runs on the calendar: Mondays 03:00 UTC.
            upcoming = wait_until(lambda: _scheduled(client, deployment.id), 120, "scheduled runs", serve, log)
            assert all((t.weekday(), t.hour, t.minute) == (0, 3, 0) for t in upcoming)
    finally:
        stop_process_group(serve)
    # The served run did the whole pipeline in the project folder.
    assert (project / "dvc.lock").is_file() and (project / "models/student/model.safetensors").is_file()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["student"]["val_loss"] > 0


def test_prefect_yaml_deployment_runs_on_a_process_worker(prefect_server, shared_ray, project):
    """The README's commands, as written, against the same server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, env = prefect_server
    assert (project / "dvc.lock").is_file(), "needs the project the served run completed"
    shutil.copy(ROOT / "prefect.yaml", project / "prefect.yaml")
    prefect = str(BIN / "prefect")
    for cmd in ([prefect, "work-pool", "create", "distill", "--type", "process"],
                [prefect, "--no-prompt", "deploy", "--name", "weekly"]):
        proc = subprocess.run(cmd, cwd=project, env=env, text=True, capture_output=True, timeout=300)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    log = project.parent / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen([prefect, "worker", "start", "--pool", "distill"], cwd=project, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            deployment = _deployment(client, DEPLOYED)
            assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [(CRON, "UTC")]
            assert deployment.work_pool_name == "distill" and deployment.parameters["root"] == "."
            proc = subprocess.run([prefect, "deployment", "run", DEPLOYED], cwd=project, env=env,
                                  text=True, capture_output=True, timeout=300)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            run_id = _triggered_run(client, deployment.id)
            final = wait_until(lambda: _final(client, run_id), 900, "the worker's run", worker, log)
            assert final.state.is_completed(), f"{final.state}\n{log.read_text()[-6000:]}"
    finally:
        stop_process_group(worker)
    worker_log = log.read_text()
    for stage in ("prepare", "teacher", "train", "evaluate"):  # DVC had nothing to redo
        assert f"Stage '{stage}' didn't change, skipping" in worker_log


def _triggered_run(client, deployment_id):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    (manual,) = [r for r in runs if not r.auto_scheduled]  # the cron's runs are auto-scheduled
    return manual.id


def _deployment(client, name: str):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


def _scheduled(client, deployment_id) -> list:
    from datetime import timezone

    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
    return [r.expected_start_time.astimezone(timezone.utc) for r in runs]


def _final(client, flow_run_id):
    run = client.read_flow_run(flow_run_id)
    return run if run.state is not None and run.state.is_final() else None
