"""``distill gate-check``: was the gate right? Train the branch it did not take and compare.

After a pipeline run (``reports/train.json`` holds the branch the pipeline trained), this
trains the other branch with the train stage's own code (``tasks.train.run``) on the same
prepared data, the same budget (the steps the gate's decision gives that branch) and the
same settings, into ``models/gate_check/``. Distillation needs the teacher's labels: the
label stage's when it ran, else they are made here with the label stage's code into
``runs/gate_check/labels`` (a cache: a second check reuses them). Both students' validation
losses then say which branch really won and by how much; the gate's call (the law's
decision, even when ``gate.force`` overrode it) is scored against that. The verdict goes to
``reports/gate_check/verdict.json``, a line of ``reports/gate_check/calls.jsonl`` (the running
record on this machine) and the MLflow run ``gate-check`` (params, metrics, tags
``distill.gate_check.*``), which ``distill report`` lists as the record of the gate's calls.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from distill.config import Config
from distill.io import read_json, write_json
from tasks.common import (DECISION, LABELS, PREPARED, RUNS, TEACHER_JSON, TRAIN_REPORT, log_to_mlflow,
                          stage_main)

GATE_CHECK_MODELS = Path("models/gate_check")
GATE_CHECK_REPORTS = Path("reports/gate_check")
GATE_CHECK_LABELS = RUNS / "gate_check" / "labels"
VERDICT = GATE_CHECK_REPORTS / "verdict.json"
CALLS = GATE_CHECK_REPORTS / "calls.jsonl"
BRANCHES = ("supervised", "distill")


def run(cfg: Config) -> dict:
    """Train the branch the pipeline did not, score the gate's call; returns the verdict."""
    decision = read_json(DECISION)
    trained = _trained_branch(decision, read_json(TRAIN_REPORT))
    other = _other(trained)
    steps = (decision.get("train_steps") or {}).get(other, cfg.train.steps)
    if steps < 1:
        # compute-limited: the teacher's costs took the whole budget, so that branch cannot
        # train at all and the call was not a choice; it is not counted in the record
        print(f"gate check: {other} gets 0 steps under this budget ({DECISION}: train_steps); "
              "nothing to train and no call to score")
        return {"status": "infeasible", "trained_by_pipeline": trained, "infeasible": other}
    print(f"gate check: the pipeline trained {trained}; training {other} on the same data and budget "
          f"({steps} steps)")
    labels = _labels_for(cfg, other)
    from tasks.train import run as train_branch

    started = time.perf_counter()
    report = train_branch(cfg, out=GATE_CHECK_MODELS / other, report_path=GATE_CHECK_REPORTS / f"train_{other}.json",
                          branch=other, labels=labels)
    measured = {trained: read_json(TRAIN_REPORT)["val_loss"], other: report["val_loss"]}
    verdict = score_call(decision, measured)
    verdict.update(checked_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   seconds=time.perf_counter() - started, trained_by_pipeline=trained,
                   trained_by_check=other, teacher=read_json(TEACHER_JSON).get("fingerprint"),
                   data=read_json(PREPARED / "manifest.json").get("tokenizer", {}).get("hash"))
    write_json(VERDICT, verdict)
    with CALLS.open("a") as f:
        f.write(json.dumps(verdict, sort_keys=True) + "\n")
    _log(verdict)
    print(summary_line(verdict))
    return verdict


def _trained_branch(decision: dict, train_report: dict) -> str:
    """The branch reports/train.json trained; it must be the decision's (the same run)."""
    trained = str(train_report.get("mode", "")).split(" ")[0]
    if trained != decision["decision"]:
        raise ValueError(f"{TRAIN_REPORT}: trained {trained!r} but {DECISION} says {decision['decision']!r}; "
                         "run the train stage for this decision first (dvc repro train)")
    return trained


def _other(branch: str) -> str:
    return BRANCHES[1 - BRANCHES.index(branch)]


def _labels_for(cfg: Config, branch: str) -> Path:
    """Where the distill branch reads its labels: the label stage's when complete, else
    labels made here with the label stage's code (cached under runs/gate_check)."""
    if branch != "distill" or cfg.distill.source != "offline":
        return LABELS
    stage_manifest = LABELS / "manifest.json"
    if stage_manifest.is_file() and read_json(stage_manifest).get("status") == "complete":
        return LABELS
    from tasks.label import label_train_blocks

    print(f"the label stage skipped (the gate chose supervised): labeling into {GATE_CHECK_LABELS}")
    label_train_blocks(cfg, GATE_CHECK_LABELS, read_json(TEACHER_JSON), read_json(PREPARED / "manifest.json"))
    return GATE_CHECK_LABELS


def score_call(decision: dict, measured: dict[str, float]) -> dict:
    """Whether the gate's call (the law's decision) picked the branch with the lower measured
    validation loss, and by how much: ``regret`` is the loss given up by the call (0 when
    right), margins are L_supervised - L_distill (> 0: distillation better), predicted and measured."""
    call = decision.get("law_decision", decision["decision"])
    best = min(BRANCHES, key=lambda b: measured[b])
    measured_margin = measured["supervised"] - measured["distill"]
    predicted_margin = decision.get("loss_margin")
    return {
        "call": call, "forced": decision["decision"] != call, "right": call == best, "better": best,
        "regret": measured[call] - measured[best],
        "measured": dict(measured), "measured_margin": measured_margin,
        "predicted": {b: decision[b]["loss"] for b in BRANCHES},
        "predicted_margin": predicted_margin,
        "margin_error": None if predicted_margin is None else predicted_margin - measured_margin,
        "question": decision.get("question"), "scenario": decision.get("scenario"),
        "coefficients": decision.get("coefficients"), "in_support": decision.get("in_support"),
        "train_steps": decision.get("train_steps"),
    }


def summary_line(verdict: dict) -> str:
    """One line: the call, right or wrong, both measured losses and the regret."""
    m = verdict["measured"]
    word = "RIGHT" if verdict["right"] else "WRONG"
    return (f"gate check: the gate's call {verdict['call']} was {word} — measured validation loss "
            f"supervised {m['supervised']:.4f}, distill {m['distill']:.4f} (margin "
            f"{verdict['measured_margin']:+.4f} nats, predicted {_signed(verdict['predicted_margin'])}); "
            f"loss given up by the call: {verdict['regret']:.4f} nats")


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def _log(verdict: dict) -> None:
    """The verdict on the active MLflow run (the ``gate-check`` stage run)."""
    import mlflow

    log_to_mlflow(params={"gate_check": {k: verdict[k] for k in ("call", "forced", "question", "scenario",
                                                                  "coefficients", "trained_by_check")}},
                  metrics={"gate_check_right": float(verdict["right"]), "gate_check_regret": verdict["regret"],
                           "gate_check_measured_margin": verdict["measured_margin"],
                           "gate_check_supervised_loss": verdict["measured"]["supervised"],
                           "gate_check_distill_loss": verdict["measured"]["distill"],
                           **({"gate_check_predicted_margin": verdict["predicted_margin"]}
                              if verdict["predicted_margin"] is not None else {})},
                  artifacts=[VERDICT])
    if mlflow.active_run() is not None:
        mlflow.set_tags({"distill.gate_check.call": verdict["call"],
                         "distill.gate_check.right": str(verdict["right"]).lower()})


def main() -> None:
    """``python -m tasks.gate_check``."""
    stage_main("gate-check", run)


if __name__ == "__main__":
    main()
