"""Peak memory of the chunked distillation loss vs a naive one (forward + backward).

Naive: the full [positions × vocabulary] student logits in float32, log-softmax, gather,
KL, all kept by autograd. Chunked: ``distill.losses.DistillationLoss`` (chunks of positions
under activation checkpointing). Both with top-k labels and a rest bucket.
Goal: chunked ≤ 0.25× naive at vocabulary 32k and 8k positions.

On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU each side runs in a fresh
child process and the peak is the growth of its maximum resident set size.

    python benchmarks/loss_memory.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from distill.losses import LOG_FLOOR, DistillationLoss, SparseTeacher


def inputs(n: int, h: int, v: int, k: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, generator=g, requires_grad=True)
    head = (0.02 * torch.randn(v, h, device=device, generator=g)).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    ids = torch.randint(0, v, (n, k), device=device, generator=g)
    logp = torch.log_softmax(torch.randn(n, k + 1, device=device, generator=g), -1)
    return hidden, head, targets, SparseTeacher(ids, logp[:, :k].half(), logp[:, k].half())


def naive_loss(hidden, head, targets, t: SparseTeacher) -> torch.Tensor:
    """The straightforward version: everything over the full vocabulary at once."""
    logits = (hidden @ head.T).float()
    logp = torch.log_softmax(logits, -1)
    kept = logp.gather(-1, t.ids)
    rest = torch.log1p(-kept.exp().sum(-1).clamp(max=1 - 1e-6)).clamp_min(LOG_FLOOR)
    s = torch.cat([kept, rest[:, None]], -1)
    tt = torch.cat([t.logprobs.float(), t.rest.float()[:, None]], -1)
    kd = (tt.exp() * (tt - s)).sum(-1).mean()
    return 0.5 * torch.nn.functional.cross_entropy(logits, targets) + 0.5 * kd


def measure(side: str, n: int, h: int, v: int, k: int, device: str) -> float:
    """Peak bytes of one forward+backward of ``side`` beyond the inputs."""
    hidden, head, targets, teacher = inputs(n, h, v, k, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if side == "naive":
        loss = naive_loss(hidden, head, targets, teacher)
    else:
        loss = DistillationLoss(alpha=0.5, z_loss=0.0, chunk_positions=1024)(hidden, head, targets, teacher).total
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--positions", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = (args.positions, args.hidden, args.vocab, args.k)
    if args.child:
        print(json.dumps(measure(args.child, *shape, args.device)))
        return
    peaks = {}
    for side in ("naive", "chunked"):
        if args.device == "cuda":
            peaks[side] = measure(side, *shape, "cuda")
        else:  # a fresh process per side: ru_maxrss only ever grows
            out = subprocess.run([sys.executable, __file__, "--child", side, "--positions", str(args.positions),
                                  "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--k", str(args.k)],
                                 capture_output=True, text=True, check=True)
            peaks[side] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.device}: {args.positions} positions x vocabulary {args.vocab}, hidden {args.hidden}, k={args.k}")
    for side, peak in peaks.items():
        print(f"  {side:8s} peak {peak / 2**20:9.1f} MiB")
    print(f"chunked / naive peak memory: {peaks['chunked'] / peaks['naive']:.3f} (goal <= 0.25)")


if __name__ == "__main__":
    main()
