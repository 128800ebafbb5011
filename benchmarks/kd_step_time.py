"""Training-step cost of distillation, both sides in one process (medians over repeats).

1. offline sparse-KD step (top-k labels, chunked loss) / supervised CE step, same student
   — goal ≤ 1.10;
2. offline KD vs online full-logit KD (the teacher, ~8× the student, runs in the step),
   end-to-end tokens/s — goal ≥ 3× faster.

    python benchmarks/kd_step_time.py                       # CPU, 1 thread
    python benchmarks/kd_step_time.py --device cuda --vocab 32000 --batch 16 --block 512
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _timing import median_seconds

from distill.config import ModelConfig, OptimConfig
from distill.losses import DistillationLoss, topk_labels
from distill.models import build_llama, count_parameters
from distill.training import make_optimizer, train_step, with_online_labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--student", type=int, nargs=2, default=[2, 64], metavar=("LAYERS", "D_MODEL"))
    p.add_argument("--teacher", type=int, nargs=2, default=[4, 192], metavar=("LAYERS", "D_MODEL"))
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--rounds", type=int, default=3, help="alternate the sides this many times")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    dev = torch.device(args.device)

    def model(layers, d):
        return build_llama(ModelConfig(layers=layers, d_model=d, heads=max(1, d // 32)),
                           args.vocab, args.block, seed=0).to(dev)

    student, teacher = model(*args.student), model(*args.teacher).eval()
    ns, nt = count_parameters(student)["non_embedding"], count_parameters(teacher)["non_embedding"]
    opt, sched = make_optimizer(student, OptimConfig(steps=10_000, warmup_steps=1))
    ids = torch.randint(0, args.vocab, (args.batch, args.block), device=dev)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        labels = topk_labels(teacher(input_ids=inputs).logits.flatten(0, 1), args.k, 1.0)
    ce_loss, kd_loss = DistillationLoss(alpha=0.0), DistillationLoss(alpha=0.5)
    sides = {
        "supervised CE": lambda: train_step(student, ce_loss, opt, sched, (inputs, targets, None), 1.0, 1),
        f"offline top-{args.k} KD": lambda: train_step(student, kd_loss, opt, sched,
                                                       (inputs, targets, labels), 1.0, 1),
        "online full-logit KD": lambda: train_step(
            student, kd_loss, opt, sched, with_online_labels(teacher, (inputs, targets, None), args.vocab),
            1.0, 1),
    }
    tokens = inputs.numel()
    print(f"{args.device}: student {args.student[0]}x{args.student[1]} ({ns:,} non-emb), teacher "
          f"{args.teacher[0]}x{args.teacher[1]} ({nt:,} non-emb, {nt / ns:.1f}x), vocab {args.vocab}, "
          f"batch {args.batch}x{args.block}")
    results: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):  # alternate sides so drift in machine load hits all of them
        for name, step in sides.items():
            results[name].append(median_seconds(step, args.repeats))
    med = {name: statistics.median(v) for name, v in results.items()}
    for name, seconds in med.items():
        print(f"  {name:24s} {seconds * 1e3:8.1f} ms/step  {tokens / seconds:10.0f} tok/s")
    kd, ce, online = med[f"offline top-{args.k} KD"], med["supervised CE"], med["online full-logit KD"]
    print(f"offline KD / CE step time: {kd / ce:.3f} (goal <= 1.10)")
    print(f"offline KD vs online KD tokens/s: {online / kd:.2f}x faster (goal >= 3)")


if __name__ == "__main__":
    main()
