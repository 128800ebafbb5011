"""Causal LMs: build small Llama-style ones from a config, load local HF ones, fingerprint."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.config import ModelConfig
from distill.io import sha256_bytes, sha256_file

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def ffn_width(cfg: ModelConfig) -> int:
    """The MLP width: ``cfg.ffn`` or 8/3·d_model rounded up to a multiple of 32 (SwiGLU)."""
    return cfg.ffn or int(32 * -(-(8 * cfg.d_model // 3) // 32))


def build_llama(cfg: ModelConfig, vocab_size: int, max_positions: int, seed: int,
                eos_id: int = 0, pad_id: int | None = None):
    """A freshly initialised Llama-style causal LM sized by ``cfg``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=ffn_width(cfg),
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def has_model_weights(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding an HF config and weights."""
    path = Path(path)
    return (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHT_FILES)


def require_model_folder(path: str | Path) -> Path:
    """``path`` as a Path if it holds an HF config and weights; else an error naming it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model folder does not exist")
    if not has_model_weights(path):
        raise FileNotFoundError(f"{path}: holds no Hugging Face model (config.json and "
                                f"one of {', '.join(WEIGHT_FILES)} expected)")
    return path


def load_causal_lm(path: str | Path, trust_remote_code: bool = False, dtype=torch.float32):
    """Load a local HF causal LM; a folder with no model is an error naming it."""
    from transformers import AutoModelForCausalLM

    path = require_model_folder(path)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                trust_remote_code=trust_remote_code)


def save_model(model, tokenizer, out_dir: str | Path) -> None:
    """Save model (safetensors) and tokenizer in HF format."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def count_parameters(model) -> dict[str, int]:
    """Total and non-embedding parameter counts (embeddings and tied/untied head excluded)."""
    total = sum(p.numel() for p in model.parameters())
    embed_ids = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        embed_ids.add(id(head.weight))
    embedding = sum(p.numel() for p in model.parameters() if id(p) in embed_ids)
    return {"total": total, "non_embedding": total - embedding}


def model_fingerprint(model_dir: str | Path) -> str:
    """Hash of a saved model's config and weights: identifies the teacher behind labels."""
    model_dir = Path(model_dir)
    parts = [sha256_file(model_dir / "config.json")]
    parts += [sha256_file(p) for p in sorted(model_dir.glob("*.safetensors"))]
    parts += [sha256_file(p) for p in sorted(model_dir.glob("pytorch_model*.bin"))]
    return sha256_bytes("".join(parts).encode())[:32]


def check_vocab_compatible(teacher_vocab: dict[str, int], student_vocab: dict[str, int],
                           teacher_name: str, student_name: str) -> None:
    """Logit distillation needs one vocabulary; raise naming the fix if they differ."""
    if teacher_vocab == student_vocab:
        return
    t_only = len(set(teacher_vocab.items()) - set(student_vocab.items()))
    s_only = len(set(student_vocab.items()) - set(teacher_vocab.items()))
    raise ValueError(
        f"teacher ({teacher_name}) and student ({student_name}) tokenizers differ "
        f"({t_only} teacher-only and {s_only} student-only token/id pairs): logit distillation "
        f"needs one vocabulary. Fix: give the student the teacher's tokenizer "
        f"(data.tokenizer = the teacher's folder), or train with gate.force = supervised.")


def logits_vocab(model_vocab: int, tokenizer_vocab: int, where: str) -> int:
    """Usable vocabulary width: padding rows beyond the tokenizer are truncated away."""
    if model_vocab < tokenizer_vocab:
        raise ValueError(f"{where}: model has {model_vocab} vocabulary rows but its tokenizer "
                         f"{tokenizer_vocab} tokens")
    return tokenizer_vocab


def pick_device(prefer_gpu: bool) -> torch.device:
    """CUDA when asked for and present, else CPU."""
    return torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")
