"""Stage ``calibrate``: a sweep of small runs on this project's data, then the laws fitted to it.

Plans the sweep from ``calibrate`` params (student sizes × budgets, × teachers for
distillation), runs the points not finished yet as Ray tasks (each finished point is stored
under ``runs/calibrate/`` by content address, so an interrupted or repeated stage skips
them), logs each point as a child MLflow run, fits both laws and writes
``gate/coefficients.json`` (read by the gate), ``gate/calibration_points.json`` and the plot
``gate/calibration.png``.

The sweep serves the gate's ``gate.coefficients: auto``. When the gate is told to use the
paper's set or a coefficients file, the stage runs nothing and writes outputs saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

from distill.calibration import (PointStore, SweepContext, SweepPoint, data_hash, fit_calibration,
                                 load_sweep_data, loss_settings, mean_over_seeds, plan_points, plan_sweep,
                                 run_sweep, write_calibration)
from distill.config import Config
from distill.io import read_json, write_json
from distill.plots import plot_note
from distill.raylocal import init_ray
from distill.storage import CALIBRATION, resolve_storage
from tasks.common import (COEFFICIENTS, PREPARED, RUNS, TEACHER_DIR, TEACHER_JSON, log_to_mlflow,
                          calibration_skip_reason, stage_main, write_skipped)

CALIBRATION_POINTS = Path("gate/calibration_points.json")
CALIBRATION_PLOT = Path("gate/calibration.png")
CALIBRATION_STORE = RUNS / "calibrate"  # outside DVC's outputs: survives re-runs of the stage


def run(cfg: Config, out: Path = COEFFICIENTS, points_path: Path = CALIBRATION_POINTS,
        plot_path: Path = CALIBRATION_PLOT, store_root: Path = CALIBRATION_STORE) -> dict:
    """Run what is missing of the sweep, fit, write the outputs; returns a summary."""
    if reason := calibration_skip_reason(cfg):  # each output says why; stored points stay
        write_json(points_path, {"status": "skipped", "reason": reason, "points": []})
        plot_note(f"calibration skipped:\n{reason}", plot_path)
        return write_skipped("calibrate", out, reason)
    manifest, teacher = read_json(PREPARED / "manifest.json"), read_json(TEACHER_JSON)
    points = plan_points(cfg)
    ctx = SweepContext(data_hash(manifest), cfg.evaluate.max_blocks, loss_settings(cfg.distill),
                       teacher["fingerprint"])
    mirror = resolve_storage(cfg.storage.root)  # storage.root keeps a copy of every finished point
    if mirror.explicit and (fetched := mirror.download_missing(store_root / "points", CALIBRATION, "points")):
        print(f"fetched {len(fetched)} finished calibration points from {mirror.uri(CALIBRATION)}")
    store = PointStore(store_root, mirror if mirror.explicit else None)
    plan = plan_sweep(points, ctx, store)
    pending = len(plan.pending)
    print(f"calibration sweep: {len(points)} points, {len(points) - pending} already finished "
          f"(skipped), {pending} to run")
    if pending:
        init_ray(cfg.ray)
        data = load_sweep_data(PREPARED, manifest, cfg.evaluate.max_blocks)
        with point_progress(len(points), len(points) - pending) as on_point:
            records = run_sweep(plan, ctx, store, data, cfg.distill, str(TEACHER_DIR.resolve()),
                                cfg.calibrate.cpus_per_point, on_point=on_point)
    else:
        records = [plan.done[k] for k in plan.keys]
    cal = cfg.calibrate
    configurations = mean_over_seeds(records)
    fit = fit_calibration(configurations, cal.heldout_share, cal.fit_starts, cal.bootstrap, cfg.seed,
                          extra_quality={"data_hash": ctx.data_hash, "points": len(records),
                                         "configurations": len(configurations), "seeds": cal.seeds,
                                         "teacher_fingerprint": teacher["fingerprint"]})
    write_calibration(fit, out, points_path, plot_path)
    summary = {"points": len(points), "points_run": pending, "points_reused": len(points) - pending,
               "heldout": fit.heldout}
    print_fit(fit)
    log_to_mlflow(params={"calibrate": dataclasses.asdict(cfg.calibrate)},
                  metrics={"calibrate_points_run": pending, "calibrate_points_reused": len(points) - pending,
                           **{f"calibrate_heldout_{kind}_{k}": v for kind, err in fit.heldout.items()
                              for k, v in err.items()}},
                  artifacts=[out, points_path, plot_path])
    return summary


@contextlib.contextmanager
def point_progress(total: int, done: int) -> Iterator:
    """A rich progress bar of points done; yields the per-point callback (also logs to MLflow)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("calibration"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("points", total=total, completed=done)

        def on_point(point: SweepPoint, record: dict) -> None:
            bar.advance(task)
            n = int(bar.tasks[0].completed)
            lt = f" (L_T {record['L_T']:.4f})" if "L_T" in record else ""
            bar.console.print(f"[{n}/{total}] {point.describe()}: val loss {record['L']:.4f}{lt}, "
                              f"N={record['N']}, D={record['D']}, {record['seconds']:.1f} s")
            log_point_run(point, record)

        yield on_point


def log_point_run(point: SweepPoint, record: dict) -> None:
    """One child MLflow run per finished point, under the stage's run (none outside a stage run).
    The driver logs, not the Ray tasks: concurrent sqlite writers race."""
    import mlflow

    stage = mlflow.active_run()
    if stage is None:
        return
    tags = {"distill.calibration_point": record["key"], "distill.calibration_kind": point.kind}
    # The experiment must be named: without it a nested run lands in MLflow's "Default".
    with mlflow.start_run(experiment_id=stage.info.experiment_id, run_name=point.describe(),
                          nested=True, tags=tags):
        mlflow.log_params({k: v for k, v in record["point"].items()})
        mlflow.log_metrics({k: float(record[k]) for k in ("N", "D", "L", "L_T", "seconds") if k in record})


def print_fit(fit) -> None:
    """The fitted coefficients' quality in the terminal."""
    q = fit.coefficients.quality
    print(f"fit on {q['supervised_points']} supervised and {q['distillation_points']} distillation "
          f"configurations (mean of {q.get('seeds', 1)} seeds each): max |rel. error| {100 * q['supervised_max_abs_rel_error']:.2f}% / "
          f"{100 * q['distillation_max_abs_rel_error']:.2f}%")
    for kind, err in fit.heldout.items():
        print(f"held-out {kind} points ({err['n']}): mean |rel. error| {100 * err['mean_abs']:.2f}%, "
              f"max {100 * err['max_abs']:.2f}%")
    if not fit.heldout:
        print("no points held out (calibrate.heldout_share = 0): the prediction error is not measured")
    print(teacher_terms_line(fit.coefficients))


def teacher_terms_line(coefs) -> str:
    """Eq. 8's teacher terms (c0, c1, d1, f1) with their 95% bootstrap intervals, and how many
    distinct teacher losses they were fitted on (fewer than 3 cannot identify them)."""
    q = coefs.quality
    intervals = q.get("distillation_intervals_95") or {}
    terms = []
    for name in ("c0", "c1", "d1", "f1"):
        value = getattr(coefs.distillation, name)
        ci = intervals.get(name)
        terms.append(f"{name} {value:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""))
    n_teachers = q.get("distinct_teacher_losses")
    where = f" from {n_teachers} teacher losses" if n_teachers is not None else ""
    ci_note = "" if intervals else " (no intervals: calibrate.bootstrap = 0)"
    return f"Eq. 8 teacher terms{where}: {', '.join(terms)}{ci_note}"


def main() -> None:
    """``python -m tasks.calibrate``."""
    stage_main("calibrate", run)


if __name__ == "__main__":
    main()
