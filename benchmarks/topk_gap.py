"""Student validation loss: offline top-k KD (several k) vs online full-logit KD vs supervised.

Runs on the project's embedded default after `make run` (it reuses `data/prepared` and
`models/teacher`): labels the train blocks at each k (content-addressed, under
`runs/bench-topk/`), trains one student per setting with the pipeline's own Ray Train
code and `params.yaml`'s student and train sections, and prints each student's
validation loss and its gap to the full-logit student in nats.

    python benchmarks/topk_gap.py --k 8 32 128 --alphas 0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from distill.blocks import shard_paths
from distill.config import load_config
from distill.io import read_json, write_json
from distill.raylocal import init_ray
from distill.training import run_training, spec_from_config
from tasks.common import PREPARED, RUNS, TEACHER_DIR, TEACHER_JSON, quiet_telemetry
from tasks.label import label_train_blocks

OUT = RUNS / "bench-topk"


def labels_at(cfg, k: int, manifest: dict, teacher: dict) -> list[Path]:
    """Top-k label shards of the train blocks (the label stage's own code; reused per k)."""
    out = OUT / f"labels-k{k}"
    out.mkdir(parents=True, exist_ok=True)
    summary = label_train_blocks(cfg, out, teacher, manifest)
    print(f"k={k}: {summary['bytes_per_position']:.1f} bytes/position")
    return [out / s["label_file"] for s in summary["shards"]]


def train_student(cfg, name: str, loss, data_paths, manifest: dict, **extra) -> float:
    """One student with the pipeline's training code; returns its validation loss."""
    spec = spec_from_config(cfg, "student", cfg.student, cfg.train, loss, data_paths,
                            shard_paths(PREPARED / "val"), PREPARED, manifest, OUT / "ray", **extra)
    result = run_training(spec, OUT / f"student-{name}")
    print(f"{name}: validation loss {result.final['val_loss']:.4f}")
    return result.final["val_loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5])
    args = p.parse_args()
    quiet_telemetry()
    cfg = load_config("params.yaml")
    manifest, teacher = read_json(PREPARED / "manifest.json"), read_json(TEACHER_JSON)
    init_ray(cfg.ray)
    train = shard_paths(PREPARED / "train")
    losses = {"supervised": train_student(cfg, "supervised", None, train, manifest)}
    for alpha in args.alphas:
        kd = dataclasses.replace(cfg.distill, alpha=alpha)
        losses[f"online full logits, alpha {alpha}"] = train_student(
            cfg, f"online-a{alpha}", kd, train, manifest, teacher_dir=str(TEACHER_DIR.resolve()))
        for k in args.k:
            cfg_k = dataclasses.replace(cfg, distill=dataclasses.replace(kd, top_k=k))
            paths = labels_at(cfg_k, k, manifest, teacher)
            losses[f"offline top-{k}, alpha {alpha}"] = train_student(
                cfg_k, f"top{k}-a{alpha}", cfg_k.distill, paths, manifest, label_meta={"k": k})
    print(f"\nteacher validation loss {teacher['val_loss']:.4f} (its own {teacher['val_blocks']} blocks)")
    for alpha in args.alphas:
        full = losses[f"online full logits, alpha {alpha}"]
        for name, loss in losses.items():
            if name.endswith(f"alpha {alpha}") or name == "supervised":
                print(f"  {name:32s} {loss:.4f}  gap to full-logit KD {loss - full:+.4f} nats")
    write_json(OUT / "results.json", {"losses": losses, "teacher_val_loss": teacher["val_loss"]})
    print(json.dumps(losses, indent=2))


if __name__ == "__main__":
    main()
