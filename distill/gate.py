"""The gate: distil or train supervised? Decided from the distillation scaling laws.

Given a question (data-limited: the student's tokens are fixed; compute-limited: its FLOPs
are, and the scenario's teacher costs are charged, Eq. 9), a student size and budget, a
teacher and a scenario, predict the student's loss both ways with a ``CoefficientSet`` and
pick the lower. Every decision names its question and scenario, says which coefficients
it used and whether the query lies inside the data they were fitted on; the decision map
draws the laws only where they are defined and marks where they are extrapolated.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import brentq, minimize

from distill.law import (
    SCENARIOS,
    CoefficientSet,
    distillation_compute,
    distillation_loss,
    flops_per_token,
    scenario_deltas,
    supervised_compute,
    supervised_loss,
)

__all__ = [
    "SCENARIOS", "QUESTIONS", "TOKEN_RANGE", "OutOfSupportWarning", "UnreliableDecisionWarning",
    "TeacherAssumptionWarning", "GateQuery",
    "SupervisedBranch", "DistillBranch",
    "Decision", "DecisionMap", "decide", "teacher_loss_for", "crossover_tokens", "format_table",
    "decision_map", "plot_decision_map",
]

TOKEN_RANGE = (1e6, 1e17)  # bounds the paper put on every variable of compute-optimal distillation

# The question the gate answers. data-limited: the student's tokens are fixed (the data is
# what is scarce); both branches train on them and the teacher's cost is not charged (the
# scenario's FLOPs are reported only). compute-limited: the budget C is fixed; supervised
# spends all of it on student tokens, distillation what is left after the scenario's
# teacher costs (Eq. 9), which can be nothing.
QUESTIONS = ("data-limited", "compute-limited")
QUESTION_HELP = ("data-limited (the student's tokens are fixed; both branches train on them and the "
                 "teacher's cost is not charged) | compute-limited (the FLOPs are fixed; supervised gets "
                 "all of them as tokens, distillation what is left after the scenario's teacher costs, Eq. 9)")


class OutOfSupportWarning(UserWarning):
    """A gate query lies outside the region its coefficients were fitted on."""


class UnreliableDecisionWarning(UserWarning):
    """The predicted margin between the branches is within the calibrated laws' own margin error."""


class TeacherAssumptionWarning(UserWarning):
    """The teacher is not larger than the student, which the distillation law assumes."""


@dataclass(frozen=True)
class GateQuery:
    """What the gate is asked.

    ``question`` says what is fixed (see ``QUESTIONS``). data-limited: give
    ``student_tokens``. compute-limited: give ``compute`` (FLOPs) or ``student_tokens``
    (then the budget is what supervised training on them costs, 3 F(N_S) D_S). Describe
    the teacher by ``teacher_params`` and ``teacher_tokens`` (its loss then comes from the
    supervised law) and/or by a measured ``teacher_loss`` (calibrated sets only). In a
    compute-limited question whose scenario trains the teacher, a query without any teacher
    lets the gate choose a compute-optimal one. ``n_ctx`` defaults to the paper's 4096."""

    student_params: float
    student_tokens: float | None = None
    compute: float | None = None
    teacher_params: float | None = None
    teacher_tokens: float | None = None
    teacher_loss: float | None = None
    scenario: str = "teacher-inference"
    question: str = "data-limited"
    n_ctx: int = 4096
    n_vocab: int = 32768

    def validate(self) -> GateQuery:
        """Raise ValueError naming the offending argument; returns self when valid."""
        _positive("student_params", self.student_params)
        for name in ("student_tokens", "compute", "teacher_params", "teacher_tokens", "teacher_loss"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("n_ctx", "n_vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if (self.student_tokens is None) == (self.compute is None):
            raise ValueError("student_tokens/compute: give exactly one of them (a token budget or a FLOP budget)")
        if self.question not in QUESTIONS:
            raise ValueError(f"question: unknown {self.question!r}; allowed: {QUESTION_HELP}")
        if self.question == "data-limited" and self.compute is not None:
            raise ValueError("compute: a FLOP budget asks the compute-limited question; give student_tokens "
                             "for the data-limited one, or set question to compute-limited")
        scenario_deltas(self.scenario)
        self._validate_teacher()
        self._validate_compute()
        return self

    @property
    def charges_teacher(self) -> bool:
        """Whether the scenario's teacher costs come out of the budget (compute-limited only)."""
        return self.question == "compute-limited"

    @property
    def has_teacher_size(self) -> bool:
        """Whether the teacher is described by its parameters and pretraining tokens."""
        return self.teacher_params is not None and self.teacher_tokens is not None

    @property
    def picks_teacher(self) -> bool:
        """A compute-limited question that trains the teacher and names none: the gate picks it."""
        no_teacher = self.teacher_params is None and self.teacher_tokens is None and self.teacher_loss is None
        return self.charges_teacher and bool(scenario_deltas(self.scenario)[1]) and no_teacher

    def _validate_teacher(self) -> None:
        if self.picks_teacher:
            return
        if not self.has_teacher_size and self.teacher_loss is None:
            raise ValueError("teacher_params/teacher_tokens/teacher_loss: describe the teacher by "
                             "teacher_params and teacher_tokens, or by a measured teacher_loss")
        if not self.charges_teacher:
            return  # data-limited: the teacher's cost is reported where known, never charged
        d_lgt, d_pre = scenario_deltas(self.scenario)
        if d_lgt and self.teacher_params is None:
            raise ValueError(f"teacher_params: scenario {self.scenario!r} charges the teacher's logit FLOPs "
                             "to the compute-limited budget, so its size is needed")
        if d_pre and not self.has_teacher_size:
            raise ValueError(f"teacher_params/teacher_tokens: scenario {self.scenario!r} charges the teacher's "
                             "pretraining FLOPs to the compute-limited budget, so its size and tokens are "
                             "needed (or describe no teacher at all and the gate picks a compute-optimal one)")

    def _validate_compute(self) -> None:
        if self.compute is None:
            return
        one_step = supervised_compute(self.student_params, self.n_ctx, self.n_ctx, self.n_vocab)
        if self.compute < one_step:
            raise ValueError(f"compute: {self.compute:.3g} FLOPs is less than one training step of the student "
                             f"({one_step:.3g} FLOPs for {self.n_ctx} tokens)")

    def budget_flops(self) -> float | None:
        """The compute-limited budget C in FLOPs (None for the data-limited question)."""
        if not self.charges_teacher:
            return None
        if self.compute is not None:
            return float(self.compute)
        return float(supervised_compute(self.student_params, self.student_tokens, self.n_ctx, self.n_vocab))


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be finite and > 0, got {value!r}")


@dataclass(frozen=True)
class SupervisedBranch:
    """Predicted outcome of plain supervised training of the student."""

    loss: float
    tokens: float
    compute: float


@dataclass(frozen=True)
class DistillBranch:
    """Predicted outcome of distilling the student from the teacher.

    ``compute`` is Eq. 9 under the scenario (None where the teacher's size is unknown);
    ``teacher_compute`` its teacher part. In a compute-limited question whose teacher costs
    use up the budget, ``tokens`` is 0 and ``loss`` inf: the branch is not feasible."""

    loss: float
    teacher_loss: float
    tokens: float
    compute: float | None
    teacher_params: float | None
    teacher_tokens: float | None
    teacher_loss_source: str  # "measured", "supervised law" or "compute-optimal teacher"
    teacher_compute: float | None = None

    @property
    def feasible(self) -> bool:
        """False when the budget leaves the student no tokens after the teacher's costs."""
        return self.tokens > 0 and math.isfinite(self.loss)


@dataclass(frozen=True)
class Decision:
    """The gate's answer, with both branches' predictions and the provenance of the numbers."""

    decision: str
    reason: str
    scenario: str
    coefficients: str
    in_support: bool
    warnings: tuple[str, ...]
    crossover_tokens: float | None
    crossover_note: str
    supervised: SupervisedBranch
    distill: DistillBranch
    query: GateQuery

    @property
    def question(self) -> str:
        """data-limited or compute-limited (see ``QUESTIONS``)."""
        return self.query.question

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (non-finite numbers become None)."""
        return _jsonable({
            "decision": self.decision,
            "reason": self.reason,
            "question": self.question,
            "scenario": self.scenario,
            "teacher_costs_charged": self.query.charges_teacher,
            "budget_flops": self.query.budget_flops(),
            "distill_feasible": self.distill.feasible,
            "coefficients": self.coefficients,
            "in_support": self.in_support,
            "warnings": list(self.warnings),
            "crossover_tokens": self.crossover_tokens,
            "crossover_note": self.crossover_note,
            "loss_margin": self.supervised.loss - self.distill.loss,
            "supervised": dataclasses.asdict(self.supervised),
            "distill": dataclasses.asdict(self.distill),
            "query": dataclasses.asdict(self.query),
        })


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    value = float(obj)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------------------
# Decision
# --------------------------------------------------------------------------------------


def teacher_loss_for(query: GateQuery, coefs: CoefficientSet) -> tuple[float, str]:
    """L_T for the query and where it came from: a measured value, or the supervised law at (N_T, D_T)."""
    _check_loss_scale(query, coefs)
    if query.teacher_loss is not None:
        return float(query.teacher_loss), "measured"
    return float(supervised_loss(query.teacher_params, query.teacher_tokens, coefs.supervised)), "supervised law"


def _check_loss_scale(query: GateQuery, coefs: CoefficientSet) -> None:
    """A measured loss is on our tokenizer's scale, never on the paper's."""
    if query.teacher_loss is not None and coefs.name == "paper":
        raise ValueError("teacher_loss: a measured teacher loss cannot be used with the 'paper' coefficients; "
                         "the paper's loss scale (C4, its tokenizer) is not ours. Give teacher_params and "
                         "teacher_tokens, or use a calibrated coefficient set")


def crossover_tokens(student_params: float, teacher_loss: float, coefs: CoefficientSet,
                     lo: float = TOKEN_RANGE[0], hi: float = TOKEN_RANGE[1]) -> float | None:
    """The student tokens D_S in [lo, hi] beyond which supervised training beats
    distillation from a teacher of loss ``teacher_loss`` at equal student tokens, for good:
    the last change from distillation-better to supervised-better. None when distillation
    is better at ``hi`` or supervised throughout."""
    diff = _margin_fn(student_params, teacher_loss, coefs)
    x, v = _margin_grid(diff, lo, hi)
    changes = _sign_changes(v)
    if changes.size == 0 or v[changes[-1]] <= 0:  # none, or the last one favours distillation
        return None
    i = int(changes[-1])
    return float(math.exp(brentq(diff, x[i], x[i + 1], xtol=1e-10)))


def _margin_grid(diff, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(math.log(lo), math.log(hi), 400)
    return x, diff(x)


def _sign_changes(v: np.ndarray) -> np.ndarray:
    """Indices i where the margin changes sign between grid points i and i + 1."""
    return np.flatnonzero((v[:-1] > 0) != (v[1:] > 0))


def _margin_fn(student_params: float, teacher_loss: float, coefs: CoefficientSet):
    """log D -> L_supervised - L_distill (positive where distillation is better)."""

    def diff(log_d):
        d = np.exp(log_d)
        return (np.asarray(supervised_loss(student_params, d, coefs.supervised))
                - np.asarray(distillation_loss(student_params, d, teacher_loss, coefs)))

    return diff


def _crossover_note(student_params: float, teacher_loss: float, coefs: CoefficientSet, cross: float | None,
                    lo: float = TOKEN_RANGE[0]) -> str:
    _, v = _margin_grid(_margin_fn(student_params, teacher_loss, coefs), lo, TOKEN_RANGE[1])
    changes = _sign_changes(v).size
    span = f"[{lo:.0e}, {TOKEN_RANGE[1]:.0e}] student tokens"
    if cross is not None:
        note = f"supervised beats distillation from {cross:.3g} student tokens on"
    elif changes:
        note = f"no crossover: distillation is better at the top of {span}"
    else:
        better = "distillation" if v[0] > 0 else "supervised"
        note = f"no crossover: {better} is better throughout {span}"
    if changes > 1:  # the laws put the branches within their own error of each other
        note += (f"; the predicted margin changes sign {changes} times in {span}, so the laws "
                 "cannot tell the branches apart there")
    return note


def _supervised_branch(query: GateQuery, coefs: CoefficientSet) -> SupervisedBranch:
    """Supervised training: the fixed tokens (data-limited) or all of the budget as tokens."""
    budget = query.budget_flops()
    if query.student_tokens is not None:
        tokens = float(query.student_tokens)
    else:
        tokens = budget / (3.0 * flops_per_token(query.student_params, query.n_ctx, query.n_vocab))
    loss = float(supervised_loss(query.student_params, tokens, coefs.supervised))
    return SupervisedBranch(loss, float(tokens), float(supervised_compute(query.student_params, tokens,
                                                                           query.n_ctx, query.n_vocab)))


def _teacher_compute(query: GateQuery, tokens: float) -> float | None:
    """The scenario's teacher FLOPs of Eq. 9 at ``tokens`` student tokens (None when unknown)."""
    d_lgt, d_pre = scenario_deltas(query.scenario)
    if not (d_lgt or d_pre):
        return 0.0
    if query.teacher_params is None or (d_pre and query.teacher_tokens is None):
        return None
    f_t = flops_per_token(query.teacher_params, query.n_ctx, query.n_vocab)
    return float(f_t * (d_lgt * tokens + (3.0 * d_pre * query.teacher_tokens if d_pre else 0.0)))


def _distill_tokens(query: GateQuery) -> float:
    """Student tokens of the distill branch: the fixed ones (data-limited), or what the budget
    buys after the scenario's teacher pretraining, at 3 F(N_S) + delta_lgt F(N_T) per token
    (compute-limited); 0 when the teacher's costs use up the budget."""
    budget = query.budget_flops()
    if budget is None:
        return float(query.student_tokens)
    d_lgt, d_pre = scenario_deltas(query.scenario)
    per_token = 3.0 * flops_per_token(query.student_params, query.n_ctx, query.n_vocab)
    if d_lgt:
        per_token += flops_per_token(query.teacher_params, query.n_ctx, query.n_vocab)
    left = budget - (_teacher_compute(query, 0.0) or 0.0) if d_pre else budget
    return float(left / per_token) if left > 0 else 0.0


def _fixed_teacher_branch(query: GateQuery, coefs: CoefficientSet) -> DistillBranch:
    """Distillation from the given teacher, charged as the question says."""
    teacher_loss, source = teacher_loss_for(query, coefs)
    tokens = _distill_tokens(query)
    teacher_flops = _teacher_compute(query, tokens)
    compute = None if teacher_flops is None else float(
        supervised_compute(query.student_params, tokens, query.n_ctx, query.n_vocab) + teacher_flops)
    loss = float(distillation_loss(query.student_params, tokens, teacher_loss, coefs)) if tokens > 0 else math.inf
    return DistillBranch(loss, teacher_loss, tokens, compute, query.teacher_params, query.teacher_tokens,
                         source, teacher_flops)


def _allocation(u: np.ndarray, query: GateQuery) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log N_T, logit of the student's share of compute) -> (D_S, N_T, D_T) spending exactly C."""
    d_lgt, _ = scenario_deltas(query.scenario)
    n_t = np.exp(u[..., 0])
    share = 1.0 / (1.0 + np.exp(-u[..., 1]))
    f_s = flops_per_token(query.student_params, query.n_ctx, query.n_vocab)
    f_t = np.asarray(flops_per_token(n_t, query.n_ctx, query.n_vocab))
    budget = query.budget_flops()
    d_s = share * budget / (3.0 * f_s + d_lgt * f_t)
    d_t = (1.0 - share) * budget / (3.0 * f_t)
    return d_s, n_t, d_t


def _allocation_loss(u: np.ndarray, query: GateQuery, coefs: CoefficientSet) -> np.ndarray:
    """Predicted student loss of an allocation; +inf outside [1e6, 1e17] for D_S, N_T, D_T."""
    d_s, n_t, d_t = _allocation(u, query)
    lo, hi = TOKEN_RANGE
    ok = (d_s >= lo) & (d_s <= hi) & (n_t >= lo) & (n_t <= hi) & (d_t >= lo) & (d_t <= hi)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        l_t = supervised_loss(n_t, d_t, coefs.supervised)
        loss = np.asarray(distillation_loss(query.student_params, d_s, l_t, coefs))
    return np.where(ok & np.isfinite(loss), loss, np.inf)


def _optimal_teacher_branch(query: GateQuery, coefs: CoefficientSet) -> DistillBranch:
    """Compute-optimal distillation when the teacher must be trained too.

    The paper ran SLSQP over (D_S, N_T, D_T) with the equality constraint FLOPs = C. Here
    the constraint is solved exactly by parametrising (log N_T, student share of C); a
    dense grid over both then Nelder-Mead from the best few cells avoids SLSQP's local
    minima and constraint drift."""
    log_nt = np.linspace(math.log(TOKEN_RANGE[0]), math.log(TOKEN_RANGE[1]), 121)
    logit = np.linspace(-12.0, 12.0, 97)
    grid = np.stack(np.meshgrid(log_nt, logit, indexing="ij"), axis=-1).reshape(-1, 2)
    values = _allocation_loss(grid, query, coefs)
    if not np.isfinite(values).any():
        raise ValueError(f"compute: {query.budget_flops():.3g} FLOPs cannot train a teacher and student with every "
                         f"size and token count in [{TOKEN_RANGE[0]:.0e}, {TOKEN_RANGE[1]:.0e}]")
    best_u, best = grid[int(np.argmin(values))], float(np.min(values))
    for start in grid[np.argsort(values)[:4]]:
        res = minimize(lambda u: float(_allocation_loss(u, query, coefs)), start, method="Nelder-Mead",
                       options={"xatol": 1e-6, "fatol": 1e-12, "maxiter": 2000})
        if res.fun < best:
            best_u, best = res.x, float(res.fun)
    d_s, n_t, d_t = (float(v) for v in _allocation(best_u, query))
    teacher_loss = float(supervised_loss(n_t, d_t, coefs.supervised))
    compute = distillation_compute(query.student_params, d_s, n_t, d_t, query.scenario, query.n_ctx, query.n_vocab)
    student = supervised_compute(query.student_params, d_s, query.n_ctx, query.n_vocab)
    return DistillBranch(best, teacher_loss, d_s, float(compute), n_t, d_t, "compute-optimal teacher",
                         float(compute - student))


# Relative slack of the support's bounds: the teacher stage's float32 loss and the sweep's
# float64 one of the same teacher differ in the 8th digit, and that is not an extrapolation.
SUPPORT_RTOL = 1e-6


def _support_warnings(coefs: CoefficientSet, values: dict[str, list[float | None]]) -> list[str]:
    """One human-readable line per queried quantity outside the coefficient set's support."""
    out = []
    for key, items in values.items():
        if key not in coefs.support:
            continue
        lo, hi = coefs.support[key]
        for v in items:
            if v is not None and not lo * (1 - SUPPORT_RTOL) <= v <= hi * (1 + SUPPORT_RTOL):
                out.append(f"{key}={v:.3g} is outside the support of coefficient set {coefs.name!r} "
                           f"[{lo:.3g}, {hi:.3g}]; the prediction is an extrapolation")
    return out


def decide(query: GateQuery, coefs: CoefficientSet) -> Decision:
    """Predict both branches for ``query`` with ``coefs`` and choose the one with lower loss
    (ties go to supervised: no labelling needed).

    The data-limited question trains both branches on the same tokens and charges nothing
    for the teacher. The compute-limited one gives supervised all of the budget as tokens
    and distillation what is left after the scenario's teacher costs; with a scenario that
    trains the teacher and no teacher in the query, the teacher is chosen compute-optimally
    (N_T, D_T, D_S spending exactly the budget), as in the paper."""
    query.validate()
    if coefs.distillation is None:
        raise ValueError(f"coefs: coefficient set {coefs.name!r} has no distillation law")
    _check_loss_scale(query, coefs)
    sup = _supervised_branch(query, coefs)
    dist = _optimal_teacher_branch(query, coefs) if query.picks_teacher else _fixed_teacher_branch(query, coefs)
    # The search starts below the query (small calibrated runs sit under the paper's 1e6),
    # so a crossover just under or over the query is found and the note describes its range.
    tokens = [t for t in (sup.tokens, dist.tokens) if t > 0]
    lo = min(TOKEN_RANGE[0], min(tokens) / 100)
    cross = crossover_tokens(query.student_params, dist.teacher_loss, coefs, lo=lo)
    note = _crossover_note(query.student_params, dist.teacher_loss, coefs, cross, lo)
    msgs = _support_warnings(coefs, {
        "student_params": [query.student_params],
        "student_tokens": sorted(set(tokens)),
        "teacher_params": [dist.teacher_params],
        "teacher_tokens": [dist.teacher_tokens],
        "teacher_loss": [dist.teacher_loss],
    })
    if "student_tokens" not in coefs.support:
        msgs.append(f"coefficient set {coefs.name!r} records no student-token support: whether "
                    f"{', '.join(f'{t:.3g}' for t in sorted(set(tokens)))} student tokens lie where it was "
                    "fitted is unknown")
    for msg in msgs:
        warnings.warn(msg, OutOfSupportWarning, stacklevel=2)
    notes = list(msgs)
    if nonsense := _loss_range_note(query, sup, dist):
        warnings.warn(nonsense, OutOfSupportWarning, stacklevel=2)
        notes.append(nonsense)
    if teacher_note := _teacher_size_note(query.student_params, query.teacher_params):
        warnings.warn(teacher_note, TeacherAssumptionWarning, stacklevel=2)
        notes.append(teacher_note)
    doubt = _margin_doubt(coefs, sup.loss - dist.loss) if dist.feasible else ""
    if doubt:
        warnings.warn(doubt, UnreliableDecisionWarning, stacklevel=2)
        notes.append(doubt)
    choice = "distill" if dist.loss < sup.loss else "supervised"
    return Decision(choice, _reason(choice, query, coefs, sup, dist, note), query.scenario, coefs.name,
                    not msgs, tuple(notes), cross, note, sup, dist, query)


def _loss_range_note(query: GateQuery, sup: SupervisedBranch, dist: DistillBranch) -> str:
    """A warning when a predicted loss lies outside (0, ln V] ('' otherwise): above ln V a
    model would do worse than guessing uniformly, so the laws do not describe the query."""
    ceiling = math.log(query.n_vocab)
    bad = [f"{name} {loss:.4g}" for name, loss in (("supervised", sup.loss), ("distilled", dist.loss))
           if math.isfinite(loss) and not 0 < loss <= ceiling]
    if not bad:
        return ""
    return (f"predicted loss {', '.join(bad)} lies outside (0, ln V = {ceiling:.3g}] (n_vocab={query.n_vocab}): "
            "the coefficients do not describe this query; the decision is not meaningful")


def _teacher_size_note(student_params: float, teacher_params: float | None) -> str:
    """A warning when the teacher is not larger than the student ('' otherwise)."""
    if teacher_params is None or teacher_params > student_params:
        return ""
    return (f"teacher_params={teacher_params:.3g} is not larger than student_params={student_params:.3g}: "
            "the distillation law was fitted on teachers larger than their students (a stronger model "
            "teaching a smaller one); for this pair its prediction is an extrapolation")


def _margin_doubt(coefs: CoefficientSet, margin: float) -> str:
    """A warning when |predicted margin| is below the laws' margin error measured by their
    calibration (the larger of the fitted and held-out pairs' errors); '' otherwise."""
    errors = [coefs.quality.get(f"margin_error_{which}") for which in ("fitted", "heldout")]
    errors = [e for e in errors if e is not None]
    if not errors or abs(margin) >= max(errors):
        return ""
    return (f"the predicted margin between the branches ({abs(margin):.3f} nats) is smaller than the "
            f"laws' own margin error on their calibration runs ({max(errors):.3f} nats): at this "
            f"scale the choice is not reliable; train both branches, or calibrate with longer runs")


def _reason(choice: str, query: GateQuery, coefs: CoefficientSet, sup: SupervisedBranch,
            dist: DistillBranch, note: str) -> str:
    if query.charges_teacher:
        budget = f"{query.budget_flops():.3g} FLOPs"
        question = f"compute-limited ({budget}, the teacher's {query.scenario} costs charged)"
    else:
        budget = f"{query.student_tokens:.3g} tokens"
        question = f"data-limited ({budget} for both branches, the teacher's cost not charged)"
    teacher = f"teacher L_T={dist.teacher_loss:.4g} ({dist.teacher_loss_source}"
    teacher += f", N_T={dist.teacher_params:.3g})" if dist.teacher_params is not None else ")"
    where = (f"N_S={query.student_params:.3g}, {teacher}, scenario {query.scenario}, "
             f"coefficients {coefs.name!r}")
    if not dist.feasible:
        return (f"supervised: the teacher's costs ({dist.teacher_compute:.3g} FLOPs) leave distillation no "
                f"student tokens in the budget of {budget}; supervised trains on {sup.tokens:.3g} tokens "
                f"for a predicted loss {sup.loss:.4f} (question {question}; {where}).")
    winner, loser = (dist.loss, sup.loss) if choice == "distill" else (sup.loss, dist.loss)
    other = "supervised" if choice == "distill" else "distillation"
    tokens = (f"student tokens {sup.tokens:.3g} supervised, {dist.tokens:.3g} distilled; "
              if query.charges_teacher else "")
    return (f"{choice}: predicted student loss {winner:.4f} vs {loser:.4f} for {other} "
            f"(question {question}; {tokens}{where}); at equal student tokens, {note}.")


# --------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def format_table(decision: Decision) -> str:
    """A plain-text table of a decision: both branches side by side, then provenance."""
    s, d = decision.supervised, decision.distill
    rows = [
        ("predicted loss", _fmt(s.loss, ".4f"), _fmt(d.loss, ".4f") if d.feasible else "infeasible"),
        ("student tokens", _fmt(s.tokens, ".3e"), _fmt(d.tokens, ".3e")),
        ("compute (FLOPs)", _fmt(s.compute, ".3e"), _fmt(d.compute, ".3e")),
        ("teacher loss", "-", _fmt(d.teacher_loss, ".4f") + f" ({d.teacher_loss_source})"),
        ("teacher params", "-", _fmt(d.teacher_params, ".3e")),
        ("teacher tokens", "-", _fmt(d.teacher_tokens, ".3e")),
    ]
    width = max(len(r[0]) for r in rows) + 2
    charged = "teacher costs charged" if decision.query.charges_teacher else "teacher cost not charged"
    lines = [f"gate decision: {decision.decision.upper()}",
             f"question: {decision.question} ({charged})",
             f"coefficients: {decision.coefficients}   scenario: {decision.scenario}   "
             f"in support: {'yes' if decision.in_support else 'NO'}",
             "",
             f"{'':<{width}}{'supervised':>14}  {'distill':<}",
             *(f"{name:<{width}}{a:>14}  {b}" for name, a, b in rows),
             "",
             f"crossover tokens: {_fmt(decision.crossover_tokens, '.3e')} ({decision.crossover_note})",
             f"reason: {decision.reason}"]
    lines += [f"warning: {w}" for w in decision.warnings]
    return "\n".join(lines)


@dataclass(frozen=True)
class DecisionMap:
    """What the decision map draws, on a (log10 N_S, log10 D_S) grid at the decision's teacher
    loss and equal student tokens: ``margin`` = L_supervised - L_distill in nats (NaN where a
    law predicts a loss outside (0, ln V] or nothing finite: not drawn), ``trusted`` (inside
    the coefficient set's support), the colour limit ``vmax`` (nats, from the trusted cells),
    and the crossover line (``cross_log_n``, ``cross_log_d``; NaN where there is none)."""

    log_n: np.ndarray
    log_d: np.ndarray
    margin: np.ndarray  # shape (len(log_d), len(log_n))
    trusted: np.ndarray
    vmax: float
    cross_log_n: np.ndarray
    cross_log_d: np.ndarray
    refused_cells: int
    loss_ceiling: float

    def cell(self, n: float, d: float) -> tuple[int, int]:
        """(row, column) of the grid cell holding (N_S, D_S)."""
        return (int(np.argmin(np.abs(self.log_d - math.log10(d)))),
                int(np.argmin(np.abs(self.log_n - math.log10(n)))))


def _span(points: list[float], anchor: float, pad: float = 3.0, decades: float = 1.0) -> tuple[float, float]:
    """log10 range covering ``points`` with a factor ``pad`` to spare and at least ``decades``
    either side of ``anchor``."""
    lo = min(min(points) / pad, anchor / 10**decades)
    hi = max(max(points) * pad, anchor * 10**decades)
    return math.log10(lo), math.log10(hi)


def _map_ranges(query: GateQuery, coefs: CoefficientSet, decision: Decision
                ) -> tuple[tuple[float, float], tuple[float, float]]:
    """log10 ranges of the map: they always hold the query (both branches' tokens), the
    coefficient set's support and the crossover where there is one."""
    n_points = [query.student_params, *coefs.support.get("student_params", ())]
    tokens = decision.supervised.tokens
    d_points = [tokens, *coefs.support.get("student_tokens", ())]
    if decision.distill.tokens > 0:
        d_points.append(decision.distill.tokens)
    if decision.crossover_tokens is not None:
        d_points.append(decision.crossover_tokens)
    return _span(n_points, query.student_params), _span(d_points, tokens)


def _inside(values: np.ndarray, coefs: CoefficientSet, key: str) -> np.ndarray:
    """Which values lie inside the set's support for ``key`` (all of them when it has none)."""
    if key not in coefs.support:
        return np.ones_like(values, dtype=bool)
    lo, hi = coefs.support[key]
    return (values >= lo * (1 - SUPPORT_RTOL)) & (values <= hi * (1 + SUPPORT_RTOL))


def _nice_limit(value: float) -> float:
    """``value`` rounded up to 1, 2 or 5 times a power of ten (readable colour-bar ends)."""
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 5.0, 10.0):
        if value <= step * 10**exponent * (1 + 1e-9):
            return step * 10**exponent
    return 10.0 ** (exponent + 1)  # pragma: no cover - the loop always returns


def decision_map(query: GateQuery, coefs: CoefficientSet, decision: Decision | None = None,
                 size: int = 200) -> DecisionMap:
    """Compute the decision map of ``plot_decision_map`` (see ``DecisionMap``).

    A law is drawn only where both predicted losses lie in (0, ln V]: a fitted set
    extrapolated far from its points predicts nonsense (millions of nats) there, and those
    cells are refused (counted in ``refused_cells``) rather than coloured."""
    decision = decision or decide(query, coefs)
    l_t = decision.distill.teacher_loss
    (n0, n1), (d0, d1) = _map_ranges(query, coefs, decision)
    log_n, log_d = np.linspace(n0, n1, size), np.linspace(d0, d1, size)
    nn, dd = np.meshgrid(10**log_n, 10**log_d)
    ceiling = math.log(query.n_vocab)
    with np.errstate(all="ignore"):
        sup = np.asarray(supervised_loss(nn, dd, coefs.supervised), dtype=float)
        dist = np.asarray(distillation_loss(nn, dd, l_t, coefs), dtype=float)
    valid = np.isfinite(sup) & np.isfinite(dist) & (sup > 0) & (dist > 0) & (sup <= ceiling) & (dist <= ceiling)
    margin = np.where(valid, sup - dist, np.nan)
    trusted = _inside(nn, coefs, "student_params") & _inside(dd, coefs, "student_tokens") & valid
    shown = margin[trusted] if trusted.any() else margin[valid]
    vmax = _nice_limit(max(float(np.max(np.abs(shown))) if shown.size else 0.0, 1e-2))
    cross_n, cross_d = _crossover_line(log_n, (d0, d1), l_t, coefs, ceiling)
    return DecisionMap(log_n, log_d, margin, trusted, vmax, cross_n, cross_d, int((~valid).sum()), ceiling)


def _crossover_line(log_n: np.ndarray, d_range: tuple[float, float], teacher_loss: float,
                    coefs: CoefficientSet, ceiling: float) -> tuple[np.ndarray, np.ndarray]:
    """The crossover D_S(N_S) solved per column (brentq, as ``crossover_tokens``), so the line
    is smooth; NaN where a column has none or the laws are not drawn there."""
    lo, hi = 10 ** d_range[0], 10 ** d_range[1]
    out = np.full(len(log_n), np.nan)
    for i, n in enumerate(10**log_n):
        with np.errstate(all="ignore"):
            cross = crossover_tokens(float(n), teacher_loss, coefs, lo=lo, hi=hi)
            if cross is None:
                continue
            loss = float(supervised_loss(n, cross, coefs.supervised))
        if 0 < loss <= ceiling:
            out[i] = math.log10(cross)
    return log_n, out


def plot_decision_map(query: GateQuery, coefs: CoefficientSet, path: str | Path,
                      decision: Decision | None = None) -> Path:
    """Write a PNG heat map of L_supervised - L_distill in nats over (log N_S, log D_S) at the
    decision's teacher loss and equal student tokens (> 0: distillation wins): coloured where
    the laws are defined, hatched outside the coefficients' support, grey where they predict
    a loss outside (0, ln V]; the crossover line, the support box and the query as a star."""
    # The Agg canvas is used directly so that no global pyplot backend state is touched.
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    decision = decision or decide(query, coefs)
    m = decision_map(query, coefs, decision)
    fig = Figure(figsize=(8, 7), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = _map_colours()
    mesh = ax.pcolormesh(m.log_n, m.log_d, np.ma.masked_invalid(m.margin), cmap=cmap,
                         norm=Normalize(-m.vmax, m.vmax), shading="auto")
    ax.set_facecolor("0.8")  # refused cells (NaN) show the grey background
    fig.colorbar(mesh, ax=ax, extend="both", label="L_supervised − L_distill (nats; > 0: distillation wins)")
    handles = []
    outside = np.isfinite(m.margin) & ~m.trusted
    if outside.any():
        with rc_context({"hatch.color": "0.45", "hatch.linewidth": 0.6}):
            ax.contourf(m.log_n, m.log_d, outside.astype(float), levels=[0.5, 1.5], colors=[(1, 1, 1, 0.55)],
                        hatches=["//"])
        handles.append(Patch(facecolor=(1, 1, 1, 0.55), edgecolor="0.4", hatch="//",
                             label=f"outside the support of {coefs.name!r} (extrapolated)"))
    if not np.isfinite(m.margin).any():
        ax.text(0.5, 0.5, f"the laws predict no loss in (0, ln V = {m.loss_ceiling:.2f}] anywhere here:\n"
                f"nothing to draw (teacher L_T = {decision.distill.teacher_loss:.3g})", transform=ax.transAxes,
                ha="center", va="center", fontsize=10)
    if m.refused_cells:
        handles.append(Patch(facecolor="0.8", label=f"not drawn: a law predicts a loss outside (0, ln V = "
                                                   f"{m.loss_ceiling:.2f}]"))
    finite = np.isfinite(m.margin)
    if finite.any() and np.nanmin(m.margin) < 0 < np.nanmax(m.margin):
        # Every place the margin changes sign (the laws can change it more than once); the
        # solid line below is the crossover proper, the last change to supervised.
        ax.contour(m.log_n, m.log_d, np.ma.masked_invalid(m.margin), levels=[0.0], colors="0.25",
                   linewidths=0.8, linestyles=":")
        handles.append(Line2D([], [], color="0.25", linewidth=0.8, linestyle=":",
                              label="margin = 0 (every sign change)"))
    if np.isfinite(m.cross_log_d).any():
        handles += ax.plot(m.cross_log_n, m.cross_log_d, color="k", linewidth=1.6,
                           label="crossover (equal tokens): supervised wins above")
    handles += _draw_support(ax, coefs)
    tokens = decision.supervised.tokens
    handles += ax.plot([math.log10(query.student_params)], [math.log10(tokens)], marker="*", markersize=16,
                       color="gold", markeredgecolor="k", linestyle="none", label=f"query ({decision.decision})")
    if decision.distill.tokens > 0 and not math.isclose(decision.distill.tokens, tokens, rel_tol=1e-6):
        handles += ax.plot([math.log10(query.student_params)], [math.log10(decision.distill.tokens)], marker="*",
                           markersize=12, color="none", markeredgecolor="k", linestyle="none",
                           label="distillation's tokens after the teacher's costs")
    ax.set_xlim(m.log_n[0], m.log_n[-1])
    ax.set_ylim(m.log_d[0], m.log_d[-1])
    ax.set_xlabel("log10 student parameters N_S")
    ax.set_ylabel("log10 student tokens D_S")
    charged = ("compute-limited: the teacher's costs charged at the query"
               if query.charges_teacher else "data-limited: equal tokens, teacher cost not charged")
    ax.set_title(f"distill or supervised? {decision.decision} ({charged})\nscenario {decision.scenario}, "
                 f"coefficients {coefs.name!r}, teacher L_T = {decision.distill.teacher_loss:.4g}\n"
                 "colours compare both branches at equal student tokens", fontsize=9)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8,
              frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")  # the legend sits below the axes
    return path


def _map_colours():
    """Red (supervised wins) to blue (distillation wins); NaN cells transparent (grey background)."""
    from matplotlib import colormaps

    return colormaps["RdBu"].with_extremes(bad=(0, 0, 0, 0))


def _draw_support(ax: Any, coefs: CoefficientSet) -> list:
    """A dashed box at the set's student-size and student-token support; its legend handle."""
    n = coefs.support.get("student_params")
    d = coefs.support.get("student_tokens")
    if n is None and d is None:
        return []
    x0, x1 = (math.log10(v) for v in n) if n else ax.get_xlim()
    y0, y1 = (math.log10(v) for v in d) if d else ax.get_ylim()
    return ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], color="0.2", linestyle="--", linewidth=1.0,
                   label=f"support of {coefs.name!r}")
