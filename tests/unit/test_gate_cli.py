"""`distill gate` as a new user meets it: every bad input is one line naming it, exit 2."""

import json

import pytest
from typer.testing import CliRunner

from distill.law import PAPER, coefficients_to_dict
from flows.cli import app

QUERY = ["gate", "--question", "data-limited", "--student-params", "5e8", "--student-tokens", "1e10",
         "--teacher-params", "7e9", "--teacher-tokens", "2e11"]


def _run(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def _one_error_line(code, out, *needles):
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out
    for needle in needles:
        assert needle in lines[0], out


def _coefficients(tmp_path, law, key, value):
    raw = coefficients_to_dict(PAPER)
    raw["name"] = "edited"
    raw[law][key] = value
    path = tmp_path / f"{law}_{key}.json"
    path.write_text(json.dumps(raw))
    return path


def test_issue_case_compute_limited_with_teacher_pretraining_says_supervised():
    code, out = _run(["gate", "--question", "compute-limited", "--student-params", "5e8", "--student-tokens",
                      "1e10", "--teacher-params", "7e9", "--teacher-tokens", "2e12", "--scenario",
                      "teacher-pretraining", "--n-ctx", "2048", "--json"])
    assert code == 0, out
    decision = json.loads(out[out.index("{"):])
    assert decision["decision"] == "supervised" and decision["question"] == "compute-limited"
    assert decision["scenario"] == "teacher-pretraining" and decision["teacher_costs_charged"] is True
    assert decision["distill_feasible"] is False


def test_plot_under_a_file_or_onto_a_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    _one_error_line(*_run(QUERY + ["--plot", str(tmp_path / "afile" / "map.png")]), "--plot", "is a file")
    _one_error_line(*_run(QUERY + ["--plot", str(tmp_path)]), "--plot", "is a folder")


@pytest.mark.parametrize("law, key, value, needle", [
    ("supervised", "E", -5.0, "'supervised.E' must be >= 0"),
    ("supervised", "alpha", -0.4, "'supervised.alpha' must be >= 0"),
    ("distillation", "c1", -1.0, "'distillation.c1' must be > 0"),
    ("distillation", "f1", 0.0, "'distillation.f1' must be > 0"),
    ("distillation", "d1", -2.0, "'distillation.d1' must be > 0"),
])
def test_coefficients_with_a_wrong_sign_are_refused(tmp_path, law, key, value, needle):
    path = _coefficients(tmp_path, law, key, value)
    _one_error_line(*_run(QUERY + ["--coefficients", str(path)]), str(path), needle)


def test_non_utf8_coefficients_file_names_the_file(tmp_path):
    path = tmp_path / "coefficients.json"
    path.write_bytes(b"\xff\xfe{}")
    _one_error_line(*_run(QUERY + ["--coefficients", str(path)]), str(path), "UTF-8")


@pytest.mark.parametrize("tokens", ["1e20", "1e-300"])
def test_student_tokens_far_outside_the_support_warn(tokens):
    args = QUERY.copy()
    args[args.index("--student-tokens") + 1] = tokens
    code, out = _run(args + ["--json"])
    assert code == 0, out
    decision = json.loads(out[out.index("{"):])
    assert decision["in_support"] is False
    assert any(w.startswith("student_tokens=") and "outside the support" in w for w in decision["warnings"])
    assert "warning: student_tokens=" in out and "gate.py" not in out  # no internal file:line


def test_missing_student_params_does_not_run_the_stage():
    _one_error_line(*_run(["gate"]), "--student-params: missing", "--stage")
    _one_error_line(*_run(["gate", "--json", "--student-tokens", "1e9"]), "--student-params: missing")
    _one_error_line(*_run(["gate", "--stage", "--student-params", "5e8"]), "--stage", "--student-params")


def test_question_is_required_and_checked():
    args = [a for a in QUERY if a not in ("--question", "data-limited")]
    _one_error_line(*_run(args), "--question: missing", "data-limited", "compute-limited")
    args = QUERY.copy()
    args[args.index("--question") + 1] = "both"
    _one_error_line(*_run(args), "--question: 'both'")


def test_teacher_not_larger_than_the_student_warns_what_the_laws_assume():
    args = QUERY.copy()
    args[args.index("--teacher-params") + 1] = "1e8"
    code, out = _run(args)
    assert code == 0, out
    assert "warning: teacher_params=1e+08 is not larger than student_params=5e+08" in out
    assert "teachers larger than their students" in out


def test_teacher_size_not_required_where_unused():
    # compute-limited teacher pretraining without a teacher: the gate picks one
    code, out = _run(["gate", "--question", "compute-limited", "--student-params", "5e8", "--compute", "1e21",
                      "--scenario", "teacher-pretraining"])
    assert code == 0 and "compute-optimal teacher" in out, out
    # data-limited: the teacher's cost is not charged, a measured loss is enough
    raw = coefficients_to_dict(PAPER)
    assert raw["support"]["student_tokens"] == [1e9, 5.12e11]


def test_n_ctx_defaults_to_the_papers_4096():
    code, out = _run(QUERY + ["--json"])
    assert code == 0
    assert json.loads(out[out.index("{"):])["query"]["n_ctx"] == 4096
