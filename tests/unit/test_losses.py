"""Every loss against a plain dense reference computation: values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (DenseTeacher, DistillationLoss, SparseTeacher, divergence,
                            sparse_buckets, topk_labels)

N, H, V = 24, 8, 17


def dense_reference(logits, teacher_logits, targets, alpha, tau, kind, beta, z_coef):
    """The loss written out naively over the full vocabulary, no chunks, no tricks."""
    valid = targets != -100
    p = torch.softmax(teacher_logits / tau, -1)
    q = torch.softmax(logits / tau, -1)
    if kind == "forward_kl":
        d = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (q.log() - p.log())).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        d = beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
    kd = (tau ** 2 * d)[valid].mean()
    ntp = F.cross_entropy(logits[valid], targets[valid])
    z = (torch.logsumexp(logits, -1)[valid] ** 2).mean()
    return (1 - alpha) * ntp + alpha * kd + z_coef * z


def inputs(seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    head = torch.randn(V, H, generator=g, requires_grad=True)
    teacher_logits = 2 * torch.randn(N, V, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore:
        targets[::5] = -100
    return hidden, head, teacher_logits, targets


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.5)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_dense_online_matches_reference(kind, beta, tau, chunk):
    hidden, head, t_logits, targets = inputs()
    loss = DistillationLoss(alpha=0.7, temperature=tau, kind=kind, beta=beta, z_loss=1e-3,
                            chunk_positions=chunk)
    got = loss(hidden, head, targets, DenseTeacher(t_logits)).total
    got_grads = torch.autograd.grad(got, (hidden, head))
    ref = dense_reference(hidden @ head.T, t_logits, targets, 0.7, tau, kind, beta, 1e-3)
    ref_grads = torch.autograd.grad(ref, (hidden, head))
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_sparse_with_full_k_equals_dense(kind):
    hidden, head, t_logits, targets = inputs(1)
    loss = DistillationLoss(alpha=1.0, temperature=1.5, kind=kind, chunk_positions=7)
    sparse = loss(hidden, head, targets, topk_labels(t_logits, V, 1.5)).total
    dense = loss(hidden, head, targets, DenseTeacher(t_logits)).total
    g_sparse = torch.autograd.grad(sparse, (hidden, head))
    g_dense = torch.autograd.grad(dense, (hidden, head))
    assert torch.allclose(sparse, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_sparse, g_dense):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sparse_topk_matches_bucketed_reference():
    """k < V: both sides become k kept tokens + one rest bucket; compare with a hand version."""
    hidden, head, t_logits, targets = inputs(2, ignore=False)
    k = 4
    labels = topk_labels(t_logits, k, 1.0)
    loss = DistillationLoss(alpha=1.0, z_loss=0.0, chunk_positions=3)
    got = loss(hidden, head, targets, labels).total
    p = torch.softmax(t_logits, -1)
    q = torch.softmax(hidden @ head.T, -1)
    p_k, q_k = p.gather(-1, labels.ids), q.gather(-1, labels.ids)
    p_b = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q_b = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    ref = (p_b * (p_b.log() - q_b.log())).sum(-1).mean()
    assert torch.allclose(got, ref, rtol=1e-4)


def test_topk_labels_are_exact():
    _, _, t_logits, _ = inputs(3)
    labels = topk_labels(t_logits, 5, 2.0)
    logp = torch.log_softmax(t_logits / 2.0, -1)
    assert torch.allclose(labels.logprobs, logp.topk(5, -1).values)
    total = torch.logsumexp(torch.cat([labels.logprobs, labels.rest[:, None]], -1), -1)
    assert torch.allclose(total, torch.zeros(N), atol=1e-5)  # kept + rest = all the mass
    exact_rest = torch.logsumexp(logp.scatter(-1, logp.topk(5, -1).indices, float("-inf")), -1)
    assert torch.allclose(labels.rest, exact_rest, atol=1e-4)


def test_log1mexp_is_stable_at_both_ends():
    from distill.losses import log1mexp

    x = torch.tensor([-1e-9, -1e-3, -0.5, -1.0, -30.0, 0.0], dtype=torch.float64)
    ref = torch.log(-torch.expm1(x.clamp(max=-1e-12)))
    assert torch.allclose(log1mexp(x), ref, rtol=1e-9)
    y = torch.zeros(3, requires_grad=True)
    log1mexp(y).sum().backward()
    assert torch.isfinite(y.grad).all()


def test_supervised_is_cross_entropy_plus_z():
    hidden, head, _, targets = inputs(4)
    parts = DistillationLoss(alpha=0.5, z_loss=1e-2)(hidden, head, targets, None)
    logits = hidden @ head.T
    valid = targets != -100
    ce = F.cross_entropy(logits[valid], targets[valid])
    z = (torch.logsumexp(logits, -1)[valid] ** 2).mean()
    assert torch.allclose(parts.total, ce + 1e-2 * z, rtol=1e-5)
    assert parts.kd.item() == 0.0


def test_ignored_positions_do_not_matter():
    hidden, head, t_logits, targets = inputs(5)
    loss = DistillationLoss(alpha=0.5, chunk_positions=4)
    a = loss(hidden, head, targets, DenseTeacher(t_logits)).total
    t2 = t_logits.clone()
    t2[targets == -100] = 100 * torch.randn_like(t2[targets == -100])
    b = loss(hidden, head, targets, DenseTeacher(t2)).total
    assert torch.allclose(a, b)


def test_divergences_are_zero_on_equal_distributions_and_positive_otherwise():
    logp = torch.log_softmax(torch.randn(6, 9), -1)
    other = torch.log_softmax(torch.randn(6, 9), -1)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert torch.allclose(divergence(logp, logp, kind), torch.zeros(6), atol=1e-6)
        assert (divergence(logp, other, kind) > 0).all()
    # JSD is bounded by log 2 for beta = 0.5
    assert (divergence(logp, other, "jsd", 0.5) <= math.log(2) + 1e-6).all()


def test_sparse_buckets_are_distributions():
    _, _, t_logits, _ = inputs(6)
    labels = topk_labels(t_logits, 3, 1.0)
    s_logits = torch.randn(N, V)
    t, s = sparse_buckets(s_logits, torch.logsumexp(s_logits, -1), labels, 1.0)
    assert torch.allclose(t.exp().sum(-1), torch.ones(N), atol=1e-5)
    assert torch.allclose(s.exp().sum(-1), torch.ones(N), atol=1e-5)


def test_unknown_divergence_is_an_error():
    with pytest.raises(ValueError, match="allowed: forward_kl, reverse_kl, jsd"):
        divergence(torch.zeros(1, 2), torch.zeros(1, 2), "tv")


def test_non_finite_loss_stops_the_step_without_updating():
    from distill.config import ModelConfig, OptimConfig
    from distill.models import build_llama
    from distill.training import make_optimizer, train_step

    model = build_llama(ModelConfig(layers=1, d_model=16, heads=2), 50, 16, seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[3] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt, sched = make_optimizer(model, OptimConfig(steps=10, warmup_steps=1))
    ids = torch.full((2, 8), 3)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train_step(model, DistillationLoss(alpha=0.0), opt, sched, (ids[:, :-1], ids[:, 1:], None), 1.0, 1)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all()
