"""Champion / challenger logic against a real MLflow registry (sqlite in a temp folder)."""

from __future__ import annotations

import json
import math

import pytest

from distill import registry
from distill.registry import CHALLENGER, CHAMPION, Evaluation

MODEL = "student-under-test"
DATA_A, DATA_B = "aaaa1111.dir", "bbbb2222.dir"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite store with one experiment; returns (client, experiment id)."""
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    client = registry.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("test", artifact_location=(tmp_path / "artifacts").as_uri())
    return client, exp


def new_version(client, exp) -> tuple[str, str]:
    """A run and a model version registered from it (no model files needed by the registry)."""
    run = client.create_run(exp)
    if not client.search_registered_models(f"name='{MODEL}'"):
        client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, source=f"runs:/{run.info.run_id}/student",
                                          run_id=run.info.run_id)
    return str(version.version), run.info.run_id


def assigned_versions(client, exp, *evaluations: Evaluation) -> list[tuple[str, str, registry.Outcome]]:
    """A new version per evaluation, each given its alias in turn: ``(version, run id, outcome)``."""
    made = []
    for evaluation in evaluations:
        version, run_id = new_version(client, exp)
        made.append((version, run_id, registry.assign_alias(client, MODEL, version, evaluation)))
    return made


def alias_of(client, alias: str) -> str | None:
    found = registry.current_version(client, MODEL, alias)
    return None if found is None else str(found.version)


def test_first_version_becomes_champion(store):
    client, exp = store
    version, run_id = new_version(client, exp)
    outcome = registry.assign_alias(client, MODEL, version, Evaluation(3.0, DATA_A, 32), run_id)
    assert outcome.alias == CHAMPION and outcome.reason == "no champion yet"
    assert alias_of(client, CHAMPION) == version
    run = client.get_run(run_id)
    assert run.data.tags["distill.registry.alias"] == CHAMPION
    assert run.data.tags["distill.registry.champion_before"] == "none"


def test_worse_second_version_is_challenger_and_first_stays_champion(store, tmp_path):
    client, exp = store
    v1, r1 = new_version(client, exp)
    registry.assign_alias(client, MODEL, v1, Evaluation(3.0, DATA_A, 32), r1)
    v2, r2 = new_version(client, exp)
    outcome = registry.assign_alias(client, MODEL, v2, Evaluation(3.5, DATA_A, 32), r2)
    assert outcome.alias == CHALLENGER and outcome.comparable and outcome.champion_before == v1
    assert "does not beat champion version 1 (3.0000)" in outcome.reason
    assert alias_of(client, CHAMPION) == v1 and alias_of(client, CHALLENGER) == v2
    run = client.get_run(r2)
    assert run.data.tags["distill.registry.comparable"] == "true"
    assert run.data.metrics["registry.champion_val_loss"] == 3.0
    logged = json.loads(open(client.download_artifacts(r2, "registry/comparison.json", str(tmp_path))).read())
    assert logged["alias"] == CHALLENGER and logged["champion_evaluation"]["val_loss"] == 3.0


def test_better_version_takes_the_champion_alias(store):
    client, exp = store
    _, (v2, _, outcome) = assigned_versions(client, exp, Evaluation(3.0, DATA_A, 32),
                                            Evaluation(2.9, DATA_A, 32))
    assert outcome.alias == CHAMPION
    assert alias_of(client, CHAMPION) == v2


def test_equal_loss_does_not_beat_the_champion(store):
    client, exp = store
    _, (_, _, outcome) = assigned_versions(client, exp, Evaluation(3.0, DATA_A, 32),
                                           Evaluation(3.0, DATA_A, 32))
    assert outcome.alias == CHALLENGER


@pytest.mark.parametrize("other", [Evaluation(1.0, DATA_B, 32), Evaluation(1.0, DATA_A, 64)])
def test_a_champion_on_other_data_that_cannot_be_remeasured_stays_champion(store, other):
    client, exp = store
    (v1, _, _), (v2, _, outcome) = assigned_versions(client, exp, Evaluation(3.0, DATA_A, 32), other)
    assert outcome.alias == CHALLENGER and not outcome.comparable and not outcome.champion_remeasured
    assert "measured on other data" in outcome.reason and "stays champion until beaten" in outcome.reason
    assert alias_of(client, CHAMPION) == v1 and alias_of(client, CHALLENGER) == v2


def remeasured_to(loss: float, calls: list):
    """A ``remeasure`` that measures the champion at ``loss`` on DATA_B (and records the call)."""
    def remeasure(version):
        calls.append(str(version.version))
        return Evaluation(loss, DATA_B, 32)
    return remeasure


@pytest.mark.parametrize("champion_now, new_alias", [(2.0, CHAMPION), (1.0, CHALLENGER)])
def test_new_data_remeasures_the_champion_and_promotes_only_if_beaten_there(store, tmp_path,
                                                                            champion_now, new_alias):
    client, exp = store
    v1, _ = new_version(client, exp)
    registry.assign_alias(client, MODEL, v1, Evaluation(3.0, DATA_A, 32))
    v2, run_id = new_version(client, exp)
    calls: list = []
    outcome = registry.assign_alias(client, MODEL, v2, Evaluation(1.5, DATA_B, 32), run_id=run_id,
                                    remeasure=remeasured_to(champion_now, calls))
    assert calls == [v1] and outcome.comparable and outcome.champion_remeasured
    assert outcome.alias == new_alias and "re-evaluated now on this data" in outcome.reason
    assert alias_of(client, CHAMPION) == (v2 if new_alias == CHAMPION else v1)
    # the champion's tags now say what it was measured on last; the old measurement is kept
    tags = client.get_model_version(MODEL, v1).tags
    assert tags[registry.TAG_DATA] == DATA_B and float(tags[registry.TAG_VAL_LOSS]) == champion_now
    assert "3.0" in tags[registry.TAG_PREVIOUS]
    run = client.get_run(run_id)
    assert run.data.tags["distill.registry.champion_remeasured"] == "true"
    assert run.data.metrics["registry.champion_val_loss"] == champion_now


def test_same_data_needs_no_remeasure(store):
    client, exp = store
    v1, _ = new_version(client, exp)
    registry.assign_alias(client, MODEL, v1, Evaluation(3.0, DATA_A, 32))
    v2, _ = new_version(client, exp)
    calls: list = []
    outcome = registry.assign_alias(client, MODEL, v2, Evaluation(2.0, DATA_A, 32),
                                    remeasure=remeasured_to(9.0, calls))
    assert calls == [] and outcome.alias == CHAMPION and not outcome.champion_remeasured


def test_a_champion_that_cannot_read_the_new_data_says_why(store):
    client, exp = store
    v1, _ = new_version(client, exp)
    registry.assign_alias(client, MODEL, v1, Evaluation(3.0, DATA_A, 32))
    v2, _ = new_version(client, exp)

    def remeasure(version):
        raise registry.NotComparable("another tokenizer")

    outcome = registry.assign_alias(client, MODEL, v2, Evaluation(1.0, DATA_B, 32), remeasure=remeasure)
    assert outcome.alias == CHALLENGER and "another tokenizer" in outcome.reason
    assert alias_of(client, CHAMPION) == v1


def test_non_finite_loss_is_never_champion():
    alias, comparable, reason = registry.choose_alias(Evaluation(math.nan, DATA_A, 32), None)
    assert alias == CHALLENGER and not comparable and "never a champion" in reason


def test_promote_moves_the_alias_by_hand(store):
    client, exp = store
    (v1, _, _), (v2, _, _) = assigned_versions(client, exp, Evaluation(3.0, DATA_A, 32),
                                               Evaluation(3.5, DATA_A, 32))
    moved = registry.promote(client, MODEL, v2)
    assert moved == {"model": MODEL, "alias": CHAMPION, "version": v2, "previous": v1}
    assert alias_of(client, CHAMPION) == v2
    assert alias_of(client, CHALLENGER) is None  # the promoted challenger is no longer one
    rows = {r["version"]: r for r in registry.list_versions(client, MODEL)}
    assert rows[v2]["aliases"] == [CHAMPION] and rows[v1]["aliases"] == []
    assert rows[v2]["reason"] == "promoted by hand"
    registry.promote(client, MODEL, int(v1), alias=CHALLENGER)
    assert alias_of(client, CHALLENGER) == v1


def test_list_versions_shows_metrics_and_aliases(store):
    client, exp = store
    (v1, r1, _), (v2, r2, _) = assigned_versions(client, exp, Evaluation(3.0, DATA_A, 32),
                                                 Evaluation(3.5, DATA_A, 32))
    rows = registry.list_versions(client, MODEL)
    assert [r["version"] for r in rows] == [v2, v1]
    assert rows[0] | {"created": None} == {
        "version": v2, "aliases": [CHALLENGER], "val_loss": 3.5, "data_hash": DATA_A, "val_blocks": 32,
        "run_id": r2, "created": None, "reason": rows[0]["reason"]}
    assert rows[1]["aliases"] == [CHAMPION] and rows[1]["run_id"] == r1


def test_unknown_version_model_or_alias_is_a_clear_error(store):
    client, exp = store
    v1, _ = new_version(client, exp)
    registry.assign_alias(client, MODEL, v1, Evaluation(3.0, DATA_A, 32))
    with pytest.raises(ValueError, match=r"version 7 of 'student-under-test' does not exist \(versions: 1\)"):
        registry.promote(client, MODEL, 7)
    with pytest.raises(ValueError, match=r"alias 'best' is not allowed \(allowed: champion, challenger\)"):
        registry.promote(client, MODEL, v1, alias="best")
    with pytest.raises(ValueError, match=r"registered model 'nope' does not exist \(registered: "
                                         r"student-under-test"):
        registry.list_versions(client, "nope")
    assert alias_of(client, CHAMPION) == v1  # nothing moved
