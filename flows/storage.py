"""The DVC remote under ``storage.root`` (``<root>/dvc``), configured for a project with DVC's
own S3 support (the ``dvc-s3`` plugin): ``dvc push`` / ``dvc pull`` then share the pipeline's
outputs through the same store as its runs, labels and artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from distill.config import Config
from distill.storage import dvc_remote_uri

REMOTE = "storage"


def configure_dvc_remote(root: Path, cfg: Config) -> str | None:
    """Make ``<storage.root>/dvc`` the project's default DVC remote (in ``.dvc/config.local``:
    the committed config stays as the user keeps it); returns its URI, or None without
    ``storage.root``. A store that is not AWS gets ``AWS_ENDPOINT_URL`` as its endpoint."""
    uri = dvc_remote_uri(cfg)
    if uri is None:
        return None
    dvc(root, "remote", "add", "--local", "--force", "--default", REMOTE, uri)
    if uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        dvc(root, "remote", "modify", "--local", REMOTE, "endpointurl", os.environ["AWS_ENDPOINT_URL"])
    return uri


def dvc(root: Path, *args: str) -> None:
    """Run a ``dvc`` command in ``root``; a failure raises with its output."""
    here = Path(sys.executable).parent / "dvc"  # the venv's dvc, as the stages run it
    proc = subprocess.run([str(here) if here.exists() else "dvc", *args], cwd=root, text=True,
                          capture_output=True)
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
