"""Evaluation metrics against plain reference computations: calibration, agreement, losses,
samples, the reports DVC and MLflow read, and the evaluate config keys."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.config import ConfigError, EvaluateConfig, ModelConfig, build_config
from distill.models import build_llama
from tasks import evaluate
from tasks.evaluate import (calibration_counts, compare_models, confidence_counts, data_version,
                            expected_calibration_error, generate_samples, topk_agreement)

VOCAB = 300


def tiny(seed=0, layers=1, d_model=16):
    return build_llama(ModelConfig(layers=layers, d_model=d_model, heads=2), vocab_size=VOCAB,
                       max_positions=32, seed=seed).eval()


def random_blocks(n=6, length=17, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, length), dtype=np.int32)


def test_ece_of_a_perfectly_calibrated_predictor_is_near_zero():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0, 1, 400_000)
    correct = rng.uniform(0, 1, confidence.size) < confidence  # right exactly as often as it claims
    assert expected_calibration_error(confidence_counts(confidence, correct, 15)) < 0.005


def test_ece_of_an_overconfident_predictor_is_its_overconfidence():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.8, 1.0, 200_000)
    correct = rng.uniform(0, 1, confidence.size) < confidence - 0.3
    assert expected_calibration_error(confidence_counts(confidence, correct, 15)) == pytest.approx(0.3, abs=0.01)


def test_ece_by_hand_on_two_bins():
    # Bin [0.8, 1]: confidences 0.9, 1.0 (the edge falls in the last bin), one right → |0.5 - 0.95|.
    # Bin [0, 0.2): confidence 0.1, right → |1 - 0.1|. Weighted by 2/3 and 1/3.
    counts = confidence_counts(np.array([0.9, 1.0, 0.1]), np.array([True, False, True]), 5)
    assert counts[0].tolist() == [1, 0, 0, 0, 2]
    assert expected_calibration_error(counts) == pytest.approx(2 / 3 * 0.45 + 1 / 3 * 0.9)
    with pytest.raises(ValueError, match="no positions"):
        expected_calibration_error(np.zeros((3, 5)))


def test_calibration_counts_from_log_probs():
    logp = torch.log(torch.tensor([[0.75, 0.15, 0.1], [0.2, 0.55, 0.25]]))
    counts = calibration_counts(logp, torch.tensor([0, 2]), 10)
    assert counts[0, 7] == 1 and counts[0, 5] == 1 and counts[0].sum() == 2
    assert counts[1, 7] == pytest.approx(0.75) and counts[2, 7] == 1 and counts[2, 5] == 0


def test_topk_agreement_counts_teacher_argmax_within_student_topk():
    teacher = torch.log_softmax(torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 5.0]]), -1)
    student = torch.log_softmax(torch.tensor([[0.0, 6, 5, 4, 3, 2], [0, 1, 2, 3, 4, 5.0]]), -1)
    assert topk_agreement(student, teacher, 1) == 1          # only the second position
    assert topk_agreement(student, teacher, 5) == 1          # token 0 is the student's 6th
    assert topk_agreement(student, teacher, 6) == 2


def test_compare_models_matches_a_plain_computation():
    student, teacher, blocks = tiny(0), tiny(1, layers=2, d_model=32), random_blocks()
    metrics, tables = compare_models(student, teacher, blocks, batch_size=4, vocab=VOCAB, ece_bins=10)
    ids = torch.from_numpy(blocks.astype(np.int64))
    with torch.no_grad():
        s = F.log_softmax(student(input_ids=ids[:, :-1]).logits.flatten(0, 1), -1)
        t = F.log_softmax(teacher(input_ids=ids[:, :-1]).logits.flatten(0, 1), -1)
    targets = ids[:, 1:].reshape(-1)
    assert metrics["student"]["val_loss"] == pytest.approx(F.nll_loss(s, targets).item(), rel=1e-5)
    assert metrics["teacher"]["perplexity"] == pytest.approx(math.exp(F.nll_loss(t, targets).item()), rel=1e-5)
    kl = (t.exp() * (t - s)).sum(-1).mean().item()
    assert metrics["kl_teacher_student"] == pytest.approx(kl, rel=1e-4)
    agree5 = (s.topk(5, -1).indices == t.argmax(-1, keepdim=True)).any(-1).float().mean().item()
    assert metrics["top5_agreement"] == pytest.approx(agree5)
    assert metrics["top1_agreement"] <= metrics["top5_agreement"]
    conf, pred = s.exp().max(-1)
    ece = expected_calibration_error(confidence_counts(conf.numpy(), (pred == targets).numpy(), 10))
    assert metrics["student"]["ece"] == pytest.approx(ece)
    assert sum(tables["teacher"]["count"]) == targets.numel() and len(tables["student"]["accuracy"]) == 10


def test_a_model_compared_with_itself_agrees_completely():
    model, blocks = tiny(0), random_blocks()
    metrics, _ = compare_models(model, model, blocks, batch_size=3, vocab=VOCAB)
    assert metrics["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["top1_agreement"] == metrics["top5_agreement"] == 1.0
    assert metrics["student"]["ece"] == pytest.approx(metrics["teacher"]["ece"])


@pytest.fixture
def tokenizer(tmp_path):
    from distill.tokenizer import train_bpe

    texts = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"] * 50
    return train_bpe(texts, VOCAB, tmp_path / "tok")


def test_samples_are_greedy_continuations_of_fixed_prompts(tokenizer):
    blocks = np.stack([tokenizer("def add(a, b):\n    return a + b\n")["input_ids"][:8]] * 2)
    cfg = EvaluateConfig(samples=2, sample_prompt_tokens=5, sample_tokens=6)
    models = {"student": tiny(0), "teacher": tiny(1)}
    first = generate_samples(models, tokenizer, blocks, cfg)
    assert first == generate_samples(models, tokenizer, blocks, cfg)  # greedy: deterministic
    assert len(first) == 2 and first[0]["prompt"] == tokenizer.decode(blocks[0, :5].tolist())
    for sample in first:
        assert {"prompt", "student", "teacher"} == sample.keys()
    assert generate_samples(models, tokenizer, blocks, EvaluateConfig(samples=0)) == []


def test_samples_longer_than_the_context_are_refused(tokenizer):
    blocks = random_blocks(length=40)
    with pytest.raises(ValueError, match=r"evaluate.sample_prompt_tokens \+ evaluate.sample_tokens "
                                         r"\(20 \+ 20\) exceed the models' context of 32"):
        generate_samples({"s": tiny()}, tokenizer, blocks,
                         EvaluateConfig(samples=1, sample_prompt_tokens=20, sample_tokens=20))


def test_data_version_is_the_dvc_hash_else_a_manifest_hash():
    manifest = {"splits": {"val": {"shards": [{"hash": "ab"}]}}, "tokenizer": {"hash": "t"}}
    assert data_version({"data/prepared": "123.dir"}, manifest) == "123.dir"
    fallback = data_version({}, manifest)
    assert fallback.startswith("manifest:") and fallback == data_version({}, manifest)
    manifest["splits"]["val"]["shards"][0]["hash"] = "cd"
    assert data_version({}, manifest) != fallback


def test_reports_for_dvc_plots_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    history = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.5, "val_loss": 2.8}]
    (tmp_path / "reports/train.json").write_text(json.dumps({"history": history}))
    model, blocks = tiny(0), random_blocks()
    metrics, tables = compare_models(model, tiny(1), blocks, batch_size=6, vocab=VOCAB)
    decision = {"decision": "distill", "supervised": {"loss": 5.0}, "distill": {"loss": 4.5},
                "coefficients": "paper", "in_support": False}
    evaluate.write_reports(metrics, tables, decision)
    with open("reports/loss_curves.csv") as f:
        assert list(csv.DictReader(f)) == [{"step": "10", "train_loss": "3.0"}, {"step": "20", "train_loss": "2.5"}]
    with open("reports/val_loss.csv") as f:
        assert list(csv.DictReader(f)) == [{"step": "20", "val_loss": "2.8"}]
    with open("reports/calibration.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"student", "teacher"} and all(int(r["count"]) > 0 for r in rows)
    assert sum(int(r["count"]) for r in rows if r["model"] == "student") == blocks[:, 1:].size
    for png in ("reliability.png", "gate_outcome.png"):
        assert (tmp_path / "reports" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("key, value, message", [
    ("ece_bins", 1, "evaluate.ece_bins = 1 is out of range (must be >= 2 and <= 1000)"),
    ("samples", -1, "evaluate.samples = -1 is out of range (must be >= 0 and <= 100)"),
    ("sample_tokens", 0, "evaluate.sample_tokens = 0 is out of range (must be >= 1)"),
    ("sample_prompt_tokens", "8", "evaluate.sample_prompt_tokens must be an integer"),
])
def test_evaluate_keys_are_validated(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config({"evaluate": {key: value}})


def test_weights_bytes_counts_every_weight_file(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 5)
    (tmp_path / "config.json").write_text("{}")
    assert evaluate.weights_bytes(tmp_path) == 15


def test_validation_loss_is_the_student_loss_of_compare_models():
    student, teacher, blocks = tiny(seed=1), tiny(seed=2, d_model=32), random_blocks()
    metrics, _ = compare_models(student, teacher, blocks, batch_size=4, vocab=VOCAB)
    assert evaluate.validation_loss(student, blocks, 4, VOCAB) == pytest.approx(metrics["student"]["val_loss"])


def test_registered_model_folders_are_found_or_named(tmp_path):
    from distill.registry import NotComparable

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(NotComparable, match="tokenizer.json"):
        evaluate.hf_folders(tmp_path)
    (tmp_path / "components" / "tokenizer").mkdir(parents=True)
    (tmp_path / "components" / "tokenizer" / "tokenizer.json").write_text("{}")
    assert evaluate.hf_folders(tmp_path) == (tmp_path / "model", tmp_path / "components" / "tokenizer")
