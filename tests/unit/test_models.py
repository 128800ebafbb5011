"""Model helpers: building, loading errors, counting, fingerprints, vocabulary checks."""

import pytest
import torch

from distill.config import ModelConfig
from distill.models import (build_llama, check_vocab_compatible, count_parameters, ffn_width,
                            load_causal_lm, logits_vocab, model_fingerprint)


def tiny(seed=0):
    return build_llama(ModelConfig(layers=1, d_model=16, heads=2), vocab_size=50, max_positions=8, seed=seed)


def test_build_is_seeded_and_counts_exclude_embeddings():
    a, b = tiny(0), tiny(0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    counts = count_parameters(a)
    assert counts["total"] - counts["non_embedding"] == 50 * 16  # tied input/output embedding
    assert ffn_width(ModelConfig(d_model=64)) == 192


def test_fingerprint_follows_the_weights(tmp_path):
    tiny(0).save_pretrained(tmp_path / "a")
    tiny(0).save_pretrained(tmp_path / "b")
    tiny(1).save_pretrained(tmp_path / "c")
    fp = {k: model_fingerprint(tmp_path / k) for k in "abc"}
    assert fp["a"] == fp["b"] != fp["c"]


def test_loading_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: holds no Hugging Face model"):
        load_causal_lm(tmp_path / "empty")


def test_different_vocabularies_are_refused_with_the_fix():
    check_vocab_compatible({"a": 0, "b": 1}, {"a": 0, "b": 1}, "t", "s")
    with pytest.raises(ValueError, match="tokenizers differ") as err:
        check_vocab_compatible({"a": 0, "b": 1}, {"a": 0, "c": 1}, "teacher-x", "student-y")
    assert "gate.force = supervised" in str(err.value) and "teacher-x" in str(err.value)


def test_padding_rows_are_truncated_but_missing_rows_are_an_error():
    assert logits_vocab(128, 100, "m") == 100
    with pytest.raises(ValueError, match="m: model has 90 vocabulary rows"):
        logits_vocab(90, 100, "m")
