"""Champion / challenger over real runs: two `dvc repro` runs of a tiny project where the second
student is worse (fewer training steps; prepared data and teacher reused), then a run that fails
in evaluate. Real DVC, Ray (the shared head), MLflow (sqlite) and the `distill` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import BIN, copy_project, run

pytestmark = pytest.mark.integration

MODEL = "distill-student"


def repro(project: Path, check: bool = True):
    return run([str(BIN / "dvc"), "repro"], cwd=project, timeout=1500, check=check)


def set_params(project: Path, section: str, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def client(project: Path):
    from distill.registry import client as registry_client

    return registry_client(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")


def aliases(project: Path) -> dict[str, str]:
    return {alias: str(v) for alias, v in client(project).get_registered_model(MODEL).aliases.items()}


def cli(project: Path, *args: str, check: bool = True):
    return run([str(BIN / "python"), "-m", "flows.cli", *args], cwd=project, check=check)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, shared_ray, base_project):
    """First run (20 train steps), second run with 3 steps: only gate..evaluate re-run.
    The project is a copy of the session's base (prepare and teacher already run)."""
    project = copy_project(base_project, tmp_path_factory.mktemp("registry") / "project")
    repro(project)
    first = json.loads((project / "reports/metrics.json").read_text())
    set_params(project, "train", steps=3, warmup_steps=1, eval_every=3, checkpoint_every=3)
    proc = repro(project)
    second = json.loads((project / "reports/metrics.json").read_text())
    return project, first, second, proc.stdout


def test_second_run_reuses_data_and_teacher(two_runs):
    _, _, _, log = two_runs
    for stage in ("prepare", "teacher"):
        assert f"Stage '{stage}' didn't change, skipping" in log
    assert "Running stage 'train'" in log and "Running stage 'evaluate'" in log


def test_calibrate_skips_its_sweep_when_the_gate_uses_the_papers_coefficients(two_runs):
    project, _, _, log = two_runs
    assert "calibrate stage skipped: gate.coefficients = paper" in log
    coefs = json.loads((project / "gate/coefficients.json").read_text())
    assert coefs["status"] == "skipped" and "set it to auto" in coefs["reason"]
    assert not list(project.glob("runs/calibrate/points/*.json"))  # no sweep point ran
    decision = json.loads((project / "gate/decision.json").read_text())
    assert decision["coefficients"] == "paper"


def test_worse_second_run_leaves_the_first_as_champion(two_runs):
    project, first, second, log = two_runs
    assert second["student"]["val_loss"] > first["student"]["val_loss"]
    assert aliases(project) == {"champion": "1", "challenger": "2"}
    assert "distill-student version 2 → challenger: val loss" in log and "does not beat champion version 1" in log
    v2 = client(project).get_model_version(MODEL, "2")
    evaluate = client(project).get_run(v2.run_id)
    assert evaluate.data.tags["distill.registry.alias"] == "challenger"
    assert evaluate.data.tags["distill.registry.comparable"] == "true"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    prepared = next(o["md5"] for o in lock["stages"]["prepare"]["outs"] if o["path"] == "data/prepared")
    assert v2.tags["distill.data_hash"] == prepared  # compared on the same DVC data version


def test_evaluation_outputs_are_read_by_dvc_and_logged(two_runs):
    project, _, second, _ = two_runs
    assert 0 <= second["top1_agreement"] <= second["top5_agreement"] <= 1
    assert 0 <= second["student"]["ece"] <= 1 and 0 <= second["teacher"]["ece"] <= 1
    samples = json.loads((project / "reports/samples.json").read_text())
    assert len(samples) == 3 and all({"prompt", "student", "teacher"} <= s.keys() for s in samples)
    shown = json.loads(run([str(BIN / "dvc"), "metrics", "show", "--json"], cwd=project).stdout)
    data = shown[""]["data"]["reports/metrics.json"]["data"]
    assert data["student"]["val_loss"] == second["student"]["val_loss"] and "top5_agreement" in data
    plots = json.loads(run([str(BIN / "dvc"), "plots", "show", "--json"], cwd=project).stdout)["data"]
    assert {"reports/loss_curves.csv", "reports/val_loss.csv", "reports/reliability.png",
            "reports/gate_outcome.png"} <= plots.keys()
    values = plots["reports/loss_curves.csv"][0]["content"]["data"]["values"]
    history = json.loads((project / "reports/train.json").read_text())["history"]
    assert [int(v["step"]) for v in values] == [h["step"] for h in history if "loss" in h]
    artifacts = {a.path for a in client(project).list_artifacts(
        client(project).get_model_version(MODEL, "2").run_id)}
    assert {"reliability.png", "gate_outcome.png", "samples.json", "metrics.json", "registry"} <= artifacts


def test_models_promote_and_report_commands(two_runs, monkeypatch):
    project, _, _, _ = two_runs
    monkeypatch.setenv("COLUMNS", "200")  # rich tables fold long cells at 80 columns
    table = cli(project, "models").stdout
    assert "champion" in table and "challenger" in table
    assert "error: version 9 of 'distill-student' does not exist (versions: 1, 2)" in \
           cli(project, "promote", "--version", "9", check=False).stderr
    assert "version 1 → version 2" in cli(project, "promote", "--version", "2").stdout
    assert aliases(project) == {"champion": "2"}
    cli(project, "promote", "--version", "1")
    assert aliases(project)["champion"] == "1"
    report = cli(project, "report").stdout
    md = (project / "reports/report.md").read_text()
    assert "Distillation run report" in report and "predicted − actual" in md
    assert "version 2 → **challenger**" in md


def test_a_run_failing_in_evaluate_leaves_the_champion_untouched(two_runs):
    project, _, _, _ = two_runs
    before = aliases(project)
    set_params(project, "evaluate", sample_prompt_tokens=30, sample_tokens=10)  # over the 32-token context
    proc = repro(project, check=False)
    assert proc.returncode != 0
    assert "evaluate.sample_prompt_tokens + evaluate.sample_tokens" in proc.stdout + proc.stderr
    assert aliases(project) == before
    assert len(client(project).search_model_versions(f"name='{MODEL}'")) == 2


def test_a_champion_on_other_validation_data_is_remeasured_there(two_runs, tmp_path):
    """Evaluate on 16 validation blocks (the champion was measured on 32): the champion (version
    1, 20 steps) is downloaded from the registry and measured on the 16, and the new version
    (3 steps) is compared with that: it does not beat it."""
    from .conftest import ROOT

    project, _, _, _ = two_runs
    params = yaml.safe_load((project / "params.yaml").read_text())
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())["evaluate"]
    params["evaluate"].update(max_blocks=16, sample_prompt_tokens=defaults["sample_prompt_tokens"],
                              sample_tokens=defaults["sample_tokens"])
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    proc = run([str(BIN / "python"), "-m", "tasks.evaluate", "--params", str(tmp_path / "p.yaml")], cwd=project)
    champion = aliases(project)["champion"]
    assert f"champion version {champion} re-evaluated on data" in proc.stdout
    new = max(client(project).search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    tags = client(project).get_model_version(MODEL, champion).tags
    assert tags["distill.val_blocks"] == "16" and "'val_blocks': 32" in tags["distill.previous_evaluation"]
    assert float(tags["distill.val_loss"]) < float(new.tags["distill.val_loss"])
    assert new.tags["distill.assigned_alias"] == "challenger"
    assert "re-evaluated now on this data" in new.tags["distill.alias_reason"]
