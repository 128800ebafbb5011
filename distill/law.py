"""Distillation scaling laws (Busbridge et al. 2025, "Distillation Scaling Laws").

Pure numpy/scipy: the supervised law (their Eq. 1), the distillation law (Eq. 8),
the compute model (Eq. 9), coefficient sets (the published one and fitted ones
stored as JSON) and the fitting procedure the paper used (Huber loss on log-loss
residuals, L-BFGS-B from a grid of starting points, best kept).

N is the non-embedding parameter count, D a token count, L a cross-entropy in nats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy.optimize import minimize

# --------------------------------------------------------------------------------------
# Coefficients
# --------------------------------------------------------------------------------------

SUPPORT_KEYS = ("student_params", "student_tokens", "teacher_params", "teacher_tokens", "teacher_loss")


@dataclass(frozen=True)
class SupervisedCoefficients:
    """Coefficients of the supervised law L(N, D) = E + (A/N^alpha + B/D^beta)^gamma."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    gamma: float


@dataclass(frozen=True)
class DistillationCoefficients:
    """Coefficients of the distillation law (Eq. 8); A, B, alpha, beta, gamma are the primed ones."""

    c0: float
    c1: float
    d1: float
    f1: float
    A: float
    B: float
    alpha: float
    beta: float
    gamma: float


@dataclass(frozen=True)
class CoefficientSet:
    """A named pair of laws plus the region of (N, D, L_T) they were fitted on.

    ``support`` maps keys of ``SUPPORT_KEYS`` to (low, high); an absent key means the
    fit's range for that quantity is unknown (no support check is possible for it).
    ``quality`` is free-form, JSON-serialisable information about the fit.
    """

    name: str
    supervised: SupervisedCoefficients
    distillation: DistillationCoefficients | None = None
    support: dict[str, tuple[float, float]] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)


# The paper's published ranges (abstract of arXiv:2502.08606): students and teachers of
# 143M-12.6B parameters "trained on data of a few billion to 512B tokens" (the low end
# taken as 1e9). Teacher loss is left out because L_T on the paper's scale only comes
# from its own supervised law.
PAPER_TOKENS = (1e9, 5.12e11)
PAPER = CoefficientSet(
    name="paper",
    supervised=SupervisedCoefficients(E=1.220, A=3355.0, B=18186.0, alpha=0.408, beta=0.431, gamma=0.452),
    distillation=DistillationCoefficients(
        c0=2.549, c1=522.6, d1=1.315, f1=0.090, A=2243.0, B=24181.0, alpha=0.321, beta=0.637, gamma=0.764
    ),
    support={"student_params": (1.43e8, 1.26e10), "teacher_params": (1.43e8, 1.26e10),
             "student_tokens": PAPER_TOKENS, "teacher_tokens": PAPER_TOKENS},
    quality={
        "source": "Busbridge et al. 2025, Distillation Scaling Laws, arXiv:2502.08606",
        "data": "C4 English, ~32k vocabulary",
        "reported_relative_error": "<~1%",
        "note": "valid only for that dataset/tokenizer/scale (143M-12.6B parameters, a few billion "
                "to 512B tokens)",
    },
)

# --------------------------------------------------------------------------------------
# The laws
# --------------------------------------------------------------------------------------


def _arr(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=float)


def _log_supervised(log_n, log_d, log_e, log_a, log_b, alpha, beta, gamma):
    """log L of Eq. 1 as nested log-sum-exps, stable for any coefficients."""
    s = np.logaddexp(log_a - alpha * log_n, log_b - beta * log_d)
    return np.logaddexp(log_e, gamma * s)


def supervised_loss(N: Any, D: Any, coef: SupervisedCoefficients) -> np.ndarray | float:
    """Supervised law (Eq. 1): E + (A/N^alpha + B/D^beta)^gamma, vectorised over N and D."""
    N, D = _arr(N), _arr(D)
    out = coef.E + (coef.A / N**coef.alpha + coef.B / D**coef.beta) ** coef.gamma
    return out if out.ndim else float(out)


def _log_distill_term(log_n, log_d, log_lt, log_ltilde, c0, log_c1, log_d1, log_f1, a, b, alpha, beta, gamma):
    """log of the second term of Eq. 8 (everything after ``L_T +``)."""
    c1, f1 = np.exp(log_c1), np.exp(log_f1)
    z = (log_lt - log_ltilde - log_d1) / f1
    s = np.logaddexp(a - alpha * log_n, b - beta * log_d)
    return -c0 * log_lt - c1 * f1 * np.logaddexp(0.0, z) + gamma * s


def distillation_loss(N_S: Any, D_S: Any, L_T: Any, coef_set: CoefficientSet) -> np.ndarray | float:
    """Distillation law (Eq. 8), with L~_S from the set's supervised law at (N_S, D_S).

    L_S = L_T + L_T^-c0 * (1 + (L_T / (L~_S d1))^(1/f1))^(-c1 f1) * (A'/N_S^a' + B'/D_S^b')^g'
    """
    dc = coef_set.distillation
    if dc is None:
        raise ValueError(f"coefficient set {coef_set.name!r} has no distillation law")
    N_S, D_S, L_T = _arr(N_S), _arr(D_S), _arr(L_T)
    ltilde = _arr(supervised_loss(N_S, D_S, coef_set.supervised))
    log_term = _log_distill_term(
        np.log(N_S), np.log(D_S), np.log(L_T), np.log(ltilde),
        dc.c0, math.log(dc.c1), math.log(dc.d1), math.log(dc.f1),
        math.log(dc.A), math.log(dc.B), dc.alpha, dc.beta, dc.gamma,
    )
    out = L_T + np.exp(log_term)
    return out if out.ndim else float(out)


# --------------------------------------------------------------------------------------
# Compute (Eq. 9)
# --------------------------------------------------------------------------------------

SCENARIOS = ("best-case", "teacher-inference", "teacher-pretraining", "teacher-pretraining+inference")
_DELTAS = {
    "best-case": (0.0, 0.0),
    "teacher-inference": (1.0, 0.0),
    "teacher-pretraining": (0.0, 1.0),
    "teacher-pretraining+inference": (1.0, 1.0),
}


def scenario_deltas(scenario: str) -> tuple[float, float]:
    """(delta_lgt, delta_pre) of Eq. 9 for a scenario; ValueError lists the allowed ones."""
    if scenario not in _DELTAS:
        raise ValueError(f"scenario: unknown {scenario!r}; allowed: {', '.join(SCENARIOS)}")
    return _DELTAS[scenario]


def flops_per_token(N: Any, n_ctx: int, n_vocab: int, rho: float = 128, omega: float = 12) -> np.ndarray | float:
    """F(N) = 2N (1 + sigma1 n_ctx N^-1/3 + sigma2 n_vocab N^-2/3): forward FLOPs per token.

    sigma1 = (rho omega^2)^-1/3 and sigma2 = (rho/omega)^1/3 follow from N = omega
    n_layers d_model^2 with rho = d_model / n_layers (attention and unembedding terms).
    """
    N = _arr(N)
    sigma1 = (rho * omega**2) ** (-1.0 / 3.0)
    sigma2 = (rho / omega) ** (1.0 / 3.0)
    out = 2.0 * N * (1.0 + sigma1 * n_ctx * N ** (-1.0 / 3.0) + sigma2 * n_vocab * N ** (-2.0 / 3.0))
    return out if out.ndim else float(out)


def supervised_compute(N_S: Any, D_S: Any, n_ctx: int = 4096, n_vocab: int = 32768) -> np.ndarray | float:
    """Training FLOPs of supervised training: 3 F(N_S) D_S."""
    out = 3.0 * _arr(flops_per_token(N_S, n_ctx, n_vocab)) * _arr(D_S)
    return out if out.ndim else float(out)


def distillation_compute(
    N_S: Any, D_S: Any, N_T: Any, D_T: Any, scenario: str, n_ctx: int = 4096, n_vocab: int = 32768
) -> np.ndarray | float:
    """Eq. 9: 3 F(N_S) D_S + F(N_T) (delta_lgt D_S + delta_pre 3 D_T).

    N_T may be None when the scenario charges nothing for the teacher, D_T when it
    charges no teacher pretraining.
    """
    d_lgt, d_pre = scenario_deltas(scenario)
    total = _arr(supervised_compute(N_S, D_S, n_ctx, n_vocab))
    if d_lgt or d_pre:
        if N_T is None:
            raise ValueError(f"N_T: scenario {scenario!r} charges teacher FLOPs, so the teacher size is needed")
        f_t = _arr(flops_per_token(N_T, n_ctx, n_vocab))
        total = total + f_t * d_lgt * _arr(D_S)
        if d_pre:
            if D_T is None:
                raise ValueError(f"D_T: scenario {scenario!r} charges teacher pretraining, so its tokens are needed")
            total = total + f_t * 3.0 * _arr(D_T)
    return total if total.ndim else float(total)


# --------------------------------------------------------------------------------------
# Coefficient files
# --------------------------------------------------------------------------------------


def _finite_number(value: Any, source: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{source}: key {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{source}: key {key!r} is not finite ({value!r})")
    return float(value)


def _coefficients_from_dict(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: key {prefix!r} must be an object, got {type(raw).__name__}")
    values = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        if f.name not in raw:
            raise ValueError(f"{source}: missing key {key!r}")
        values[f.name] = _finite_number(raw[f.name], source, key)
    return cls(**values)


def _support_from_dict(raw: Any, source: str) -> dict[str, tuple[float, float]]:
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: key 'support' must be an object")
    support = {}
    for k, pair in raw.items():
        key = f"support.{k}"
        if k not in SUPPORT_KEYS:
            raise ValueError(f"{source}: unknown key {key!r}; allowed: {', '.join(SUPPORT_KEYS)}")
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{source}: key {key!r} must be [low, high]")
        lo, hi = (_finite_number(v, source, key) for v in pair)
        if not 0 < lo <= hi:
            raise ValueError(f"{source}: key {key!r} needs 0 < low <= high, got [{lo}, {hi}]")
        support[k] = (lo, hi)
    return support


# What each coefficient must satisfy for the laws to be defined and to describe a loss that
# falls with N and D: positive scales (their logs are taken), non-negative exponents, a
# non-negative irreducible loss. c0 may have either sign (the paper's is 2.549).
_POSITIVE = {"supervised": ("A", "B"), "distillation": ("c1", "d1", "f1", "A", "B")}
_NON_NEGATIVE = {"supervised": ("E", "alpha", "beta", "gamma"), "distillation": ("alpha", "beta", "gamma")}


def check_coefficients(coef_set: CoefficientSet, source: str) -> CoefficientSet:
    """Raise ValueError naming ``source`` and the key when a coefficient has the wrong sign
    (see ``_POSITIVE``/``_NON_NEGATIVE``); returns the set. Called wherever a set is built
    from a file or a fit."""
    for law in ("supervised", "distillation"):
        coefs = getattr(coef_set, law)
        if coefs is None:
            continue
        for name in _POSITIVE[law]:
            value = getattr(coefs, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{source}: key '{law}.{name}' must be > 0, got {value!r}")
        for name in _NON_NEGATIVE[law]:
            value = getattr(coefs, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{source}: key '{law}.{name}' must be >= 0, got {value!r}"
                                 + (" (a negative irreducible loss)" if name == "E" else ""))
    return coef_set


def coefficients_from_dict(raw: Any, source: str = "<dict>") -> CoefficientSet:
    """Build a CoefficientSet from the JSON structure of ``save_coefficients``; errors name ``source`` and the key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: top level must be a JSON object")
    for key in ("name", "supervised"):
        if key not in raw:
            raise ValueError(f"{source}: missing key {key!r}")
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise ValueError(f"{source}: key 'name' must be a non-empty string")
    supervised = _coefficients_from_dict(SupervisedCoefficients, raw["supervised"], source, "supervised")
    dist_raw = raw.get("distillation")
    distillation = None if dist_raw is None else _coefficients_from_dict(
        DistillationCoefficients, dist_raw, source, "distillation")
    support = _support_from_dict(raw.get("support", {}), source)
    quality = raw.get("quality", {})
    if not isinstance(quality, dict):
        raise ValueError(f"{source}: key 'quality' must be an object")
    return check_coefficients(CoefficientSet(raw["name"], supervised, distillation, support, quality), source)


def coefficients_to_dict(coef_set: CoefficientSet) -> dict[str, Any]:
    """The JSON structure written by ``save_coefficients``."""
    return {
        "name": coef_set.name,
        "supervised": dataclasses.asdict(coef_set.supervised),
        "distillation": None if coef_set.distillation is None else dataclasses.asdict(coef_set.distillation),
        "support": {k: [float(lo), float(hi)] for k, (lo, hi) in coef_set.support.items()},
        "quality": coef_set.quality,
    }


def save_coefficients(coef_set: CoefficientSet, path: str | Path) -> Path:
    """Write a coefficient set as JSON (readable by ``load_coefficients``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(coefficients_to_dict(coef_set), indent=2, sort_keys=True, allow_nan=False)
    path.write_text(text + "\n")
    return path


def load_coefficients(name_or_path: str | Path) -> CoefficientSet:
    """``"paper"`` for the published set, else a path to a JSON file from ``save_coefficients``."""
    if str(name_or_path) == "paper":
        return PAPER
    path = Path(name_or_path)
    if path.suffix != ".json" and not path.exists():
        raise ValueError(f"coefficients: unknown name {str(name_or_path)!r}; use 'paper' or a path to a JSON file")
    if not path.is_file():
        raise ValueError(f"{path}: coefficients file not found")
    try:
        # NaN/Infinity literals are accepted here so that the check below can name the key.
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {exc.start}); a coefficients file is the "
                         "JSON written by the calibrate stage") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return coefficients_from_dict(raw, str(path))


# --------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------

HUBER_DELTA = 1e-4
_WARM_DELTA = 1e-1  # residuals of a few % sit in Huber's quadratic zone: plain least squares
_BOOT_ITER = 500


@dataclass(frozen=True)
class FitResult:
    """Outcome of a fit: coefficients, the Huber objective at the optimum, per-point signed
    relative errors (pred - obs) / obs, and optionally bootstrap intervals per coefficient."""

    coefficients: SupervisedCoefficients | DistillationCoefficients
    loss: float
    relative_errors: np.ndarray
    law: str
    theta: np.ndarray
    data: dict[str, np.ndarray] = field(repr=False)
    supervised: SupervisedCoefficients | None = field(default=None, repr=False)
    intervals: dict[str, tuple[float, float]] | None = None
    n_starts: int = 0

    @property
    def max_abs_relative_error(self) -> float:
        """Largest |pred - obs| / obs over the fitted points."""
        return float(np.max(np.abs(self.relative_errors)))


def relative_error(pred: Any, obs: Any) -> np.ndarray:
    """Signed relative error (pred - obs) / obs, elementwise."""
    pred, obs = _arr(pred), _arr(obs)
    return (pred - obs) / obs


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals and its derivative."""
    a = np.abs(r)
    quad = a <= delta
    value = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    grad = np.where(quad, r, delta * np.sign(r))
    return value, grad


class _Law:
    """A law in the parametrisation the optimiser sees: log-prediction and its Jacobian."""

    names: tuple[str, ...]
    bounds: list[tuple[float | None, float | None]]

    def log_pred(self, theta: np.ndarray, x: dict[str, np.ndarray]) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def jac(self, theta: np.ndarray, x: dict[str, np.ndarray]) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def grid(self) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def to_coefficients(self, theta: np.ndarray) -> Any:  # pragma: no cover
        raise NotImplementedError


class _SupervisedLaw(_Law):
    """theta = (log E, log A, log B, alpha, beta, gamma), as in the paper's grid."""

    names = ("E", "A", "B", "alpha", "beta", "gamma")
    bounds = [(-5.0, 5.0), (-10.0, 60.0), (-10.0, 60.0), (0.0, 3.0), (0.0, 3.0), (0.0, 3.0)]

    def log_pred(self, theta, x):
        e, a, b, al, be, ga = (theta[..., i, None] for i in range(6))
        return _log_supervised(x["log_n"], x["log_d"], e, a, b, al, be, ga)

    def jac(self, theta, x):
        e, a, b, al, be, ga = theta
        u, v = a - al * x["log_n"], b - be * x["log_d"]
        s = np.logaddexp(u, v)
        p = np.logaddexp(e, ga * s)
        wu, wv = np.exp(u - s), np.exp(v - s)
        dp_ds = np.exp(ga * s - p) * ga
        return np.stack([
            np.exp(e - p), dp_ds * wu, dp_ds * wv,
            -dp_ds * wu * x["log_n"], -dp_ds * wv * x["log_d"], np.exp(ga * s - p) * s,
        ], axis=-1)

    def grid(self):
        # The paper's grid: log A, log B in {0,...,20}, log E in {-1,...,1.5}, exponents in {0,...,1.5}.
        logs, log_e, expo = [0, 5, 10, 15, 20], [-1, -0.5, 0, 0.5, 1, 1.5], [0, 0.5, 1, 1.5]
        return np.array([(e, a, b, al, be, ga) for e, a, b in itertools.product(log_e, logs, logs)
                         for al, be, ga in itertools.product(expo, expo, expo)], dtype=float)

    def to_coefficients(self, theta):
        e, a, b, al, be, ga = (float(t) for t in theta)
        return SupervisedCoefficients(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=al, beta=be, gamma=ga)


class _DistillationLaw(_Law):
    """theta = (c0, log c1, log d1, log f1, log A', log B', alpha', beta', gamma')."""

    names = ("c0", "c1", "d1", "f1", "A", "B", "alpha", "beta", "gamma")
    bounds = [(-10.0, 10.0), (-5.0, 10.0), (-2.0, 2.0), (-6.0, 2.0), (-10.0, 60.0), (-10.0, 60.0),
              (0.0, 3.0), (0.0, 3.0), (0.0, 3.0)]

    def log_pred(self, theta, x):
        t = [theta[..., i, None] for i in range(9)]
        q = _log_distill_term(x["log_n"], x["log_d"], x["log_lt"], x["log_ltilde"], *t)
        return np.logaddexp(x["log_lt"], q)

    def jac(self, theta, x):
        c0, lc1, ld1, lf1, a, b, al, be, ga = theta
        c1, f1 = math.exp(lc1), math.exp(lf1)
        z = (x["log_lt"] - x["log_ltilde"] - ld1) / f1
        sp, sig = np.logaddexp(0.0, z), 1.0 / (1.0 + np.exp(-z))
        u, v = a - al * x["log_n"], b - be * x["log_d"]
        s = np.logaddexp(u, v)
        q = -c0 * x["log_lt"] - c1 * f1 * sp + ga * s
        dq = np.exp(q - np.logaddexp(x["log_lt"], q))  # d log pred / d q
        wu, wv = ga * np.exp(u - s), ga * np.exp(v - s)
        cols = [-x["log_lt"], -c1 * f1 * sp, c1 * sig, -c1 * f1 * (sp - z * sig),
                wu, wv, -wu * x["log_n"], -wv * x["log_d"], s]
        return np.stack([dq * c for c in cols], axis=-1)

    def grid(self):
        # No grid is published for Eq. 8; this one brackets the paper's values and stays small.
        c0s, lc1s, ld1s, lf1s = [0.0, 1.5, 3.0], np.log([1.0, 30.0, 500.0]), np.log([1.0, 1.3]), np.log([0.1, 0.5])
        logs, expo = [0, 5, 10, 15], [0.3, 0.6, 1.0]
        return np.array(list(itertools.product(c0s, lc1s, ld1s, lf1s, logs, logs, expo, expo, expo)), dtype=float)

    def to_coefficients(self, theta):
        c0, lc1, ld1, lf1, a, b, al, be, ga = (float(t) for t in theta)
        return DistillationCoefficients(c0=c0, c1=math.exp(lc1), d1=math.exp(ld1), f1=math.exp(lf1),
                                        A=math.exp(a), B=math.exp(b), alpha=al, beta=be, gamma=ga)


def _objective(law: _Law, x: dict[str, np.ndarray], log_obs: np.ndarray, w: np.ndarray, delta: float) -> Callable:
    """Weighted mean Huber loss of log residuals, returned with its gradient (for L-BFGS-B)."""

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        r = law.log_pred(theta, x)[..., :] - log_obs
        r = r.reshape(-1)
        h, dh = _huber(r, delta)
        # Scaled by 1/delta so values and gradients are O(residual), which suits the tolerances.
        value = float(np.sum(w * h)) / delta
        # A sum, not "@": a tiny BLAS gemv goes multi-threaded and crawls on a busy 2-core box.
        grad = np.sum((w * dh)[:, None] * law.jac(theta, x), axis=0) / delta
        return value, grad

    return f


def _grid_values(law: _Law, grid: np.ndarray, x: dict[str, np.ndarray], log_obs: np.ndarray,
                 w: np.ndarray, delta: float, chunk: int = 4096) -> np.ndarray:
    """Objective at every grid point, vectorised in chunks."""
    out = np.empty(len(grid))
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(0, len(grid), chunk):
            r = law.log_pred(grid[i:i + chunk], x) - log_obs
            out[i:i + chunk] = (_huber(r, delta)[0] * w).sum(axis=-1) / delta
    return np.where(np.isfinite(out), out, np.inf)


def _single_threaded_blas() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread while optimising, if threadpoolctl is installed.

    L-BFGS-B makes thousands of tiny BLAS calls; multi-threaded OpenBLAS turns each into a
    thread handoff, which made a 1.5 s fit take 20-40 s on a busy 2-core machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it fits are only slower on contended machines
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _optimise(law: _Law, x: dict[str, np.ndarray], log_obs: np.ndarray, starts: np.ndarray,
              delta: float, w: np.ndarray | None = None, maxiter: int = 1000,
              warm_delta: float | None = _WARM_DELTA) -> tuple[np.ndarray, float]:
    """L-BFGS-B from each start; the best end point and its objective.

    With residuals far above delta the Huber loss is L1-like (kinked), on which L-BFGS-B
    crawls; a first pass with ``warm_delta`` (least squares in log space) brings each start
    close, then the paper's delta finishes. Only the final objective is compared."""
    w = np.full(len(log_obs), 1.0 / len(log_obs)) if w is None else w
    f = _objective(law, x, log_obs, w, delta)
    f_warm = None if warm_delta is None else _objective(law, x, log_obs, w, warm_delta)
    lo, hi = np.array(law.bounds, dtype=float).T
    opts = {"maxiter": maxiter, "ftol": 1e-12, "gtol": 1e-10}
    best_theta, best_val = starts[0], np.inf
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"), _single_threaded_blas():
        for start in starts:
            theta = np.clip(start, lo, hi)
            if f_warm is not None:
                theta = minimize(f_warm, theta, jac=True, method="L-BFGS-B", bounds=law.bounds, options=opts).x
            res = minimize(f, theta, jac=True, method="L-BFGS-B", bounds=law.bounds, options=opts)
            if np.isfinite(res.fun) and res.fun < best_val:
                best_theta, best_val = res.x, float(res.fun)
    return best_theta, best_val


def _fit(law: _Law, x: dict[str, np.ndarray], obs: np.ndarray, n_starts: int | None,
         delta: float) -> tuple[np.ndarray, float, int]:
    """Grid-evaluate the objective, then run L-BFGS-B from the ``n_starts`` best grid points."""
    log_obs = np.log(obs)
    w = np.full(len(obs), 1.0 / len(obs))
    grid = law.grid()
    if n_starts is not None and n_starts < len(grid):
        # Screening the full grid once and polishing only the best starts keeps a fit in
        # seconds; n_starts=None runs L-BFGS-B from every grid point as the paper did.
        order = np.argsort(_grid_values(law, grid, x, log_obs, w, delta), kind="stable")
        grid = grid[order[:n_starts]]
    theta, value = _optimise(law, x, log_obs, grid, delta, w)
    return theta, value, len(grid)


def _check_points(names: tuple[str, ...], arrays: tuple[Any, ...], n_params: int) -> list[np.ndarray]:
    """Positive, finite, 1-D, equal-length arrays with at least ``n_params`` points."""
    out = []
    for name, a in zip(names, arrays):
        a = np.atleast_1d(_arr(a))
        if a.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(f"{name}: all values must be finite and > 0")
        out.append(a)
    n = len(out[-1])
    for name, a in zip(names, out):
        if len(a) != n:
            raise ValueError(f"{name}: has {len(a)} points but {names[-1]} has {n}")
    if n < n_params:
        raise ValueError(f"{names[-1]}: {n} points, fewer than the {n_params} parameters of the law")
    return out


def _supervised_inputs(N: np.ndarray, D: np.ndarray) -> dict[str, np.ndarray]:
    return {"log_n": np.log(N), "log_d": np.log(D)}


def _distillation_inputs(N_S, D_S, L_T, supervised_coef) -> dict[str, np.ndarray]:
    ltilde = _arr(supervised_loss(N_S, D_S, supervised_coef))
    return {"log_n": np.log(N_S), "log_d": np.log(D_S), "log_lt": np.log(L_T), "log_ltilde": np.log(ltilde)}


def _result(law: _Law, theta, value, x, obs, data, n_starts, supervised=None) -> FitResult:
    pred = np.exp(law.log_pred(theta, x)).reshape(-1)
    return FitResult(law.to_coefficients(theta), value, relative_error(pred, obs),
                     "supervised" if supervised is None else "distillation", np.array(theta), data,
                     supervised, None, n_starts)


def fit_supervised(N: Any, D: Any, L: Any, n_starts: int | None = 32, delta: float = HUBER_DELTA,
                   n_bootstrap: int = 0, seed: int = 0) -> FitResult:
    """Fit Eq. 1 to observed losses L at (N, D): Huber(delta) on log residuals, L-BFGS-B
    from the paper's grid (screened to the ``n_starts`` best points; None = all 9600).

    ``n_bootstrap`` > 0 also computes 95% bootstrap intervals."""
    N, D, L = _check_points(("N", "D", "L"), (N, D, L), 6)
    law, x = _SupervisedLaw(), _supervised_inputs(N, D)
    theta, value, used = _fit(law, x, L, n_starts, delta)
    fit = _result(law, theta, value, x, L, {"N": N, "D": D, "L": L}, used)
    return bootstrap_intervals(fit, n_bootstrap, seed=seed) if n_bootstrap else fit


def fit_distillation(N_S: Any, D_S: Any, L_T: Any, L: Any, supervised_coef: SupervisedCoefficients,
                     n_starts: int | None = 32, delta: float = HUBER_DELTA,
                     n_bootstrap: int = 0, seed: int = 0) -> FitResult:
    """Fit Eq. 8 to distilled-student losses L, with L~_S from ``supervised_coef`` (fit that
    first, as the paper did). Same objective and procedure as ``fit_supervised``."""
    N_S, D_S, L_T, L = _check_points(("N_S", "D_S", "L_T", "L"), (N_S, D_S, L_T, L), 9)
    law, x = _DistillationLaw(), _distillation_inputs(N_S, D_S, L_T, supervised_coef)
    theta, value, used = _fit(law, x, L, n_starts, delta)
    fit = _result(law, theta, value, x, L, {"N_S": N_S, "D_S": D_S, "L_T": L_T, "L": L}, used, supervised_coef)
    return bootstrap_intervals(fit, n_bootstrap, seed=seed) if n_bootstrap else fit


def bootstrap_intervals(fit: FitResult, n_resamples: int = 50, level: float = 0.95, seed: int = 0) -> FitResult:
    """Percentile bootstrap intervals per coefficient: resample the points with replacement,
    refit from the original optimum, and take the (1-level)/2 quantiles. Returns a copy of
    ``fit`` with ``intervals`` filled."""
    if n_resamples < 2:
        raise ValueError(f"n_resamples: need at least 2, got {n_resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1), got {level}")
    law = _SupervisedLaw() if fit.law == "supervised" else _DistillationLaw()
    d = fit.data
    if fit.law == "supervised":
        x = _supervised_inputs(d["N"], d["D"])
    else:
        x = _distillation_inputs(d["N_S"], d["D_S"], d["L_T"], fit.supervised)
    rng = np.random.default_rng(seed)
    n = len(d["L"])
    samples = []
    for _ in range(n_resamples):
        # Reweighting by resample counts equals refitting on the resampled points.
        w = np.bincount(rng.integers(0, n, n), minlength=n) / n
        theta, _ = _optimise(law, x, np.log(d["L"]), fit.theta[None, :], HUBER_DELTA, w,
                              maxiter=_BOOT_ITER, warm_delta=None)
        samples.append(dataclasses.astuple(law.to_coefficients(theta)))
    lo, hi = np.quantile(np.array(samples), [(1 - level) / 2, (1 + level) / 2], axis=0)
    intervals = {name: (float(a), float(b)) for name, a, b in zip(law.names, lo, hi)}
    return dataclasses.replace(fit, intervals=intervals)


def heldout_error(coefs: CoefficientSet | SupervisedCoefficients, N: Any, D: Any, L: Any,
                  L_T: Any = None) -> dict[str, float]:
    """Relative prediction error on held-out points: the supervised law when ``L_T`` is None,
    else the distillation law (needs a CoefficientSet). Returns mean/max |rel. error| and n."""
    if L_T is None:
        sup = coefs.supervised if isinstance(coefs, CoefficientSet) else coefs
        pred = supervised_loss(N, D, sup)
    else:
        if not isinstance(coefs, CoefficientSet):
            raise ValueError("coefs: the distillation law needs a CoefficientSet")
        pred = distillation_loss(N, D, L_T, coefs)
    err = np.abs(relative_error(pred, L))
    return {"mean_abs": float(np.mean(err)), "max_abs": float(np.max(err)), "n": int(err.size)}


def distillation_error_floor(L_T: Any, L: Any) -> np.ndarray:
    """The smallest |relative error| Eq. 8 can make at each point, whatever its coefficients.

    Eq. 8 is L_T plus a positive term, so it predicts a student above its teacher's loss; a
    distilled student measured below it (the loss mixes in next-token prediction, λ < 1, or
    teacher and student are alike) is missed by at least (L_T − L) / L. Zero where L ≥ L_T."""
    L_T, L = _arr(L_T), _arr(L)
    return np.maximum(L_T - L, 0.0) / L


def coefficient_set_from_fits(name: str, supervised: FitResult, distillation: FitResult | None = None,
                              quality: dict[str, Any] | None = None) -> CoefficientSet:
    """A CoefficientSet from fits, with support = the ranges of the fitted points."""
    d = supervised.data
    support = {"student_params": (float(d["N"].min()), float(d["N"].max())),
               "student_tokens": (float(d["D"].min()), float(d["D"].max()))}
    q = {"supervised_max_abs_rel_error": supervised.max_abs_relative_error, "supervised_points": len(d["L"])}
    dist = None
    if distillation is not None:
        dd = distillation.data
        dist = distillation.coefficients
        for key, arr in (("student_params", dd["N_S"]), ("student_tokens", dd["D_S"])):
            lo, hi = support[key]
            support[key] = (min(lo, float(arr.min())), max(hi, float(arr.max())))
        support["teacher_loss"] = (float(dd["L_T"].min()), float(dd["L_T"].max()))
        q.update(distillation_max_abs_rel_error=distillation.max_abs_relative_error,
                 distillation_points=len(dd["L"]))
    q.update(quality or {})
    return check_coefficients(CoefficientSet(name, supervised.coefficients, dist, support, q), f"fit {name!r}")
