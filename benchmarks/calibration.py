"""How well do the calibrated laws predict, and does the gate then pick the branch that wins?

Runs the calibration sweep of a project's params on its prepared data and teacher (by default
the embedded default after `make run`: ``data/prepared``, ``models/teacher``), plus the
pipeline's own configuration (``student`` size at ``train.steps``, supervised and distilled
from every teacher), with its own point store (finished points are reused on a re-run).
Then, for each split, fits both laws on the kept points and reports on the held-out ones:

* ``random``: a ``calibrate.heldout_share`` of the (size, budget) configurations, all their points;
* ``largest``: every configuration at the largest budget (extrapolation in tokens, as the paper
  tested by fitting weak models and predicting strong ones);
* ``query``: the pipeline's own configuration, fitted on the whole sweep (the decision
  ``make run`` takes).

Figures: mean/max |relative error| of Eq. 1 and Eq. 8 on held-out points, and the share of
held-out configurations (size, budget, teacher) where the gate — losses compared at equal
student tokens — picks the branch whose measured loss is lower.

A measured winner is only real when its margin exceeds the runs' own noise: every
configuration is the mean of ``calibrate.seeds`` runs (initialisation and data order), and
the picks are also reported over the configurations whose measured margin L_sup − L_dist
exceeds twice its standard error (the others are ties at this noise).

    python benchmarks/calibration.py --project /path/to/project [--store DIR] [--out result.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path("."),
                        help="project holding params.yaml, data/prepared and models/teacher")
    parser.add_argument("--params", type=Path, default=None, help="parameters (default: <project>/params.yaml)")
    parser.add_argument("--store", type=Path, default=None, help="point store (default: <project>/runs/calibrate)")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--fit-starts", type=int, default=None, help="L-BFGS-B starts (default: params)")
    parser.add_argument("--stored-only", action="store_true",
                        help="run nothing: evaluate the points already in the store (a partial sweep)")
    args = parser.parse_args()

    from tasks.common import quiet_telemetry

    quiet_telemetry()
    os.chdir(args.project.resolve())
    from distill.config import load_config

    cfg = load_config(args.params.resolve() if args.params else Path("params.yaml"))
    started = time.perf_counter()
    from distill.calibration import fit_calibration, mean_over_seeds
    from tasks.calibrate import teacher_terms_line

    runs, query_keys, seconds, trained = run_points(cfg, args.store or Path("runs/calibrate"), args.stored_only)
    records = mean_over_seeds(runs)
    noise = seed_noise(records)
    starts = args.fit_starts or cfg.calibrate.fit_starts
    results = {name: evaluate_split(records, held, starts)
               for name, held in splits(records, query_keys, cfg.calibrate.heldout_share).items()}
    full = fit_calibration(records, 0.0, n_starts=starts, n_bootstrap=cfg.calibrate.bootstrap, seed=cfg.seed)
    report = {"runs": len(runs), "points": len(records), "sweep_seconds": seconds,
              "runs_trained_now": trained, "points_per_s": trained / seconds if trained and seconds else None,
              "total_seconds": time.perf_counter() - started, "noise": noise, "splits": results,
              "teacher_terms": teacher_terms_line(full.coefficients),
              "params": dataclasses.asdict(cfg.calibrate)}
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def run_points(cfg, store_root: Path, stored_only: bool = False) -> tuple[list[dict], set[str], float, int]:
    """The sweep plus the pipeline's own configuration; returns every run's record, the query's
    keys, the wall time of the points run now and how many were."""
    from distill.calibration import (PointStore, SweepContext, data_hash, load_sweep_data,
                                     loss_settings, plan_points, plan_sweep, run_sweep, warmup_for_steps)
    from distill.io import read_json
    from distill.raylocal import init_ray
    from tasks.common import PREPARED, TEACHER_DIR, TEACHER_JSON

    manifest, teacher = read_json(PREPARED / "manifest.json"), read_json(TEACHER_JSON)
    points = plan_points(cfg)
    size = f"{cfg.student.layers}x{cfg.student.d_model}"
    # the student's supervised and distilled points (not a swept teacher's own run of that size)
    template = [p for p in points if p.size == size and p.kind != "teacher"]
    if not template:
        raise ValueError(f"calibrate.students must include the pipeline's student {size} for this benchmark")
    steps, warmup = cfg.train.steps, warmup_for_steps(cfg, cfg.train.steps)
    query = {dataclasses.replace(p, steps=steps, warmup_steps=warmup) for p in template}
    points += sorted(query - set(points), key=lambda p: (p.kind, p.teacher))
    ctx = SweepContext(data_hash(manifest), cfg.evaluate.max_blocks, loss_settings(cfg.distill),
                       teacher["fingerprint"])
    store = PointStore(store_root)
    plan = plan_sweep(points, ctx, store)
    print(f"{len(points)} points ({len(query)} of them the pipeline's own configuration), "
          f"{len(plan.pending)} to run", flush=True)
    t0 = time.perf_counter()
    if stored_only:
        records = [plan.done[k] for k in plan.keys if k in plan.done]
        print(f"--stored-only: evaluating the {len(records)} finished points", flush=True)
    elif plan.pending:
        init_ray(cfg.ray)
        data = load_sweep_data(PREPARED, manifest, cfg.evaluate.max_blocks)

        def progress(point, record):
            print(f"  {point.describe()}: {record['L']:.4f} ({record['seconds']:.0f} s)", flush=True)

        records = run_sweep(plan, ctx, store, data, cfg.distill, str(TEACHER_DIR.resolve()),
                            cfg.calibrate.cpus_per_point, on_point=progress)
    else:
        records = [plan.done[k] for k in plan.keys]
    seconds = time.perf_counter() - t0
    query_keys = {k for p, k in zip(points, plan.keys) if p in query}
    trained = 0 if stored_only else len(plan.pending)
    return records, query_keys, seconds, trained


def seed_noise(records: list[dict]) -> dict:
    """The runs' seed noise: median standard error of a configuration's mean loss, and of the
    margins L_sup − L_dist (empty with one seed per configuration)."""
    import numpy as np

    repeated = [r for r in records if len(r["L_runs"]) > 1]
    if not repeated:
        return {}
    sup = {config_of(r): r for r in repeated if r["kind"] == "supervised"}
    margins = [margin_sem(sup[config_of(r)], r) for r in repeated
               if r["kind"] == "distill" and config_of(r) in sup]
    return {"seeds": max(len(r["L_runs"]) for r in repeated),
            "loss_sem_median": float(np.median([r["L_sem"] for r in repeated])),
            "loss_std_median": float(np.median([np.std(r["L_runs"], ddof=1) for r in repeated])),
            "margin_sem_median": float(np.median(margins)) if margins else None}


def margin_sem(sup: dict, dist: dict) -> float:
    """Standard error of L_sup − L_dist from the two means' standard errors."""
    return (sup["L_sem"] ** 2 + dist["L_sem"] ** 2) ** 0.5


def config_of(record: dict) -> tuple:
    """A configuration: student size and budget (its supervised and distilled points)."""
    return record["size"], record["D"]


def splits(records: list[dict], query_keys: set[str], share: float) -> dict[str, set[str]]:
    """Held-out keys per split (see the module docstring)."""
    from distill.config import heldout_count
    from distill.io import sha256_bytes

    sweep = [r for r in records if r["key"] not in query_keys]
    configs = sorted({config_of(r) for r in sweep}, key=lambda c: sha256_bytes(repr(c).encode()))
    random_held = set(configs[: max(1, heldout_count(len(configs), share))])
    largest = max(r["D"] for r in sweep)
    return {
        "random": {r["key"] for r in sweep if config_of(r) in random_held} | query_keys,
        "largest": {r["key"] for r in sweep if r["D"] == largest} | query_keys,
        "query": set(query_keys),
    }


def evaluate_split(records: list[dict], held: set[str], n_starts: int) -> dict:
    """Fit on the kept points; held-out errors of both laws and the gate's branch-pick accuracy
    (also over the picks whose measured margin exceeds twice its standard error)."""
    from distill.calibration import fit_calibration, heldout_errors, predict_record

    kept = [dict(r) for r in records if r["key"] not in held]
    test = [r for r in records if r["key"] in held]
    fit = fit_calibration(kept, 0.0, n_starts=n_starts)
    coefs = fit.coefficients
    errors = heldout_errors(coefs, test)
    picks = branch_picks(coefs, test)
    decided = [p for p in picks if p["margin_sem"] > 0 and abs(p["measured_margin"]) > 2 * p["margin_sem"]]
    return {"fit_points": {"supervised": sum(r["kind"] == "supervised" for r in kept),
                           "distill": sum(r["kind"] == "distill" for r in kept)},
            "heldout": errors, "picks": picks,
            "pick_accuracy": (sum(p["correct"] for p in picks) / len(picks)) if picks else None,
            "decided_picks": {"correct": sum(p["correct"] for p in decided), "n": len(decided),
                              "supervised_wins": sum(p["actual"] == "supervised" for p in decided)},
            # how far the predicted margin L_sup - L_dist is from the measured one, in nats
            "margin_error": (sum(abs(p["predicted_margin"] - p["measured_margin"]) for p in picks)
                             / len(picks)) if picks else None,
            "predictions": [{"kind": r["kind"], "size": r["size"], "D": r["D"], "L_T": r.get("L_T"),
                             "measured": r["L"], "predicted": predict_record(coefs, r)} for r in test]}


def branch_picks(coefs, test: list[dict]) -> list[dict]:
    """For each held-out (size, budget, teacher) with both branches trained: the gate's pick
    (calibrated coefficients, measured L_T, equal student tokens) and the measured winner."""
    from distill.gate import GateQuery, decide

    sup = {config_of(r): r for r in test if r["kind"] == "supervised"}
    picks = []
    for r in (r for r in test if r["kind"] == "distill" and config_of(r) in sup):
        s = sup[config_of(r)]
        query = GateQuery(student_params=float(r["N"]), student_tokens=float(r["D"]),
                          teacher_loss=float(r["L_T"]), scenario="best-case")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # support is reported by the decision itself
            decision = decide(query, coefs)
        actual = "distill" if r["L"] < s["L"] else "supervised"
        picks.append({"size": r["size"], "D": r["D"], "L_T": r["L_T"], "gate": decision.decision,
                      "actual": actual, "correct": decision.decision == actual,
                      "measured_margin": s["L"] - r["L"], "margin_sem": margin_sem(s, r),
                      "predicted_margin": decision.supervised.loss - decision.distill.loss,
                      "in_support": decision.in_support})
    return picks


def print_report(report: dict) -> None:
    rate = f", {report['points_per_s']:.3f} points/s" if report.get("points_per_s") else ""
    print(f"\n{report['runs']} runs, {report['points']} configurations; sweep {report['sweep_seconds']:.0f} s "
          f"({report['runs_trained_now']} points trained now{rate}), total {report['total_seconds']:.0f} s")
    print(report["teacher_terms"])
    noise = report["noise"]
    if noise:
        print(f"seed noise ({noise['seeds']} seeds): median loss std {noise['loss_std_median']:.4f}, "
              f"standard error of a configuration's mean {noise['loss_sem_median']:.4f}, of a margin "
              f"{noise['margin_sem_median']:.4f} nats")
    print(f"{'split':<8} {'fit sup/dist':>12} {'Eq.1 held-out mean/max':>24} "
          f"{'Eq.8 held-out mean/max':>24} {'branch picks':>14} {'beyond noise':>19} {'margin err':>11}")
    for name, r in report["splits"].items():
        cells = []
        for kind in ("supervised", "distill"):
            e = r["heldout"].get(kind)
            cells.append(f"{100 * e['mean_abs']:.2f}% / {100 * e['max_abs']:.2f}% (n={e['n']})" if e else "-")
        picks = r["picks"]
        acc = f"{sum(p['correct'] for p in picks)}/{len(picks)}" if picks else "-"
        fp = r["fit_points"]
        err = f"{r['margin_error']:.3f}" if r["margin_error"] is not None else "-"
        dp = r["decided_picks"]
        beyond = f"{dp['correct']}/{dp['n']} ({dp['supervised_wins']} sup)" if noise else "-"
        print(f"{name:<8} {fp['supervised']:>5}/{fp['distill']:<6} {cells[0]:>24} {cells[1]:>24} {acc:>14} "
              f"{beyond:>19} {err:>11}")
    for p in report["splits"]["query"]["picks"]:
        print(f"pipeline's own configuration {p['size']}, D={p['D']}, L_T={p['L_T']:.4f}: gate says "
              f"{p['gate']} (predicted margin {p['predicted_margin']:+.4f}), measured winner {p['actual']} "
              f"(margin {p['measured_margin']:+.4f})")


if __name__ == "__main__":
    main()
