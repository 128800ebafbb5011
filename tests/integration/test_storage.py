"""storage.root in a real S3 store (SeaweedFS on loopback, one per session): the teacher's Ray
Train run keeps its checkpoints there, the label shards and MLflow's artifacts go there, and a
re-run without the local copies resumes from what the store holds."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.integration.conftest import BIN, TINY_PARAMS, deep_merge, make_project, run
from tests.integration.s3 import seaweedfs
from tests.integration.test_labeling import decide_distill, stages

BUCKET = "distill-tests"


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """One SeaweedFS for the session; the AWS variables point every client (and the stages
    and Ray workers, which inherit them) at it while it runs."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as store:
        saved = {k: os.environ.get(k) for k in store.env()}
        os.environ.update(store.env())
        store.create_bucket(BUCKET)
        try:
            yield store
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def test_runs_labels_and_artifacts_live_in_s3_and_a_rerun_resumes_from_them(tmp_path, object_store,
                                                                               shared_ray):
    prefix = f"{BUCKET}/{tmp_path.name}"
    params = deep_merge(TINY_PARAMS, {
        "data": {"max_documents": 10, "max_doc_chars": 3000},
        "label": {"inline_blocks": 10 ** 6},  # labeled in the stage's process: no actor start
        "storage": {"root": f"s3://{prefix}"}})
    project = make_project(tmp_path / "project", params)
    first = stages(project, "prepare", "teacher")["teacher"].stdout
    assert "new run teacher-" in first
    decide_distill(project)
    stages(project, "label")

    objects = object_store.list(prefix)
    runs = [o for o in objects if o.startswith(f"{prefix}/runs/teacher-")]
    assert any("/checkpoint_" in o for o in runs), objects
    assert not (project / "runs").exists()  # nothing of the run on local disk
    manifest = json.loads((project / "data/labels/manifest.json").read_text())
    shards = {s["label_file"] for s in manifest["shards"]}
    assert shards and shards <= {o.rsplit("/", 1)[1] for o in objects if o.startswith(f"{prefix}/labels/")}
    artifacts = [o for o in objects if o.startswith(f"{prefix}/mlflow-artifacts/")]
    assert any(o.endswith("/teacher.json") for o in artifacts), artifacts

    # Without the local copies (a fresh clone, another node): the teacher run resumes from its
    # checkpoint in the store, and the labels come back from it without the teacher.
    shutil.rmtree(project / "data/labels")
    again = stages(project, "teacher", "label")
    assert "exists (same data, settings and code" in again["teacher"].stdout
    assert f"fetched {len(shards)} label shards from s3://{prefix}/labels" in again["label"].stdout
    second = json.loads((project / "data/labels/manifest.json").read_text())
    assert second["labeled_now"] == 0 and second["reused"] == manifest["blocks"]


def test_the_dvc_remote_under_the_storage_root_pushes_and_pulls(tmp_path, object_store):
    """flows.storage configures <storage.root>/dvc (dvc-s3): a fresh clone pulls what was pushed."""
    from distill.config import build_config
    from flows.storage import configure_dvc_remote

    prefix = f"{BUCKET}/{tmp_path.name}"
    cfg = build_config({"storage": {"root": f"s3://{prefix}"}})
    project = make_project(tmp_path / "project")
    (project / "notes.txt").write_text("kept in the object store")
    run([str(BIN / "dvc"), "add", "notes.txt"], cwd=project)
    assert configure_dvc_remote(project, cfg) == f"s3://{prefix}/dvc"
    run([str(BIN / "dvc"), "push"], cwd=project)
    assert [o for o in object_store.list(f"{prefix}/dvc") if "/files/md5/" in o]
    (project / "notes.txt").unlink()
    shutil.rmtree(project / ".dvc" / "cache")
    run([str(BIN / "dvc"), "pull", "notes.txt.dvc"], cwd=project)  # the stages never ran here
    assert (project / "notes.txt").read_text() == "kept in the object store"
