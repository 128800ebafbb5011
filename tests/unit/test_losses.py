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


# ----- the fused path (analytic logits gradient) against autograd on the reference path -----

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def float64_inputs(seed, ignore=True):
    """``inputs`` in float64, hidden and head as fresh leaves."""
    hidden, head, t_logits, targets = inputs(seed, ignore)
    return (hidden.detach().double().requires_grad_(), head.detach().double().requires_grad_(),
            t_logits.double(), targets)


def make_teacher(which, t_logits, tau, k=4):
    """``sparse`` (top-k at τ, rest bucket) or ``dense`` teacher from teacher logits [N, V]."""
    if which == "dense":
        return DenseTeacher(t_logits)
    labels = topk_labels(t_logits, k, tau)
    return SparseTeacher(labels.ids, labels.logprobs.double(), labels.rest.double())


def fused_and_reference(loss, hidden, head, targets, teacher):
    """(parts, grads) of the fused forward and of the reference, grads of ``total``."""
    out = []
    for fn in (loss, loss.reference):
        parts = fn(hidden, head, targets, teacher)
        out.append((parts, torch.autograd.grad(parts.total, (hidden, head))))
    return out


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("which", ["sparse", "dense"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fused_gradients_match_autograd_reference(kind, beta, which, tau, alpha):
    hidden, head, t_logits, targets = float64_inputs(7)
    teacher = make_teacher(which, t_logits, tau)
    loss = DistillationLoss(alpha=alpha, temperature=tau, kind=kind, beta=beta, z_loss=1e-2,
                            chunk_positions=5)
    (got, got_grads), (ref, ref_grads) = fused_and_reference(loss, hidden, head, targets, teacher)
    for name in ("total", "ntp", "kd", "z"):
        assert torch.allclose(getattr(got, name), getattr(ref, name), rtol=1e-12, atol=1e-12), name
    for a, b in zip(got_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind,beta", KINDS + [("jsd", 0.0), ("jsd", 1.0)])
def test_fused_gradients_with_repeated_ids_and_large_kept_mass(kind, beta):
    """Random label ids (repeats add up in the scatter), some teacher rests at LOG_FLOOR."""
    hidden, head, _, targets = float64_inputs(8)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, V, (N, 6), generator=g)
    logp = torch.log_softmax(3 * torch.randn(N, 7, generator=g, dtype=torch.float64), -1)
    logp[:3, -1] = -1e4  # rest bucket hits LOG_FLOOR on the teacher side
    teacher = SparseTeacher(ids, logp[:, :6], logp[:, 6])
    loss = DistillationLoss(alpha=0.6, temperature=1.5, kind=kind, beta=beta, chunk_positions=7)
    (got, got_grads), (ref, ref_grads) = fused_and_reference(loss, hidden, head, targets, teacher)
    assert torch.allclose(got.total, ref.total, rtol=1e-12)
    for a, b in zip(got_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("which", ["sparse", "dense", "none"])
def test_fused_gradcheck(kind, beta, which):
    """Finite differences on a tiny float64 case, independent of the reference path."""
    g = torch.Generator().manual_seed(9)
    n, h, v = 6, 3, 7
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[2] = -100
    t_logits = torch.randn(n, v, generator=g, dtype=torch.float64)
    teacher = None if which == "none" else make_teacher(which, t_logits, 2.0, k=3)
    loss = DistillationLoss(alpha=0.5, temperature=2.0, kind=kind, beta=beta, z_loss=0.1,
                            chunk_positions=4)
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, targets, teacher).total, (hidden, head))


def test_fused_backward_scales_by_the_incoming_gradient():
    hidden, head, t_logits, targets = float64_inputs(10)
    loss = DistillationLoss(alpha=0.5, chunk_positions=5)
    teacher = make_teacher("sparse", t_logits, 1.0)
    once = torch.autograd.grad(loss(hidden, head, targets, teacher).total, (hidden, head))
    total = loss(hidden, head, targets, teacher).total
    thrice = torch.autograd.grad(-3.0 * total, (hidden, head))
    for a, b in zip(once, thrice):
        assert torch.allclose(-3.0 * a, b)


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_fused_gradient_for_only_one_input(needs):
    hidden, head, t_logits, targets = float64_inputs(11)
    hidden.requires_grad_(needs[0])
    head.requires_grad_(needs[1])
    leaf = hidden if needs[0] else head
    loss = DistillationLoss(alpha=0.5, temperature=2.0, chunk_positions=5)
    teacher = make_teacher("sparse", t_logits, 2.0)
    got = torch.autograd.grad(loss(hidden, head, targets, teacher).total, leaf)[0]
    ref = torch.autograd.grad(loss.reference(hidden, head, targets, teacher).total, leaf)[0]
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_no_gradient_work_without_autograd(monkeypatch):
    """Under no_grad, or with inputs that need no gradient, only the values are computed."""
    hidden, head, t_logits, targets = inputs(12)
    loss = DistillationLoss(alpha=0.5, temperature=2.0, chunk_positions=5)
    teacher = topk_labels(t_logits, 4, 2.0)
    ref = loss.reference(hidden, head, targets, teacher).total.detach()

    def boom(*args, **kwargs):
        raise AssertionError("gradient work without autograd")

    monkeypatch.setattr(DistillationLoss, "_chunk_grad", boom)
    with torch.no_grad():
        got = loss(hidden, head, targets, teacher).total
    assert not got.requires_grad and torch.allclose(got, ref, rtol=1e-6)
    got = loss(hidden.detach(), head.detach(), targets, teacher).total
    assert not got.requires_grad and torch.allclose(got, ref, rtol=1e-6)


def saved_shapes(fn):
    """Run ``fn()`` (forward only) and return the shapes autograd saved for backward."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return shapes, out


@pytest.mark.parametrize("which", ["sparse", "dense", "none"])
def test_fused_keeps_no_full_width_tensor_for_backward(which):
    n, h, v, chunk = 64, 4, 40, 16  # [chunk, V] = 640 elements > [N, H] = 256 > [V, H] = 160
    g = torch.Generator().manual_seed(13)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    head = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    t_logits = torch.randn(n, v, generator=g)
    teacher = {"sparse": topk_labels(t_logits, 5, 2.0), "dense": DenseTeacher(t_logits),
               "none": None}[which]
    loss = DistillationLoss(alpha=0.5, temperature=2.0, chunk_positions=chunk)

    shapes, parts = saved_shapes(lambda: loss(hidden, head, targets, teacher))
    assert (n, h) in shapes and (v, h) in shapes  # the hook does see the custom function's saves
    assert max(math.prod(s) for s in shapes) <= n * h, shapes
    parts.total.backward()  # and the saved gradients still work after the hooks
    assert hidden.grad is not None and head.grad is not None

    # the check can fail: plain autograd keeps the [N, V] logits
    naive, _ = saved_shapes(lambda: dense_reference(hidden @ head.T, t_logits, targets, 0.5, 2.0,
                                                    "forward_kl", 0.5, 1e-4))
    assert (n, v) in naive


def test_fused_in_bfloat16_is_close_to_reference():
    hidden, head, t_logits, targets = inputs(14)
    hidden = hidden.detach().bfloat16().requires_grad_()
    head = head.detach().bfloat16().requires_grad_()
    loss = DistillationLoss(alpha=0.5, temperature=2.0, chunk_positions=5)
    teacher = topk_labels(t_logits, 4, 2.0)
    (got, got_grads), (ref, ref_grads) = fused_and_reference(loss, hidden, head, targets, teacher)
    assert got.total.dtype == torch.float32
    assert torch.allclose(got.total, ref.total, rtol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        assert a.dtype == torch.bfloat16
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("kind,beta", KINDS + [("jsd", 0.0), ("jsd", 1.0)])
def test_divergence_and_grad_matches_autograd(kind, beta):
    from distill.losses import divergence_and_grad

    g = torch.Generator().manual_seed(15)
    t = torch.log_softmax(torch.randn(5, 6, generator=g, dtype=torch.float64), -1)
    s = torch.log_softmax(torch.randn(5, 6, generator=g, dtype=torch.float64), -1).requires_grad_()
    t[0, 1] = float("-inf")  # a zero-mass teacher bucket
    value, grad = divergence_and_grad(t, s.detach(), kind, beta)
    ref = divergence(t, s, kind, beta)
    assert torch.allclose(value, ref, rtol=1e-12)
    assert torch.allclose(grad, torch.autograd.grad(ref.sum(), s)[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("k", [V - 3, V])
def test_fused_student_rest_is_exact_when_the_kept_mass_is_almost_one(kind, beta, k):
    """Student rest mass ~1e-13 (kept logits +30): the fused path sums it from the outside
    columns, so it matches autograd on the reference per logit, tiny entries included
    (float64); with k = V there is no rest and both hold it at the floor."""
    hidden, head, t_logits, targets = float64_inputs(16)
    labels = topk_labels(t_logits, k, 1.0)
    teacher = SparseTeacher(labels.ids, labels.logprobs.double(), labels.rest.double())
    with torch.no_grad():  # logits = hidden @ head.T: lift the kept rows of head by +30 along hidden
        z = hidden @ head.T
        z.scatter_add_(-1, labels.ids, torch.full((N, k), 30.0, dtype=torch.float64))
    eye = torch.eye(N, dtype=torch.float64, requires_grad=True)
    w = z.T.clone().requires_grad_()  # logits = eye @ w.T = z
    loss = DistillationLoss(alpha=1.0, kind=kind, beta=beta, z_loss=0.0, chunk_positions=7)
    (got, (_, got_w)), (ref, (_, ref_w)) = fused_and_reference(loss, eye, w, targets, teacher)
    assert torch.allclose(got.total, ref.total, rtol=1e-12)
    assert torch.isfinite(got_w).all()
    assert torch.allclose(got_w, ref_w, rtol=1e-6, atol=1e-30)


# ----- autocast: the fused loss under bf16 autocast equals the float32 loss within bf16 rounding -----

AUTOCAST_LOSS_RTOL, AUTOCAST_GRAD_RTOL = 2e-3, 1e-2


@pytest.mark.parametrize("which", ["sparse", "dense", "none"])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_under_cpu_bf16_autocast_matches_float32(which, hidden_dtype):
    """Under ``torch.autocast('cpu', bfloat16)`` (hidden as an autocast model hands it over:
    float32 or bf16; head a float32 parameter) the fused loss runs its matmuls in bf16 and
    the rest in float32: loss within 2e-3 relative and gradients within 1e-2 relative (norm)
    of the float32 loss (measured: 5e-4 and 4e-3; bf16 logits carry 2^-8 relative rounding)."""
    hidden, head, t_logits, targets = inputs(21)
    teacher = None if which == "none" else make_teacher(which, t_logits, 1.0)
    if isinstance(teacher, SparseTeacher):
        teacher = SparseTeacher(teacher.ids, teacher.logprobs.float(), teacher.rest.float())
    loss = DistillationLoss(alpha=0.5, chunk_positions=5)
    ref = loss(hidden, head, targets, teacher)
    ref_grads = torch.autograd.grad(ref.total, (hidden, head))
    h = hidden.detach().to(hidden_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(h, head, targets, teacher)
        got_grads = torch.autograd.grad(got.total, (h, head))
    assert got.total.dtype == torch.float32
    assert abs(got.total.item() - ref.total.item()) <= AUTOCAST_LOSS_RTOL * abs(ref.total.item())
    for a, b in zip(got_grads, ref_grads):
        assert a.dtype == (hidden_dtype if a.shape == hidden.shape else torch.float32)
        assert (a.float() - b).norm() <= AUTOCAST_GRAD_RTOL * b.norm()
