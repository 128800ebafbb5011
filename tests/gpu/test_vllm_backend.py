"""vLLM backend on a GPU: the same top-k labels as the HF backend, and both throughputs.

Needs CUDA and the optional ``vllm`` extra (``pip install -e .[gpu]``); skipped otherwise.
"""

import time

import numpy as np
import pytest
import torch

from distill.config import ModelConfig
from distill.models import build_llama
from distill.teachers.hf import HFLabeler

pytestmark = pytest.mark.gpu
vllm = pytest.importorskip("vllm")

VOCAB, BLOCK, K = 512, 64, 16


def synthetic_texts(n=400, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "kernel", "tensor", "label", "teacher", "student",
             "vocab", "softmax", "token", "block", "prompt", "cache", "layer", "norm", "rope"]
    return [" ".join(rng.choice(words, 12)) + f" {i} {i * 7 % 13}." for i in range(n)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 2-layer Llama (d_model 128, vocab 512, 64 positions = the block) and a BPE tokenizer."""
    from distill.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("vllm-teacher")
    tokenizer = train_bpe(synthetic_texts(), VOCAB, path)
    model = build_llama(ModelConfig(layers=2, d_model=128, heads=4), VOCAB, BLOCK, seed=0,
                        eos_id=tokenizer.eos_token_id)
    with torch.no_grad():
        # spread the logits: few near-ties in the top k, rest mass ~0.3
        model.get_input_embeddings().weight.mul_(3)
    model.save_pretrained(path, safe_serialization=True)
    return path, len(tokenizer)


@pytest.fixture(scope="module")
def vllm_labeler(teacher_dir):
    from distill.teachers.vllm import VLLMLabeler

    path, _ = teacher_dir
    return VLLMLabeler(str(path), k=K, temperature=1.0, vocab_size=VOCAB, dtype="float32",
                       gpu_memory_utilization=0.3)


def random_batch(n, token_limit, seed=0):
    rng = np.random.default_rng(seed)
    return {"block_id": np.array([f"b{i}" for i in range(n)]),
            "input_ids": rng.integers(0, token_limit, (n, BLOCK)).astype(np.int32)}


def test_vllm_labels_match_hf(teacher_dir, vllm_labeler):
    path, tokens = teacher_dir
    batch = random_batch(8, tokens)
    hf = HFLabeler(str(path), k=K, temperature=1.0, vocab_size=VOCAB, use_gpu=True)(dict(batch))
    out = vllm_labeler(dict(batch))
    for col in ("input_ids", "topk_ids", "topk_logprobs", "rest_logprob", "teacher_nll"):
        assert out[col].dtype == hf[col].dtype and out[col].shape == hf[col].shape, col
    assert np.mean(out["topk_ids"] == hf["topk_ids"]) >= 0.98  # ties may swap order
    a = np.sort(out["topk_logprobs"].astype(np.float32).reshape(-1, K), -1)
    b = np.sort(hf["topk_logprobs"].astype(np.float32).reshape(-1, K), -1)
    assert np.allclose(a, b, atol=2e-2)
    mass = [np.exp(x["rest_logprob"].astype(np.float32)) for x in (out, hf)]
    assert np.allclose(*mass, atol=2e-3)
    assert np.allclose(out["teacher_nll"], hf["teacher_nll"], atol=2e-2)


def test_block_longer_than_the_engine_is_an_error_row(vllm_labeler):
    too_long = {"block_id": np.array(["long"]),
                "input_ids": np.zeros((1, vllm_labeler.max_len + 1), np.int32)}
    out = vllm_labeler(too_long)  # a per-block error row, not a crash
    assert "max_model_len" in out["error"][0]


def test_throughput_of_both_backends(teacher_dir, vllm_labeler, capsys):
    path, tokens = teacher_dir
    batch = random_batch(256, tokens, seed=1)
    hf = HFLabeler(str(path), k=K, temperature=1.0, vocab_size=VOCAB, use_gpu=True)
    rates = {}
    for name, labeler in (("hf", hf), ("vllm", vllm_labeler)):
        labeler(random_batch(8, tokens, seed=2))  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, 256, 64):
            labeler({k: v[i:i + 64] for k, v in batch.items()})
        torch.cuda.synchronize()
        rates[name] = 256 * BLOCK / (time.perf_counter() - start)
    with capsys.disabled():
        print(f"\nlabel throughput on {torch.cuda.get_device_name()} (k={K}, block {BLOCK}, "
              f"batch 64, fp32): " + ", ".join(f"{n} {r:,.0f} tokens/s" for n, r in rates.items()))
    assert all(r > 0 for r in rates.values())


def test_vllm_hard_soft_labels_match_hf(teacher_dir):
    """Greedy hard+soft labels: vLLM's generations and their top-k against the HF backend's."""
    import json

    from distill.teachers.vllm import VLLMLabeler

    path, tokens = teacher_dir
    from distill.tokenizer import load_tokenizer

    eos = load_tokenizer(path).eos_token_id
    gen = json.dumps({"prompt_tokens": 16, "max_new_tokens": 32, "sampling": "greedy",
                      "temperature": None, "top_p": None, "seed": None})
    kwargs = {"k": K, "temperature": 1.0, "vocab_size": VOCAB, "block_size": BLOCK, "mode": "hard+soft",
              "generation": gen, "eos_id": eos, "pad_id": eos}
    batch = random_batch(8, tokens, seed=3)
    hf = HFLabeler(str(path), use_gpu=True, **kwargs)(dict(batch))
    out = VLLMLabeler(str(path), dtype="float32", gpu_memory_utilization=0.3, **kwargs)(dict(batch))
    assert (out["error"] == "").all()
    for col in ("input_ids", "topk_ids", "topk_logprobs", "rest_logprob", "loss_from", "length"):
        assert out[col].dtype == hf[col].dtype and out[col].shape == hf[col].shape, col
    same = [np.array_equal(a, b) for a, b in zip(out["input_ids"], hf["input_ids"])]
    assert np.mean(same) >= 0.75  # near-ties may pick another token and the rows diverge
    assert np.allclose(out["teacher_nll"], hf["teacher_nll"], atol=2e-2)
