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
    stage: bool = typer.Option(False, "--stage", help="run the pipeline's gate stage on --params instead of "
                               "answering a query"),
    params: Path = typer.Option(Path("params.yaml"), help="parameters file (with --stage)"),
    question: Optional[str] = typer.Option(None, help="what is fixed: data-limited (the student's tokens; "
                                           "the teacher's cost not charged) | compute-limited (the FLOPs; "
                                           "the scenario's teacher costs charged, Eq. 9)"),
    student_params: Optional[float] = typer.Option(None, help="student non-embedding parameters N_S"),
    student_tokens: Optional[float] = typer.Option(None, help="student training tokens D_S (compute-limited: "
                                                   "the budget is supervised training on them)"),
    compute: Optional[float] = typer.Option(None, help="FLOP budget C (compute-limited, instead of "
                                            "--student-tokens)"),
    teacher_params: Optional[float] = typer.Option(None, help="teacher non-embedding parameters N_T"),
    teacher_tokens: Optional[float] = typer.Option(None, help="teacher pretraining tokens D_T"),
    teacher_loss: Optional[float] = typer.Option(None, help="measured teacher loss L_T (calibrated only)"),
    scenario: str = typer.Option("teacher-inference", help="which teacher costs a compute-limited question "
                                 "charges: best-case | teacher-inference | teacher-pretraining | "
                                 "teacher-pretraining+inference"),
    coefficients: str = typer.Option("paper", help="paper, or a calibrated coefficients JSON file"),
    n_ctx: int = typer.Option(4096, help="context length in the FLOP model (the paper's compute figures use 4096)"),
    n_vocab: int = typer.Option(32768, help="vocabulary size"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    plot: Optional[Path] = typer.Option(None, help="also write the decision map PNG here"),
) -> None:
    """Ask the scaling-law gate a question (--question, --student-params, ...), or run the
    pipeline's gate stage (--stage)."""
    quiet_telemetry()
    query_flags = {"--question": question, "--student-params": student_params,
                   "--student-tokens": student_tokens, "--compute": compute, "--teacher-params": teacher_params,
                   "--teacher-tokens": teacher_tokens, "--teacher-loss": teacher_loss, "--plot": plot}
    if stage:
        given = [flag for flag, value in query_flags.items() if value is not None] + (["--json"] if as_json else [])
        _usage_error(bool(given), f"--stage: runs the gate stage on {params} and takes no query flags "
                                  f"(got {', '.join(given)})")
        from tasks.common import stage_main
        from tasks.gate import run as run_gate

        stage_main("gate", run_gate, ["--params", str(params)])
        return
    _usage_error(student_params is None, "--student-params: missing; ask a question (--question, "
                                         "--student-params, --student-tokens or --compute, the teacher) or "
                                         "give --stage to run the pipeline's gate stage on params.yaml")
    from distill.gate import QUESTION_HELP, QUESTIONS

    _usage_error(question not in QUESTIONS, f"--question: {'missing' if question is None else repr(question)}; "
                                            f"say what is fixed: {QUESTION_HELP}")
    _check_plot_path(plot)
    decision, coefs, query = _ask_gate(question, student_params, student_tokens, compute, teacher_params,
                                       teacher_tokens, teacher_loss, scenario, coefficients, n_ctx, n_vocab)
    if plot:
        from distill.gate import plot_decision_map

        try:
            plot_decision_map(query, coefs, plot, decision=decision)
        except OSError as exc:
            _usage_error(True, f"--plot: cannot write {plot}: {exc.strerror or exc}")
    if as_json:
        for line in decision.warnings:  # the table prints them; with --json they go to stderr too
            typer.echo(f"warning: {line}", err=True)
        typer.echo(json.dumps(decision.to_dict(), indent=2))
    else:
        from distill.gate import format_table

        typer.echo(format_table(decision))


def _usage_error(failed: bool, message: str) -> None:
    """Exit 2 with ``error: message`` on stderr when ``failed``."""
    if failed:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)


def _check_plot_path(plot: Path | None) -> None:
    """--plot must name a file whose folder exists or can be made (no file on the way)."""
    if plot is None:
        return
    _usage_error(plot.is_dir(), f"--plot: {plot} is a folder; give a file name such as {plot / 'map.png'}")
    for parent in plot.parents:
        if parent.exists():
            _usage_error(not parent.is_dir(), f"--plot: cannot write {plot}: {parent} is a file, not a folder")
            break


def _ask_gate(question, student_params, student_tokens, compute, teacher_params, teacher_tokens,
              teacher_loss, scenario, coefficients, n_ctx, n_vocab):
    """(decision, coefficient set, query) for the CLI's flags; bad input exits 2 naming it.
    Warnings are collected into the decision (printed by the caller, without source lines)."""
    import warnings

    from distill.gate import GateQuery, decide
    from distill.law import load_coefficients

    try:
        coefs = load_coefficients(coefficients)
        query = GateQuery(student_params=student_params, student_tokens=student_tokens, compute=compute,
                          teacher_params=teacher_params, teacher_tokens=teacher_tokens,
                          teacher_loss=teacher_loss, scenario=scenario, question=question, n_ctx=n_ctx,
                          n_vocab=n_vocab).validate()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # every warning is also in decision.warnings
            decision = decide(query, coefs)
    except ValueError as exc:
        _usage_error(True, _flag_names(str(exc)))
    return decision, coefs, query


_QUERY_FIELDS = ("student_params", "student_tokens", "compute", "teacher_params", "teacher_tokens",
                 "teacher_loss", "question", "scenario", "n_ctx", "n_vocab")


def _flag_names(message: str) -> str:
    """The query's argument names as the CLI spells them (student_params -> --student-params)."""
    import re

    pattern = r"(?<![\w.'-])(" + "|".join(_QUERY_FIELDS) + r")(?![\w'-])"
    return re.sub(pattern, lambda m: "--" + m.group(1).replace("_", "-"), message)


@app.command(name="gate-check")
def gate_check(params: Path = typer.Option(Path("params.yaml"), help="parameters file")) -> None:
    """Score the gate's call: train the branch it did not take (same data, budget and train
    code), compare both students' validation losses, record the verdict in MLflow and
    reports/gate_check/ (run in the project folder after the pipeline)."""
    quiet_telemetry()
    from tasks.common import stage_main
    from tasks.gate_check import run as run_check

    stage_main("gate-check", run_check, ["--params", str(params)])


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
