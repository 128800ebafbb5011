"""Tokenizers: a byte-level BPE trained here, or a local Hugging Face tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from distill.io import sha256_bytes, sha256_file

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE on ``texts`` and save it as an HF fast tokenizer in ``out_dir``.

    Deterministic: the same texts in the same order give the same ``tokenizer.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                 pad_token=PAD, unk_token=None)
    hf.model_max_length = 1_000_000
    hf.save_pretrained(str(out_dir))
    return hf


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load a local HF tokenizer; the error names the folder when none is there."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer folder not found")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                            local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: holds no loadable tokenizer: {exc}") from exc
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: tokenizer has no EOS token (needed to separate documents)")
    return tok


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    """Hash identifying a tokenizer's vocabulary and rules (its ``tokenizer.json``)."""
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; only fast tokenizers are supported")
    return sha256_file(path)


def vocab_table(tokenizer) -> dict[str, int]:
    """Token → id, specials included."""
    return dict(tokenizer.get_vocab())


def encoder_json(tokenizer) -> str:
    """The tokenizer's rules as a JSON string (what :func:`encode_texts` needs): small,
    picklable, so Ray workers on other nodes encode with exactly the same rules."""
    return tokenizer.backend_tokenizer.to_str()


_ENCODERS: dict[str, object] = {}


def encode_texts(tokenizer_json: str, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens: the same ids as calling the HF fast
    tokenizer with ``add_special_tokens=False``, through its Rust batch encoder."""
    from tokenizers import Tokenizer

    key = sha256_bytes(tokenizer_json.encode())
    tok = _ENCODERS.get(key)
    if tok is None:
        tok = Tokenizer.from_str(tokenizer_json)
        tok.no_truncation()
        tok.no_padding()
        _ENCODERS.clear()  # one tokenizer per process at a time
        _ENCODERS[key] = tok
    # encode_batch_fast: the same ids without character offsets (~25 % faster here)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [enc.ids for enc in encode(texts, add_special_tokens=False)]
