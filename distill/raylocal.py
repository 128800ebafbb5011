"""Starting or joining Ray the same way everywhere."""

from __future__ import annotations

import os

from distill.config import RayConfig

# Passed to every Ray worker so telemetry stays off there too.
WORKER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "1",
              "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              # Ray Train otherwise routes print() through its logger as well: every
              # progress line would reach the driver twice.
              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
             "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL")


def init_ray(cfg: RayConfig) -> None:
    """Join ``cfg.address`` (``auto`` or host:port), or start a local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    # The object store's endpoint and credentials (storage.root: s3://…) reach the workers too.
    runtime_env = {"env_vars": {**WORKER_ENV, **{k: v for k, v in os.environ.items() if k in STORE_ENV}}}
    # Workers log at ERROR: without the dashboard, Ray Train's placement-group cleaner
    # warns several times a second that the state API is unavailable. Progress lines
    # are printed, not logged, so they still reach the driver.
    logging_config = ray.LoggingConfig(encoding="TEXT", log_level="ERROR")
    # RAY_ADDRESS (set by `ray job submit`, or by the tests' shared Ray) joins that cluster.
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_config=logging_config)
        _quiet_ray_data()
        return
    ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), include_dashboard=False,
             object_store_memory=cfg.object_store_mb * 1024 * 1024, runtime_env=runtime_env,
             logging_config=logging_config, logging_level="WARNING")
    _quiet_ray_data()


def _quiet_ray_data() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # Ray Data's per-operator bars redraw as new lines in logs (DVC/Prefect capture the
    # output): the stages print their own progress instead.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
