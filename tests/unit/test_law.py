"""The scaling laws against hand computation, coefficient files, and the fitting procedure."""

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy.optimize import check_grad

from distill import law
from distill.law import (
    PAPER,
    SCENARIOS,
    CoefficientSet,
    SupervisedCoefficients,
    bootstrap_intervals,
    coefficient_set_from_fits,
    distillation_compute,
    distillation_loss,
    fit_distillation,
    fit_supervised,
    flops_per_token,
    heldout_error,
    load_coefficients,
    relative_error,
    save_coefficients,
    supervised_compute,
    supervised_loss,
)

REL = 1e-6  # "6 significant digits"

# A small-scale "true" law (losses ~2.5-4 nats for 1e5-1e7 parameters) used to make synthetic runs.
TRUE = SupervisedCoefficients(E=2.0, A=40.0, B=100.0, alpha=0.3, beta=0.3, gamma=0.8)


# ---------------------------------------------------------------- hand-computed values


def test_supervised_law_matches_hand_computation():
    # Eq. 1: E + (A / N^alpha + B / D^beta)^gamma with the published coefficients.
    n, d = 1e9, 2e10
    expected = 1.220 + math.pow(3355 / math.pow(n, 0.408) + 18186 / math.pow(d, 0.431), 0.452)
    assert expected == pytest.approx(2.374692, rel=REL)
    assert supervised_loss(n, d, PAPER.supervised) == pytest.approx(expected, rel=REL)
    n, d = 1.43e8, 3e9
    expected = 1.220 + math.pow(3355 / math.pow(n, 0.408) + 18186 / math.pow(d, 0.431), 0.452)
    assert supervised_loss(n, d, PAPER.supervised) == pytest.approx(expected, rel=REL)


def test_supervised_law_is_vectorised():
    n, d = np.array([1e9, 1.43e8]), np.array([2e10, 3e9])
    out = supervised_loss(n, d, PAPER.supervised)
    assert out.shape == (2,)
    assert out[1] == pytest.approx(supervised_loss(1.43e8, 3e9, PAPER.supervised), rel=1e-12)


@pytest.mark.parametrize("n_s, d_s, l_t", [(1e9, 2e10, 2.0), (3e8, 1e11, 2.3)])
def test_distillation_law_matches_hand_computation(n_s, d_s, l_t):
    # Eq. 8: L_T + L_T^-c0 (1 + (L_T / (L~_S d1))^(1/f1))^(-c1 f1) (A'/N^a' + B'/D^b')^g'
    l_tilde = 1.220 + math.pow(3355 / math.pow(n_s, 0.408) + 18186 / math.pow(d_s, 0.431), 0.452)
    teacher_term = math.pow(1 + math.pow(l_t / (l_tilde * 1.315), 1 / 0.090), -522.6 * 0.090)
    student_term = math.pow(2243 / math.pow(n_s, 0.321) + 24181 / math.pow(d_s, 0.637), 0.764)
    expected = l_t + math.pow(l_t, -2.549) * teacher_term * student_term
    assert distillation_loss(n_s, d_s, l_t, PAPER) == pytest.approx(expected, rel=REL)


def test_distillation_law_pinned_value():
    assert distillation_loss(1e9, 2e10, 2.0, PAPER) == pytest.approx(2.276811, rel=REL)


def _f_by_hand(n, n_ctx, n_vocab):
    sigma1 = math.pow(128 * 12 * 12, -1 / 3)
    sigma2 = math.pow(128 / 12, 1 / 3)
    return 2 * n * (1 + sigma1 * n_ctx * math.pow(n, -1 / 3) + sigma2 * n_vocab * math.pow(n, -2 / 3))


def test_flops_per_token_matches_hand_computation():
    assert _f_by_hand(1e9, 2048, 32768) == pytest.approx(2.299324e9, rel=REL)
    assert flops_per_token(1e9, 2048, 32768) == pytest.approx(_f_by_hand(1e9, 2048, 32768), rel=REL)
    assert flops_per_token(1e6, 128, 4096) == pytest.approx(_f_by_hand(1e6, 128, 4096), rel=REL)


@pytest.mark.parametrize("scenario, d_lgt, d_pre", [
    ("best-case", 0, 0), ("teacher-inference", 1, 0),
    ("teacher-pretraining", 0, 1), ("teacher-pretraining+inference", 1, 1),
])
def test_distillation_compute_matches_eq9(scenario, d_lgt, d_pre):
    n_s, d_s, n_t, d_t = 1e9, 2e10, 7.75e9, 5.12e11
    f_s, f_t = _f_by_hand(n_s, 2048, 32768), _f_by_hand(n_t, 2048, 32768)
    expected = 3 * f_s * d_s + f_t * (d_lgt * d_s + d_pre * 3 * d_t)
    assert distillation_compute(n_s, d_s, n_t, d_t, scenario, 2048, 32768) == pytest.approx(expected, rel=REL)


def test_eq9_pinned_values_and_supervised_compute():
    assert distillation_compute(1e9, 2e10, 7.75e9, 5.12e11, "teacher-inference", 2048, 32768) == pytest.approx(
        4.658143e20, rel=REL)
    assert supervised_compute(1e9, 2e10, 2048, 32768) == pytest.approx(3 * _f_by_hand(1e9, 2048, 32768) * 2e10,
                                                                        rel=REL)
    assert SCENARIOS == ("best-case", "teacher-inference", "teacher-pretraining", "teacher-pretraining+inference")


def test_compute_errors_name_the_argument():
    with pytest.raises(ValueError, match="scenario.*best-case"):
        distillation_compute(1e9, 2e10, 7e9, 1e11, "free-lunch", 2048, 32768)
    with pytest.raises(ValueError, match="N_T"):
        distillation_compute(1e9, 2e10, None, None, "teacher-inference", 2048, 32768)
    with pytest.raises(ValueError, match="D_T"):
        distillation_compute(1e9, 2e10, 7e9, None, "teacher-pretraining", 2048, 32768)
    assert distillation_compute(1e9, 2e10, None, None, "best-case", 2048, 32768) == pytest.approx(
        supervised_compute(1e9, 2e10, 2048, 32768))


# ---------------------------------------------------------------- coefficient files


def test_paper_set_and_round_trip(tmp_path):
    assert load_coefficients("paper") is PAPER
    assert PAPER.support["student_params"] == (1.43e8, 1.26e10)
    path = save_coefficients(PAPER, tmp_path / "c.json")
    again = load_coefficients(path)
    assert again == PAPER


def _write(tmp_path, raw):
    path = tmp_path / "coefs.json"
    path.write_text(json.dumps(raw))
    return path


def test_nan_coefficient_names_file_and_key(tmp_path):
    raw = law.coefficients_to_dict(PAPER)
    raw["supervised"]["E"] = float("nan")
    path = _write(tmp_path, raw)
    with pytest.raises(ValueError, match=r"coefs\.json.*supervised\.E"):
        load_coefficients(path)


def test_missing_key_names_file_and_key(tmp_path):
    raw = law.coefficients_to_dict(PAPER)
    del raw["distillation"]["c1"]
    path = _write(tmp_path, raw)
    with pytest.raises(ValueError, match=r"coefs\.json.*distillation\.c1"):
        load_coefficients(path)
    raw = law.coefficients_to_dict(PAPER)
    raw["support"]["student_params"] = [1e8, float("inf")]
    with pytest.raises(ValueError, match=r"support\.student_params"):
        load_coefficients(_write(tmp_path, raw))


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown name 'chinchilla'"):
        load_coefficients("chinchilla")
    with pytest.raises(ValueError, match="nope.json"):
        load_coefficients(tmp_path / "nope.json")


def test_supervised_only_set_round_trips(tmp_path):
    only = CoefficientSet("sup-only", TRUE, None, {"student_params": (1e5, 1e7)}, {"points": 3})
    assert load_coefficients(save_coefficients(only, tmp_path / "s.json")) == only
    with pytest.raises(ValueError, match="no distillation law"):
        distillation_loss(1e6, 1e8, 2.5, only)


# ---------------------------------------------------------------- fitting


def _synthetic_supervised(seed=0, noise=1e-3):
    rng = np.random.default_rng(seed)
    n = np.repeat(np.logspace(5, 7, 6), 6)
    d = np.tile(np.logspace(7, 9, 6), 6)
    obs = supervised_loss(n, d, TRUE) * (1 + noise * rng.standard_normal(n.size))
    return n, d, obs


@pytest.fixture(scope="module")
def supervised_fit():
    n, d, obs = _synthetic_supervised()
    return fit_supervised(n, d, obs)


def test_gradients_are_analytic_and_correct():
    n, d, obs = _synthetic_supervised()
    sup = law._SupervisedLaw()
    f = law._objective(sup, law._supervised_inputs(n, d), np.log(obs), np.full(n.size, 1 / n.size), 1e-2)
    theta = np.array([0.5, 3.5, 4.7, 0.28, 0.33, 0.75])
    assert check_grad(lambda t: f(t)[0], lambda t: f(t)[1], theta) < 1e-5 * np.linalg.norm(f(theta)[1])
    dist = law._DistillationLaw()
    lt = np.linspace(2.2, 3.4, n.size)
    x = law._distillation_inputs(n, d, lt, TRUE)
    g = law._objective(dist, x, np.log(obs), np.full(n.size, 1 / n.size), 1e-2)
    theta = np.array([2.0, math.log(300), math.log(1.2), math.log(0.1), 7.0, 9.0, 0.3, 0.6, 0.7])
    assert check_grad(lambda t: g(t)[0], lambda t: g(t)[1], theta) < 1e-5 * np.linalg.norm(g(theta)[1])


def test_fit_recovers_known_law(supervised_fit):
    # 0.1% noise on 36 points: predictions anywhere in the fitted range within 0.5%.
    n, d = np.meshgrid(np.logspace(5, 7, 9), np.logspace(7, 9, 9))
    err = relative_error(supervised_loss(n, d, supervised_fit.coefficients), supervised_loss(n, d, TRUE))
    assert np.max(np.abs(err)) < 5e-3
    assert supervised_fit.coefficients.alpha == pytest.approx(TRUE.alpha, abs=0.05)
    assert supervised_fit.max_abs_relative_error < 5e-3
    assert supervised_fit.relative_errors.shape == (36,)


def test_fit_on_weaker_half_predicts_stronger_half():
    # The paper reports <~1% error when extrapolating from weak to strong models; so do we.
    n, d, obs = _synthetic_supervised(seed=2)
    order = np.argsort(obs)[::-1]
    weak, strong = order[:18], order[18:]
    fit = fit_supervised(n[weak], d[weak], obs[weak])
    assert obs[weak].min() >= obs[strong].max()
    assert heldout_error(fit.coefficients, n[strong], d[strong], obs[strong])["max_abs"] < 0.01


def test_bootstrap_intervals_bracket_the_fit(supervised_fit):
    boot = bootstrap_intervals(supervised_fit, n_resamples=20, seed=0)
    assert set(boot.intervals) == {"E", "A", "B", "alpha", "beta", "gamma"}
    for name in ("alpha", "beta", "gamma"):
        lo, hi = boot.intervals[name]
        assert lo <= getattr(supervised_fit.coefficients, name) <= hi
        assert hi - lo < 0.1
    assert supervised_fit.intervals is None  # the original is left alone


def test_distillation_fit_predicts_within_range():
    # 4 student sizes x 3 token counts x 3 teachers, 0.1% noise; held-out points drawn anywhere in that box.
    rng = np.random.default_rng(5)
    true_set = CoefficientSet("true", TRUE, PAPER.distillation)
    n_s, d_s, l_t = (a.ravel() for a in np.meshgrid(np.logspace(5, 7, 4), np.logspace(7, 9, 3), [2.0, 2.75, 3.5]))
    obs = distillation_loss(n_s, d_s, l_t, true_set) * (1 + 1e-3 * rng.standard_normal(n_s.size))
    fit = fit_distillation(n_s, d_s, l_t, obs, TRUE)
    fitted = CoefficientSet("fit", TRUE, fit.coefficients)
    n2, d2, l2 = 10 ** rng.uniform(5, 7, 200), 10 ** rng.uniform(7, 9, 200), rng.uniform(2.0, 3.5, 200)
    err = heldout_error(fitted, n2, d2, distillation_loss(n2, d2, l2, true_set), L_T=l2)
    assert err["max_abs"] < 5e-3
    merged = coefficient_set_from_fits("calibrated", fit_supervised(*_synthetic_supervised()), fit)
    assert merged.support["teacher_loss"] == (2.0, 3.5)
    assert merged.support["student_params"] == (pytest.approx(1e5), pytest.approx(1e7))
    assert merged.distillation == fit.coefficients


def test_fewer_points_than_parameters_is_an_error():
    n, d, obs = _synthetic_supervised()
    with pytest.raises(ValueError, match=r"^L: 5 points, fewer than the 6"):
        fit_supervised(n[:5], d[:5], obs[:5])
    with pytest.raises(ValueError, match=r"^L: 8 points, fewer than the 9"):
        fit_distillation(n[:8], d[:8], np.full(8, 2.5), obs[:8], TRUE)
    with pytest.raises(ValueError, match=r"^D: has 35 points"):
        fit_supervised(n, d[:-1], obs)
    with pytest.raises(ValueError, match=r"^N: all values must be finite"):
        fit_supervised(np.where(n == n[0], -1.0, n), d, obs)


def test_relative_error_is_signed():
    assert relative_error([1.1, 0.9], [1.0, 1.0]) == pytest.approx([0.1, -0.1])


def test_frozen_coefficients():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PAPER.supervised.E = 2.0


# ---------------------------------------------------------------- coefficient checks


@pytest.mark.parametrize("which, key, value", [
    ("supervised", "E", -5.0), ("supervised", "alpha", -0.4), ("supervised", "A", 0.0),
    ("distillation", "c1", -1.0), ("distillation", "f1", 0.0), ("distillation", "d1", -1.0),
    ("distillation", "gamma", -0.1),
])
def test_coefficients_with_a_wrong_sign_are_refused_naming_source_and_key(which, key, value):
    import dataclasses

    from distill.law import check_coefficients

    bad = dataclasses.replace(PAPER, **{which: dataclasses.replace(getattr(PAPER, which), **{key: value})})
    with pytest.raises(ValueError, match=rf"^here: key '{which}\.{key}' must be"):
        check_coefficients(bad, "here")
    raw = law.coefficients_to_dict(bad)
    with pytest.raises(ValueError, match=rf"^f\.json: key '{which}\.{key}'"):
        law.coefficients_from_dict(raw, "f.json")


def test_paper_set_carries_the_published_token_support():
    assert PAPER.support["student_tokens"] == (1e9, 5.12e11)
    assert PAPER.support["teacher_tokens"] == (1e9, 5.12e11)
