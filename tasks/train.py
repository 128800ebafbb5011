"""Stage ``train``: the student, by distillation from the labels or supervised, as the gate said.

Ray Train ``TorchTrainer`` with ``train.num_workers`` workers; checkpoints every
``train.checkpoint_every`` steps and resumes from them (see ``distill.training``).
Writes ``models/student/`` (HF format with tokenizer) and ``reports/train.json``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from distill.blocks import shard_paths
from distill.config import Config
from distill.io import read_json, write_json
from distill.labels import check_label_settings, settings_for_run
from distill.models import check_vocab_compatible
from distill.plots import plot_loss_curves
from distill.raylocal import init_ray
from distill.tokenizer import load_tokenizer
from distill.training import run_training, spec_from_config, tokens_per_run
from tasks.common import (DECISION, LABELS, PREPARED, RUNS, STUDENT_DIR, TEACHER_DIR,
                          TEACHER_JSON, TRAIN_REPORT, log_to_mlflow, mlflow_target, stage_main)


def run(cfg: Config, out: Path = STUDENT_DIR, decision_path: Path = DECISION,
        report_path: Path = TRAIN_REPORT, branch: str | None = None, labels: Path = LABELS) -> dict:
    """Train the student and write its model and training report; returns the report.

    ``branch`` (default: the gate's decision) trains the other branch too, for
    ``distill gate-check``, into ``out`` with its report at ``report_path`` (and its labels
    from ``labels``)."""
    decision = read_json(decision_path)
    manifest = read_json(PREPARED / "manifest.json")
    mode = branch or decision["decision"]
    cfg = with_branch_steps(cfg, decision, mode)
    extra: dict = {}
    if mode == "distill" and cfg.distill.source == "offline":
        data_paths, extra["label_meta"] = offline_inputs(cfg, manifest, labels)
    else:
        data_paths = shard_paths(PREPARED / "train")
    if mode == "distill" and cfg.distill.source == "online":
        check_same_vocabulary(manifest)
        extra["teacher_dir"] = str(TEACHER_DIR.resolve())
    loss = cfg.distill if mode == "distill" else None
    spec = spec_from_config(cfg, "student", cfg.student, cfg.train, loss, data_paths,
                            shard_paths(PREPARED / "val"), PREPARED, manifest, RUNS,
                            **extra, **mlflow_target(cfg))
    if mode == "distill":
        labels = f", {cfg.label.mode} labels" if "label_meta" in extra else ""
        mode = f"distill ({cfg.distill.source}{labels})"
    print(f"training the student ({mode}) for {cfg.train.steps} steps on "
          f"{cfg.train.num_workers} Ray Train worker(s)")
    init_ray(cfg.ray)
    started = time.perf_counter()
    result = run_training(spec, out)
    report = {"mode": mode, "steps": cfg.train.steps, "run_name": spec.run_name(),
              "resumed_from": result.resumed_from,
              "tokens": tokens_per_run(cfg.train, manifest["block_size"], cfg.train.num_workers),
              "val_loss": result.final.get("val_loss"), "seconds": time.perf_counter() - started,
              "history": result.history}
    write_json(report_path, report)
    curves = {"student": result.history}
    teacher_history = read_json(TEACHER_JSON).get("history") or []
    if teacher_history:
        curves["teacher"] = teacher_history
    curve = plot_loss_curves(curves, report_path.parent / "student_loss.png", title=f"student ({mode})")
    log_to_mlflow(params={"train": cfg.train.__dict__, "mode": mode},
                  metrics={"student_val_loss": report["val_loss"] or float("nan"),
                           "train_seconds": report["seconds"]},
                  artifacts=[report_path, curve])
    print(f"student ({mode}) validation loss {report['val_loss']:.4f} nats/token")
    return report


def with_branch_steps(cfg: Config, decision: dict, branch: str) -> Config:
    """``cfg`` with the steps the gate gave ``branch`` (a compute-limited question gives the
    distill branch fewer, after the teacher's costs); warm-up scaled with them so the
    schedule keeps its shape. Unchanged when the decision has no ``train_steps``."""
    steps = (decision.get("train_steps") or {}).get(branch, cfg.train.steps)
    if steps == cfg.train.steps:
        return cfg
    if steps < 1:
        raise ValueError(f"gate/decision.json: train_steps.{branch} = {steps}: the gate's compute-limited "
                         f"budget leaves the {branch} branch no steps")
    warmup = min(steps - 1, round(cfg.train.warmup_steps * steps / cfg.train.steps))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, warmup_steps=warmup))


def check_same_vocabulary(manifest: dict) -> dict:
    """Logit distillation needs the teacher's vocabulary to be the student's; returns teacher.json."""
    teacher = read_json(TEACHER_JSON)
    if teacher["tokenizer_hash"] != manifest["tokenizer"]["hash"]:
        check_vocab_compatible(load_tokenizer(TEACHER_DIR).get_vocab(),
                               load_tokenizer(PREPARED / "tokenizer").get_vocab(),
                               str(TEACHER_DIR), "student (prepared data tokenizer)")
    return teacher


def offline_inputs(cfg: Config, manifest: dict, folder: Path = LABELS) -> tuple[list[Path], dict]:
    """Label shards checked against this run's settings, and the label metadata workers need."""
    labels = read_json(folder / "manifest.json")
    if labels.get("status") != "complete":
        raise ValueError(f"{folder / 'manifest.json'}: labels are {labels.get('status')!r}, but the "
                         f"decision is distill (offline); re-run the label stage")
    teacher = check_same_vocabulary(manifest)
    expected = settings_for_run(cfg.distill.top_k, cfg.distill.temperature, teacher, manifest,
                                cfg.label, cfg.seed, cfg.distill.label_kind, cfg.distill.samples)
    paths = [folder / s["label_file"] for s in labels["shards"]]
    check_label_settings(paths, expected)
    # hard labels carry no top-k: the loss is then cross-entropy on the teacher's generations
    return paths, {"k": expected.k or None, "mode": expected.mode, "samples": expected.samples}


def main() -> None:
    """``python -m tasks.train``."""
    stage_main("train", run)


if __name__ == "__main__":
    main()
