"""Calibration: planning the sweep, content-addressed resume, one point's training, the fit
and the coefficients file it writes (which the gate then reads)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
import math
import warnings

import numpy as np
import pytest

from distill.calibration import (PointStore, SweepContext, SweepData, batch_indices, fit_calibration,
                                 label_teacher, loss_settings, mean_over_seeds, plan_points, plan_sweep,
                                 point_key,
                                 split_heldout, teacher_point, train_point, warmup_for_steps,
                                 write_calibration)
from distill.config import ConfigError, DistillConfig, build_config
from distill.gate import GateQuery, UnreliableDecisionWarning, decide
from distill.io import sha256_bytes
from distill.law import (PAPER, DistillationCoefficients, SupervisedCoefficients, distillation_loss,
                         load_coefficients, supervised_loss)

BASE = {"student": {"d_model": 64}, "train": {"lr": 0.004, "steps": 300, "warmup_steps": 20},
        "calibrate": {"students": "1x48, 2x64, 3x96", "steps": "100, 300", "teachers": "pipeline, 3x96",
                      "teacher_steps": 0, "seeds": 1, "heldout_share": 0.0}}


def config(**calibrate):
    raw = {**BASE, "calibrate": {**BASE["calibrate"], **calibrate}}
    return build_config(raw)


def context(**kw):
    base = dict(data_hash="d0", eval_blocks=16, loss=loss_settings(DistillConfig()), pipeline_teacher="fp0")
    return SweepContext(**{**base, **kw})


# ---------------------------------------------------------------------------- planning

def test_plan_covers_sizes_budgets_and_teachers():
    points = plan_points(config())
    sup = [p for p in points if p.kind == "supervised"]
    dist = [p for p in points if p.kind == "distill"]
    # the pipeline's teacher distills all 3 sizes, the swept 3x96 (3 strengths: its run's
    # cooldowns at 300, 150 and 75 steps) only the 2 smaller ones
    assert len(sup) == 3 * 2 and len(dist) == 3 * 2 + 3 * 2 * 2
    assert {p.teacher for p in dist} == {"pipeline", "3x96@75", "3x96@150", "3x96@300"}
    assert {p.size for p in dist if p.teacher.startswith("3x96")} == {"1x48", "2x64"}
    assert [(p.size, p.steps) for p in points if p.kind == "teacher"] == [("3x96", s) for s in (75, 150, 300)]
    assert {(p.layers, p.d_model, p.heads) for p in sup} == {(1, 48, 3), (2, 64, 4), (3, 96, 6)}


def test_the_pipelines_own_run_is_a_point_and_lr_scales_with_width():
    cfg = config()
    points = plan_points(cfg)
    own = next(p for p in points if p.kind == "supervised" and p.size == "2x64" and p.steps == 300)
    assert own.lr == pytest.approx(cfg.train.lr) and own.warmup_steps == cfg.train.warmup_steps
    assert own.batch_size == cfg.train.batch_size
    wide = next(p for p in points if p.size == "3x96")
    assert wide.lr == pytest.approx(0.004 * (64 / 96) ** 0.5)
    short = next(p for p in points if p.steps == 100)
    # warmup–stable–decay: every budget shares the warm-up (its cooldown branches off the trunk)
    assert short.warmup_steps == 20 and short.schedule == "wsd" and short.run() == dataclasses.replace(
        next(p for p in points if p.kind == "supervised" and p.size == short.size and p.steps == 300), steps=0)
    cosine = plan_points(build_config({**BASE, "train": {**BASE["train"], "schedule": "cosine"}}))
    short = next(p for p in cosine if p.steps == 100)
    assert short.warmup_steps == round(100 * 20 / 300) and short.run() == short  # cosine: same shape, own run


def test_warmup_share_never_reaches_the_last_step():
    cfg = build_config({"train": {"steps": 10, "warmup_steps": 7, "schedule": "cosine"},
                        "calibrate": {"steps": "2, 4, 8"}})
    assert [warmup_for_steps(cfg, s) for s in (2, 4, 8)] == [1, 3, 6]
    cfg = build_config({"train": {"steps": 10, "warmup_steps": 7}, "calibrate": {"steps": "2, 4, 8"}})
    assert [warmup_for_steps(cfg, s) for s in (2, 4, 8)] == [1, 3, 7]


def test_sweep_teacher_runs_are_named_by_size_and_budget():
    points = plan_points(config())
    assert teacher_point(points, "3x96@300").steps == 300
    assert teacher_point(points, "3x96@75").kind == "teacher"
    with pytest.raises(ValueError, match="calibrate.teachers"):
        teacher_point(points, "9x9@10")


def test_a_swept_teacher_trains_for_teacher_steps_and_need_not_be_a_student():
    points = plan_points(config(students="1x48, 2x64", steps="100, 200, 300", teachers="pipeline, 3x96",
                                teacher_steps=600))
    sup = [(p.size, p.steps) for p in points if p.kind == "supervised"]
    assert sup == [(s, b) for s in ("1x48", "2x64") for b in (100, 200, 300)]
    # the teacher's own longer run (one run, three cooldowns): not configurations of the fit
    assert [(p.size, p.steps) for p in points if p.kind == "teacher"] == [("3x96", s) for s in (150, 300, 600)]
    assert len({p.run() for p in points if p.kind == "teacher"}) == 1
    assert {(p.size, p.teacher) for p in points if p.kind == "distill"} == {
        (s, t) for s in ("1x48", "2x64") for t in ("pipeline", "3x96@150", "3x96@300", "3x96@600")}
    # a teacher that is also a student keeps its student budgets and adds its own run
    both = plan_points(config(teacher_steps=600, teacher_strengths=1))
    assert [(p.kind, p.steps) for p in both if p.size == "3x96" and p.kind != "distill"] == [
        ("supervised", 100), ("supervised", 300), ("teacher", 600)]
    assert teacher_point(both, "3x96@600").steps == 600


def test_seeds_repeat_every_configuration_but_not_the_teachers_run():
    points = plan_points(config(teacher_steps=600, seeds=3))
    one = plan_points(config(teacher_steps=600))
    assert len([p for p in points if p.kind != "teacher"]) == 3 * len([p for p in one if p.kind != "teacher"])
    assert {p.seed for p in points if p.kind in ("supervised", "distill")} == {0, 1, 2}
    assert {p.seed for p in points if p.kind == "teacher"} == {0}
    assert teacher_point(points, "3x96@600").seed == 0


def run_record(kind, size, steps, seed, loss, teacher=""):
    return {"kind": kind, "size": size, "D": steps * 100, "L": loss, "key": f"{kind}{size}{steps}{teacher}{seed}",
            "point": {"seed": seed, "teacher": teacher, "steps": steps}}


def test_mean_over_seeds_averages_each_configuration_and_drops_teacher_runs():
    runs = [run_record("supervised", "2x64", 10, s, loss) for s, loss in ((1, 5.2), (0, 5.0), (2, 5.3))]
    runs += [run_record("distill", "2x64", 10, 0, 4.9, "pipeline"), run_record("teacher", "3x96", 60, 0, 4.0)]
    by_kind = {r["kind"]: r for r in mean_over_seeds(runs)}
    assert set(by_kind) == {"supervised", "distill"}
    sup = by_kind["supervised"]
    assert sup["L"] == pytest.approx(15.5 / 3)
    assert sup["L_runs"] == [5.0, 5.2, 5.3] and sup["seeds"] == [0, 1, 2] and sup["key"] == "supervised2x64100"
    assert sup["L_sem"] == pytest.approx(np.std([5.0, 5.2, 5.3], ddof=1) / 3 ** 0.5)
    assert by_kind["distill"]["L_sem"] == 0.0
    with pytest.raises(ValueError, match="mean_over_seeds"):
        fit_calibration(runs[:3], 0.0)


@pytest.mark.parametrize("calibrate, fragment", [
    ({"students": "2y64"}, "calibrate.students: '2y64' is not a size"),
    ({"students": "2x64, 2x64"}, "calibrate.students: sizes repeat"),
    ({"steps": "100, abc"}, "calibrate.steps"),
    ({"teachers": "pipeline, 4y128"}, "calibrate.teachers: '4y128' is not a size"),
    ({"teacher_steps": 200}, "calibrate.teacher_steps: 200 is shorter than the largest student budget (300"),
    ({"teachers": "pipeline, 2x40"}, "calibrate.teachers: d_model 40 of 2x40 must be divisible"),
    ({"head_dim": 32}, "d_model 48 of 1x48 must be divisible by calibrate.head_dim"),
    ({"heldout_share": 0.5}, "calibrate.heldout_share = 0.5"),
    ({"teachers": "pipeline", "steps": "100"}, "supervised law has 6 coefficients"),
    ({"heldout_share": 1.5}, "calibrate.heldout_share = 1.5 is out of range"),
    # the smallest size as the only teacher distills no student: nothing to fit Eq. 8 on
    ({"teachers": "1x48"}, "give 0 distillation configurations"),
])
def test_bad_calibrate_params_name_the_key(calibrate, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        config(**calibrate)
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------- keys and resume

def test_keys_change_with_what_changes_the_result():
    points = plan_points(config())
    sup = next(p for p in points if p.kind == "supervised")
    dist = next(p for p in points if p.kind == "distill" and p.teacher == "pipeline")
    ctx = context()
    key = lambda p, c=ctx: point_key(p, c, points)  # noqa: E731
    assert key(sup) == key(sup) and len({key(p) for p in points}) == len(points)
    assert key(sup, context(data_hash="d1")) != key(sup)
    # The loss settings and the teacher matter to distillation points only.
    other_loss = context(loss=loss_settings(DistillConfig(alpha=0.7)))
    assert key(sup, other_loss) == key(sup) and key(dist, other_loss) != key(dist)
    assert key(dist, context(pipeline_teacher="fp1")) != key(dist)
    assert key(dataclasses.replace(sup, lr=sup.lr * 2)) != key(sup)


def test_a_sweep_teachers_key_follows_its_teacher_run():
    cfg = config()
    points = plan_points(cfg)
    student = next(p for p in points if p.kind == "distill" and p.teacher == "3x96@150" and p.steps == 100)
    before = point_key(student, context(), points)
    teacher = teacher_point(points, "3x96@150")
    other = [dataclasses.replace(p, lr=p.lr * 2) if p == teacher else p for p in points]
    assert student in other  # the student's run is identical ...
    assert point_key(student, context(), other) != before  # ... its teacher not
    assert before == point_key(student, context(), points)


def test_store_skips_finished_points_and_replans_a_lost_teacher_model(tmp_path):
    points = plan_points(config())
    ctx, store = context(), PointStore(tmp_path)
    plan = plan_sweep(points, ctx, store)
    assert len(plan.pending) == len(points) and not plan.done
    for i, (p, k) in enumerate(zip(points, plan.keys)):
        if p.kind == "supervised":
            store.put(k, {"key": k, "kind": p.kind, "L": 5.0 + i})
    plan = plan_sweep(points, ctx, store)
    teacher_keys = [point_key(teacher_point(points, f"3x96@{s}"), ctx, points) for s in (75, 150, 300)]
    for i, (p, k) in enumerate(zip(points, plan.keys)):
        if p.kind == "teacher":
            store.put(k, {"key": k, "kind": p.kind, "L": 4.0})
    plan = plan_sweep(points, ctx, store)
    # Every supervised point is done; the teachers are not, as their model folders are missing.
    assert {points[i].kind for i in plan.pending} == {"distill", "teacher"}
    assert sorted(plan.keys[i] for i in plan.pending if points[i].kind == "teacher") == sorted(teacher_keys)
    for key in teacher_keys:
        store.model_dir(key).mkdir(parents=True)
    plan = plan_sweep(points, ctx, store)
    assert {points[i].kind for i in plan.pending} == {"distill"}
    assert store.get(plan.keys[0])["L"] == 5.0


def test_batches_cover_each_epoch_once_and_drop_the_remainder():
    idx = batch_indices(10, 4, steps=5, seed=0)
    assert idx.shape == (5, 4)
    assert sorted(idx[:2].ravel().tolist()) == sorted(set(idx[:2].ravel().tolist()))  # epoch 1: no repeats
    assert not np.array_equal(idx[:2], idx[2:4])  # the shuffle window is reseeded per epoch
    with pytest.raises(ValueError, match="train.batch_size"):
        batch_indices(3, 4, steps=1, seed=0)


# ---------------------------------------------------------------------------- one point

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    # A learnable stream: each token is the previous one + 1 (mod vocab), with a little noise.
    start = rng.integers(0, 64, size=(48, 1))
    blocks = ((start + np.arange(17)) % 64 + (rng.random((48, 17)) < 0.1) * 3) % 64
    tok_dir = tmp_path_factory.mktemp("tok")
    vocab = {f"t{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", pad_token="t1").save_pretrained(tok_dir)
    return SweepData(train=blocks[:40].astype(np.int32), val=blocks[40:].astype(np.int32), vocab_size=64,
                     eos_id=0, pad_id=1, tokenizer_dir=str(tok_dir))


def _point(kind="supervised", steps=30, teacher="", size="1x32"):
    cfg = build_config({"train": {"batch_size": 8, "lr": 0.01, "steps": 30, "warmup_steps": 3},
                        "student": {"d_model": 32}, "calibrate": {"students": "1x16, 1x32", "head_dim": 8,
                                                                  "steps": "10, 20, 30", "heldout_share": 0,
                                                                  "teachers": "pipeline, 1x32",
                                                                  "teacher_strengths": 1, "teacher_steps": 0}})
    return next(p for p in plan_points(cfg) if p.kind == kind and p.steps == steps and p.size == size
                and p.teacher == teacher)


def test_supervised_and_distilled_points_train_and_a_teacher_is_reusable(tiny_data, tmp_path):
    teacher_dir = tmp_path / "teacher"
    rec = train_point(_point(), tiny_data, model_out=str(teacher_dir))
    assert rec["D"] == 30 * 8 * 16 and rec["N"] > 0 and rec["L"] < math.log(64)
    assert (teacher_dir / "model.safetensors").is_file() and rec["model_dir"] == str(teacher_dir)
    labels = label_teacher(str(teacher_dir), tiny_data, top_k=8, temperature=1.0)
    assert labels["topk_ids"].shape == (40, 16, 8) and labels["rest_logprob"].shape == (40, 16)
    assert labels["topk_logprobs"].dtype == np.float16  # as the label stage stores them
    assert labels["teacher_loss"] == pytest.approx(rec["L"], rel=1e-4)  # same model, same val blocks
    dist = train_point(_point("distill", 20, "1x32@30", "1x16"), tiny_data, DistillConfig(top_k=8), labels)
    assert dist["L_T"] == labels["teacher_loss"] and math.isfinite(dist["L"])
    with pytest.raises(ValueError, match="need teacher labels"):
        train_point(_point("distill", 20, "1x32@30", "1x16"), tiny_data, DistillConfig(top_k=8))


# ---------------------------------------------------------------------------- the fit

SUP = SupervisedCoefficients(E=2.0, A=40.0, B=300.0, alpha=0.35, beta=0.4, gamma=0.9)
DIST = DistillationCoefficients(c0=0.5, c1=2.0, d1=1.1, f1=0.5, A=30.0, B=400.0, alpha=0.35,
                                beta=0.45, gamma=0.8)


def synthetic_records():
    """Points drawn from known laws at this project's scale (sizes 1e4-1e6, tokens 1e5-1e7)."""
    from distill.law import CoefficientSet

    truth = CoefficientSet("truth", SUP, DIST)
    records = []
    for n in np.geomspace(1e4, 1e6, 4):
        for d in np.geomspace(1e5, 1e7, 4):
            records.append({"kind": "supervised", "N": n, "D": d, "L": float(supervised_loss(n, d, SUP)),
                            "point": {"seed": 0, "teacher": ""}})
            for l_t in (2.6, 3.2):
                records.append({"kind": "distill", "N": n, "D": d, "L_T": l_t,
                                "L": float(distillation_loss(n, d, l_t, truth)),
                                "point": {"seed": 0, "teacher": f"t{l_t}"}})
    for i, r in enumerate(records):
        r.update(key=sha256_bytes(str(i).encode())[:20], size=f"{r['N']:.0f}")
    return records


def test_heldout_split_is_per_kind_and_reproducible():
    records = synthetic_records()
    held = split_heldout(records, 0.25)
    assert sum(r["key"] in held for r in records if r["kind"] == "supervised") == 4
    assert sum(r["key"] in held for r in records if r["kind"] == "distill") == 8
    assert split_heldout(list(reversed(records)), 0.25) == held
    assert split_heldout(records, 0.0) == set()


def test_fit_recovers_known_laws_and_writes_a_file_the_gate_uses(tmp_path):
    fit = fit_calibration(synthetic_records(), heldout_share=0.25, n_starts=8)
    for kind in ("supervised", "distill"):
        assert fit.heldout[kind]["max_abs"] < 2e-3, fit.heldout
    paths = tmp_path / "coefficients.json", tmp_path / "points.json", tmp_path / "fit.png"
    write_calibration(fit, *paths)
    coefs = load_coefficients(paths[0])
    assert coefs.name == "calibrated" and coefs.quality["heldout_distill"]["n"] == 8
    lo, hi = coefs.support["student_params"]
    assert 1e4 <= lo < hi <= 1e6 and coefs.support["student_tokens"][1] <= 1e7
    assert coefs.support["teacher_loss"] == (2.6, 3.2)
    assert paths[2].stat().st_size > 1000
    query = GateQuery(student_params=1e5, student_tokens=1e6, teacher_params=1e6, teacher_loss=2.6,
                      n_ctx=128, n_vocab=2048)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the support: no warning
        decision = decide(query, coefs)
    assert decision.in_support
    truth_margin = supervised_loss(1e5, 1e6, SUP) - decision.distill.loss
    assert (decision.decision == "distill") == (truth_margin > 0)
    with pytest.warns(UserWarning, match="outside the support"):
        decide(dataclasses.replace(query, student_params=1e8), coefs)


def test_teacher_terms_are_reported_with_intervals_and_their_teacher_count():
    from tasks.calibrate import teacher_terms_line

    records = synthetic_records()
    fit = fit_calibration(records, heldout_share=0.0, n_starts=4, n_bootstrap=4)
    assert fit.coefficients.quality["distinct_teacher_losses"] == 2  # 2.6 and 3.2: too few to identify
    line = teacher_terms_line(fit.coefficients)
    assert line.startswith("Eq. 8 teacher terms from 2 teacher losses: c0 ")
    assert all(f"{name} " in line for name in ("c1", "d1", "f1")) and line.count("[") == 4
    bare = teacher_terms_line(fit_calibration(records, heldout_share=0.0, n_starts=4).coefficients)
    assert "no intervals" in bare


def test_fit_records_what_the_laws_can_promise_and_the_gate_warns_on_a_margin_within_it():
    exact = fit_calibration(synthetic_records(), heldout_share=0.25, n_starts=8).coefficients.quality
    # points drawn from the laws: no distilled student below its teacher, margins predicted
    assert exact["distillation_error_floor_fitted"] == 0 and exact["distill_below_teacher_fitted"] == 0
    assert exact["margin_pairs_fitted"] >= 10 and exact["margin_pairs_heldout"] >= 1
    assert exact["margin_error_fitted"] < 0.01 < exact["margin_mean_abs_fitted"]
    records = synthetic_records()
    below = next(r for r in records if r["kind"] == "distill" and r["L_T"] == 3.2 and r["L"] > 3.3)
    below["L"] = 3.0  # a student measured below its teacher: Eq. 8 cannot follow it
    fit = fit_calibration(records, heldout_share=0.0, n_starts=8)
    q = fit.coefficients.quality
    assert q["distill_below_teacher_fitted"] == 1
    assert q["distillation_error_floor_fitted"] == pytest.approx(0.2 / 3.0)
    assert q["margin_error_fitted"] > exact["margin_error_fitted"]
    noisy = dataclasses.replace(fit.coefficients, quality={**q, "margin_error_fitted": 5.0})
    query = GateQuery(student_params=1e5, student_tokens=1e6, teacher_params=1e6, teacher_loss=2.6,
                      n_ctx=128, n_vocab=2048)
    with pytest.warns(UnreliableDecisionWarning, match="not reliable"):
        decision = decide(query, noisy)
    assert decision.in_support and any("margin error" in w for w in decision.warnings)


def test_fit_with_too_few_points_after_holding_out_is_refused():
    records = [r for r in synthetic_records() if r["kind"] == "supervised"][:7]
    records += [r for r in synthetic_records() if r["kind"] == "distill"][:12]
    with pytest.raises(ValueError, match="5 supervised points left to fit after holding out "
                                         "calibrate.heldout_share = 0.3, fewer than the 6"):
        fit_calibration(records, heldout_share=0.3, n_starts=4)
    records[-1:] = []  # 11 distillation points, 8 kept: too few for Eq. 8 (9 coefficients)
    with pytest.raises(ValueError, match="8 distillation points left .* fewer than the 9"):
        fit_calibration(records + [dict(r, key=f"x{i}", D=1.5 * r["D"]) for i, r in enumerate(records[:3])],
                        heldout_share=0.3, n_starts=4)


def test_paper_coefficients_are_flagged_outside_their_support_at_our_scale():
    query = GateQuery(student_params=1e5, student_tokens=6e5, teacher_params=8e5, teacher_tokens=8e5,
                      n_ctx=128, n_vocab=2048)
    with pytest.warns(UserWarning):
        decision = decide(query, PAPER)
    assert not decision.in_support and any("student_params" in w for w in decision.warnings)


def test_calibrate_runs_after_the_teacher_and_before_the_gate():
    from pathlib import Path

    from flows.calibrate import stages_up_to
    from flows.pipeline import stage_order

    dvc_yaml = Path(__file__).resolve().parents[2] / "dvc.yaml"
    assert stages_up_to("calibrate", dvc_yaml) == ["prepare", "teacher", "calibrate"]
    order = stage_order(dvc_yaml)
    assert order.index("teacher") < order.index("calibrate") < order.index("gate")
    with pytest.raises(ValueError, match="no stage 'calibrat'"):
        stages_up_to("calibrat", dvc_yaml)


def test_a_skipped_calibration_is_written_and_never_read_as_coefficients(tmp_path, monkeypatch):
    import json

    from tasks.calibrate import run as calibrate
    from tasks.gate import coefficient_source

    monkeypatch.chdir(tmp_path)  # nothing else here: a skip reads no data, teacher or store
    out, points, plot = Path("gate/coefficients.json"), Path("gate/points.json"), Path("gate/cal.png")
    result = calibrate(build_config({"gate": {"coefficients": "paper"}}), out, points, plot)
    assert result["status"] == "skipped" and "gate.coefficients = paper" in result["reason"]
    assert json.loads(out.read_text())["status"] == "skipped"
    assert json.loads(points.read_text())["points"] == [] and plot.stat().st_size > 1000
    assert coefficient_source("paper") == "paper"
    with pytest.raises(ValueError, match="calibration was skipped .* run the calibrate stage first"):
        coefficient_source("auto")  # auto never falls back silently on a skipped calibration


def test_the_calibrate_flow_refuses_when_the_gate_would_not_read_the_fit():
    from flows.calibrate import check_calibration_wanted

    check_calibration_wanted(build_config({}), Path("params.yaml"))  # auto: calibrate
    with pytest.raises(ValueError, match="params.yaml: gate.coefficients = paper: the calibrate stage only"):
        check_calibration_wanted(build_config({"gate": {"coefficients": "paper"}}), Path("params.yaml"))
