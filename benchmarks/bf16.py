"""bf16 autocast against float32 on this machine: teacher pretraining step, teacher labeling
(forward + top-k / sampled labels) and the student's training steps (supervised, offline
top-k KD with the fused loss, online full-logit KD), both sides in one process.

The models are params.yaml's teacher and student shapes (random weights: speed does not
depend on them) on random token ids of `data.block_size`, batches of `train.batch_size`
(training) and `label.batch_size` (labeling). Each side is timed as a median over
`--repeats` steps after warm-up; the sides alternate `--rounds` times so that drift in the
machine's load hits both, and the figure reported is the median over rounds of
bf16 time / float32 time (< 1: bf16 is faster). Labeling is also timed with the teacher's
weights in bf16 (`label.dtype: bfloat16`, the option that exists), not only under autocast.

    python benchmarks/bf16.py                  # 1 thread, as a stage's worker runs
    python benchmarks/bf16.py --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import numpy as np
import torch
from _timing import median_seconds

from distill.config import load_config
from distill.losses import DistillationLoss, topk_labels
from distill.models import build_llama
from distill.teachers.hf import HFLabeler
from distill.training import make_optimizer, train_step, with_online_labels


def autocast(on: bool):
    """CPU bf16 autocast when ``on``, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def cpu_has_bf16() -> str:
    """The CPU's bf16 instruction sets, as /proc/cpuinfo names them (empty when none)."""
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return ""
    return " ".join(sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")}))


def build_sides(cfg, k: int, samples: int) -> dict[str, tuple]:
    """name → (float32 step, bf16 step) closures, each one unit of the stage's work."""
    vocab, block = cfg.data.vocab_size, cfg.data.block_size
    teacher = build_llama(cfg.teacher, vocab, block, seed=0)
    student = build_llama(cfg.student, vocab, block, seed=1)
    teacher_bf16 = build_llama(cfg.teacher, vocab, block, seed=0).to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (cfg.train.batch_size, block), generator=gen)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    label_ids = torch.randint(0, vocab, (cfg.label.batch_size, block), generator=gen).numpy()
    label_batch = {"block_id": np.array([f"b{i}" for i in range(len(label_ids))], dtype=object),
                   "input_ids": label_ids}
    t_opt = make_optimizer(teacher, cfg.teacher.optim)
    s_opt = make_optimizer(student, cfg.train)
    ce = DistillationLoss(alpha=0.0, z_loss=cfg.distill.z_loss)
    kd = DistillationLoss(alpha=cfg.distill.alpha, temperature=cfg.distill.temperature,
                          z_loss=cfg.distill.z_loss, chunk_positions=cfg.distill.chunk_positions)
    with torch.no_grad():
        topk = topk_labels(teacher(input_ids=inputs).logits.flatten(0, 1), k, 1.0)
    frozen = build_llama(cfg.teacher, vocab, block, seed=0).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)

    def labeler(model, n: int) -> HFLabeler:
        lab = HFLabeler.from_model(model, k, 1.0, vocab, block)
        lab.samples, lab.sample_seed = n, 0
        return lab

    lab_topk, lab_topk_bf16w = labeler(teacher, 0), labeler(teacher_bf16, 0)
    lab_sampled = labeler(teacher, samples)

    def step(fn, on: bool):
        def run():
            with autocast(on):
                return fn()
        return run

    def teacher_train():
        out = train_step(teacher, ce, *t_opt, (inputs, targets, None), cfg.teacher.optim.grad_clip, 1)
        teacher.eval()
        return out

    units = {
        "teacher pretraining step": teacher_train,
        f"label top-{k} (batch {cfg.label.batch_size})": lambda: lab_topk(label_batch),
        f"label sampled N={samples} (batch {cfg.label.batch_size})": lambda: lab_sampled(label_batch),
        "student supervised step": lambda: train_step(student, ce, *s_opt, (inputs, targets, None),
                                                      cfg.train.grad_clip, 1),
        f"student offline top-{k} KD step": lambda: train_step(student, kd, *s_opt, (inputs, targets, topk),
                                                              cfg.train.grad_clip, 1),
        "student online full-logit KD step": lambda: train_step(
            student, kd, *s_opt, with_online_labels(frozen, (inputs, targets, None), vocab),
            cfg.train.grad_clip, 1),
    }
    sides = {name: (step(fn, False), step(fn, True)) for name, fn in units.items()}
    sides[f"label top-{k}, bf16 weights (label.dtype)"] = (step(units[f"label top-{k} (batch {cfg.label.batch_size})"], False),
                                                         lambda: lab_topk_bf16w(label_batch))
    return sides


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--samples", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("params.yaml")
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU bf16: {cpu_has_bf16() or 'none'}, "
          f"mkldnn bf16 supported: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    sides = build_sides(cfg, args.k, args.samples)
    print(f"{'unit of work':48s} {'float32 ms':>10s} {'bf16 ms':>9s} {'bf16/fp32':>9s}")
    for name, (fp32, bf16) in sides.items():
        ratios, t32s, t16s = [], [], []
        for _ in range(args.rounds):
            t32, t16 = median_seconds(fp32, args.repeats), median_seconds(bf16, args.repeats)
            t32s.append(t32)
            t16s.append(t16)
            ratios.append(t16 / t32)
        print(f"{name:48s} {statistics.median(t32s) * 1e3:10.1f} {statistics.median(t16s) * 1e3:9.1f} "
              f"{statistics.median(ratios):9.2f}", flush=True)


if __name__ == "__main__":
    main()
