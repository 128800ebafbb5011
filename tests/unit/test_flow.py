"""The flow's view of the DAG and the stage wrapper, without running anything heavy."""

from pathlib import Path

import pytest
import yaml

from flows.pipeline import stage_order

ROOT = Path(__file__).resolve().parents[2]


def test_stage_order_follows_dvc_yaml():
    assert stage_order(ROOT / "dvc.yaml") == ["prepare", "teacher", "gate", "label", "train", "evaluate"]


def test_every_stage_runs_its_task_module_and_declares_its_code():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m tasks.{name}"
        assert f"tasks/{name}.py" in stage["deps"]


def test_cycles_are_reported(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "x", "deps": ["b.out"], "outs": ["a.out"]},
        "b": {"cmd": "y", "deps": ["a.out"], "outs": ["b.out"]}}}))
    with pytest.raises(ValueError, match="cycle"):
        stage_order(tmp_path / "dvc.yaml")


def test_core_library_does_not_import_prefect_or_dvc():
    for path in (ROOT / "distill").rglob("*.py"):
        text = path.read_text()
        for banned in ("import prefect", "from prefect", "import dvc", "from dvc"):
            assert banned not in text, f"{path} imports {banned.split()[-1]}"
