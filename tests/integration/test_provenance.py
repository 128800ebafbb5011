"""Change the code or a setting in a temporary copy of the project and see exactly its effect:
an unchanged project re-runs nothing, switching ``label.dtype`` relabels every block and
switching back reuses the first labels, a change to the loss code retrains and the student's
weights differ (real DVC, Ray, MLflow; tiny params, the calibration sweep off)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from .conftest import BIN, TINY_PARAMS, copy_project, run

pytestmark = pytest.mark.integration

STAGES = ["prepare", "teacher", "calibrate", "gate", "label", "train", "evaluate"]


def dvc(project: Path, *args: str) -> str:
    proc = run([str(BIN / "dvc"), *args], cwd=project, timeout=1500)
    return proc.stdout + proc.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def set_label_dtype(project: Path, dtype: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["label"]["dtype"] = dtype
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def label_manifest(project: Path) -> dict:
    return json.loads((project / "data/labels/manifest.json").read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory, shared_ray, base_project):
    """A tiny project after one full `dvc repro` (hf labels in float32), from a copy of the
    session's base (prepare and teacher already run: the loss change below re-runs teacher)."""
    params = {**TINY_PARAMS, "label": {**TINY_PARAMS["label"], "backend": "hf", "dtype": "float32"}}
    project = copy_project(base_project, tmp_path_factory.mktemp("provenance") / "project", params)
    (project / "first_repro.log").write_text(dvc(project, "repro"))
    return project


def test_an_unchanged_project_reruns_nothing(project):
    before = (project / "dvc.lock").read_text()
    out = dvc(project, "repro")
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert (project / "dvc.lock").read_text() == before


def test_switching_label_dtype_relabels_every_block_and_switching_back_reuses(project):
    first = label_manifest(project)
    blocks = first["blocks"]
    assert first["settings"]["dtype"] == "float32" and first["settings"]["backend"] == "hf"
    first_files = {s["label_file"]: digest(project / "data/labels" / s["label_file"]) for s in first["shards"]}

    set_label_dtype(project, "bfloat16")
    out = dvc(project, "repro", "-s", "label")
    assert f"labeling {blocks} of {blocks} train blocks (0 already labeled" in out
    second = label_manifest(project)
    assert second["settings"]["dtype"] == "bfloat16" and second["labeled_now"] == blocks
    assert not set(first_files) & {s["label_file"] for s in second["shards"]}
    for name, sha in first_files.items():  # the float32 labels stay beside them, untouched
        assert digest(project / "data/labels" / name) == sha

    set_label_dtype(project, "float32")
    out = dvc(project, "repro", "-s", "label")
    assert f"labeling 0 of {blocks} train blocks ({blocks} already labeled" in out
    back = label_manifest(project)
    assert back["reused"] == blocks and back["labeled_now"] == 0
    assert {s["label_file"] for s in back["shards"]} == set(first_files)
    assert "kept" in out and "shards of other label settings" in out


LOSS_CHANGE = '''

# A change to the loss (the test's): every z-loss weight grows by 0.5.
_original_init = DistillationLoss.__init__


def _init_with_more_z_loss(self, *args, **kwargs):
    kwargs["z_loss"] = kwargs.get("z_loss", 1e-4) + 0.5
    _original_init(self, *args, **kwargs)


DistillationLoss.__init__ = _init_with_more_z_loss
'''


def test_a_change_to_the_loss_code_retrains_and_the_student_differs(project):
    weights = project / "models/student/model.safetensors"
    before = digest(weights)
    old_run = json.loads((project / "reports/train.json").read_text())["run_name"]
    with (project / "distill/losses.py").open("a") as f:
        f.write(LOSS_CHANGE)
    out = dvc(project, "repro")
    report = json.loads((project / "reports/train.json").read_text())
    assert report["run_name"] != old_run and report["resumed_from"] == []
    assert f"student: new run {report['run_name']}" in out and f"not resuming {old_run}" in out
    assert "Running stage 'train'" in out and "Running stage 'teacher'" in out
    assert digest(weights) != before
