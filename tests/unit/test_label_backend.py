"""Which label backend runs, and with how many GPUs per Ray actor (CUDA faked at its edge:
``torch.cuda.is_available`` and the cluster's GPU count)."""

import importlib.util

import pytest
import torch

from distill.config import build_config
from distill.teachers import resolve_backend
from tasks.label import actor_gpus


def fake_host(monkeypatch, cuda: bool, vllm: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real(name, *a) if name != "vllm" else
                                          (object() if vllm else None)))


@pytest.mark.parametrize("cuda, vllm, expected", [(True, True, "vllm"), (True, False, "hf"),
                                                  (False, True, "hf"), (False, False, "hf")])
def test_auto_is_vllm_only_with_cuda_and_vllm(monkeypatch, cuda, vllm, expected):
    fake_host(monkeypatch, cuda, vllm)
    assert resolve_backend("auto") == expected
    assert resolve_backend("auto", temperature=2.0) == "hf"  # vLLM's prompt log-probs are τ = 1
    assert resolve_backend("vllm") == "vllm" and resolve_backend("hf") == "hf"


def label(**over):
    return build_config({"label": over}).label


def test_explicit_vllm_on_cpu_needs_no_gpu():
    cfg = label(backend="vllm")  # the config accepts it: vLLM's CPU build runs without GPUs
    assert actor_gpus(cfg, "vllm", cuda=False, cluster_gpus=0) == 0
    cpu_tp = label(backend="vllm", tensor_parallel_size=2)
    assert actor_gpus(cpu_tp, "vllm", cuda=False, cluster_gpus=0) == 0


def test_vllm_on_a_cuda_host_takes_its_gpus_from_the_config():
    assert actor_gpus(label(backend="auto", gpus_per_actor=1), "vllm", cuda=True, cluster_gpus=1) == 1
    tp = label(backend="vllm", gpus_per_actor=2, tensor_parallel_size=2, num_actors=2)
    assert actor_gpus(tp, "vllm", cuda=True, cluster_gpus=4) == 2


def test_auto_on_a_cuda_host_without_actor_gpus_is_refused_naming_the_keys():
    with pytest.raises(ValueError, match=r"auto chose vllm .*label\.gpus_per_actor: 1.*label\.backend: hf"):
        actor_gpus(label(backend="auto"), "vllm", cuda=True, cluster_gpus=8)
    with pytest.raises(ValueError, match=r"label\.gpus_per_actor ≥ 2"):
        actor_gpus(label(backend="vllm", tensor_parallel_size=2), "vllm", cuda=True, cluster_gpus=8)


def test_more_gpus_than_the_cluster_has_is_refused_rather_than_hanging():
    with pytest.raises(ValueError, match=r"the Ray cluster has 1: the labeling actors would never"):
        actor_gpus(label(backend="vllm", gpus_per_actor=1, num_actors=2), "vllm", cuda=True,
                   cluster_gpus=1)
    with pytest.raises(ValueError, match="never be scheduled"):
        actor_gpus(label(backend="hf", gpus_per_actor=1), "hf", cuda=False, cluster_gpus=0)
    assert actor_gpus(label(backend="hf"), "hf", cuda=True, cluster_gpus=0) == 0


def test_sampled_labels_with_auto_backend_are_keyed_as_the_hf_labeler_that_makes_them(monkeypatch):
    """On a host where `auto` means vLLM, sampled labels are made by HF (vLLM gives only the
    top k): the settings, which key the cache, must name HF and its code."""
    import distill.teachers as teachers
    from distill.config import LabelConfig
    from distill.labels import labeler_code_fingerprint, settings_for_run

    monkeypatch.setattr(teachers, "resolve_backend", lambda backend, temperature=1.0: "vllm")
    teacher = {"fingerprint": "t"}
    manifest = {"tokenizer": {"hash": "h", "vocab_size": 512}}
    sampled = settings_for_run(32, 1.0, teacher, manifest, LabelConfig(backend="auto"), 0, "sampled", 16)
    assert sampled.backend == "hf" and sampled.code == labeler_code_fingerprint("hf")
    topk = settings_for_run(32, 1.0, teacher, manifest, LabelConfig(backend="auto"), 0, "topk", 0)
    assert topk.backend == "vllm" and topk.code == labeler_code_fingerprint("vllm")
