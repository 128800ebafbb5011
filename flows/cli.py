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
def run(root: Path = typer.Option(Path("."), help="project folder (holds params.yaml, dvc.yaml)")) -> None:
    """Run the whole pipeline as a Prefect flow (each stage through DVC)."""
    quiet_telemetry()
    from flows.pipeline import pipeline

    pipeline(root=str(root))


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


def main() -> None:
    """Entry point of the ``distill`` script."""
    app()


if __name__ == "__main__":
    main()
