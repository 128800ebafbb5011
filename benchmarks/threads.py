"""Torch threads 1 vs 2 (or N) for the pipeline's training steps, both sides in one process.

The teacher stage (4x128 supervised), the train stage (2x64, offline top-k distillation) and a
calibration sweep point (2x32, supervised, the smallest size) each take one optimizer step at
the pipeline's batch (16 × 128 tokens, vocabulary 2048) with 1 and with ``--threads`` threads,
alternating the sides for ``--rounds`` rounds; the figure is the median step time and the
ratio t(1) / t(N) (> 1: more threads pay).

    python benchmarks/threads.py [--threads 2] [--repeats 7] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _timing import median_seconds  # noqa: E402

from distill.config import ModelConfig, OptimConfig  # noqa: E402
from distill.losses import DistillationLoss, SparseTeacher  # noqa: E402
from distill.models import build_llama  # noqa: E402
from distill.training import make_optimizer, train_step  # noqa: E402

VOCAB, BLOCK, BATCH, K = 2048, 128, 16, 32
CASES = {"teacher 4x128": ((4, 128, 4), False), "train 2x64 (KD)": ((2, 64, 4), True),
         "sweep 2x32": ((2, 32, 2), False)}


def step_fn(shape: tuple[int, int, int], distill: bool):
    """A closure taking one optimizer step of a fresh model of ``shape`` (layers, d_model, heads)."""
    layers, width, heads = shape
    model = build_llama(ModelConfig(layers=layers, d_model=width, heads=heads), VOCAB, BLOCK, 0, 0, 1)
    opt, sched = make_optimizer(model, OptimConfig(steps=10 ** 6, warmup_steps=0))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, BLOCK), generator=g)
    n = BATCH * (BLOCK - 1)
    teacher = None
    if distill:
        logp = torch.log_softmax(torch.randn(n, K + 1, generator=g), -1)
        teacher = SparseTeacher(ids=torch.randint(0, VOCAB, (n, K), generator=g),
                                logprobs=logp[:, :K], rest=logp[:, K])
    loss = DistillationLoss(alpha=0.5 if distill else 0.0, z_loss=1e-4)
    batch = (ids[:, :-1], ids[:, 1:], teacher)
    return lambda: train_step(model, loss, opt, sched, batch, 1.0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} (the machine may be shared)")
    for name, (shape, distill) in CASES.items():
        fn = step_fn(shape, distill)
        times: dict[int, list[float]] = {1: [], args.threads: []}
        for _ in range(args.rounds):
            for threads in times:
                torch.set_num_threads(threads)
                times[threads].append(median_seconds(fn, args.repeats, warmup=1))
        one, many = statistics.median(times[1]), statistics.median(times[args.threads])
        print(f"{name:<18} 1 thread {1000 * one:7.1f} ms/step   {args.threads} threads "
              f"{1000 * many:7.1f} ms/step   speed-up {one / many:.2f}x")


if __name__ == "__main__":
    main()
