"""Sampled (RS-KD) labels: an unbiased forward-KL gradient, the label format, cache and errors."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distill.labels import (LabelSettings, check_label_settings, labels_table, read_label_settings,
                            settings_for_run, write_label_shard)
from distill.losses import (DenseTeacher, DistillationLoss, SparseTeacher, exact_sample_frequencies,
                            sampled_labels, topk_labels)

N, V = 6, 40


def teacher_and_student(seed=0):
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(N, V, generator=g, dtype=torch.float64), \
        torch.randn(N, V, generator=g, dtype=torch.float64)


def kd_grad(student: torch.Tensor, teacher, tau: float = 1.0) -> torch.Tensor:
    """d KD / d student logits [n, V] through the fused loss (hidden = identity, head = zᵀ)."""
    n = student.shape[0]
    head = student.T.clone().requires_grad_()
    loss = DistillationLoss(alpha=1.0, temperature=tau, z_loss=0.0, chunk_positions=512)
    total = loss(torch.eye(n, dtype=student.dtype), head, torch.zeros(n, dtype=torch.long), teacher).total
    return torch.autograd.grad(total, head)[0].T


def draws_grads(t_logits, s_logits, samples, repeats, tau=1.0, seed=0) -> torch.Tensor:
    """[repeats, N, V]: the fused loss's gradient for ``repeats`` independent sets of draws
    (all in one call: the positions of every repeat side by side; each row draws on its own,
    and the mean over repeats·N positions is rescaled to the mean over N)."""
    g = torch.Generator().manual_seed(seed)
    lab = sampled_labels(t_logits.repeat(repeats, 1), samples, tau, g)
    teacher = SparseTeacher(lab.ids, lab.logprobs.double(), lab.rest.double())
    return repeats * kd_grad(s_logits.repeat(repeats, 1), teacher, tau).view(repeats, N, V)


def bernstein_bound(per_draw_var: torch.Tensor, spread: float, repeats: int, checks: int,
                    family_error: float = 1e-3) -> torch.Tensor:
    """How far the mean of ``repeats`` independent draws may lie from its expectation, per
    coordinate, with probability ≥ 1 − ``family_error`` over all ``checks`` coordinates
    (Bernstein's inequality, union bound): √(2·Var·ln(2/δ)/M) + 2·b·ln(2/δ)/(3M), with Var the
    per-draw variance and b a bound on one draw's deviation; δ = family_error / checks."""
    log_term = torch.log(torch.tensor(2.0 * checks / family_error, dtype=torch.float64))
    return (2 * per_draw_var * log_term / repeats).sqrt() + 2 * spread * log_term / (3 * repeats)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_gradient_is_unbiased_for_the_dense_forward_kl(tau):
    """The mean gradient over M independent draws matches the dense forward-KL gradient within
    a bound derived from the per-draw variance: one draw's gradient at logit j is
    (τ/N)·(q_j − c_j/S) with c_j ~ Binomial(S, p_j), so its variance is (τ/N)²·p_j(1−p_j)/S
    and it deviates by at most τ/N (Bernstein + union bound over all logits, family error
    1e-3). A biased target (the top 12 renormalised, rest dropped) fails the same bound, and
    the draws' empirical variance agrees with the derived one."""
    t_logits, s_logits = teacher_and_student(1)
    dense = kd_grad(s_logits, DenseTeacher(t_logits), tau)
    m, samples, w = 3000, 12, tau / N
    grads = draws_grads(t_logits, s_logits, samples=samples, repeats=m, tau=tau)
    p = torch.softmax(t_logits / tau, -1)
    var = w ** 2 * p * (1 - p) / samples
    bound = bernstein_bound(var, w, m, N * V)
    assert ((grads.mean(0) - dense).abs() <= bound).all()
    assert torch.allclose(grads.var(0).sum(), var.sum(), rtol=0.1)
    top = topk_labels(t_logits, 12, tau)
    rest = torch.full((N,), float("-inf"), dtype=torch.float64)
    biased = kd_grad(s_logits, SparseTeacher(top.ids, torch.log_softmax(top.logprobs, -1), rest), tau)
    assert not ((biased - dense).abs() <= bound).all()


def test_sampled_gradient_error_shrinks_like_one_over_root_n():
    """RMS error of one draw's gradient against the dense one, for N = 4, 16, 64 draws:
    each 4× more draws at least 1.6× smaller (1/√N gives 2×)."""
    t_logits, s_logits = teacher_and_student(2)
    dense = kd_grad(s_logits, DenseTeacher(t_logits))
    rms = [((draws_grads(t_logits, s_logits, n, 200, seed=n) - dense) ** 2).mean().sqrt().item()
           for n in (4, 16, 64)]
    assert rms[0] > 1.6 * rms[1] > 1.6 ** 2 * rms[2], rms


def test_sampled_labels_are_distinct_ids_with_counts():
    t_logits, _ = teacher_and_student(3)
    lab = sampled_labels(t_logits, 12, 1.0, torch.Generator().manual_seed(0))
    assert lab.ids.shape == (N, 12) and torch.isneginf(lab.rest).all()
    for row in lab.ids:
        assert len(set(row.tolist())) == 12
    counts = lab.logprobs.exp() * 12
    assert torch.allclose(counts, counts.round(), atol=1e-4) and torch.allclose(counts.sum(-1), torch.full((N,), 12.0, dtype=counts.dtype))
    # more draws than tokens: every token gets a column
    assert sampled_labels(t_logits, 100, 1.0).ids.shape == (N, V)


@pytest.mark.parametrize("samples", [12, 512, 2048])
def test_float16_log_frequencies_give_every_count_back(samples):
    """The label file stores log(count/N) in float16; every count 1..N comes back exactly
    (why ``distill.samples`` stops at 2048)."""
    counts = torch.arange(1, samples + 1, dtype=torch.float64)
    stored = torch.log(counts / samples).half()
    back = exact_sample_frequencies(stored, samples).exp() * samples
    assert torch.equal(back.round(), counts.float())
    assert torch.isneginf(exact_sample_frequencies(torch.tensor([float("-inf")]).half(), samples)).all()


# ----------------------------------------------------------------- settings, format, cache

TEACHER, MANIFEST = {"fingerprint": "fp"}, {"tokenizer": {"hash": "th", "vocab_size": 50}}


def test_settings_carry_kind_samples_and_seed():
    topk = settings_for_run(32, 1.0, TEACHER, MANIFEST, seed=3)
    s12 = settings_for_run(32, 1.0, TEACHER, MANIFEST, seed=3, kind="sampled", samples=12)
    assert (s12.kind, s12.samples, s12.k, s12.sample_seed) == ("sampled", 12, 12, 3)
    assert (topk.kind, topk.samples, topk.sample_seed) == ("topk", 0, 0)
    assert topk == settings_for_run(32, 1.0, TEACHER, MANIFEST, seed=4)  # top-k ignores the seed
    others = [settings_for_run(32, 1.0, TEACHER, MANIFEST, seed=s, kind="sampled", samples=n)
              for s, n in ((3, 32), (4, 12))]
    assert len({x.key("h") for x in [topk, s12, *others]}) == 4


def hf_sampled(path, samples=12, seed=0):
    from distill.teachers.hf import HFLabeler

    return HFLabeler(path, k=4, temperature=1.0, vocab_size=50, block_size=16, samples=samples,
                     sample_seed=seed)


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    from distill.config import ModelConfig
    from distill.models import build_llama

    path = tmp_path_factory.mktemp("teacher")
    build_llama(ModelConfig(layers=1, d_model=32, heads=2), 50, 16, 0, eos_id=1, pad_id=0) \
        .save_pretrained(path, safe_serialization=True)
    return str(path)


def blocks(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"block_id": np.array([f"b{i}" for i in range(n)]),
            "input_ids": rng.integers(2, 50, (n, 16)).astype(np.int32)}


def test_hf_sampled_labels_follow_the_teacher_and_are_seeded_per_block(tiny_teacher_dir):
    """Frequencies from 2048 draws match the teacher's softmax within 5 standard errors; a
    block's labels do not depend on its batch (resume and cache see the same labels); another
    seed draws differently; block ids are required."""
    from distill.models import load_causal_lm

    batch = blocks()
    out = hf_sampled(tiny_teacher_dir, samples=2048)(batch)
    assert out["topk_ids"].shape == (4, 15 * 50) and out["rest_logprob"].shape == (4, 15)
    model = load_causal_lm(tiny_teacher_dir, False)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.from_numpy(batch["input_ids"][:, :-1]).long())
                              .logits.float(), -1).view(60, 50).double()
    freq = torch.zeros(60, 50, dtype=torch.float64).scatter_(
        -1, torch.from_numpy(out["topk_ids"]).long().view(60, 50),
        torch.from_numpy(out["topk_logprobs"].astype(np.float32)).double().view(60, 50).exp())
    se = (probs * (1 - probs) / 2048).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 1e-3).all()
    lab = hf_sampled(tiny_teacher_dir)
    whole = lab(batch)
    split = [lab({k: v[i:i + 1] for k, v in batch.items()}) for i in range(4)]
    assert np.array_equal(whole["topk_ids"], np.concatenate([s["topk_ids"] for s in split]))
    assert np.array_equal(whole["topk_logprobs"], np.concatenate([s["topk_logprobs"] for s in split]))
    assert not np.array_equal(whole["topk_ids"], hf_sampled(tiny_teacher_dir, seed=1)(batch)["topk_ids"])
    with pytest.raises(ValueError, match="block_id"):
        lab({"input_ids": batch["input_ids"]})


def test_sampled_shards_round_trip_resume_and_train(tiny_teacher_dir, tmp_path):
    """Write → read → training tensors with exact frequencies; a resumed labeling writes the
    same shard files; a run wanting top-k refuses them by name; one finite training step."""
    from distill.config import ModelConfig, OptimConfig
    from distill.labels import index_label_shards, plan_labels
    from distill.models import build_llama
    from distill.training import batch_to_tensors, make_optimizer, train_step
    from tasks.label import ShardWriter

    settings = settings_for_run(32, 1.0, TEACHER, {"tokenizer": {"hash": "th", "vocab_size": 50}},
                                seed=0, kind="sampled", samples=12)
    lab, batch = hf_sampled(tiny_teacher_dir), blocks(6)
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir(), part.mkdir()
    w = ShardWriter(full, settings, shard_blocks=4, total=6)
    w.add(lab(batch))
    w.finish()
    first = ShardWriter(part, settings, shard_blocks=4, total=6)
    first.add(lab({k: v[:4] for k, v in batch.items()}))
    plan = plan_labels(list(batch["block_id"]), index_label_shards(part, settings)[0])
    assert plan.missing == ["b4", "b5"]
    rest = ShardWriter(part, settings, shard_blocks=4, total=2)
    rest.add(lab({k: v[4:] for k, v in batch.items()}))
    rest.finish()
    names = sorted(p.name for p in full.iterdir())
    assert names == sorted(p.name for p in part.iterdir())
    for name in names:
        assert pq.read_table(full / name).equals(pq.read_table(part / name))
    path = full / names[0]
    assert read_label_settings(path) == settings
    topk = settings_for_run(32, 1.0, TEACHER, {"tokenizer": {"hash": "th", "vocab_size": 50}})
    with pytest.raises(ValueError, match="kind: labels have 'sampled', run wants 'topk'"):
        check_label_settings([path], topk)
    table = pq.read_table(path)
    cols = {c: np.stack(table.column(c).to_numpy(zero_copy_only=False)) for c in
            ("input_ids", "topk_ids", "topk_logprobs", "rest_logprob")}
    inputs, targets, teacher = batch_to_tensors(cols, torch.device("cpu"), 12, samples=12)
    counts = (teacher.logprobs.exp() * 12).round()
    assert torch.equal(teacher.logprobs, torch.log(counts / 12))  # exactly log(count / N)
    assert torch.equal(counts.sum(-1), torch.full((len(counts),), 12.0))
    student = build_llama(ModelConfig(layers=1, d_model=16, heads=2), 50, 16, 0)
    opt, sched = make_optimizer(student, OptimConfig(steps=2, warmup_steps=0))
    metrics = train_step(student, DistillationLoss(alpha=0.5), opt, sched, (inputs, targets, teacher), 1.0, 1)
    assert np.isfinite(metrics["loss"]) and metrics["kd"] > 0


# ----------------------------------------------------------------- errors

@pytest.mark.parametrize("raw, fragment", [
    ({"distill": {"label_kind": "dense"}}, "distill.label_kind = 'dense' is not allowed (allowed: topk, sampled)"),
    ({"distill": {"label_kind": "sampled", "samples": 0}}, "distill.samples = 0 is out of range"),
    ({"distill": {"label_kind": "sampled", "samples": 4096}}, "distill.samples = 4096 is out of range"),
    ({"distill": {"label_kind": "sampled", "divergence": "reverse_kl"}},
     "distill.label_kind = sampled needs distill.divergence = forward_kl (got reverse_kl)"),
    ({"distill": {"label_kind": "sampled"}, "label": {"mode": "hard"}},
     "distill.label_kind = sampled needs label.mode = soft (got hard)"),
    ({"distill": {"label_kind": "sampled"}, "label": {"backend": "vllm", "gpus_per_actor": 1}},
     "distill.label_kind = sampled needs label.backend hf or auto (got vllm)"),
])
def test_sampled_config_errors_name_the_key(raw, fragment):
    from distill.config import ConfigError, build_config

    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert fragment in str(err.value)


def test_vllm_backend_refuses_sampled_labels():
    from distill.config import build_config
    from tasks.label import teacher_backend

    cfg = build_config({"distill": {"label_kind": "sampled"}})
    settings = settings_for_run(32, 1.0, TEACHER, MANIFEST, kind="sampled", samples=32)
    manifest = {"tokenizer": {"vocab_size": 50, "eos_id": 1, "pad_id": 0}, "block_size": 16}
    with pytest.raises(ValueError, match="sampled needs the HF backend .*vLLM returns only top-k"):
        teacher_backend(cfg, "vllm", settings, manifest)
    cls, kwargs = teacher_backend(cfg, "hf", settings, manifest)
    assert (kwargs["samples"], kwargs["k"]) == (32, 32)
