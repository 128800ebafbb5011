"""``distill report``: a one-page summary of the latest run, read back from MLflow.

The latest run is the newest pipeline flow run (tag ``distill.flow = pipeline``) or, when the
pipeline has only been run by ``dvc repro`` (no flow, no parent run), the newest ``evaluate``
stage run. The page holds the gate's decision and reason, both branches' predicted losses,
the actual student and teacher losses, predicted − actual, the champion comparison, and the
run ids with where to look in MLflow. It is printed with rich, written to
``reports/report.md`` and logged as ``report.md`` to that run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from distill import registry

REPORT_MD = Path("reports/report.md")


@dataclass
class RunFacts:
    """What the report needs, gathered from MLflow."""

    tracking_uri: str
    experiment_id: str
    run_id: str                      # the run the report belongs to (pipeline parent or evaluate)
    kind: str                        # "pipeline" or "evaluate"
    status: str
    stages: list[dict] = field(default_factory=list)   # [{stage, run_id, status}]
    evaluate_run_id: str | None = None
    metrics: dict | None = None
    decision: dict | None = None
    comparison: dict | None = None
    champion_now: str | None = None
    evaluate_reused: bool = False    # the flow skipped evaluate (unchanged): an earlier run's
    gate_calls: list[dict] = field(default_factory=list)  # finished gate-check runs, newest first


def find_latest_run(client, experiment_id: str):
    """The newest pipeline parent run, unless a standalone evaluate run (``dvc repro`` or a
    stage run by hand, no parent) started after it; None when there is neither."""
    def newest(query: str):
        runs = client.search_runs([experiment_id], filter_string=query, max_results=1,
                                  order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    pipeline = newest("tags.`distill.flow` = 'pipeline'")
    evaluate = newest("tags.`distill.stage` = 'evaluate'")
    if evaluate is None or "mlflow.parentRunId" in evaluate.data.tags:
        return pipeline or evaluate
    if pipeline is None or evaluate.info.start_time > pipeline.info.start_time:
        return evaluate
    return pipeline


def gather(client, experiment_name: str, registered_model: str) -> RunFacts:
    """Collect the latest run's stages, metrics, decision and champion comparison."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"MLflow experiment {experiment_name!r} does not exist at "
                         f"{client.tracking_uri} (mlflow.experiment; has the pipeline run?)")
    run = find_latest_run(client, experiment.experiment_id)
    if run is None:
        raise ValueError(f"no pipeline or evaluate run in experiment {experiment_name!r} at "
                         f"{client.tracking_uri}: run `distill run` (or `dvc repro`) first")
    facts = RunFacts(tracking_uri=client.tracking_uri, experiment_id=experiment.experiment_id,
                     run_id=run.info.run_id, status=run.info.status,
                     kind="pipeline" if run.data.tags.get("distill.flow") == "pipeline" else "evaluate")
    if facts.kind == "pipeline":
        children = client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
                                      order_by=["attributes.start_time ASC"])
        facts.stages = [{"stage": c.data.tags.get("distill.stage", c.info.run_name),
                         "run_id": c.info.run_id, "status": c.info.status} for c in children]
        evaluate = [c for c in children if c.data.tags.get("distill.stage") == "evaluate"
                    and c.info.status == "FINISHED"]
        facts.evaluate_run_id = evaluate[-1].info.run_id if evaluate else None
        if facts.evaluate_run_id is None and run.info.status == "FINISHED":
            # A finished flow whose evaluate stage DVC skipped (nothing changed): its results
            # are those of the newest evaluate run before it.
            facts.evaluate_run_id = latest_finished_evaluate(client, experiment.experiment_id)
            facts.evaluate_reused = facts.evaluate_run_id is not None
    else:
        facts.evaluate_run_id = run.info.run_id if run.info.status == "FINISHED" else None
    if facts.evaluate_run_id:
        facts.metrics = read_artifact_json(client, facts.evaluate_run_id, "metrics.json")
        facts.decision = read_artifact_json(client, facts.evaluate_run_id, "decision.json")
        facts.comparison = read_artifact_json(client, facts.evaluate_run_id, "registry/comparison.json")
    facts.gate_calls = gate_calls(client, experiment.experiment_id)
    champion = None
    if client.search_registered_models(f"name='{registered_model}'"):
        champion = registry.current_version(client, registered_model, registry.CHAMPION)
    facts.champion_now = None if champion is None else str(champion.version)
    return facts


GATE_CALLS_SHOWN = 20


def gate_calls(client, experiment_id: str, limit: int = GATE_CALLS_SHOWN) -> list[dict]:
    """The finished ``distill gate-check`` runs, newest first: when, the gate's call, whether
    it was right, both measured losses, the predicted and measured margins, the regret."""
    runs = client.search_runs([experiment_id], max_results=limit, order_by=["attributes.start_time DESC"],
                              filter_string="tags.`distill.stage` = 'gate-check' and "
                                            "attributes.status = 'FINISHED'")
    calls = []
    for r in runs:
        m, p = r.data.metrics, r.data.params
        if "gate_check_right" not in m:
            continue
        calls.append({"run_id": r.info.run_id, "start_time": r.info.start_time,
                      "call": p.get("gate_check.call"), "question": p.get("gate_check.question"),
                      "scenario": p.get("gate_check.scenario"), "coefficients": p.get("gate_check.coefficients"),
                      "right": m["gate_check_right"] >= 0.5, "regret": m.get("gate_check_regret"),
                      "supervised": m.get("gate_check_supervised_loss"),
                      "distill": m.get("gate_check_distill_loss"),
                      "measured_margin": m.get("gate_check_measured_margin"),
                      "predicted_margin": m.get("gate_check_predicted_margin")})
    return calls


def latest_finished_evaluate(client, experiment_id: str) -> str | None:
    """The newest finished evaluate stage run's id, or None."""
    runs = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string="tags.`distill.stage` = 'evaluate' and "
                                            "attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def read_artifact_json(client, run_id: str, path: str) -> dict | None:
    """A JSON artifact of a run; None when the run has no such artifact."""
    folder = str(Path(path).parent) if "/" in path else None
    if Path(path).name not in {Path(a.path).name for a in client.list_artifacts(run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())


def render_markdown(f: RunFacts, registered_model: str) -> str:
    """The one-page report as markdown."""
    lines = [f"# Distillation run report ({f.kind} run `{f.run_id}`, {f.status.lower()})", ""]
    if f.stages:
        lines += ["Stages: " + ", ".join(f"{s['stage']} ({s['status'].lower()})" for s in f.stages), ""]
    if f.metrics is None or f.decision is None:
        lines += ["**No evaluation in this run**: it stopped before the evaluate stage finished, "
                  "so no model version was registered and the champion was left untouched "
                  f"(champion now: {_version(f.champion_now)}).", ""]
    else:
        if f.evaluate_reused:
            lines += [f"The evaluate stage was unchanged in this run (DVC skipped it): the results "
                      f"below are those of evaluate run `{f.evaluate_run_id}`.", ""]
        lines += _result_lines(f, registered_model)
    lines += _gate_call_lines(f.gate_calls)
    lines += _where_lines(f)
    return "\n".join(lines) + "\n"


def _result_lines(f: RunFacts, registered_model: str) -> list[str]:
    d, m = f.decision, f.metrics
    chosen = d["decision"]
    student, teacher = m["student"]["val_loss"], m["teacher"]["val_loss"]
    predicted = d[chosen]["loss"]
    lines = ["## Decision", "", f"**{chosen}** — {d['reason']}", "",
             f"Coefficients: {d['coefficients']} (query inside their support: {d['in_support']})"
             + (f"; question {d['question']}, scenario {d['scenario']}." if "question" in d else "."), "",
             "## Losses (validation, nats/token)", "",
             "| | supervised | distill |", "|---|---|---|",
             f"| predicted by the gate | {_num(d['supervised']['loss'])} | {_num(d['distill']['loss'])} |",
             f"| actual student ({chosen}) | {_if(chosen, 'supervised', student)} | "
             f"{_if(chosen, 'distill', student)} |", "",
             f"- student: {student:.4f} (perplexity {m['student']['perplexity']:.1f}); teacher: "
             f"{teacher:.4f} (perplexity {m['teacher']['perplexity']:.1f})",
             f"- predicted − actual (student, {chosen}): {predicted - student:+.4f}",
             f"- KL(teacher‖student) {m['kl_teacher_student']:.4f}; top-1 agreement "
             f"{m['top1_agreement']:.1%}"
             + (f", top-5 {m['top5_agreement']:.1%}" if "top5_agreement" in m else ""),
             ]
    if "student_speedup" in m:
        lines.append(f"- size: student {m['student']['parameters']['total']:,} parameters, teacher "
                     f"{m['teacher']['parameters']['total']:,}; the student is "
                     f"{m['student_speedup']:.1f}× faster")
    if "ece" in m["student"]:
        lines.append(f"- calibration error (ECE): student {m['student']['ece']:.3f}, teacher "
                     f"{m['teacher']['ece']:.3f}")
    lines += ["", "## Champion", ""]
    c = f.comparison
    if c is None:
        lines.append(f"No registry comparison was logged by this run (champion now: "
                     f"{_version(f.champion_now)}).")
    else:
        champ = c.get("champion_evaluation") or {}
        known = c.get("champion_before") and math.isfinite(champ.get("val_loss", math.nan))
        before = (f"version {c['champion_before']} (val loss {champ['val_loss']:.4f})" if known
                  else _version(c.get("champion_before")))
        lines += [f"{registered_model} version {c['version']} → **{c['alias']}**: {c['reason']}.", "",
                  f"Champion before this run: {before}; champion now: {_version(f.champion_now)}."]
    return lines + [""]


def _gate_call_lines(calls: list[dict]) -> list[str]:
    """The running record of the gate's calls scored by ``distill gate-check``."""
    lines = ["## The gate's calls, checked", ""]
    if not calls:
        return lines + ["None checked yet: `distill gate-check` trains the branch the gate did not take "
                        "on the same data and budget and records whether the call was right.", ""]
    right = sum(c["right"] for c in calls)
    lines += [f"{right} of {len(calls)} checked calls right (newest first; margins are L_supervised − "
              "L_distill in nats, > 0: distillation better; regret: the loss the call gave up).", "",
              "| when (UTC) | call | question | right | supervised | distill | margin measured | "
              "margin predicted | regret |", "|---|---|---|---|---|---|---|---|---|"]
    for c in calls:
        when = datetime.fromtimestamp(c["start_time"] / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
        lines.append(f"| {when} | {c['call']} | {c['question'] or '—'} | {'yes' if c['right'] else '**no**'} | "
                     f"{_num(c['supervised'])} | {_num(c['distill'])} | {_num(c['measured_margin'], '+.4f')} | "
                     f"{_num(c['predicted_margin'], '+.4f')} | {_num(c['regret'])} |")
    return lines + [""]


def _num(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def _where_lines(f: RunFacts) -> list[str]:
    lines = ["## Where to look in MLflow", "",
             f"- tracking URI: `{f.tracking_uri}` (experiment id {f.experiment_id})",
             f"- this run: `{f.run_id}` — UI: `#/experiments/{f.experiment_id}/runs/{f.run_id}`"]
    if f.evaluate_run_id and f.evaluate_run_id != f.run_id:
        lines.append(f"- evaluate run: `{f.evaluate_run_id}` (metrics, reliability.png, "
                     f"gate_outcome.png, samples.json, registry/comparison.json)")
    lines += [f"- stage run `{s['stage']}`: `{s['run_id']}`" for s in f.stages if s["stage"] != "evaluate"]
    if f.tracking_uri.startswith("sqlite:///"):
        lines += ["", f"Browse: `mlflow ui --backend-store-uri {f.tracking_uri}`"]
    return lines


def _if(chosen: str, branch: str, value: float) -> str:
    return f"{value:.4f}" if chosen == branch else "—"


def _version(version: str | None) -> str:
    return f"version {version}" if version else "none"


def report(tracking_uri: str, experiment: str, registered_model: str,
           out: Path = REPORT_MD, console=None) -> str:
    """Gather, print (rich), write ``out`` and log ``report.md`` to the run; returns the markdown."""
    from rich.console import Console
    from rich.markdown import Markdown

    # Reading three small JSON artifacts needs no progress bars in the middle of the page.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = registry.client(tracking_uri)
    facts = gather(client, experiment, registered_model)
    markdown = render_markdown(facts, registered_model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    client.log_text(facts.run_id, markdown, "report.md")
    (console or Console()).print(Markdown(markdown))
    return markdown
