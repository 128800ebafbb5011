"""Student validation loss by label kind, with seeds: supervised, online full-logit KD, offline
top-k (k = 8/32/128) and sampled RS-KD labels (N = 12/32), at several λ; bytes/token of each.

Runs on the project's embedded default after `make run` (or `python -m tasks.prepare &&
python -m tasks.teacher`): it reuses `data/prepared` and `models/teacher`, labels the train
blocks once per label kind with the label stage's own code (content-addressed, under
`runs/bench-topk/`), and trains one student per (setting, λ, seed) with the pipeline's Ray
Train code and `params.yaml`'s student and train sections (`--steps` overrides train.steps).
The student's seed varies (initialisation and data order); the labels stay fixed.

Resumable: each finished run is stored as `runs/bench-topk/results/<run>.json` and skipped
when the script is run again, so it can be stopped at any time and continued. It prints the
mean ± standard error over seeds of each setting's validation loss and its gap to online
full-logit KD (same λ), writes `runs/bench-topk/summary.json` and a PNG of loss against
label bytes per token.

    python benchmarks/topk_gap.py --k 32 --samples 12 32      # the cells that decide the default
    python benchmarks/topk_gap.py                             # then the rest (k = 8/128)
    python benchmarks/topk_gap.py --summary-only              # table + PNG of what is stored

Results are keyed by label kind, λ, seed and steps, not by code: after a change to the
training or loss code, move `runs/bench-topk/results/` away before measuring again.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

from distill.blocks import shard_paths
from distill.config import load_config
from distill.io import read_json, write_json
from distill.raylocal import init_ray
from distill.training import run_training, spec_from_config
from tasks.common import PREPARED, RUNS, TEACHER_DIR, TEACHER_JSON, quiet_telemetry
from tasks.label import label_train_blocks

OUT = RUNS / "bench-topk"
RESULTS = OUT / "results"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One student recipe: ``kind`` supervised | online | topk | sampled; ``size`` k or N."""

    kind: str
    size: int = 0

    @property
    def name(self) -> str:
        return {"supervised": "supervised", "online": "online full logits",
                "topk": f"top-{self.size} + rest", "sampled": f"sampled N={self.size}"}[self.kind]

    @property
    def tag(self) -> str:
        return self.kind if self.kind in ("supervised", "online") else f"{self.kind}{self.size}"


def label_config(cfg, setting: Setting):
    """``cfg`` with the ``distill`` label keys of ``setting`` (top-k or sampled)."""
    if setting.kind == "topk":
        return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, label_kind="topk",
                                                                    top_k=setting.size))
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, label_kind="sampled",
                                                                samples=setting.size))


def labels_for(cfg, setting: Setting, manifest: dict, teacher: dict) -> tuple[list[Path], dict]:
    """Label shards of the train blocks for ``setting`` (cached per kind) and their summary."""
    out = OUT / f"labels-{setting.tag}"
    summary = label_train_blocks(label_config(cfg, setting), out, teacher, manifest)
    return [out / s["label_file"] for s in summary["shards"]], summary


def train_student(cfg, run: str, loss, data_paths, manifest: dict, **extra) -> dict:
    """One student with the pipeline's training code; its final metrics and wall time."""
    spec = spec_from_config(cfg, "student", cfg.student, cfg.train, loss, data_paths,
                            shard_paths(PREPARED / "val"), PREPARED, manifest, OUT / "ray", **extra)
    start = time.perf_counter()
    result = run_training(spec, OUT / f"student-{run}")
    return {"val_loss": result.final["val_loss"], "seconds": time.perf_counter() - start}


def run_one(cfg, setting: Setting, alpha: float, seed: int, manifest: dict, teacher: dict,
            labels: dict) -> dict:
    """Train (or load the stored result of) one (setting, λ, seed) run."""
    run = f"{setting.tag}-a{alpha}-s{seed}-n{cfg.train.steps}"
    path = RESULTS / f"{run}.json"
    if path.exists():
        return read_json(path)
    cfg_s = dataclasses.replace(label_config(cfg, setting) if setting.kind in ("topk", "sampled") else cfg,
                                seed=seed)
    kd = dataclasses.replace(cfg_s.distill, alpha=alpha)
    train = shard_paths(PREPARED / "train")
    if setting.kind == "supervised":
        metrics = train_student(cfg_s, run, None, train, manifest)
    elif setting.kind == "online":
        metrics = train_student(cfg_s, run, kd, train, manifest, teacher_dir=str(TEACHER_DIR.resolve()))
    else:
        paths, summary = labels[setting]
        samples = setting.size if setting.kind == "sampled" else 0
        metrics = train_student(cfg_s, run, kd, paths, manifest,
                                label_meta={"k": summary["settings"]["k"], "mode": "soft", "samples": samples})
    record = {"setting": setting.name, "tag": setting.tag, "alpha": None if setting.kind == "supervised" else alpha,
              "seed": seed, "steps": cfg.train.steps, **metrics}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    print(f"{run}: validation loss {record['val_loss']:.4f} ({record['seconds']:.0f} s)", flush=True)
    return record


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample s.d. / √n; nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarise(records: list[dict], bytes_per_token: dict[str, float], teacher_loss: float) -> dict:
    """Per (setting, λ): mean ± s.e. of the validation loss, its gap to online KD, bytes/token."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["tag"], r["setting"], r["alpha"]), []).append(r)
    rows = []
    for (tag, name, alpha), rs in sorted(groups.items(), key=lambda x: (str(x[0][2]), x[0][0])):
        mean, se = mean_se([r["val_loss"] for r in rs])
        rows.append({"tag": tag, "setting": name, "alpha": alpha, "seeds": sorted(r["seed"] for r in rs),
                     "val_loss": mean, "se": se, "bytes_per_token": bytes_per_token.get(tag)})
    for row in rows:
        online = [o for o in rows if o["tag"] == "online" and o["alpha"] == (row["alpha"] or o["alpha"])]
        row["gap_to_online"] = row["val_loss"] - online[0]["val_loss"] if online else None
        row["paired_gap"], row["paired_se"] = paired_gap(groups, row, online[0] if online else None)
    return {"teacher_val_loss": teacher_loss, "rows": rows}


def paired_gap(groups: dict, row: dict, online: dict | None) -> tuple[float | None, float | None]:
    """Mean ± s.e. over seeds of (this run − the online run of the same seed and λ): the seed's
    own luck (initialisation, data order) cancels where it is shared."""
    if online is None:
        return None, None
    mine = {r["seed"]: r["val_loss"] for r in groups[(row["tag"], row["setting"], row["alpha"])]}
    ref = {r["seed"]: r["val_loss"] for r in groups[("online", online["setting"], online["alpha"])]}
    diffs = [mine[s] - ref[s] for s in sorted(mine.keys() & ref.keys())]
    return mean_se(diffs) if diffs else (None, None)


def print_table(summary: dict) -> None:
    print(f"\nteacher validation loss {summary['teacher_val_loss']:.4f}")
    print(f"{'setting':24s} {'λ':>4s} {'seeds':>5s} {'val loss':>17s} {'gap to online':>13s} "
          f"{'paired gap':>17s} {'B/token':>8s}")
    for r in summary["rows"]:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:.1f}"
        gap = "" if r["gap_to_online"] is None else f"{r['gap_to_online']:+.4f}"
        size = "" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}"
        paired = "" if r["paired_gap"] is None else f"{r['paired_gap']:+.4f} ± {r['paired_se']:.4f}"
        print(f"{r['setting']:24s} {alpha:>4s} {len(r['seeds']):5d} {r['val_loss']:.4f} ± {r['se']:.4f} "
              f"{gap:>13s} {paired:>17s} {size:>8s}")


def plot(summary: dict, path: Path) -> Path:
    """Validation loss (mean ± s.e.) against label bytes per token, one marker per λ; the
    supervised and online students as horizontal lines (no labels on disk)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    alphas = sorted({r["alpha"] for r in summary["rows"] if r["alpha"] is not None})
    colours = dict(zip(alphas, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    named: set[str] = set()
    for r in summary["rows"]:
        if r["bytes_per_token"] is None:
            style = ("k", "--") if r["tag"] == "supervised" else (colours[r["alpha"]], ":")
            label = r["setting"] if r["alpha"] is None else f"{r['setting']}, λ={r['alpha']}"
            ax.axhline(r["val_loss"], color=style[0], linestyle=style[1], label=label)
            continue
        marker = "o" if r["tag"].startswith("topk") else "s"
        # the λ's of one label kind share its size: spread them a little so none hides another
        x = r["bytes_per_token"] * 1.04 ** (alphas.index(r["alpha"]) - (len(alphas) - 1) / 2)
        ax.errorbar(x, r["val_loss"], yerr=0 if math.isnan(r["se"]) else r["se"],
                    fmt=marker, color=colours[r["alpha"]], capsize=3)
        if r["tag"] not in named:  # one name per label kind (the λ's share an x)
            named.add(r["tag"])
            ax.annotate(r["setting"], (r["bytes_per_token"], r["val_loss"]), textcoords="offset points",
                        xytext=(6, 6), fontsize=8)
    sizes = sorted({r["bytes_per_token"] for r in summary["rows"] if r["bytes_per_token"] is not None})
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{x:.0f}" for x in sizes])
    ax.minorticks_off()
    ax.set_xlabel("label size on disk (bytes per token, log scale)")
    ax.set_ylabel("student validation loss (nats/token)")
    ax.set_title("student loss vs label size (○ top-k + rest, □ sampled, colour = λ; mean ± s.e. over seeds)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="*", default=[8, 32, 128])
    p.add_argument("--samples", type=int, nargs="*", default=[12, 32])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=0, help="train.steps override (0 = params.yaml)")
    p.add_argument("--summary-only", action="store_true",
                   help="train nothing: summarise every stored result at these steps")
    args = p.parse_args()
    quiet_telemetry()
    cfg = load_config("params.yaml")
    if args.steps:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=args.steps))
    manifest, teacher = read_json(PREPARED / "manifest.json"), read_json(TEACHER_JSON)
    if args.summary_only:
        records = [read_json(p) for p in sorted(RESULTS.glob(f"*-n{cfg.train.steps}.json"))]
        sizes = {d.name[len("labels-"):]: read_json(d / "manifest.json")["bytes_per_position"]
                 for d in OUT.glob("labels-*") if (d / "manifest.json").exists()}
        return report(records, sizes, teacher, cfg.train.steps)
    init_ray(cfg.ray)
    sparse = [Setting("topk", k) for k in args.k] + [Setting("sampled", n) for n in args.samples]
    labels = {s: labels_for(cfg, s, manifest, teacher) for s in sparse}
    bytes_per_token = {s.tag: summary["bytes_per_position"] for s, (_, summary) in labels.items()}
    # seeds outermost: a run stopped early still has every setting at its first seeds
    records = []
    for seed in args.seeds:
        records.append(run_one(cfg, Setting("supervised"), 0.0, seed, manifest, teacher, labels))
        for alpha in args.alphas:
            for setting in [Setting("online"), *sparse]:
                records.append(run_one(cfg, setting, alpha, seed, manifest, teacher, labels))
    report(records, bytes_per_token, teacher, cfg.train.steps)


def report(records: list[dict], bytes_per_token: dict[str, float], teacher: dict, steps: int) -> None:
    """Summary JSON, table and PNG of ``records``."""
    summary = summarise(records, bytes_per_token, teacher["val_loss"])
    summary["steps"] = steps
    write_json(OUT / "summary.json", summary)
    print_table(summary)
    print(f"plot: {plot(summary, OUT / 'topk_gap.png')}")


if __name__ == "__main__":
    main()
