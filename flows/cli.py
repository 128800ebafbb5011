"""The ``distill`` command line: the whole pipeline, one stage, or a question to the gate."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional

import typer

from tasks.common import quiet_telemetry

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Knowledge distillation of language models: prepare → teacher → gate → "
                       "label → train → evaluate.")

STAGES = ("prepare", "teacher", "label", "train", "evaluate")


@app.command()
def run(root: Path = typer.Option(Path("."), help="project folder (holds params.yaml, dvc.yaml)"),
        wait_for_lock: float = typer.Option(0.0, min=0.0, help="seconds to wait for another run of "
                                            "this project to finish (0 = refuse at once)")) -> None:
    """Run the whole pipeline as a Prefect flow (each stage through DVC)."""
    quiet_telemetry()
    from distill.config import ConfigError
    from distill.tracking import TrackingStoreError
    from flows.pipeline import StageFailed, pipeline, preflight
    from flows.runlock import PipelineBusyError, is_locked

    try:
        # Checked here too, before Prefect's temporary server starts: a bad store or a busy
        # project is reported in seconds. The flow checks again (deployments start there).
        preflight(root.resolve())
        if not wait_for_lock and (busy := is_locked(root.resolve())):
            raise PipelineBusyError(busy)
        pipeline(root=str(root), wait_for_lock=wait_for_lock)
    except (ConfigError, TrackingStoreError, PipelineBusyError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except StageFailed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command()
def serve(root: Path = typer.Option(Path("."), help="project folder the scheduled runs use"),
          cron: str = typer.Option("0 3 * * 1", help="cron schedule (default: Mondays 03:00)"),
          timezone: str = typer.Option("UTC", help="time zone of the cron schedule"),
          name: str = typer.Option("weekly", help="deployment name")) -> None:
    """Serve the pipeline on a cron schedule (needs a running Prefect server; Ctrl-C stops)."""
    quiet_telemetry()
    from flows.serve import serve_pipeline

    try:
        serve_pipeline(root.resolve(), cron, timezone, name)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def calibrate(root: Path = typer.Option(Path("."), help="project folder (holds params.yaml, dvc.yaml)")) -> None:
    """Calibrate the gate: sweep small runs on this data (Ray), fit the laws, write
    gate/coefficients.json (a Prefect flow running the calibrate stage and those before it)."""
    quiet_telemetry()
    from flows.calibrate import calibrate as calibrate_flow

    calibrate_flow(root=str(root))


def _stage_command(stage: str):
    def command(params: Path = typer.Option(Path("params.yaml"), help="parameters file")) -> None:
        from tasks.common import stage_main

        module = importlib.import_module(f"tasks.{stage}")

        stage_main(stage, module.run, ["--params", str(params)])

    command.__doc__ = f"Run only the {stage} stage (without DVC; `dvc repro -s {stage}` tracks it)."
    return command


for _stage in STAGES:
    app.command(name=_stage)(_stage_command(_stage))


@app.command()
def gate(
    params: Path = typer.Option(Path("params.yaml"), help="parameters file (stage mode)"),
    student_params: Optional[float] = typer.Option(None, help="student non-embedding parameters N_S"),
    student_tokens: Optional[float] = typer.Option(None, help="student training tokens D_S"),
    compute: Optional[float] = typer.Option(None, help="total FLOP budget C (instead of --student-tokens)"),
    teacher_params: Optional[float] = typer.Option(None, help="teacher non-embedding parameters N_T"),
    teacher_tokens: Optional[float] = typer.Option(None, help="teacher pretraining tokens D_T"),
    teacher_loss: Optional[float] = typer.Option(None, help="measured teacher loss L_T (calibrated only)"),
    scenario: str = typer.Option("teacher-inference", help="best-case | teacher-inference | "
                                 "teacher-pretraining | teacher-pretraining+inference"),
    coefficients: str = typer.Option("paper", help="paper, or a calibrated coefficients JSON file"),
    n_ctx: int = typer.Option(2048, help="context length"),
    n_vocab: int = typer.Option(32768, help="vocabulary size"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    plot: Optional[Path] = typer.Option(None, help="also write the decision map PNG here"),
) -> None:
    """Ask the scaling-law gate. With --student-params: answer that query; without: run the gate stage."""
    quiet_telemetry()
    if student_params is None:
        from tasks.common import stage_main
        from tasks.gate import run as run_gate

        stage_main("gate", run_gate, ["--params", str(params)])
        return
    from distill.gate import GateQuery, decide, format_table, plot_decision_map
    from distill.law import load_coefficients

    try:
        coefs = load_coefficients(coefficients)
        query = GateQuery(student_params=student_params, student_tokens=student_tokens, compute=compute,
                          teacher_params=teacher_params, teacher_tokens=teacher_tokens,
                          teacher_loss=teacher_loss, scenario=scenario, n_ctx=n_ctx,
                          n_vocab=n_vocab).validate()
        decision = decide(query, coefs)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if plot:
        plot_decision_map(query, coefs, plot, decision=decision)
    typer.echo(json.dumps(decision.to_dict(), indent=2) if as_json else format_table(decision))


def _registry_target(root: Path, params: Path | None) -> tuple[str, object]:
    """(tracking URI, config) of the project at ``root`` (its params.yaml unless ``params``)."""
    from distill.config import load_config
    from distill.tracking import tracking_uri

    cfg = load_config(params or root / "params.yaml")
    return tracking_uri(cfg, root.resolve()), cfg


@app.command()
def models(root: Path = typer.Option(Path("."), help="project folder (holds params.yaml)"),
           params: Optional[Path] = typer.Option(None, help="parameters file (default: ROOT/params.yaml)"),
           name: Optional[str] = typer.Option(None, help="registered model (default: evaluate.registered_model)")) -> None:
    """List the registered student versions: aliases, val loss, data version, run id."""
    quiet_telemetry()
    from rich.console import Console
    from rich.table import Table

    from distill import registry
    from distill.config import ConfigError

    try:
        uri, cfg = _registry_target(root, params)
        model = name or cfg.evaluate.registered_model
        rows = registry.list_versions(registry.client(uri), model)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    table = Table(title=f"{model} ({uri})")
    for column in ("version", "aliases", "val loss"):
        table.add_column(column, no_wrap=True)
    for column in ("data version", "val blocks", "run id", "why"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["version"], ", ".join(r["aliases"]),
                      "—" if r["val_loss"] is None else f"{r['val_loss']:.4f}", r["data_hash"] or "—",
                      "—" if r["val_blocks"] is None else str(r["val_blocks"]), r["run_id"] or "—",
                      r["reason"] or "")
    Console().print(table)


@app.command()
def promote(version: int = typer.Option(..., help="model version to move the alias to"),
            alias: str = typer.Option("champion", help="champion | challenger"),
            root: Path = typer.Option(Path("."), help="project folder (holds params.yaml)"),
            params: Optional[Path] = typer.Option(None, help="parameters file (default: ROOT/params.yaml)"),
            name: Optional[str] = typer.Option(None, help="registered model (default: evaluate.registered_model)")) -> None:
    """Move an alias (default ``champion``) to a model version by hand."""
    quiet_telemetry()
    from distill import registry
    from distill.config import ConfigError

    try:
        uri, cfg = _registry_target(root, params)
        moved = registry.promote(registry.client(uri), name or cfg.evaluate.registered_model, version, alias)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{moved['model']}@{moved['alias']}: version {moved['previous'] or 'none'} → "
               f"version {moved['version']}")


@app.command()
def report(root: Path = typer.Option(Path("."), help="project folder (holds params.yaml)"),
           params: Optional[Path] = typer.Option(None, help="parameters file (default: ROOT/params.yaml)")) -> None:
    """One page on the latest run: decision, predicted vs actual losses, champion, where to look.
    Printed, written to ROOT/reports/report.md and logged to the run in MLflow."""
    quiet_telemetry()
    from distill.config import ConfigError
    from flows.report import REPORT_MD
    from flows.report import report as write_report

    try:
        uri, cfg = _registry_target(root, params)
        write_report(uri, cfg.mlflow.experiment, cfg.evaluate.registered_model, out=root / REPORT_MD)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def main() -> None:
    """Entry point of the ``distill`` script."""
    app()


if __name__ == "__main__":
    main()
