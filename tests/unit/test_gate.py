"""The gate's decisions: the paper's findings through the published law, budgets, errors, output."""

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
from scipy.optimize import brentq

from distill.gate import (
    Decision,
    GateQuery,
    OutOfSupportWarning,
    crossover_tokens,
    decide,
    format_table,
    plot_decision_map,
)
from distill.law import (
    PAPER,
    SCENARIOS,
    distillation_compute,
    distillation_loss,
    flops_per_token,
    supervised_loss,
)

BIG_TEACHER = {"teacher_params": 7.75e9, "teacher_tokens": 5.12e11}  # 20+ tokens/param, L_T ~ 1.93
WEAK_TEACHER = {"teacher_params": 1e9, "teacher_tokens": 2e10}  # L_T ~ 2.37
CALIBRATED = dataclasses.replace(PAPER, name="calibrated", support={
    "student_params": (1e5, 1e7), "student_tokens": (1e7, 1e9), "teacher_loss": (2.0, 3.5)})


def _decide(**kw) -> Decision:
    if kw.get("compute") is not None:
        kw.setdefault("question", "compute-limited")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutOfSupportWarning)
        return decide(GateQuery(**kw), PAPER)


def _teacher_loss(n_t, d_t):
    return float(supervised_loss(n_t, d_t, PAPER.supervised))


# ---------------------------------------------------------------- the paper's findings


def test_existing_teacher_distill_wins_small_tokens_supervised_beyond_crossover():
    small = _decide(student_params=1e9, student_tokens=1e10, **BIG_TEACHER)
    large = _decide(student_params=1e9, student_tokens=1e13, **BIG_TEACHER)
    assert small.decision == "distill" and large.decision == "supervised"
    cross = small.crossover_tokens
    assert 1e10 < cross < 1e13
    assert large.crossover_tokens == pytest.approx(cross)
    assert _decide(student_params=1e9, student_tokens=cross * 0.9, **BIG_TEACHER).decision == "distill"
    assert _decide(student_params=1e9, student_tokens=cross * 1.1, **BIG_TEACHER).decision == "supervised"
    l_t = _teacher_loss(**{"n_t": 7.75e9, "d_t": 5.12e11})
    assert float(supervised_loss(1e9, cross, PAPER.supervised)) == pytest.approx(
        float(distillation_loss(1e9, cross, l_t, PAPER)), abs=1e-9)


def test_crossover_tokens_earlier_for_larger_students_with_a_fixed_teacher():
    # Holds for a teacher that is not much stronger than the students (see the next test).
    l_t = _teacher_loss(WEAK_TEACHER["teacher_params"], WEAK_TEACHER["teacher_tokens"])
    cross = [crossover_tokens(n, l_t, PAPER) for n in (3e8, 1e9, 3e9, 1e10)]
    assert all(a > b for a, b in zip(cross, cross[1:])), cross


def test_crossover_tokens_not_monotone_in_student_size_for_a_strong_teacher():
    # What the law gives (not a stated finding): with L_T ~ 1.93 the token crossover rises
    # while the student is far weaker than the teacher, peaks near 1e9, then falls.
    l_t = _teacher_loss(BIG_TEACHER["teacher_params"], BIG_TEACHER["teacher_tokens"])
    small, mid, large = (crossover_tokens(n, l_t, PAPER) for n in (1.43e8, 1e9, 1e10))
    assert mid > 5 * small and mid > 5 * large


def test_compute_threshold_grows_with_student_size_for_an_existing_teacher():
    # The paper's headline: with an existing teacher (pay only its logits), distillation wins
    # up to a compute level that grows with student size.
    def margin(n_s, log_c):
        d = _decide(student_params=n_s, compute=math.exp(log_c), **BIG_TEACHER)
        return d.supervised.loss - d.distill.loss

    thresholds = []
    for n_s in (1.43e8, 1e9, 1e10):
        grid = np.linspace(math.log(3e18), math.log(1e25), 25)
        values = [margin(n_s, x) for x in grid]
        i = next(k for k in range(len(grid) - 1) if values[k] > 0 >= values[k + 1])
        thresholds.append(math.exp(brentq(lambda x: margin(n_s, x), grid[i], grid[i + 1])))
    assert thresholds[0] < thresholds[1] < thresholds[2], thresholds


def test_crossover_later_for_stronger_teachers_within_the_paper_range():
    # Teachers of 0.3B-12.6B parameters at 20 tokens/parameter, student of 1B.
    losses = [_teacher_loss(n, 20 * n) for n in (3e8, 1e9, 3e9, 1.26e10)]
    assert all(a > b for a, b in zip(losses, losses[1:]))
    cross = [crossover_tokens(1e9, l_t, PAPER) for l_t in losses]
    assert all(a < b for a, b in zip(cross, cross[1:])), cross


def test_crossover_earlier_again_for_a_far_too_strong_teacher():
    # Capacity gap in the crossover: past L_T ~ 1.9 a stronger teacher helps a 1B student for fewer tokens.
    assert crossover_tokens(1e9, 1.5, PAPER) < crossover_tokens(1e9, 1.9, PAPER)


def test_capacity_gap_u_shape_in_teacher_loss():
    l_t = np.linspace(1.3, 3.0, 171)
    student = np.asarray(distillation_loss(1e9, 2e10, l_t, PAPER))
    i = int(np.argmin(student))
    assert 0 < i < len(l_t) - 1
    assert student[0] > student[i] + 0.01 and student[-1] > student[i] + 0.01
    assert l_t[i] < float(supervised_loss(1e9, 2e10, PAPER.supervised))  # the best teacher beats the student


@pytest.mark.parametrize("n_s", [3e8, 1e9, 3e9])
@pytest.mark.parametrize("compute", [1e20, 1e21, 1e22, 1e23])
def test_training_the_teacher_too_supervised_wins(n_s, compute):
    # No teacher in the query: the gate trains a compute-optimal one inside the budget.
    d = _decide(student_params=n_s, compute=compute, scenario="teacher-pretraining+inference")
    assert d.decision == "supervised", d.reason
    assert d.distill.compute == pytest.approx(compute, rel=1e-9)
    assert d.distill.teacher_loss_source == "compute-optimal teacher"
    assert 1e6 <= d.distill.teacher_params <= 1e17 and 1e6 <= d.distill.teacher_tokens <= 1e17


def test_optimal_teacher_beats_the_given_one_at_equal_compute():
    c = 1e22
    opt = _decide(student_params=1e9, compute=c, scenario="teacher-pretraining+inference")
    n_t, d_t = BIG_TEACHER["teacher_params"], 1e11
    f = flops_per_token
    d_s = (c - 3 * f(n_t, 4096, 32768) * d_t) / (3 * f(1e9, 4096, 32768) + f(n_t, 4096, 32768))
    assert distillation_compute(1e9, d_s, n_t, d_t, "teacher-pretraining+inference") == pytest.approx(c)
    assert opt.distill.loss <= float(distillation_loss(1e9, d_s, _teacher_loss(n_t, d_t), PAPER))


# ---------------------------------------------------------------- budgets and accounting


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_token_budget_trains_both_branches_on_the_same_tokens(scenario):
    d = _decide(student_params=1e9, student_tokens=2e10, scenario=scenario, **BIG_TEACHER)
    assert d.supervised.tokens == d.distill.tokens == 2e10
    assert d.distill.compute == pytest.approx(
        distillation_compute(1e9, 2e10, 7.75e9, 5.12e11, scenario, 4096, 32768), rel=1e-12)
    assert d.supervised.compute == pytest.approx(3 * flops_per_token(1e9, 4096, 32768) * 2e10, rel=1e-12)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_compute_budget_is_spent_exactly(scenario):
    c = 3e21
    teacher = {} if "pretraining" in scenario else BIG_TEACHER  # the gate picks a teacher it trains
    d = _decide(student_params=1e9, compute=c, scenario=scenario, **teacher)
    assert d.supervised.tokens == pytest.approx(c / (3 * flops_per_token(1e9, 4096, 32768)), rel=1e-12)
    assert d.supervised.compute == pytest.approx(c, rel=1e-12)
    assert d.distill.compute == pytest.approx(c, rel=1e-9)
    if scenario == "best-case":
        assert d.distill.tokens == pytest.approx(d.supervised.tokens)
    else:
        assert d.distill.tokens < d.supervised.tokens


ISSUE_TEACHER = {"teacher_params": 7e9, "teacher_tokens": 2e12}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_data_limited_question_charges_no_teacher_cost_so_the_scenario_only_reports(scenario):
    d = _decide(student_params=5e8, student_tokens=1e10, scenario=scenario, **ISSUE_TEACHER)
    assert d.decision == "distill" and d.question == "data-limited"
    out = d.to_dict()
    assert out["question"] == "data-limited" and out["teacher_costs_charged"] is False
    assert out["budget_flops"] is None and out["scenario"] == scenario
    assert d.distill.tokens == d.supervised.tokens == 1e10
    assert "data-limited" in d.reason and "not charged" in d.reason


def test_compute_limited_teacher_pretraining_charged_says_supervised():
    # The issue's case: distillation with the teacher's pretraining costs 8.9e22 FLOPs, the
    # student's whole budget 3.6e19 (supervised on 1e10 tokens at n_ctx 2048).
    kw = {"student_params": 5e8, "student_tokens": 1e10, "n_ctx": 2048, **ISSUE_TEACHER}
    d = _decide(question="compute-limited", scenario="teacher-pretraining", **kw)
    assert d.decision == "supervised", d.reason
    assert not d.distill.feasible and d.distill.tokens == 0
    assert d.distill.teacher_compute == pytest.approx(8.9e22, rel=0.02)
    assert d.query.budget_flops() == pytest.approx(3.6e19, rel=0.02)
    assert d.supervised.tokens == pytest.approx(1e10)
    out = d.to_dict()
    assert out["question"] == "compute-limited" and out["teacher_costs_charged"] is True
    assert out["distill_feasible"] is False and out["distill"]["loss"] is None
    assert "leave distillation no student tokens" in d.reason
    json.dumps(out)
    # teacher inference only: the student gets fewer tokens than supervised, and the decision can differ
    inf = _decide(question="compute-limited", scenario="teacher-inference", **kw)
    f_s, f_t = flops_per_token(5e8, 2048, 32768), flops_per_token(7e9, 2048, 32768)
    assert inf.distill.tokens == pytest.approx(3 * f_s * 1e10 / (3 * f_s + f_t), rel=1e-9)
    assert inf.distill.compute == pytest.approx(inf.query.budget_flops(), rel=1e-9)
    best = _decide(question="compute-limited", scenario="best-case", **kw)
    assert best.distill.tokens == pytest.approx(1e10) and best.decision == "distill"


def test_compute_limited_fixed_teacher_within_the_budget_is_charged_exactly():
    c = 1e23
    d = _decide(student_params=1e9, compute=c, scenario="teacher-pretraining+inference", **BIG_TEACHER)
    assert d.distill.teacher_loss_source == "supervised law" and d.distill.feasible
    assert d.distill.compute == pytest.approx(c, rel=1e-9)
    assert d.distill.teacher_params == BIG_TEACHER["teacher_params"]


def test_question_errors_name_the_input():
    with pytest.raises(ValueError, match="^question: unknown 'both'; allowed: data-limited"):
        GateQuery(student_params=1e9, student_tokens=1e10, question="both", **BIG_TEACHER).validate()
    with pytest.raises(ValueError, match="^compute: a FLOP budget asks the compute-limited question"):
        GateQuery(student_params=1e9, compute=1e21, **BIG_TEACHER).validate()
    # data-limited: the teacher's size is not needed (nothing is charged)
    GateQuery(student_params=1e6, student_tokens=1e8, teacher_loss=2.6).validate()


def test_calibrated_set_accepts_a_measured_teacher_loss():
    q = GateQuery(student_params=1e6, student_tokens=1e8, teacher_loss=2.6, teacher_params=1e7)
    d = decide(q, CALIBRATED)
    assert d.distill.teacher_loss == 2.6 and d.distill.teacher_loss_source == "measured"
    assert d.coefficients == "calibrated" and d.in_support and d.warnings == ()
    assert d.distill.loss == pytest.approx(float(distillation_loss(1e6, 1e8, 2.6, CALIBRATED)))


# ---------------------------------------------------------------- errors and warnings


@pytest.mark.parametrize("kwargs, match", [
    ({"student_params": 0.0, "student_tokens": 1e10}, "^student_params"),
    ({"student_params": float("nan"), "student_tokens": 1e10}, "^student_params"),
    ({"student_params": 1e9, "student_tokens": -1.0}, "^student_tokens"),
    ({"student_params": 1e9, "compute": float("inf")}, "^compute"),
    ({"student_params": 1e9, "student_tokens": 1e10, "compute": 1e21}, "^student_tokens/compute"),
    ({"student_params": 1e9}, "^student_tokens/compute"),
    ({"student_params": 1e9, "student_tokens": 1e10, "scenario": "free"}, "^scenario.*teacher-inference"),
    ({"student_params": 1e9, "student_tokens": 1e10, "teacher_params": None}, "^teacher_params/teacher_tokens/"),
    ({"student_params": 1e9, "student_tokens": 1e10, "teacher_params": 0}, "^teacher_params"),
    ({"student_params": 1e9, "student_tokens": 1e10, "teacher_tokens": None}, "teacher_params/teacher_tokens"),
    ({"student_params": 1e9, "compute": 1e12, "question": "compute-limited"}, "^compute: .*one training step"),
    ({"student_params": 1e9, "student_tokens": 1e10, "n_ctx": 0}, "^n_ctx"),
])
def test_bad_queries_name_the_argument(kwargs, match):
    full = {**BIG_TEACHER, **kwargs}
    with pytest.raises(ValueError, match=match):
        GateQuery(**full).validate()
    with pytest.raises(ValueError, match=match):
        decide(GateQuery(**full), PAPER)


def test_teacher_inference_needs_the_teacher_size():
    with pytest.raises(ValueError, match="^teacher_params: scenario 'teacher-inference'"):
        GateQuery(student_params=1e6, student_tokens=1e8, teacher_loss=2.6, question="compute-limited").validate()
    GateQuery(student_params=1e6, student_tokens=1e8, teacher_loss=2.6, scenario="best-case").validate()


def test_measured_teacher_loss_with_paper_coefficients_is_refused():
    q = GateQuery(student_params=1e9, student_tokens=1e10, teacher_loss=2.0, **BIG_TEACHER)
    with pytest.raises(ValueError, match="^teacher_loss: .*'paper'.*loss scale"):
        decide(q, PAPER)


def test_out_of_support_query_warns_and_says_so():
    q = GateQuery(student_params=1e6, student_tokens=1e8, teacher_params=1e7, teacher_tokens=2e8)
    with pytest.warns(OutOfSupportWarning) as record:
        d = decide(q, PAPER)
    assert sorted(str(r.message) for r in record) == sorted(d.warnings)
    assert not d.in_support
    assert any(w.startswith("student_params=") for w in d.warnings)
    assert any(w.startswith("teacher_params=") for w in d.warnings)
    assert d.to_dict()["in_support"] is False


def test_in_support_query_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = decide(GateQuery(student_params=1e9, student_tokens=2e10, **BIG_TEACHER), PAPER)
    assert d.in_support and d.warnings == ()


def test_calibrated_support_covers_tokens_and_teacher_loss():
    q = GateQuery(student_params=1e6, student_tokens=1e10, teacher_loss=1.5, teacher_params=1e7)
    with pytest.warns(OutOfSupportWarning):
        d = decide(q, CALIBRATED)
    assert {w.split("=")[0] for w in d.warnings} == {"student_tokens", "teacher_loss"}


def test_support_bounds_allow_float32_rounding_of_the_same_teacher_loss():
    # the teacher stage stores its loss from float32; the sweep measured the same teacher in float64
    edge = dict(student_params=1e6, student_tokens=1e8, teacher_params=1e7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = decide(GateQuery(teacher_loss=float(np.float32(3.5 + 3e-7)), **edge), CALIBRATED)
    assert d.in_support
    with pytest.warns(OutOfSupportWarning):
        assert not decide(GateQuery(teacher_loss=3.5001, **edge), CALIBRATED).in_support


# ---------------------------------------------------------------- output


def test_to_dict_is_json_and_complete():
    d = _decide(student_params=1e9, compute=1e21, **BIG_TEACHER)
    out = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    for key in ("decision", "reason", "scenario", "coefficients", "in_support", "warnings",
                "crossover_tokens", "supervised", "distill", "query"):
        assert key in out
    assert set(out["supervised"]) >= {"loss", "tokens", "compute"}
    assert set(out["distill"]) >= {"loss", "teacher_loss", "tokens", "compute", "teacher_params", "teacher_tokens"}
    assert out["query"]["compute"] == 1e21 and out["coefficients"] == "paper"
    assert out["decision"] in ("distill", "supervised")


def test_no_crossover_is_reported_as_none():
    # A 143M student cannot reach L_T = 2.3 alone, so the law has distillation ahead at every D_S.
    assert crossover_tokens(1.43e8, 2.3, PAPER) is None
    d = decide(GateQuery(student_params=1.43e8, student_tokens=1e10, teacher_loss=2.3, teacher_params=1e9),
               dataclasses.replace(PAPER, name="calibrated-copy"))
    assert d.crossover_tokens is None and "distillation is better throughout" in d.crossover_note
    assert json.dumps(d.to_dict(), allow_nan=False)


# A fit of the embedded default's own calibration sweep (make run, 2026-11-27): small runs,
# a distillation law whose margin over supervised swings around zero near the query.
SMALL_SCALE_FIT = {
    "name": "calibrated",
    "supervised": {"A": 616579485418658.4, "B": 7281968241.074191, "E": 0.9155502992375175,
                   "alpha": 2.756251157833059, "beta": 1.189195781270874, "gamma": 0.1885334849979842},
    "distillation": {"A": 2988958584609.1816, "B": 3572.6217848033093, "alpha": 2.9998609411905615,
                     "beta": 0.4492313781348509, "c0": 2.104234298966321, "c1": 20584.183182232628,
                     "d1": 1.2583574989257968, "f1": 0.04432500431018494, "gamma": 1.1987831593252924},
    "support": {"student_params": [27792.0, 332448.0], "student_tokens": [203200.0, 812800.0],
                "teacher_loss": [4.280160969314205, 4.474318330558911]}}


def test_crossover_below_the_papers_range_is_found_and_an_unstable_margin_is_said():
    from distill.law import coefficients_from_dict

    coefs = coefficients_from_dict(SMALL_SCALE_FIT)
    query = GateQuery(student_params=106816.0, student_tokens=609600.0, teacher_loss=4.4743, teacher_params=803968.0,
                      n_ctx=128, n_vocab=2048)
    d = decide(query, coefs)
    # distillation wins at the query and supervised from ~6.9e5 tokens on: a crossover under
    # the paper's 1e6 floor, which a search starting at 1e6 missed ("supervised throughout")
    assert d.decision == "distill"
    assert query.student_tokens < d.crossover_tokens < 1e6
    margin = lambda tokens: (supervised_loss(query.student_params, tokens, coefs.supervised)
                             - distillation_loss(query.student_params, tokens, query.teacher_loss, coefs))
    assert margin(d.crossover_tokens * 1.01) < 0 < margin(d.crossover_tokens * 0.99)
    assert all(margin(t) < 0 for t in np.geomspace(d.crossover_tokens * 1.01, 1e17, 50))
    assert "changes sign" in d.crossover_note and "cannot tell the branches apart" in d.crossover_note


def test_reason_and_table_carry_the_numbers():
    d = _decide(student_params=1e9, student_tokens=2e10, **BIG_TEACHER)
    assert d.reason.startswith("distill:") and f"{d.distill.loss:.4f}" in d.reason
    assert f"{d.supervised.loss:.4f}" in d.reason and "paper" in d.reason
    table = format_table(d)
    assert "DISTILL" in table and f"{d.supervised.loss:.4f}" in table and f"{d.distill.loss:.4f}" in table
    assert "teacher-inference" in table and "crossover" in table


def test_decision_map_writes_png(tmp_path):
    q = GateQuery(student_params=1e9, student_tokens=2e10, **BIG_TEACHER)
    path = plot_decision_map(q, PAPER, tmp_path / "sub" / "map.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _embedded_default_coefficients():
    """A calibrated set like the embedded default's: fitted to noisy runs of 2x32-2x64 students
    (2.5e4-1e5 parameters) on 1.5e5-6.1e5 tokens with two teachers, losses ~4-5 nats on a
    2048-token vocabulary. Fits on such a narrow range extrapolate wildly outside it."""
    from distill.law import (CoefficientSet, DistillationCoefficients, SupervisedCoefficients,
                             coefficient_set_from_fits, fit_distillation, fit_supervised)

    sup = SupervisedCoefficients(E=2.6, A=40.0, B=300.0, alpha=0.35, beta=0.4, gamma=0.9)
    truth = CoefficientSet("truth", sup, DistillationCoefficients(
        c0=0.5, c1=2.0, d1=1.1, f1=0.5, A=30.0, B=400.0, alpha=0.35, beta=0.45, gamma=0.8))
    rng = np.random.default_rng(0)
    n, d = np.meshgrid([2.46e4, 5.5e4, 9.8e4], np.geomspace(1.52e5, 6.1e5, 4))
    n, d = n.ravel(), d.ravel()
    noisy = lambda x: x * (1 + 0.004 * rng.standard_normal(x.shape))  # noqa: E731 - seed noise
    l_sup = noisy(np.asarray(supervised_loss(n, d, sup)))
    n2, d2, l_t = np.tile(n, 2), np.tile(d, 2), np.repeat([3.9, 4.2], n.size)
    l_dist = noisy(np.asarray(distillation_loss(n2, d2, l_t, truth)))
    fs = fit_supervised(n, d, l_sup, n_starts=8)
    fd = fit_distillation(n2, d2, l_t, l_dist, fs.coefficients, n_starts=8)
    return coefficient_set_from_fits("calibrated", fs, fd)


def test_decision_map_of_the_embedded_default_shows_the_query(tmp_path):
    from distill.gate import decision_map

    coefs = _embedded_default_coefficients()
    assert coefs.support["student_tokens"] == pytest.approx((1.52e5, 6.1e5))
    query = GateQuery(student_params=9.8e4, student_tokens=6.1e5, teacher_params=7.9e5, teacher_loss=3.9,
                      n_ctx=128, n_vocab=2048)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decision = decide(query, coefs)
    m = decision_map(query, coefs, decision)
    # the axes hold the query and the whole support
    for key, axis, value in (("student_params", m.log_n, 9.8e4), ("student_tokens", m.log_d, 6.1e5)):
        lo, hi = coefs.support[key]
        assert axis[0] < math.log10(lo) and math.log10(hi) < axis[-1]
        assert axis[0] < math.log10(value) < axis[-1]
    row, col = m.cell(9.8e4, 6.1e5)
    assert np.isfinite(m.margin[row, col]) and m.trusted[row, col]  # the query is coloured, inside support
    assert math.isfinite(m.vmax) and 0.01 <= m.vmax <= 5.0  # a few nats, not the extrapolated 1e7
    drawn = m.margin[np.isfinite(m.margin)]
    assert drawn.size and np.all(np.abs(drawn) <= math.log(2048))  # nothing beyond ln V is drawn
    path = plot_decision_map(query, coefs, tmp_path / "map.png", decision=decision)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decision_map_spans_the_crossover_and_draws_it_smoothly():
    from distill.gate import decision_map

    q = GateQuery(student_params=1e9, student_tokens=1e10, **BIG_TEACHER)
    d = _decide(**dataclasses.asdict(q))
    m = decision_map(q, PAPER, d)
    assert m.log_d[0] < math.log10(d.crossover_tokens) < m.log_d[-1]
    line = m.cross_log_d[np.isfinite(m.cross_log_d)]
    assert line.size > 50
    assert np.max(np.abs(np.diff(line))) < 0.1  # smooth: no steps between neighbouring columns
    row, col = m.cell(1e9, 1e10)
    assert np.isfinite(m.margin[row, col]) and m.trusted[row, col]


def test_decision_map_refuses_cells_where_a_law_predicts_more_than_ln_v(tmp_path):
    from distill.gate import decision_map

    # The paper's law at the tiny test project's scale: the teacher's predicted loss (16.9)
    # is above ln 320 = 5.77 everywhere, so nothing is coloured and the map says so.
    q = GateQuery(student_params=4.14e3, student_tokens=4.96e3, teacher_params=2.68e4, teacher_tokens=7.44e3,
                  n_ctx=32, n_vocab=320)
    d = _decide(**dataclasses.asdict(q))
    assert any("outside (0, ln V = 5.77]" in w for w in d.warnings)
    m = decision_map(q, PAPER, d)
    assert m.refused_cells == m.margin.size and not np.isfinite(m.margin).any()
    assert plot_decision_map(q, PAPER, tmp_path / "map.png", decision=d).stat().st_size > 5000
