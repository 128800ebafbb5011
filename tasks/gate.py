"""Stage ``gate``: distil or train the student supervised? Decided by the scaling laws.

Reads the teacher's description (``teacher.json``), sizes the student and its token
budget from the params, asks ``distill.gate.decide`` and writes ``gate/decision.json``
(both branches' predicted losses and compute, the reason, which coefficients, whether the
query is inside their support) and the decision map PNG.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import torch

from distill.config import Config, ModelConfig
from distill.gate import GateQuery, decide, format_table, plot_decision_map
from distill.io import read_json, write_json
from distill.law import load_coefficients, scenario_deltas
from distill.models import build_llama, count_parameters
from distill.training import tokens_per_run
from tasks.common import (COEFFICIENTS, DECISION, DECISION_MAP, PREPARED, TEACHER_JSON,
                          log_to_mlflow, stage_main)


def run(cfg: Config, out: Path = DECISION, map_path: Path = DECISION_MAP) -> dict:
    """Decide and write ``decision.json`` and the decision map; returns the decision dict."""
    teacher = read_json(TEACHER_JSON)
    manifest = read_json(PREPARED / "manifest.json")
    coefs = load_coefficients(coefficient_source(cfg.gate.coefficients))
    query = build_query(cfg, teacher, manifest, calibrated=coefs.name != "paper")
    with warnings.catch_warnings(record=True):
        # Out-of-support warnings are also in decision.warnings, printed with the table.
        warnings.simplefilter("always")
        decision = decide(query, coefs)
    result = decision.to_dict()
    result["law_decision"] = result["decision"]
    if cfg.gate.force != "none":
        result["decision"] = cfg.gate.force
        result["reason"] = (f"forced by gate.force = {cfg.gate.force} (the law said "
                            f"{result['law_decision']}: {result['reason']})")
    result["train_steps"] = branch_steps(cfg, manifest, decision)
    if result["train_steps"][result["decision"]] < 1:
        forced = f" (gate.force = {cfg.gate.force})" if cfg.gate.force != "none" else ""
        raise ValueError(f"gate.question: the compute-limited budget leaves the {result['decision']} "
                         f"branch{forced} less than one train step of tokens: {result['reason']}")
    result["coefficients_quality"] = coefficient_quality(coefs)
    result["student"] = {"non_embedding_params": query.student_params, "tokens": query.student_tokens}
    result["teacher"] = {"fingerprint": teacher["fingerprint"], "val_loss": teacher["val_loss"],
                         "non_embedding_params": teacher["parameters"]["non_embedding"],
                         "tokens": teacher["tokens"]}
    plot_decision_map(query, coefs, map_path, decision=decision)
    write_json(out, result)
    print(format_table(decision))  # includes the out-of-support warnings
    print(f"decision: {result['decision']} — {result['reason']}")
    log_to_mlflow(params={"gate": {"coefficients": coefs.name, "question": query.question,
                                   "scenario": query.scenario, "force": cfg.gate.force}},
                  metrics={"gate_supervised_loss": result["supervised"]["loss"],
                           "gate_distill_loss": result["distill"]["loss"],
                           "gate_distill": float(result["decision"] == "distill")},
                  artifacts=[out, map_path])
    return result


def branch_steps(cfg: Config, manifest: dict, decision) -> dict[str, int]:
    """Optimizer steps each branch trains for: train.steps for both in the data-limited
    question; in the compute-limited one, the distill branch's tokens after the teacher's
    costs, in whole steps at train.batch_size (0 when it gets none)."""
    per_step = tokens_per_run(dataclasses.replace(cfg.train, steps=1), manifest["block_size"],
                              cfg.train.num_workers)
    steps = {"supervised": cfg.train.steps, "distill": cfg.train.steps}
    if decision.query.charges_teacher:
        # the tokens come back from FLOPs through floats: a whole number of steps may land a
        # hair below itself (best-case charges nothing and must give train.steps)
        steps["distill"] = min(cfg.train.steps, math.floor(decision.distill.tokens / per_step + 1e-6))
    return steps


def coefficient_source(setting: str) -> str:
    """``auto`` → the calibrated ``gate/coefficients.json`` when present, else ``paper``."""
    if setting != "auto":
        return setting
    if not COEFFICIENTS.is_file():
        return "paper"
    calibration = read_json(COEFFICIENTS)
    if calibration.get("status") == "skipped":  # DVC re-runs calibrate when the setting changes
        raise ValueError(f"{COEFFICIENTS}: the calibration was skipped ({calibration['reason']}); "
                         "with gate.coefficients = auto run the calibrate stage first (dvc repro gate)")
    return str(COEFFICIENTS)


def coefficient_quality(coefs) -> dict:
    """How far to trust the coefficients: a calibrated set's held-out errors and point counts,
    or the paper's own note (valid only at its scale)."""
    keys = ("heldout_supervised", "heldout_distill", "supervised_points", "distillation_points",
            "supervised_max_abs_rel_error", "distillation_max_abs_rel_error", "note")
    forms = ("margin_error_", "margin_mean_abs_", "distillation_error_floor_", "distill_below_teacher_")
    quality = {k: v for k, v in coefs.quality.items() if k in keys or k.startswith(forms)}
    if coefs.name != "paper" and not any(k.startswith("heldout_") for k in quality):
        quality["note"] = "no points were held out: the prediction error was not measured"
    return quality


def build_query(cfg: Config, teacher: dict, manifest: dict, calibrated: bool) -> GateQuery:
    """The gate's question for this run: student size and tokens (train.steps' tokens: the
    fixed data, or in the compute-limited question the budget of training on them
    supervised), the teacher, the scenario."""
    block, vocab = manifest["block_size"], manifest["tokenizer"]["vocab_size"]
    teacher_tokens = teacher["tokens"] or None
    if not calibrated and teacher_tokens is None:
        raise ValueError("teacher.pretrain_tokens: the paper's law describes a teacher by its "
                         "parameters and pretraining tokens; set teacher.pretrain_tokens for a "
                         "given teacher (or calibrate and use gate.coefficients: auto)")
    if (cfg.gate.question == "compute-limited" and scenario_deltas(cfg.gate.scenario)[1]
            and teacher_tokens is None):
        raise ValueError(f"teacher.pretrain_tokens: gate.question = compute-limited with gate.scenario = "
                         f"{cfg.gate.scenario} charges the teacher's pretraining, so its tokens are needed; "
                         "set teacher.pretrain_tokens for a given teacher")
    return GateQuery(
        student_params=float(student_non_embedding_params(cfg.student, vocab, block)),
        student_tokens=float(tokens_per_run(cfg.train, block, cfg.train.num_workers)),
        teacher_params=float(teacher["parameters"]["non_embedding"]),
        teacher_tokens=float(teacher_tokens) if teacher_tokens else None,
        teacher_loss=float(teacher["val_loss"]) if calibrated else None,
        scenario=cfg.gate.scenario, question=cfg.gate.question, n_ctx=block, n_vocab=vocab,
    ).validate()


def student_non_embedding_params(model: ModelConfig, vocab: int, block: int) -> int:
    """N_S without allocating weights (the model is built on the meta device)."""
    with torch.device("meta"):
        if model.model == "scratch":
            student = build_llama(model, vocab, block, seed=0)
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(model.model, trust_remote_code=model.trust_remote_code)
            student = AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    return count_parameters(student)["non_embedding"]


def main() -> None:
    """``python -m tasks.gate``."""
    stage_main("gate", run)


if __name__ == "__main__":
    main()
