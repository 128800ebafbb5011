"""HF-backend labeling throughput vs a bare batched forward pass of the same teacher.

Both sides run in this one process on the same batches: ``bare`` is ``model(input_ids)``
alone; ``label`` is ``HFLabeler`` (forward + top-k + rest mass + NLL + float16 conversion).
Prints tokens/s of each (median of repeats) and their ratio (goal ≥ 0.8), plus bytes per
labeled token on disk at the given k values.

    python benchmarks/label_throughput.py                 # CPU, embedded-default-sized teacher
    python benchmarks/label_throughput.py --device cuda --layers 12 --d-model 768 --vocab 32000
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _timing import median_seconds

from distill.config import ModelConfig
from distill.labels import LabelSettings, labels_table, write_label_shard
from distill.models import build_llama
from distill.teachers.hf import HFLabeler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k", type=int, nargs="+", default=[32, 128])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # as a labeling actor runs: one CPU each

    heads = max(1, args.d_model // 64)
    model = build_llama(ModelConfig(layers=args.layers, d_model=args.d_model, heads=heads),
                        args.vocab, args.block, seed=0)
    rng = np.random.default_rng(0)
    batch = {"block_id": np.array([f"b{i}" for i in range(args.batch)]),
             "input_ids": rng.integers(0, args.vocab, (args.batch, args.block)).astype(np.int32)}
    tokens = args.batch * (args.block - 1)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        print(f"teacher {args.layers}x{args.d_model}, vocab {args.vocab}, batch {args.batch}x{args.block}, "
              f"{args.device}, {args.dtype}")
        for k in args.k:
            labeler = HFLabeler(tmp, k=k, temperature=1.0, vocab_size=args.vocab, dtype=args.dtype,
                                use_gpu=args.device == "cuda")
            ids = torch.from_numpy(batch["input_ids"].astype(np.int64)).to(labeler.device)

            @torch.inference_mode()
            def bare():
                labeler.model(input_ids=ids[:, :-1]).logits.float().sum().item()

            t_bare = median_seconds(bare, args.repeats)
            t_label = median_seconds(lambda: labeler(dict(batch)), args.repeats)
            out = labeler(dict(batch))
            path = Path(tmp) / f"labels-k{k}.parquet"
            settings = LabelSettings("bench", "bench", k, 1.0)
            write_label_shard(labels_table(out, settings), path)
            print(f"k={k:4d}: bare forward {tokens / t_bare:10.0f} tok/s, labeling {tokens / t_label:10.0f} "
                  f"tok/s, ratio {t_bare / t_label:.3f} (goal >= 0.8); "
                  f"{path.stat().st_size / tokens:.1f} bytes/labeled token on disk "
                  f"(random weights: near-uniform log-probs compress worst)")


if __name__ == "__main__":
    main()
