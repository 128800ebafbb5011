"""Stage ``train``: the student, by distillation from the labels or supervised, as the gate said.

Ray Train ``TorchTrainer`` with ``train.num_workers`` workers; checkpoints every
``train.checkpoint_every`` steps and resumes from them (see ``distill.training``).
Writes ``models/student/`` (HF format with tokenizer) and ``reports/train.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from distill.blocks import shard_paths
from distill.config import Config
from distill.io import read_json, write_json
from distill.labels import LabelSettings, check_label_settings
from distill.models import check_vocab_compatible
from distill.plots import plot_loss_curves
from distill.raylocal import init_ray
from distill.tokenizer import load_tokenizer
from distill.training import run_training, spec_from_config, tokens_per_run
from tasks.common import (DECISION, LABELS, PREPARED, REPORTS, RUNS, STUDENT_DIR, TEACHER_DIR,
                          TEACHER_JSON, TRAIN_REPORT, log_to_mlflow, mlflow_target, stage_main)


def run(cfg: Config, out: Path = STUDENT_DIR) -> dict:
    """Train the student and write its model and training report; returns the report."""
    decision = read_json(DECISION)
    manifest = read_json(PREPARED / "manifest.json")
    mode = decision["decision"]
    if mode == "distill":
        data_paths, label_meta = distillation_inputs(cfg, manifest)
        loss = cfg.distill
    else:
        data_paths, label_meta, loss = shard_paths(PREPARED / "train"), {}, None
    spec = spec_from_config(cfg, "student", cfg.student, cfg.train, loss, data_paths,
                            shard_paths(PREPARED / "val"), PREPARED, manifest, RUNS,
                            label_meta=label_meta, **mlflow_target(cfg))
    print(f"training the student ({mode}) for {cfg.train.steps} steps on "
          f"{cfg.train.num_workers} Ray Train worker(s)")
    init_ray(cfg.ray)
    started = time.perf_counter()
    result = run_training(spec, out)
    report = {"mode": mode, "steps": cfg.train.steps, "run_name": spec.run_name(),
              "tokens": tokens_per_run(cfg.train, manifest["block_size"], cfg.train.num_workers),
              "val_loss": result.final.get("val_loss"), "seconds": time.perf_counter() - started,
              "history": result.history}
    write_json(TRAIN_REPORT, report)
    curves = {"student": result.history}
    teacher_history = read_json(TEACHER_JSON).get("history") or []
    if teacher_history:
        curves["teacher"] = teacher_history
    curve = plot_loss_curves(curves, REPORTS / "student_loss.png", title=f"student ({mode})")
    log_to_mlflow(params={"train": cfg.train.__dict__, "mode": mode},
                  metrics={"student_val_loss": report["val_loss"] or float("nan"),
                           "train_seconds": report["seconds"]},
                  artifacts=[TRAIN_REPORT, curve])
    print(f"student ({mode}) validation loss {report['val_loss']:.4f} nats/token")
    return report


def distillation_inputs(cfg: Config, manifest: dict) -> tuple[list[Path], dict]:
    """Label shards checked against this run's settings, and the label metadata workers need."""
    labels = read_json(LABELS / "manifest.json")
    if labels.get("status") != "complete":
        raise ValueError(f"{LABELS / 'manifest.json'}: labels are {labels.get('status')!r}, but the "
                         f"decision is distill; re-run the label stage")
    teacher = read_json(TEACHER_JSON)
    if teacher["tokenizer_hash"] != manifest["tokenizer"]["hash"]:
        check_vocab_compatible(load_tokenizer(TEACHER_DIR).get_vocab(),
                               load_tokenizer(PREPARED / "tokenizer").get_vocab(),
                               str(TEACHER_DIR), "student (prepared data tokenizer)")
    expected = LabelSettings(teacher_fingerprint=teacher["fingerprint"],
                             tokenizer_hash=manifest["tokenizer"]["hash"],
                             k=min(cfg.distill.top_k, manifest["tokenizer"]["vocab_size"]),
                             temperature=cfg.distill.temperature)
    paths = [LABELS / s["label_file"] for s in labels["shards"]]
    check_label_settings(paths, expected)
    return paths, {"k": expected.k}


def main() -> None:
    """``python -m tasks.train``."""
    stage_main("train", run)


if __name__ == "__main__":
    main()
