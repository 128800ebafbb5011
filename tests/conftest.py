"""Test-wide settings: telemetry off, offline, Prefect's home in a temp dir."""

import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="prefect-home-")

for key, value in {
    "DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PREFECT_HOME": _PREFECT_HOME,
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ[key] = value


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where CUDA is absent (this machine, CI)."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
