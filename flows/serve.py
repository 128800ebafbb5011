"""Recurring runs: serve the pipeline flow as a Prefect deployment on a cron schedule.

``distill serve --cron "0 3 * * 1"`` registers the deployment ``distill-pipeline/<name>``
with a Prefect server (``PREFECT_API_URL``) and polls it for scheduled and manually
triggered runs, each of which runs the whole pipeline on the project folder given here.
Prefect's temporary per-process server cannot hold schedules, so a real server is required.
"""

from __future__ import annotations

from pathlib import Path

import requests

from flows.pipeline import pipeline

API_CHECK_TIMEOUT_S = 5.0


def cron_schedule(cron: str, timezone: str = "UTC"):
    """A validated Prefect cron schedule; a bad expression or zone raises ValueError naming it."""
    from pydantic import ValidationError
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        problems = "; ".join(err["msg"].removeprefix("Value error, ") for err in exc.errors())
        raise ValueError(f"--cron {cron!r} --timezone {timezone!r}: {problems} (a cron expression has "
                         f"5 fields: minute hour day-of-month month day-of-week, e.g. '0 3 * * 1')") from exc


def prefect_api_url() -> str:
    """The Prefect server the deployment goes to; raises ValueError when none is set or up."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ValueError("no Prefect server: schedules need one. Start it with `prefect server start` "
                         "and point at it: `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`")
    try:
        requests.get(url.rstrip("/") + "/health", timeout=API_CHECK_TIMEOUT_S).raise_for_status()
    except requests.RequestException as exc:
        raise ValueError(f"the Prefect server at PREFECT_API_URL={url} is not answering ({exc}); "
                         f"start it with `prefect server start`") from exc
    return url


def serve_pipeline(root: Path, cron: str, timezone: str = "UTC", name: str = "weekly") -> None:
    """Register ``distill-pipeline/<name>`` on ``cron`` for the project at ``root`` and serve it."""
    if not (root / "params.yaml").is_file() or not (root / "dvc.yaml").is_file():
        raise ValueError(f"--root {root}: not a pipeline project (needs params.yaml and dvc.yaml)")
    schedule = cron_schedule(cron, timezone)
    url = prefect_api_url()
    print(f"serving distill-pipeline/{name} for {root} on '{cron}' ({timezone}) via {url}\n"
          f"trigger a run now with:  prefect deployment run 'distill-pipeline/{name}'")
    pipeline.serve(name=name, schedules=[schedule], parameters={"root": str(root)},
                   tags=["distill"], description=f"The distillation pipeline on {root}, on '{cron}'.")
