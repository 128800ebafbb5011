"""Recurring runs: documents added to the project's corpus folder are picked up by the next
run (the folder is a DVC dependency of prepare), and each pipeline run's MLflow record
holds the data version it used and what changed since the previous run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import TINY_PARAMS, deep_merge, make_project, run

pytestmark = pytest.mark.integration

FIRST, ADDED = 24, 6


def corpus_files(n: int) -> list[Path]:
    """Mid-sized standard-library modules: real text, no duplicates, decodable."""
    from distill.corpus import stdlib_files

    files = [f for f in stdlib_files() if 3000 < f.stat().st_size < 15000]
    assert len(files) >= n
    return files[:n]


def add_documents(project: Path, files: list[Path]) -> None:
    for f in files:
        shutil.copy(f, project / "corpus" / f"{f.parent.name}_{f.name}")


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")


def lock_md5(project: Path, stage: str, path: str, kind: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(e["md5"] for e in lock["stages"][stage][kind] if e["path"] == path)


def artifact(client, run_id: str, name: str) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, name)).read_text())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, shared_ray, prefect_api):
    """A project on a local corpus folder: one run, then documents added, then a second run
    (both flows on the session's Prefect server)."""
    params = deep_merge(TINY_PARAMS, {"data": {"source": "corpus", "max_documents": 0}})
    project = make_project(tmp_path_factory.mktemp("recurring") / "project", params)
    files = corpus_files(FIRST + ADDED)
    add_documents(project, files[:FIRST])
    cli = [sys.executable, "-m", "flows.cli", "run", "--root", str(project)]
    first = run(cli, cwd=project, timeout=1500)
    versions = {"prepared": lock_md5(project, "prepare", "data/prepared", "outs"),
                "corpus": lock_md5(project, "prepare", "corpus", "deps")}
    add_documents(project, files[FIRST:])
    second = run(cli, cwd=project, timeout=1500)
    return {"project": project, "first": first, "second": second, "first_versions": versions}


def test_new_documents_rerun_prepare_and_dvc_records_the_new_version(two_runs):
    p = two_runs["project"]
    assert "Running stage 'prepare'" in two_runs["second"].stdout
    assert lock_md5(p, "prepare", "corpus", "deps") != two_runs["first_versions"]["corpus"]
    assert lock_md5(p, "prepare", "data/prepared", "outs") != two_runs["first_versions"]["prepared"]
    manifest = json.loads((p / "data/prepared/manifest.json").read_text())
    assert manifest["documents"]["total"] == FIRST + ADDED


def test_each_pipeline_run_records_its_data_version_and_the_change(two_runs):
    p = two_runs["project"]
    client = mlflow_client(p)
    exp = client.get_experiment_by_name("distill")
    first, second = client.search_runs([exp.experiment_id], "tags.`distill.flow` = 'pipeline'",
                                       order_by=["attributes.start_time ASC"])
    assert first.data.params["data.version"] == two_runs["first_versions"]["prepared"]
    assert first.data.params["data.corpus_md5"] == two_runs["first_versions"]["corpus"]
    assert artifact(client, first.info.run_id, "changes.json")["first_run"] is True
    # The second run: the new data version (DVC's md5s) and what changed since the first.
    assert second.data.params["data.version"] == lock_md5(p, "prepare", "data/prepared", "outs")
    assert second.data.params["data.corpus_md5"] == lock_md5(p, "prepare", "corpus", "deps")
    assert second.data.tags["distill.data.previous_run"] == first.info.run_id
    assert second.data.tags["distill.data.changed"] == "true"
    assert second.data.metrics["changes.documents_added"] == ADDED
    assert second.data.metrics["changes.documents_removed"] == 0
    assert second.data.metrics["data.documents"] == FIRST + ADDED
    assert second.data.metrics["changes.blocks_delta.train"] + second.data.metrics["changes.blocks_delta.val"] > 0
    changes = artifact(client, second.info.run_id, "changes.json")
    assert changes["prepare"] == "ran" and changes["previous_prepared_md5"] == first.data.params["data.version"]
    assert changes["labels"]["status"] == "complete" and "labeled_now" in changes["labels"]
    version = artifact(client, second.info.run_id, "data_version.json")
    assert version["prepared_md5"] == second.data.params["data.version"]
    if version["document_hashes"] is not None:  # prepare records per-document hashes
        assert changes["method"] == "per-document content hashes"
        assert len(version["document_hashes"]) == FIRST + ADDED
    assert "since previous run" in two_runs["second"].stdout  # the closing table says it too
