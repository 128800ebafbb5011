"""Champion / challenger in the MLflow model registry (MLflow client only).

Each registered student version is tagged with what it was measured on: its validation
loss, the prepared data's version (the DVC hash of ``data/prepared``) and how many
validation blocks were evaluated. A new version gets the alias ``champion`` only if it beats
(strictly lower validation loss) the current champion measured on the same data version and
the same number of validation blocks; otherwise ``challenger``. The comparison is written to
the version's tags and, when a run is named, to that run's tags and a JSON artifact.

A champion stays champion until beaten on the same data. When it was measured on other data
(a new data version, as in a weekly run on new data, or another number of validation blocks)
the caller's ``remeasure`` evaluates it on this run's validation blocks, its tags are updated
to that measurement (the previous one kept in ``distill.previous_evaluation``), and the new
version is compared with it as usual. A champion that cannot be measured on the new data (no
``remeasure``, or one that raises ``NotComparable``, e.g. another tokenizer: losses per token of
two vocabularies are not comparable) stays champion and the new version is the challenger; the
reason says why, and ``distill promote`` moves the alias by hand. A version without a champion
(the first) becomes the champion. Aliases are moved only by
``assign_alias`` (the last step of a successful evaluation) and ``promote`` (by hand).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

CHAMPION = "champion"
CHALLENGER = "challenger"
ALIASES = (CHAMPION, CHALLENGER)

TAG_VAL_LOSS = "distill.val_loss"
TAG_DATA = "distill.data_hash"
TAG_VAL_BLOCKS = "distill.val_blocks"
TAG_ALIAS = "distill.assigned_alias"
TAG_REASON = "distill.alias_reason"
TAG_PREVIOUS = "distill.previous_evaluation"


class NotComparable(Exception):
    """The champion cannot be measured on the new data (the message says why)."""


@dataclass(frozen=True)
class Evaluation:
    """What a version was measured on and how it did (lower ``val_loss`` is better)."""

    val_loss: float
    data_hash: str
    val_blocks: int

    def comparable_with(self, other: Evaluation) -> bool:
        """Same data version and same validation blocks: the losses can be compared."""
        return self.data_hash == other.data_hash and self.val_blocks == other.val_blocks


@dataclass(frozen=True)
class Outcome:
    """The alias a new version got and why."""

    model: str
    version: str
    alias: str
    comparable: bool
    reason: str
    evaluation: Evaluation
    champion_before: str | None = None
    champion_evaluation: Evaluation | None = None
    champion_remeasured: bool = False   # champion_evaluation was measured now, on this data

    @property
    def message(self) -> str:
        """One line for the terminal."""
        return f"{self.model} version {self.version} → {self.alias}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for the JSON artifact and reports)."""
        return asdict(self)


def client(tracking_uri: str | None = None):
    """An ``MlflowClient`` on ``tracking_uri`` (default: the current tracking URI)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def choose_alias(new: Evaluation, champion: Evaluation | None,
                 champion_version: str | None = None, remeasured: bool = False,
                 not_comparable_why: str = "") -> tuple[str, bool, str]:
    """The pure rule: (alias, comparable, reason) for a new version against the champion.
    ``remeasured``: the champion's evaluation was measured now, on the new version's data;
    ``not_comparable_why``: why a champion on other data could not be measured on it."""
    if not math.isfinite(new.val_loss):
        return CHALLENGER, False, f"validation loss is {new.val_loss}: never a champion"
    if champion is None:
        return CHAMPION, False, "no champion yet"
    if not new.comparable_with(champion):
        return CHALLENGER, False, (
            f"champion version {champion_version} was measured on other data "
            f"(data {champion.data_hash}, {champion.val_blocks} val blocks; this run: data "
            f"{new.data_hash}, {new.val_blocks} val blocks) and cannot be measured on this data"
            f"{': ' + not_comparable_why if not_comparable_why else ''}; it stays champion until "
            f"beaten on the same data (`distill promote` moves it by hand)")
    verdict = "beats" if new.val_loss < champion.val_loss else "does not beat"
    alias = CHAMPION if new.val_loss < champion.val_loss else CHALLENGER
    how = " (re-evaluated now on this data)" if remeasured else ""
    return alias, True, (f"val loss {new.val_loss:.4f} {verdict} champion version {champion_version} "
                         f"({champion.val_loss:.4f}{how}) on the same data {new.data_hash}")


def evaluation_of(version) -> Evaluation | None:
    """The ``Evaluation`` recorded in a model version's tags; None when it has none."""
    tags = version.tags or {}
    if not {TAG_VAL_LOSS, TAG_DATA, TAG_VAL_BLOCKS} <= tags.keys():
        return None
    return Evaluation(val_loss=float(tags[TAG_VAL_LOSS]), data_hash=tags[TAG_DATA],
                      val_blocks=int(tags[TAG_VAL_BLOCKS]))


def current_version(mlflow_client, model: str, alias: str):
    """The version holding ``alias``, or None when no version holds it."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(model, alias)
    except MlflowException as exc:
        # The sqlite store answers INVALID_PARAMETER_VALUE "... alias champion not found".
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc):
            return None
        raise


def assign_alias(mlflow_client, model: str, version: str, evaluation: Evaluation,
                 run_id: str | None = None,
                 remeasure: Callable[[Any], Evaluation] | None = None) -> Outcome:
    """Tag ``version`` with ``evaluation``, compare it with the champion, set ``champion`` or
    ``challenger``, and record the comparison (version tags; the run's tags and
    ``registry/comparison.json`` when ``run_id`` is given). ``remeasure(champion_version)``
    evaluates a champion measured on other data on ``evaluation``'s data (or raises
    ``NotComparable``)."""
    version = str(version)
    tag_evaluation(mlflow_client, model, version, evaluation)
    champion = current_version(mlflow_client, model, CHAMPION)
    champion_eval = None if champion is None else evaluation_of(champion)
    champion_version = None if champion is None else str(champion.version)
    if champion is not None and champion_eval is None:
        # A champion set without our tags (by hand, or by an older version of this code).
        champion_eval = Evaluation(float("nan"), "unknown", -1)
    remeasured, why = False, ""
    if (champion_eval is not None and remeasure is not None and math.isfinite(evaluation.val_loss)
            and not evaluation.comparable_with(champion_eval)):
        try:
            now = remeasure(champion)
        except NotComparable as exc:
            why = str(exc)
        else:
            if not evaluation.comparable_with(now):
                raise ValueError(f"re-evaluating champion version {champion_version} gave data "
                                 f"{now.data_hash}/{now.val_blocks} blocks, not this run's "
                                 f"{evaluation.data_hash}/{evaluation.val_blocks}")
            mlflow_client.set_model_version_tag(model, champion_version, TAG_PREVIOUS,
                                                repr(asdict(champion_eval)))
            tag_evaluation(mlflow_client, model, champion_version, now)
            champion_eval, remeasured = now, True
            print(f"champion version {champion_version} re-evaluated on data {now.data_hash} "
                  f"({now.val_blocks} val blocks): val loss {now.val_loss:.4f}", flush=True)
    alias, comparable, reason = choose_alias(evaluation, champion_eval, champion_version,
                                             remeasured, why)
    outcome = Outcome(model=model, version=version, alias=alias, comparable=comparable,
                      reason=reason, evaluation=evaluation, champion_before=champion_version,
                      champion_evaluation=champion_eval, champion_remeasured=remeasured)
    mlflow_client.set_registered_model_alias(model, alias, version)
    mlflow_client.set_model_version_tag(model, version, TAG_ALIAS, alias)
    mlflow_client.set_model_version_tag(model, version, TAG_REASON, reason[:5000])
    if run_id:
        log_outcome(mlflow_client, run_id, outcome)
    return outcome


def tag_evaluation(mlflow_client, model: str, version: str, evaluation: Evaluation) -> None:
    """Record on ``version`` what it was (last) measured on and its loss there."""
    for key, value in ((TAG_VAL_LOSS, repr(evaluation.val_loss)), (TAG_DATA, evaluation.data_hash),
                       (TAG_VAL_BLOCKS, str(evaluation.val_blocks))):
        mlflow_client.set_model_version_tag(model, version, key, value)


def log_outcome(mlflow_client, run_id: str, outcome: Outcome) -> None:
    """The comparison on the evaluating run: tags, a metric and ``registry/comparison.json``."""
    mlflow_client.set_tag(run_id, "distill.registry.version", outcome.version)
    mlflow_client.set_tag(run_id, "distill.registry.alias", outcome.alias)
    mlflow_client.set_tag(run_id, "distill.registry.champion_before", outcome.champion_before or "none")
    mlflow_client.set_tag(run_id, "distill.registry.comparable", str(outcome.comparable).lower())
    mlflow_client.set_tag(run_id, "distill.registry.champion_remeasured", str(outcome.champion_remeasured).lower())
    mlflow_client.set_tag(run_id, "distill.registry.reason", outcome.reason[:5000])
    if outcome.champion_evaluation is not None and math.isfinite(outcome.champion_evaluation.val_loss):
        mlflow_client.log_metric(run_id, "registry.champion_val_loss", outcome.champion_evaluation.val_loss)
    mlflow_client.log_dict(run_id, outcome.to_dict(), "registry/comparison.json")


def list_versions(mlflow_client, model: str) -> list[dict[str, Any]]:
    """Every version of ``model`` (newest first): aliases, val loss, data hash, run id."""
    require_model(mlflow_client, model)
    aliases: dict[str, list[str]] = {}
    for alias, version in (mlflow_client.get_registered_model(model).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in mlflow_client.search_model_versions(f"name='{model}'"):
        evaluation = evaluation_of(v)
        rows.append({"version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                     "val_loss": None if evaluation is None else evaluation.val_loss,
                     "data_hash": None if evaluation is None else evaluation.data_hash,
                     "val_blocks": None if evaluation is None else evaluation.val_blocks,
                     "run_id": v.run_id, "created": v.creation_timestamp,
                     "reason": (v.tags or {}).get(TAG_REASON)})
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def require_model(mlflow_client, model: str) -> None:
    """Fail with the registered model names when ``model`` is not one of them."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(model)
    except MlflowException as exc:
        known = sorted(m.name for m in mlflow_client.search_registered_models())
        raise ValueError(f"registered model {model!r} does not exist (registered: "
                         f"{', '.join(known) or 'none'}; evaluate registers "
                         f"evaluate.registered_model)") from exc


def promote(mlflow_client, model: str, version: str | int, alias: str = CHAMPION) -> dict[str, Any]:
    """Move ``alias`` to ``version`` by hand; returns {alias, version, previous}. A version
    promoted to champion stops being the challenger."""
    if alias not in ALIASES:
        raise ValueError(f"alias {alias!r} is not allowed (allowed: {', '.join(ALIASES)})")
    version = str(version)
    versions = [r["version"] for r in list_versions(mlflow_client, model)]
    if version not in versions:
        raise ValueError(f"version {version} of {model!r} does not exist (versions: "
                         f"{', '.join(sorted(versions, key=int)) or 'none'})")
    previous = current_version(mlflow_client, model, alias)
    mlflow_client.set_registered_model_alias(model, alias, version)
    if alias == CHAMPION:
        challenger = current_version(mlflow_client, model, CHALLENGER)
        if challenger is not None and str(challenger.version) == version:
            mlflow_client.delete_registered_model_alias(model, CHALLENGER)
    mlflow_client.set_model_version_tag(model, version, TAG_ALIAS, alias)
    mlflow_client.set_model_version_tag(model, version, TAG_REASON, "promoted by hand")
    return {"model": model, "alias": alias, "version": version,
            "previous": None if previous is None else str(previous.version)}
