"""storage.root: validated once, resolved to the folders every consumer uses; copying with a
local root (the same pyarrow calls an s3:// root makes; S3 itself: tests/integration/test_storage.py)."""

import pytest

from distill.config import ConfigError, build_config
from distill.storage import (dvc_remote_uri, mlflow_artifacts_uri, resolve_storage, runs_uri,
                             storage_for_ray_train)


@pytest.mark.parametrize("root, problem", [("relative/dir", "absolute path"),
                                           ("gs://bucket/x", "expected s3://"),
                                           ("s3://ab/x", "3\\+ characters")])
def test_bad_roots_are_refused_naming_the_key(root, problem):
    with pytest.raises(ConfigError, match=f"storage.root = .*{problem}"):
        build_config({"storage": {"root": root}})


def test_default_root_keeps_the_project_layout(tmp_path):
    cfg = build_config({})
    assert runs_uri(cfg, tmp_path / "runs") == str((tmp_path / "runs").resolve())
    assert mlflow_artifacts_uri(cfg, "file:///p/mlflow/artifacts") == "file:///p/mlflow/artifacts"
    assert dvc_remote_uri(cfg) is None


def test_an_s3_root_names_every_folder_under_it(tmp_path):
    cfg = build_config({"storage": {"root": "s3://bucket/team/run/"}})
    assert runs_uri(cfg, tmp_path) == "s3://bucket/team/run/runs"
    assert mlflow_artifacts_uri(cfg, "file:///x") == "s3://bucket/team/run/mlflow-artifacts"
    assert dvc_remote_uri(cfg) == "s3://bucket/team/run/dvc"
    assert storage_for_ray_train("/abs/runs") == {"storage_path": "/abs/runs"}


def test_a_local_root_uploads_lists_and_downloads(tmp_path):
    storage = resolve_storage(str(tmp_path / "store"))
    assert storage.explicit and not storage.remote and storage.files("labels") == []
    (tmp_path / "a.parquet").write_bytes(b"one")
    storage.upload(tmp_path / "a.parquet", "labels", "a.parquet")
    assert storage.files("labels") == ["a.parquet"] and storage.folders() == ["labels"]
    local = tmp_path / "clone"
    assert storage.download_missing(local, "labels") == ["a.parquet"]
    assert (local / "a.parquet").read_bytes() == b"one"
    assert storage.download_missing(local, "labels") == []  # only what is missing
    cfg = build_config({"storage": {"root": str(tmp_path / "store")}})
    assert mlflow_artifacts_uri(cfg, "x") == (tmp_path / "store" / "mlflow-artifacts").as_uri()


def test_text_files_by_path_round_trip_and_a_missing_one_is_none(tmp_path):
    from distill.storage import read_text, write_text

    target = str(tmp_path / "runs" / "teacher-x" / "DIVERGED")
    assert read_text(target) is None
    write_text(target, "diverged at step 3")
    assert read_text(target) == "diverged at step 3"


def test_calibration_points_are_copied_to_the_storage_and_fetched_back(tmp_path):
    from distill.calibration import PointStore
    from distill.storage import CALIBRATION

    storage = resolve_storage(str(tmp_path / "store"))
    PointStore(tmp_path / "node1", storage).put("abc", {"loss": 3.5})
    assert storage.files(CALIBRATION, "points") == ["abc.json"]
    assert storage.download_missing(tmp_path / "node2" / "points", CALIBRATION, "points") == ["abc.json"]
    assert PointStore(tmp_path / "node2").get("abc") == {"loss": 3.5}
