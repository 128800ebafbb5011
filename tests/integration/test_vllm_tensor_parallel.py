"""Tensor parallel 2 on vLLM's CPU build inside a Ray actor that sits in a placement group
capturing its children: where vLLM, left to itself, would pick its Ray executor and start
workers inside that group. The labeler keeps the TP workers as subprocesses of the actor
(``distributed_executor_backend="mp"``) and splits the actor's cores among the ranks; the
labels equal the HF backend's. Slow (an engine with two workers starts in minutes on 2 shared
cores), so one batch only."""

import numpy as np
import pytest

from tests.integration.test_vllm_labeler import BLOCK, K, VOCAB, blocks, hf_labeler, save_teacher

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("vllm", reason="vLLM's CPU build is installed by `make test`")


def test_tp2_labeler_in_a_placement_group_actor_equals_hf(tmp_path, shared_ray):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    teacher = save_teacher(tmp_path / "teacher")
    batch = blocks(seed=5)
    ray.init(address=shared_ray)
    group = placement_group([{"CPU": 1}])
    try:
        ray.get(group.ready(), timeout=60)

        @ray.remote(num_cpus=1)
        def label_with_tp2(path, batch):
            from distill.teachers.vllm import VLLMLabeler

            labeler = VLLMLabeler(path, k=K, temperature=1.0, vocab_size=VOCAB, dtype="float32",
                                  block_size=BLOCK, enforce_eager=True, tensor_parallel_size=2,
                                  kv_cache_gib=1)
            try:
                return labeler(batch)
            finally:
                labeler.close()

        strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        out = ray.get(label_with_tp2.options(scheduling_strategy=strategy).remote(teacher, batch),
                      timeout=900)
    finally:
        remove_placement_group(group)
        ray.shutdown()
    hf = hf_labeler(teacher)(dict(batch))
    assert (out["error"] == "").all()
    assert np.mean(out["topk_ids"] == hf["topk_ids"]) > 0.98
    assert np.abs(out["teacher_nll"] - hf["teacher_nll"]).max() < 1e-5
    assert np.allclose(out["topk_logprobs"].astype(np.float32), hf["topk_logprobs"].astype(np.float32),
                       rtol=2 ** -10, atol=1e-3)
