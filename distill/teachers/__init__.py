"""Teacher backends that label token blocks: Hugging Face transformers (CPU/GPU) and vLLM (GPU)."""

from __future__ import annotations

import importlib.util


def resolve_backend(backend: str) -> str:
    """``auto`` → ``vllm`` when CUDA and vllm are both present, else ``hf``."""
    if backend != "auto":
        return backend
    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if has_vllm and torch.cuda.is_available() else "hf"
