"""The distillation loss ``L = (1-α)·L_NTP + α·τ²·D(p_T^τ ‖ q_S^τ) + λ_Z·L_Z``, chunked.

Shapes (N = positions, already flattened over batch and time; H = hidden; V = vocabulary;
K = kept teacher tokens):

* ``hidden``: [N, H] student final hidden states (any float dtype);
* ``head``: [V, H] the student's output projection;
* ``targets``: [N] int64 next-token ids, ``ignore_index`` where no loss is wanted;
* teacher, one of: ``SparseTeacher`` (ids [N, K], log-probs [N, K], rest log-mass [N]) or
  ``DenseTeacher`` (logits [N, V]), or ``None`` for plain supervised training.

The student logits are built from ``hidden`` one chunk of positions at a time, under
activation checkpointing, so the full [N × V] matrix never exists in float32: peak extra
memory is O(chunk × V), recomputed in the backward pass.

With sparse labels the K kept tokens plus one "rest" bucket (the mass outside them) form
the distribution on both sides; with K = V (rest mass 0) this equals the dense loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# log(0) for an empty rest bucket becomes this floor: exp(-100) is 0 for every practical
# purpose but keeps 0·log 0 terms and their gradients finite.
LOG_FLOOR = -100.0


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
    """The total loss and its parts, each a mean over unmasked positions."""

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
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(teacher_logp, student_logp)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(student_logp, teacher_logp)
    if kind == "jsd":
        mix = torch.logsumexp(torch.stack([teacher_logp + math.log(beta),
                                           student_logp + math.log(1.0 - beta)]), dim=0)
        return beta * _kl(teacher_logp, mix) + (1.0 - beta) * _kl(student_logp, mix)
    raise ValueError(f"distill.divergence: unknown {kind!r} (allowed: forward_kl, reverse_kl, jsd)")


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row; 0·log 0 terms are exactly 0."""
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p)).sum(-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x ≤ 0``, stable at both ends (Mächler 2012).

    ``x`` is capped just below 0 so that a kept mass of exactly 1 (k = V) gives a finite
    ``log(1e-12)`` with a finite gradient instead of -inf/NaN.
    """
    x = x.clamp(max=-1e-12)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_buckets(logits: torch.Tensor, lse: torch.Tensor, teacher: SparseTeacher,
                   tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides as [N, K+1] log-distributions over the kept tokens plus the rest bucket.

    ``lse`` [N] is ``logsumexp(logits / τ)``. Only K columns of the student's logits are
    touched (a gather), never a full [N, V] log-softmax: this is what keeps an offline
    sparse-KD step nearly as cheap as a cross-entropy step.
    """
    kept = logits.gather(-1, teacher.ids) / tau - lse.unsqueeze(-1)
    rest = log1mexp(torch.logsumexp(kept, dim=-1)).clamp_min(LOG_FLOOR)
    student = torch.cat([kept, rest.unsqueeze(-1)], dim=-1)
    t = torch.cat([teacher.logprobs.float(), teacher.rest.float().clamp_min(LOG_FLOOR).unsqueeze(-1)], -1)
    return t, student


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
        """Loss parts for ``hidden`` [N, H], ``head`` [V, H], ``targets`` [N] (see module doc)."""
        valid = targets != self.ignore_index
        count = valid.sum().clamp_min(1)
        sums = torch.zeros(3, device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], self.chunk):
            s = slice(start, start + self.chunk)
            t_chunk = teacher.chunk(s) if teacher is not None else None
            if torch.is_grad_enabled() and hidden.requires_grad:
                part = checkpoint(self._chunk_sums, hidden[s], head, targets[s], t_chunk,
                                  use_reentrant=False)
            else:
                part = self._chunk_sums(hidden[s], head, targets[s], t_chunk)
            sums = sums + part
        ntp, kd, z = sums / count
        weight_kd = self.alpha if teacher is not None else 0.0
        total = (1.0 - weight_kd) * ntp + weight_kd * kd + self.z_coef * z
        return LossParts(total=total, ntp=ntp, kd=kd, z=z)

    def _chunk_sums(self, hidden, head, targets, teacher) -> torch.Tensor:
        logits = (hidden @ head.T).float()  # [n, V], the only full-width float32 tensor
        valid = targets != self.ignore_index
        # One logsumexp serves cross-entropy, z-loss and (at τ = 1) the sparse KD.
        lse = torch.logsumexp(logits, dim=-1)
        target_logit = logits.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        ntp = ((lse - target_logit) * valid).sum()
        z = (lse.square() * valid).sum()
        kd = logits.new_zeros(())
        if teacher is not None:
            kd = (self.per_position_kd(logits, lse, teacher) * valid).sum()
        return torch.stack([ntp, kd, z])

    def per_position_kd(self, logits: torch.Tensor, lse: torch.Tensor, teacher) -> torch.Tensor:
        """τ²·D(p_T^τ ‖ q_S^τ) per position, [n]; sparse labels already carry τ."""
        if isinstance(teacher, DenseTeacher):
            student_logp = F.log_softmax(logits / self.tau, dim=-1)
            teacher_logp = F.log_softmax(teacher.logits.float() / self.tau, dim=-1)
        else:
            lse_tau = lse if self.tau == 1.0 else torch.logsumexp(logits / self.tau, dim=-1)
            teacher_logp, student_logp = sparse_buckets(logits, lse_tau, teacher, self.tau)
        return self.tau ** 2 * divergence(teacher_logp, student_logp, self.kind, self.beta)


def topk_labels(logits: torch.Tensor, k: int, temperature: float,
                lse: torch.Tensor | None = None) -> SparseTeacher:
    """Teacher logits [N, V] → top-k log-probs at temperature τ plus the rest log-mass.

    The top-k is taken on the logits (same order as on log-probs), so no full [N, V]
    log-softmax is materialised; the rest is ``log(1 - Σ kept)`` via ``log1mexp``.
    ``lse`` [N], if given, is ``logsumexp(logits / τ)`` already computed by the caller.
    """
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    k = min(k, scaled.shape[-1])
    top, ids = scaled.topk(k, dim=-1)
    lse = torch.logsumexp(scaled, dim=-1) if lse is None else lse
    logprobs = top - lse.unsqueeze(-1)
    if k == scaled.shape[-1]:  # nothing left outside: exactly zero mass, not float32 noise
        rest = torch.full_like(lse, float("-inf"))
    else:  # float32 fixes the rest *mass* to ~1e-7, plenty for the loss
        rest = log1mexp(torch.logsumexp(logprobs, dim=-1))
    return SparseTeacher(ids=ids, logprobs=logprobs, rest=rest)
