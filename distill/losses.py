"""The distillation loss ``L = (1-α)·L_NTP + α·τ²·D(p_T^τ ‖ q_S^τ) + λ_Z·L_Z``, fused, chunked.

Shapes (N = positions, already flattened over batch and time; H = hidden; V = vocabulary;
K = kept teacher tokens; n = positions in one chunk):

* ``hidden``: [N, H] student final hidden states (any float dtype);
* ``head``: [V, H] the student's output projection;
* ``targets``: [N] int64 next-token ids, ``ignore_index`` where no loss is wanted;
* teacher, one of: ``SparseTeacher`` (ids [N, K], log-probs [N, K], rest log-mass [N]) or
  ``DenseTeacher`` (logits [N, V]), or ``None`` for plain supervised training.

``DistillationLoss`` works like Liger-Kernel's fused linear cross-entropy, in plain PyTorch:
a custom autograd function walks the positions one chunk at a time, builds the chunk's
[n, V] logits once, computes the loss parts *and* the analytic gradient of the total loss
with respect to those logits, and turns that gradient straight into ``grad_hidden[chunk]``
[n, H] and a running ``grad_head`` [V, H]. Only those two are kept for the backward pass,
which merely scales them by the incoming gradient: no [N × V] student tensor exists, nothing
is recomputed. Without autograd (``torch.no_grad`` or inputs that need no gradient) the
gradient work is skipped. ``DistillationLoss.reference`` is the plain autograd version of
the same loss (checkpointed chunks), kept as the ground truth for the tests.

With sparse labels the K kept tokens plus one "rest" bucket (the mass outside them) form
the distribution on both sides; with K = V (rest mass 0) this equals the dense loss.

Gradients (per position; z = the chunk's logits row, p = softmax(z), q = softmax(z/τ),
lse = logsumexp(z)):

* cross-entropy: ∂/∂z = p − onehot(target); z-loss lse²: ∂/∂z = 2·lse·p;
* any loss D(s) of the student's log-probs s = log_softmax(z/τ): with g = ∂D/∂s,
  ∂D/∂z = (g − q·Σg) / τ (dense teacher: g is [n, V]);
* sparse buckets: s_i = z_{id_i}/τ − lse_τ for the K kept ids and s_rest = log R with
  R = Σ_{j ∉ ids} q_j, the student's mass *outside* the kept columns, summed directly over
  those columns (never as 1 − Σ kept, which cancels when the student is confident inside the
  teacher's top k). With g = ∂D/∂buckets and Σg over all K+1 buckets:
  ∂D/∂z_j = (g_j − q_j·Σg)/τ at a kept column (g summed over repeats of its id) and
  q_j·(g_rest/R − Σg)/τ outside. The fused path writes the kept columns directly instead of
  adding a large q·g_rest/R everywhere and cancelling it at the kept ones.

Numerics: both rest buckets are exact to float32 rounding of the logits. The teacher's is
``logsumexp`` of its logits outside the top k minus the full ``logsumexp``
(:func:`topk_labels`); the student's is summed from e^{(z − max)/τ} over the columns outside
the kept ids, so it stays exact while that mass is within float32's range (above about
e^{−87} of the top logit's weight); below that the fused path holds it at ``LOG_FLOOR`` and
passes no gradient through it (the reference, a ``logsumexp`` with its own maximum, is still
exact there and clamps only at ``LOG_FLOOR`` itself).

Sampled labels (:func:`sampled_labels`, RS-KD) are a ``SparseTeacher`` too: the drawn ids
with log-frequencies and an empty rest; with forward KL the gradient is q − count/N.

Kept ids must lie in 0..V-1; repeated ids (several buckets on one token) are allowed.

Under ``torch.autocast`` the fused path runs its two matmuls (logits, and the gradients of
hidden and head) in the autocast dtype and everything else in float32, with autocast itself
switched off inside (``torch.mm(..., out=)`` cannot take autocast's output dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# log(0) for an empty rest bucket becomes this floor: exp(-100) is 0 for every practical
# purpose but keeps 0·log 0 terms and their gradients finite.
LOG_FLOOR = -100.0
# log1mexp caps its argument here, so a kept mass of (numerically) 1 gives a finite rest.
_LOG_MASS_CAP = -1e-12


@dataclass
class SparseTeacher:
    """Top-k teacher labels: ``ids`` [N, K] int64, ``logprobs`` [N, K], ``rest`` [N] (log mass)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor

    def chunk(self, s: slice) -> "SparseTeacher":
        return SparseTeacher(self.ids[s], self.logprobs[s], self.rest[s])


@dataclass
class DenseTeacher:
    """Full teacher logits [N, V] (online distillation); softened by τ in the loss."""

    logits: torch.Tensor

    def chunk(self, s: slice) -> "DenseTeacher":
        return DenseTeacher(self.logits[s])


@dataclass
class LossParts:
    """The total loss and its parts, each a mean over unmasked positions.

    From ``DistillationLoss.forward`` only ``total`` carries a gradient; ``ntp``, ``kd`` and
    ``z`` are reported values (from ``DistillationLoss.reference`` all four do).
    """

    total: torch.Tensor
    ntp: torch.Tensor
    kd: torch.Tensor
    z: torch.Tensor


def divergence(teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: str,
               beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between two log-distributions over the last dim: [N, B] → [N].

    ``forward_kl`` = KL(p_T ‖ q_S); ``reverse_kl`` = KL(q_S ‖ p_T); ``jsd`` is the generalised
    Jensen–Shannon divergence of GKD (Agarwal et al. 2024, as in TRL): with
    m = β·p_T + (1-β)·q_S, JSD_β = β·KL(p_T ‖ m) + (1-β)·KL(q_S ‖ m); β = 0 and 1 fall back
    to forward and reverse KL as TRL does.
    """
    kind = _resolve_kind(kind, beta)
    if kind == "forward_kl":
        return _kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return _kl(student_logp, teacher_logp)
    mix = torch.logsumexp(torch.stack([teacher_logp + math.log(beta),
                                       student_logp + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(teacher_logp, mix) + (1.0 - beta) * _kl(student_logp, mix)


def _resolve_kind(kind: str, beta: float) -> str:
    """``jsd`` with β = 0 / 1 is forward / reverse KL (as in TRL); unknown kinds raise."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return "forward_kl"
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return "reverse_kl"
    if kind == "jsd":
        return "jsd"
    raise ValueError(f"distill.divergence: unknown {kind!r} (allowed: forward_kl, reverse_kl, jsd)")


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row; 0·log 0 terms are exactly 0."""
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p)).sum(-1)


def divergence_and_grad(teacher_logp: torch.Tensor, student_logp: torch.Tensor, kind: str,
                        beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``divergence`` [N] and its gradient ``g = ∂D/∂student_logp`` [N, B], no autograd.

    With P = e^t (teacher), Q = e^s (student), M = βP + (1-β)Q, m = log M:
    forward KL g = −P; reverse KL g = Q·(s − t + 1); JSD_β g = (1-β)·Q·(s − m) (the terms
    through m cancel). Terms with zero mass contribute 0, as in ``_kl``.
    """
    kind = _resolve_kind(kind, beta)
    t, s = teacher_logp, student_logp
    if kind == "forward_kl":
        p = t.exp()
        return torch.where(p > 0, p * (t - s), 0.0).sum(-1), -p
    q = s.exp()
    if kind == "reverse_kl":
        diff = s - t
        return (torch.where(q > 0, q * diff, 0.0).sum(-1),
                torch.where(q > 0, q * (diff + 1.0), 0.0))
    mix = torch.logaddexp(t + math.log(beta), s + math.log(1.0 - beta))
    p = t.exp()
    q_term = torch.where(q > 0, q * (s - mix), 0.0)
    value = beta * torch.where(p > 0, p * (t - mix), 0.0).sum(-1) + (1.0 - beta) * q_term.sum(-1)
    return value, (1.0 - beta) * q_term


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x ≤ 0``, stable at both ends (Mächler 2012).

    ``x`` is capped just below 0 so that a kept mass of exactly 1 (k = V) gives a finite
    ``log(1e-12)`` with a finite gradient instead of -inf/NaN.
    """
    x = x.clamp(max=_LOG_MASS_CAP)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_buckets(logits: torch.Tensor, lse: torch.Tensor, teacher: SparseTeacher,
                   tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides as [N, K+1] log-distributions over the kept tokens plus the rest bucket.

    ``lse`` [N] is ``logsumexp(logits / τ)``. Only K columns of the student's logits are
    gathered for the kept buckets; the rest is ``logsumexp`` of the logits outside the kept
    ids minus ``lse`` (exact, no 1 − Σ kept). Used by the reference path (the fused path
    computes the same buckets in ``DistillationLoss._chunk``).
    """
    scaled = logits / tau if tau != 1.0 else logits
    kept = scaled.gather(-1, teacher.ids) - lse.unsqueeze(-1)
    rest = (outside_logsumexp(scaled, teacher.ids) - lse).clamp_min(LOG_FLOOR)
    student = torch.cat([kept, rest.unsqueeze(-1)], dim=-1)
    return _teacher_buckets(teacher, student.dtype), student


def outside_logsumexp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` [N] of ``logits`` [N, V] over the columns *not* in ``ids`` [N, K].

    The kept columns are set to the dtype's lowest finite value rather than −inf, so a row
    with nothing outside (K = V) gives a huge negative number with a zero (not NaN) gradient.
    """
    lowest = torch.finfo(logits.dtype).min
    return torch.logsumexp(logits.scatter(-1, ids, lowest), dim=-1)


def _teacher_buckets(teacher: SparseTeacher, dtype: torch.dtype) -> torch.Tensor:
    """The teacher's [N, K+1] bucket log-probs: kept log-probs, then the floored rest."""
    rest = teacher.rest.to(dtype).clamp_min(LOG_FLOOR).unsqueeze(-1)
    return torch.cat([teacher.logprobs.to(dtype), rest], -1)


@dataclass
class BucketTeacher:
    """A ``SparseTeacher`` prepared once per call for the fused loss (all rows at once).

    ``ids`` [N, K]; ``logp`` [N, K+1] the bucket log-probs (rest floored at ``LOG_FLOOR``);
    ``probs`` [N, K+1] = exp(logp); ``plogp`` [N] = Σ_b P_b·logp_b over buckets with P_b > 0.
    """

    ids: torch.Tensor
    logp: torch.Tensor
    probs: torch.Tensor
    plogp: torch.Tensor

    @classmethod
    def from_sparse(cls, teacher: SparseTeacher, dtype: torch.dtype) -> "BucketTeacher":
        logp = _teacher_buckets(teacher, dtype)
        probs = logp.exp()
        return cls(teacher.ids, logp, probs, torch.where(probs > 0, probs * logp, 0.0).sum(-1))

    def chunk(self, s: slice) -> "BucketTeacher":
        return BucketTeacher(self.ids[s], self.logp[s], self.probs[s], self.plogp[s])


@dataclass
class SparseKDGrad:
    """∂D/∂buckets of a sparse KD term: ``kept`` [n, K], ``rest`` [n], ``total`` [n] = Σ over
    all K+1 buckets (for the fused path's direct kept-column and outside-column formulas)."""

    kept: torch.Tensor
    rest: torch.Tensor
    total: torch.Tensor


def sparse_kd_and_grad(s_kept: torch.Tensor, s_rest: torch.Tensor, teacher: BucketTeacher,
                       tau: float, kind: str, beta: float,
                       want_grad: bool) -> tuple[torch.Tensor, SparseKDGrad | None]:
    """τ²·D over the K+1 buckets [n] and g = ∂D/∂buckets (None without ``want_grad``).

    ``s_kept`` [n, K] are the student's log-probs at ``teacher.ids`` (at τ), ``s_rest`` [n] its
    exact log mass outside them (floored at ``LOG_FLOOR``). Forward KL uses the teacher's
    precomputed Σ P·log P (fewest small kernels); its g is −P.
    """
    student = torch.cat([s_kept, s_rest.unsqueeze(-1)], -1)
    if _resolve_kind(kind, beta) == "forward_kl":
        value = teacher.plogp - (teacher.probs * student).sum(-1)
        g = teacher.probs.neg() if want_grad else None
    else:
        value, g = divergence_and_grad(teacher.logp, student, kind, beta)
    value = value if tau == 1.0 else value * tau ** 2
    if not want_grad:
        return value, None
    return value, SparseKDGrad(g[:, :-1], g[:, -1], g.sum(-1))


def split_sums(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row sums [n], sums outside ``ids`` [n], the values at ``ids`` [n, K]) of ``weights`` [n, V].

    The outside sum adds only the outside columns (exact for a tiny outside mass); the kept
    columns are zeroed for it and written back, so ``weights`` ends unchanged.
    """
    kept = weights.gather(-1, ids)
    total = weights.sum(-1)
    weights.scatter_(-1, ids, 0.0)
    outside = weights.sum(-1)
    weights.scatter_(-1, ids, kept)  # repeated ids write the same value back
    return total, outside, kept


def dense_kd_and_grad(logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, kind: str,
                      beta: float, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """τ²·D(p_T^τ ‖ q_S^τ) per position [n] and its gradient w.r.t. the logits [n, V].

    ``logits`` and ``teacher_logits`` are [n, V]; ∂(τ²D)/∂z = τ·(g − q·Σg), g = ∂D/∂s.
    """
    student = F.log_softmax(logits / tau, dim=-1)
    teacher = F.log_softmax(teacher_logits.to(logits.dtype) / tau, dim=-1)
    value, g = divergence_and_grad(teacher, student, kind, beta)
    if not want_grad:
        return tau ** 2 * value, None
    grad = g.sub_(student.exp_().mul_(g.sum(-1, keepdim=True))).mul_(tau)
    return tau ** 2 * value, grad


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


class _FusedLinearDistill(torch.autograd.Function):
    """``total`` (scalar) and ``parts`` [3] = (ntp, kd, z) from ``hidden`` and ``head``.

    The forward pass computes the gradient of ``total`` w.r.t. ``hidden`` [N, H] and
    ``head`` [V, H] chunk by chunk and saves just those; ``parts`` carries no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, head, targets, teacher, loss, needs):
        total, parts, grad_hidden, grad_head = loss._fused_pass(hidden, head, targets, teacher, needs)
        ctx.mark_non_differentiable(parts)
        ctx.save_for_backward(grad_hidden, grad_head)
        return total, parts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_parts):
        grad_hidden, grad_head = ctx.saved_tensors
        gh = grad_hidden * grad_total.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_head * grad_total.to(grad_head.dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


@dataclass
class _Coefs:
    """Per-position gradient coefficients [N], from w = valid / count (computed once per call).

    ``ce`` = (1-α)·w multiplies p − onehot(target); ``z`` = 2λ·w multiplies lse·p; ``kd`` =
    α·τ·w multiplies τ·∂D/∂z (so α·τ²·∂D/∂z; sparse teacher: see ``_chunk_grad``).
    """

    ce: torch.Tensor
    z: torch.Tensor
    kd: torch.Tensor

    def chunk(self, s: slice) -> "_Coefs":
        return _Coefs(self.ce[s], self.z[s], self.kd[s])


@dataclass
class _SparseSide:
    """The student's distribution at τ as a sparse teacher's buckets see it, for one chunk.

    ``weights`` [n, V] = e^{(z − max)/τ} (unnormalised q); ``total`` [n] their row sums,
    ``outside`` [n] the sum outside the kept ids (the rest mass R times ``total``), ``kept``
    [n, K] the weights at the kept ids, ``lse`` [n] = logsumexp(z/τ).
    """

    weights: torch.Tensor
    total: torch.Tensor
    outside: torch.Tensor
    kept: torch.Tensor
    lse: torch.Tensor

    @classmethod
    def of(cls, weights: torch.Tensor, ids: torch.Tensor, top_tau: torch.Tensor) -> "_SparseSide":
        total, outside, kept = split_sums(weights, ids)
        return cls(weights, total, outside, kept, total.log() + top_tau)

    def log_rest(self) -> torch.Tensor:
        """log R [n], exact; floored at ``LOG_FLOOR`` (0 weight outside → the floor)."""
        return (self.outside.log() - self.total.log()).clamp_min(LOG_FLOOR)

    def held(self) -> torch.Tensor:
        """[n] rows whose rest is held at the floor (no gradient through it, as the reference)."""
        return (self.outside <= 0) | (self.outside.log() - self.total.log() < LOG_FLOOR)


def _matmul_dtype(hidden: torch.Tensor, head: torch.Tensor) -> torch.dtype:
    """The dtype of the fused loss's matmuls: autocast's when it is on for this device, else
    the inputs' common dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, head.dtype)


def _write_hidden_grad(out: torch.Tensor, dlogits: torch.Tensor, head: torch.Tensor) -> None:
    """``out`` [n, H] = dlogits [n, V] @ head [V, H]; straight into ``out`` when dtypes agree."""
    if out.dtype == dlogits.dtype == head.dtype:
        torch.mm(dlogits, head, out=out)
    else:
        out.copy_(dlogits @ head)


class DistillationLoss(nn.Module):
    """``(1-α)·NTP + α·τ²·D + λ_Z·Z`` over chunks of positions (see module docstring)."""

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, kind: str = "forward_kl",
                 beta: float = 0.5, z_loss: float = 1e-4, chunk_positions: int = 1024,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.alpha, self.tau, self.kind, self.beta = alpha, temperature, kind, beta
        self.z_coef, self.chunk, self.ignore_index = z_loss, chunk_positions, ignore_index

    def forward(self, hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                teacher: SparseTeacher | DenseTeacher | None = None) -> LossParts:
        """Loss parts for ``hidden`` [N, H], ``head`` [V, H], ``targets`` [N] (module doc).

        Fused path; falls back to ``reference`` when the teacher's tensors need a gradient.
        """
        _resolve_kind(self.kind, self.beta)
        if teacher is not None and any(t.requires_grad for t in _teacher_tensors(teacher)):
            return self.reference(hidden, head, targets, teacher)
        needs = (hidden.requires_grad, head.requires_grad)
        if torch.is_grad_enabled() and any(needs):
            total, parts = _FusedLinearDistill.apply(hidden, head, targets, teacher, self, needs)
        else:
            total, parts, _, _ = self._fused_pass(hidden, head, targets, teacher, (False, False))
        return LossParts(total=total, ntp=parts[0], kd=parts[1], z=parts[2])

    def _kd_weight(self, teacher) -> float:
        """α with a teacher, 0 without one."""
        return self.alpha if teacher is not None else 0.0

    @torch.no_grad()
    def _fused_pass(self, hidden, head, targets, teacher, needs: tuple[bool, bool]):
        """One walk over the chunks: (total [], parts [3], grad_hidden [N, H], grad_head [V, H]).

        Gradients are those of ``total``; each is an empty tensor where ``needs`` says no.
        Per-row values go to ``rows`` [3, N] (ntp, kd, z), masked and summed once at the end.
        Under autocast the matmuls run in its dtype, with autocast itself off (module doc).
        """
        mm_dtype = _matmul_dtype(hidden, head)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self._fused_walk(hidden, head, targets, teacher, needs, mm_dtype)

    def _fused_walk(self, hidden, head, targets, teacher, needs, mm_dtype):
        """``_fused_pass`` with the matmuls in ``mm_dtype`` (autocast off)."""
        dtype = _compute_dtype(hidden.dtype)
        valid = targets != self.ignore_index
        count = valid.sum().clamp_min(1)
        w = valid.to(dtype) / count                                       # [N] d part / d row
        w_kd = self._kd_weight(teacher)
        coefs = _Coefs((1.0 - w_kd) * w, (2.0 * self.z_coef) * w, (w_kd * self.tau) * w)
        if isinstance(teacher, SparseTeacher):
            teacher = BucketTeacher.from_sparse(teacher, dtype)
        h_mm, w_mm = hidden.to(mm_dtype), head.to(mm_dtype)
        grad_hidden = (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                       if needs[0] else hidden.new_empty(0))
        grad_head = (torch.zeros(head.shape, dtype=_compute_dtype(head.dtype), device=head.device)
                     if needs[1] else head.new_empty(0))
        rows = torch.zeros(3, hidden.shape[0], device=hidden.device, dtype=dtype)
        for start in range(0, hidden.shape[0], self.chunk):
            s = slice(start, start + self.chunk)
            t_chunk = teacher.chunk(s) if teacher is not None else None
            dlogits = self._chunk(h_mm[s], w_mm, targets[s], t_chunk, rows[:, s],
                                  coefs.chunk(s) if any(needs) else None)
            if needs[0]:
                _write_hidden_grad(grad_hidden[s], dlogits.to(mm_dtype), w_mm)
            if needs[1]:
                _accumulate_head_grad(grad_head, dlogits, h_mm[s])
        parts = torch.where(valid, rows, 0.0).sum(-1) / count
        total = (1.0 - w_kd) * parts[0] + w_kd * parts[1] + self.z_coef * parts[2]
        return total, parts, grad_hidden, grad_head.to(head.dtype)

    def _chunk(self, hidden, head, targets, teacher, rows, coefs: _Coefs | None):
        """Fill ``rows`` [3, n] with per-position (ntp, kd, z); return d total / d logits [n, V].

        ``hidden`` [n, H], ``targets`` [n]; ``coefs`` None means no gradient (returns None).
        The chunk's logits buffer is reused in place for e^{z − max}, then for the gradient.
        """
        logits = (hidden @ head.T).to(rows.dtype)                      # [n, V], the only big buffer
        tgt = targets.clamp_min(0).unsqueeze(-1)                      # [n, 1]
        target_logit = logits.gather(-1, tgt).squeeze(-1)
        kd_grad_needed = coefs is not None and self._kd_weight(teacher) != 0.0
        kd_row, kd_dense, side = None, None, None
        if isinstance(teacher, DenseTeacher):  # needs the logits before they are overwritten
            kd_row, kd_dense = dense_kd_and_grad(logits, teacher.logits, self.tau, self.kind,
                                                 self.beta, kd_grad_needed)
        sparse = isinstance(teacher, BucketTeacher)
        kept = logits.gather(-1, teacher.ids) if sparse else None      # [n, K] raw kept logits
        top = logits.amax(-1, keepdim=True)                            # [n, 1]
        if sparse and self.tau != 1.0:                                 # e^{(z−max)/τ}: q's weights
            side = _SparseSide.of(torch.sub(logits, top).div_(self.tau).exp_(), teacher.ids,
                                  top.squeeze(-1) / self.tau)
        e = logits.sub_(top).exp_()                                    # [n, V] e^{z−max}, in place
        if sparse and side is None:                                    # τ = 1: q is p
            side = _SparseSide.of(e, teacher.ids, top.squeeze(-1))
            sum_e = side.total
        else:
            sum_e = e.sum(-1)
        lse = sum_e.log().add_(top.squeeze(-1))
        kd_grad = None
        if sparse:
            s_kept = (kept if self.tau == 1.0 else kept / self.tau) - side.lse.unsqueeze(-1)
            kd_row, kd_grad = sparse_kd_and_grad(s_kept, side.log_rest(), teacher, self.tau,
                                                 self.kind, self.beta, kd_grad_needed)
        torch.sub(lse, target_logit, out=rows[0])
        if kd_row is not None:
            rows[1].copy_(kd_row)
        torch.square(lse, out=rows[2])
        if coefs is None:
            return None
        return self._chunk_grad(e, sum_e, lse, side, tgt, teacher, coefs, kd_dense, kd_grad)

    def _chunk_grad(self, e, sum_e, lse, side, tgt, teacher, coefs: _Coefs, kd_dense,
                    kd_grad: SparseKDGrad | None) -> torch.Tensor:
        """d total / d logits [n, V], built in ``e``'s buffer.

        ``e`` [n, V] = e^{z−max} with row sums ``sum_e`` [n], p = e/Σe; ``lse`` [n]; ``tgt``
        [n, 1]; ``side``: the sparse teacher's view of q = softmax(z/τ) (its weights are ``e``
        at τ = 1); ``kd_grad`` its g, or ``kd_dense`` [n, V]. Everywhere p·(ce + z·lse) plus, for
        a sparse teacher, kd·q·(g_rest/R − Σg) outside the kept ids; the kept columns are then
        overwritten with p·(ce + z·lse) − kd·q·Σg and get kd·g added (scatter_add: repeated ids
        add up); −ce at the target.
        """
        coef_p = torch.addcmul(coefs.ce, coefs.z, lse)                             # [n]
        kept_base = None
        if kd_grad is not None:
            kd = coefs.kd
            q_kept = side.kept / side.total.unsqueeze(-1)                           # [n, K]
            p_kept = q_kept if side.weights is e else e.gather(-1, teacher.ids) / sum_e.unsqueeze(-1)
            kept_base = (p_kept * coef_p.unsqueeze(-1)).sub_(q_kept * (kd * kd_grad.total).unsqueeze(-1))
            share = torch.where(side.held(), 0.0, kd_grad.rest / side.outside)     # g_rest / R·Σw
            out_coef = kd * (share - kd_grad.total / side.total)                   # per unit weight
        if kd_grad is not None and side.weights is e:  # τ = 1: one dense coefficient per row
            grad = e.mul_((coef_p / sum_e + out_coef).unsqueeze(-1))
        else:
            grad = e.mul_((coef_p / sum_e).unsqueeze(-1))
            if kd_grad is not None:
                grad.addcmul_(side.weights, out_coef.unsqueeze(-1))
        if kd_dense is not None:
            grad.addcmul_(kd_dense, (coefs.kd / self.tau).unsqueeze(-1))
        if kd_grad is not None:
            grad.scatter_(-1, teacher.ids, kept_base)
            grad.scatter_add_(-1, teacher.ids, kd_grad.kept.mul_(coefs.kd.unsqueeze(-1)))
        grad.scatter_add_(-1, tgt, coefs.ce.neg().unsqueeze(-1))
        return grad

    # ----- reference path: plain autograd through the same math (the old implementation) -----

    def reference(self, hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor,
                  teacher: SparseTeacher | DenseTeacher | None = None) -> LossParts:
        """The same loss by autograd over checkpointed chunks (slower; ground truth for tests)."""
        valid = targets != self.ignore_index
        count = valid.sum().clamp_min(1)
        sums = torch.zeros(3, device=hidden.device, dtype=_compute_dtype(hidden.dtype))
        for start in range(0, hidden.shape[0], self.chunk):
            s = slice(start, start + self.chunk)
            t_chunk = teacher.chunk(s) if teacher is not None else None
            if torch.is_grad_enabled() and (hidden.requires_grad or head.requires_grad):
                part = checkpoint(self._chunk_sums, hidden[s], head, targets[s], t_chunk,
                                  use_reentrant=False)
            else:
                part = self._chunk_sums(hidden[s], head, targets[s], t_chunk)
            sums = sums + part
        ntp, kd, z = sums / count
        weight_kd = self._kd_weight(teacher)
        total = (1.0 - weight_kd) * ntp + weight_kd * kd + self.z_coef * z
        return LossParts(total=total, ntp=ntp, kd=kd, z=z)

    def _chunk_sums(self, hidden, head, targets, teacher) -> torch.Tensor:
        """Reference: sums of (ntp, kd, z) [3] over one chunk, differentiable."""
        logits = (hidden @ head.T).to(_compute_dtype(hidden.dtype))  # [n, V]
        valid = targets != self.ignore_index
        lse = torch.logsumexp(logits, dim=-1)
        target_logit = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        ntp = ((lse - target_logit) * valid).sum()
        z = (lse.square() * valid).sum()
        kd = logits.new_zeros(())
        if teacher is not None:
            kd = (self.per_position_kd(logits, lse, teacher) * valid).sum()
        return torch.stack([ntp, kd, z])

    def per_position_kd(self, logits: torch.Tensor, lse: torch.Tensor, teacher) -> torch.Tensor:
        """Reference: τ²·D(p_T^τ ‖ q_S^τ) per position, [n]; sparse labels already carry τ."""
        if isinstance(teacher, DenseTeacher):
            student_logp = F.log_softmax(logits / self.tau, dim=-1)
            teacher_logp = F.log_softmax(teacher.logits.to(logits.dtype) / self.tau, dim=-1)
        else:
            lse_tau = lse if self.tau == 1.0 else torch.logsumexp(logits / self.tau, dim=-1)
            teacher_logp, student_logp = sparse_buckets(logits, lse_tau, teacher, self.tau)
        return self.tau ** 2 * divergence(teacher_logp, student_logp, self.kind, self.beta)


def _teacher_tensors(teacher) -> list[torch.Tensor]:
    """The tensors a teacher holds."""
    if isinstance(teacher, DenseTeacher):
        return [teacher.logits]
    return [teacher.ids, teacher.logprobs, teacher.rest]


def _accumulate_head_grad(grad_head: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor) -> None:
    """``grad_head`` [V, H] += dlogits^T [V, n] @ hidden [n, H], in ``grad_head``'s precision."""
    if hidden.dtype == grad_head.dtype:
        grad_head.addmm_(dlogits.T, hidden)
    else:  # low-precision matmul, accumulated in float32 across chunks
        grad_head += dlogits.T.to(hidden.dtype) @ hidden


def sampled_labels(logits: torch.Tensor, samples: int, temperature: float,
                   generator: torch.Generator | None = None) -> SparseTeacher:
    """RS-KD labels (Anshumann et al., ACL 2025): ``samples`` draws per position [N] from the
    teacher's softmax at τ, kept as the distinct ids with their frequencies.

    ``logits`` [N, V] → ids [N, W] (W = min(samples, V), distinct per row; ids never drawn
    fill the row with count 0), logprobs [N, W] = log(count / samples) (−inf for 0), rest
    −inf (no mass outside the draws). The proposal is the teacher's own distribution, so the
    importance weights are 1 and the frequencies are an unbiased estimate of p_T^τ: with
    them as the sparse teacher, the forward-KL gradient ∂/∂z = (q_S^τ − count/samples)·τ
    is unbiased for the dense one (a student bucket per drawn id, the rest bucket empty).
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator)   # [N, S]
    counts = torch.zeros_like(probs).scatter_add_(-1, draws, torch.ones_like(draws, dtype=probs.dtype))
    width = min(samples, probs.shape[-1])
    count, ids = counts.topk(width, dim=-1)      # distinct ids, drawn ones first
    logprobs = torch.log(count / samples)
    return SparseTeacher(ids=ids, logprobs=logprobs, rest=torch.full_like(count[:, 0], float("-inf")))


def exact_sample_frequencies(logprobs: torch.Tensor, samples: int) -> torch.Tensor:
    """Stored log-frequencies (float16) → the exact log(count / samples) they encode."""
    return torch.log(torch.round(logprobs.float().exp() * samples) / samples)


def topk_labels(logits: torch.Tensor, k: int, temperature: float,
                lse: torch.Tensor | None = None) -> SparseTeacher:
    """Teacher logits [N, V] → top-k log-probs at temperature τ plus the rest log-mass.

    The top-k is taken on the logits (same order as on log-probs), so no full [N, V]
    log-softmax is materialised. The rest is exact: ``logsumexp`` of the scaled logits
    *outside* the top k minus the full ``logsumexp`` (not log(1 − Σ kept), which float32
    cancellation makes 10–50 nats wrong for a confident teacher). ``lse`` [N], if given, is
    ``logsumexp(logits / τ)`` already computed by the caller.
    """
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    k = min(k, scaled.shape[-1])
    top, ids = scaled.topk(k, dim=-1)
    lse = torch.logsumexp(scaled, dim=-1) if lse is None else lse
    logprobs = top - lse.unsqueeze(-1)
    if k == scaled.shape[-1]:  # nothing left outside: exactly zero mass
        rest = torch.full_like(lse, float("-inf"))
    else:
        rest = outside_logsumexp(scaled, ids) - lse
    return SparseTeacher(ids=ids, logprobs=logprobs, rest=rest)
