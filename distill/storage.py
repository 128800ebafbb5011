"""One storage root (``storage.root``) for what a run keeps beyond the project's DVC outputs:
Ray Train's runs (checkpoints), label shards, calibration points, MLflow's artifacts and the
DVC remote, as folders under it.

The root is this project's folder (``""``, the default: the layout as before), an absolute
folder, or ``s3://bucket/prefix``. S3 goes through pyarrow's filesystem (and, for MLflow and
DVC, through their own S3 support); endpoint and credentials come from the standard AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) or the AWS config files, as every
client reads them — nothing here talks S3 by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Folders under an explicit root (the default root keeps the project's historical names).
RUNS, LABELS, CALIBRATION, MLFLOW_ARTIFACTS, DVC_REMOTE = "runs", "labels", "calibrate", "mlflow-artifacts", "dvc"


@dataclass(frozen=True)
class Storage:
    """A resolved storage root: ``root`` is an absolute local folder or ``s3://bucket/prefix``."""

    root: str
    explicit: bool  # set by storage.root (else the project's own folders)

    @property
    def remote(self) -> bool:
        """Whether the root is an object store (not a local folder)."""
        return "://" in self.root

    def uri(self, *parts: str) -> str:
        """The URI (or absolute local path) of ``parts`` under the root."""
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts]])

    def filesystem(self, *parts: str):
        """A pyarrow filesystem and the path of ``parts`` in it."""
        import pyarrow.fs as pafs

        if not self.remote:
            return pafs.LocalFileSystem(), self.uri(*parts)
        return pafs.FileSystem.from_uri(self.uri(*parts))

    def files(self, *parts: str) -> list[str]:
        """Names of the files directly in the folder ``parts`` (none if it does not exist)."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(*parts)
        selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
        return sorted(i.base_name for i in fs.get_file_info(selector) if i.type == pafs.FileType.File)

    def folders(self, *parts: str) -> list[str]:
        """Names of the folders directly in the folder ``parts`` (none if it does not exist)."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(*parts)
        selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
        return sorted(i.base_name for i in fs.get_file_info(selector) if i.type == pafs.FileType.Directory)

    def upload(self, local: Path, *parts: str) -> None:
        """Copy the local file ``local`` to ``parts`` (an S3 object appears whole or not at all)."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(*parts)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(local.resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)

    def download_missing(self, local_dir: Path, *parts: str) -> list[str]:
        """Copy the files of the folder ``parts`` that ``local_dir`` lacks; returns their names."""
        import pyarrow.fs as pafs

        fs, path = self.filesystem(*parts)
        local_dir.mkdir(parents=True, exist_ok=True)
        fetched = []
        for name in self.files(*parts):
            if not (local_dir / name).exists():
                tmp = local_dir / f".{name}.part"
                pafs.copy_files(f"{path}/{name}", str(tmp.resolve()), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
                tmp.rename(local_dir / name)
                fetched.append(name)
        return fetched


def storage_for_ray_train(uri: str) -> dict:
    """``RunConfig`` keywords for Ray Train runs under ``uri`` (a local folder or ``s3://``):
    the path in its pyarrow filesystem and that filesystem (Ray Train's own S3 support)."""
    if "://" not in uri:
        return {"storage_path": uri}
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    return {"storage_path": path, "storage_filesystem": fs}


def write_text(uri: str, text: str) -> None:
    """Write ``text`` to the file ``uri`` (a local path or ``s3://``), making its folder."""
    fs, path = _filesystem_of(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(uri: str) -> str | None:
    """The text of the file ``uri`` (a local path or ``s3://``), or None where there is none."""
    import pyarrow.fs as pafs

    fs, path = _filesystem_of(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _filesystem_of(uri: str):
    import pyarrow.fs as pafs

    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def resolve_storage(root: str, project: Path | None = None) -> Storage:
    """The storage of ``storage.root`` (validated by the config); ``""`` = the project folder."""
    if root:
        return Storage(root=root.rstrip("/"), explicit=True)
    return Storage(root=str((project or Path.cwd()).resolve()), explicit=False)


def runs_uri(cfg, default: Path) -> str:
    """Where Ray Train keeps runs: ``<root>/runs`` with ``storage.root``, else ``default``."""
    storage = resolve_storage(cfg.storage.root)
    return storage.uri(RUNS) if storage.explicit else str(default.resolve())


def mlflow_artifacts_uri(cfg, default: str) -> str:
    """MLflow's artifact location: ``<root>/mlflow-artifacts`` with ``storage.root``, else ``default``."""
    storage = resolve_storage(cfg.storage.root)
    if not storage.explicit:
        return default
    return storage.uri(MLFLOW_ARTIFACTS) if storage.remote else Path(storage.uri(MLFLOW_ARTIFACTS)).as_uri()


def dvc_remote_uri(cfg) -> str | None:
    """The DVC remote under ``storage.root`` (``<root>/dvc``), or None without one."""
    storage = resolve_storage(cfg.storage.root)
    return storage.uri(DVC_REMOTE) if storage.explicit else None
