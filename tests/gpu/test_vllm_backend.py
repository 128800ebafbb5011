"""vLLM backend on a GPU (the official CUDA build, ``make install-gpu``): the CUDA engine gives
the HF backend's labels. Everything that does not need CUDA runs in CI on vLLM's CPU build
(tests/integration/test_vllm_labeler.py); GPU throughput and MFU: benchmarks/vllm_gpu.sh.
"""

import numpy as np
import pytest
import torch

from tests.integration.test_vllm_labeler import BLOCK, K, VOCAB, blocks, gen_settings, save_teacher

pytestmark = pytest.mark.gpu
vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("vllm-teacher"))


@pytest.mark.parametrize("mode", ["soft", "hard+soft"])
def test_cuda_engine_labels_match_hf_on_cuda(teacher, mode):
    from distill.teachers.hf import HFLabeler
    from distill.teachers.vllm import VLLMLabeler

    kwargs = {"k": K, "temperature": 1.0, "vocab_size": VOCAB, "block_size": BLOCK, "mode": mode,
              "generation": gen_settings() if mode != "soft" else "", "eos_id": VOCAB - 1,
              "pad_id": 0}
    batch = blocks()
    hf = HFLabeler(teacher, use_gpu=True, dtype="float32", **kwargs)(dict(batch))
    lab = VLLMLabeler(teacher, dtype="float32", gpu_memory_utilization=0.3, **kwargs)
    try:
        out = lab(dict(batch))
    finally:
        lab.close()
    assert (out["error"] == "").all()
    for col in ("input_ids", "topk_ids", "topk_logprobs", "rest_logprob", "teacher_nll"):
        assert out[col].dtype == hf[col].dtype and out[col].shape == hf[col].shape, col
    assert np.mean(out["topk_ids"] == hf["topk_ids"]) > 0.98  # near-ties may swap on GPU
    assert np.allclose(out["topk_logprobs"].astype(np.float32), hf["topk_logprobs"].astype(np.float32),
                       atol=2e-3)
    assert np.abs(out["teacher_nll"] - hf["teacher_nll"]).max() < 1e-3
    assert torch.cuda.is_available()
