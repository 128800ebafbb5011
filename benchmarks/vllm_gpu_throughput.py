"""vLLM prompt-log-prob throughput and MFU on a GPU (one command, on a CUDA host with vLLM):

    make install-gpu && .venv-gpu/bin/python benchmarks/vllm_gpu_throughput.py

Builds a random Llama teacher (default 12 layers × 768, vocab 32000, bf16), starts one vLLM
engine as a labeling actor does, and labels batches of blocks with top-k prompt log-probs
through :class:`distill.teachers.vllm.VLLMLabeler`. Prints the engine start time, labeled
tokens/s (median of repeats) for the labeler and for the engine alone, and the model FLOPs
utilisation: forward FLOPs (2 · parameters per token, plus attention 4 · layers · d_model ·
block/2 per token, causal) × tokens/s ÷ the GPU's peak dense bf16 FLOP/s (``--peak-tflops``,
or a table of common GPUs).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from _timing import median_seconds

from distill.config import ModelConfig
from distill.models import build_llama

# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "RTX 4090": 165.0}


def peak_tflops(name: str, given: float | None) -> float:
    if given:
        return given
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"no peak FLOP/s known for {name!r}: pass --peak-tflops")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--block", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA and the official vllm (make install-gpu); on CPU use "
                         "benchmarks/label_throughput.py --backend vllm")
    from distill.teachers.vllm import VLLMLabeler

    model = build_llama(ModelConfig(layers=args.layers, d_model=args.d_model,
                                    heads=max(1, args.d_model // 64)), args.vocab, args.block, seed=0)
    params = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    batch = {"block_id": np.array([f"b{i}" for i in range(args.batch)]),
             "input_ids": rng.integers(0, args.vocab, (args.batch, args.block)).astype(np.int32)}
    tokens = args.batch * args.block
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        start = time.perf_counter()
        labeler = VLLMLabeler(tmp, k=args.k, temperature=1.0, vocab_size=args.vocab, dtype=args.dtype,
                              block_size=args.block)
        started = time.perf_counter() - start
        prompts = [{"prompt_token_ids": row.tolist()} for row in batch["input_ids"]]
        t_label = median_seconds(lambda: labeler(dict(batch)), args.repeats)
        t_engine = median_seconds(lambda: labeler.llm.generate(prompts, labeler.params, use_tqdm=False),
                                  args.repeats)
        labeler.close()
    flops_per_token = 2 * params + 4 * args.layers * args.d_model * args.block / 2
    name = torch.cuda.get_device_name()
    peak = peak_tflops(name, args.peak_tflops) * 1e12
    print(f"{name}: teacher {args.layers}x{args.d_model} ({params / 1e6:.0f}M parameters), vocab "
          f"{args.vocab}, {args.batch}x{args.block} tokens, k={args.k}, {args.dtype}")
    print(f"engine start {started:.1f} s")
    for what, seconds in (("labeler", t_label), ("engine alone", t_engine)):
        rate = tokens / seconds
        print(f"{what}: {rate:,.0f} prompt-log-prob tokens/s, MFU {flops_per_token * rate / peak:.1%}")


if __name__ == "__main__":
    main()
