"""Stage ``evaluate``: student vs teacher on the validation blocks, tracked in MLflow.

Metrics: validation cross-entropy and perplexity of both, KL(teacher ‖ student), top-1
agreement, inference tokens/s of both, and the gate's predicted vs the actual student
loss. Writes ``reports/metrics.json``; logs params, the DVC hashes of the data used, the
git commit, the decision, metrics and plots to MLflow, and registers the student
(transformers flavour, with its tokenizer) as a new model version.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from distill.blocks import read_blocks
from distill.config import Config
from distill.io import read_json, write_json
from distill.losses import divergence
from distill.models import count_parameters, load_causal_lm
from distill.tokenizer import load_tokenizer
from tasks.common import (DECISION, DECISION_MAP, METRICS, PREPARED, REPORTS, STUDENT_DIR,
                          TEACHER_DIR, TRAIN_REPORT, log_to_mlflow, stage_main)


def run(cfg: Config, out: Path = METRICS) -> dict:
    """Evaluate, write ``reports/metrics.json`` and log/register in MLflow; returns the metrics."""
    manifest = read_json(PREPARED / "manifest.json")
    decision = read_json(DECISION)
    vocab = manifest["tokenizer"]["vocab_size"]
    _, blocks = read_blocks(PREPARED / "val", limit=cfg.evaluate.max_blocks)
    student = load_causal_lm(STUDENT_DIR, cfg.student.trust_remote_code).eval()
    teacher = load_causal_lm(TEACHER_DIR, cfg.teacher.trust_remote_code).eval()
    metrics = compare_models(student, teacher, blocks, cfg.evaluate.batch_size, vocab)
    predicted = decision[decision["decision"]]["loss"]
    metrics.update(
        decision=decision["decision"],
        gate={"coefficients": decision["coefficients"], "in_support": decision["in_support"],
              "predicted_student_loss": predicted,
              "actual_minus_predicted": metrics["student"]["val_loss"] - predicted},
        val_blocks=len(blocks), val_tokens=int(blocks[:, 1:].size),
    )
    write_json(out, metrics)
    print(summary_line(metrics))
    track_in_mlflow(cfg, metrics, decision, student, manifest)
    return metrics


@torch.inference_mode()
def compare_models(student, teacher, blocks: np.ndarray, batch_size: int, vocab: int) -> dict:
    """Loss, perplexity, speed and size of both models, and how closely the student follows."""
    sums = {"student_nll": 0.0, "teacher_nll": 0.0, "kl": 0.0, "agree": 0.0}
    seconds = {"student": 0.0, "teacher": 0.0}
    count = 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[start:start + batch_size].astype(np.int64))
        inputs, targets = ids[:, :-1], ids[:, 1:].reshape(-1)
        logits = {}
        for name, model in (("student", student), ("teacher", teacher)):
            t0 = time.perf_counter()
            logits[name] = model(input_ids=inputs).logits[..., :vocab].float().flatten(0, 1)
            seconds[name] += time.perf_counter() - t0
        s_logp, t_logp = F.log_softmax(logits["student"], -1), F.log_softmax(logits["teacher"], -1)
        sums["student_nll"] += F.nll_loss(s_logp, targets, reduction="sum").item()
        sums["teacher_nll"] += F.nll_loss(t_logp, targets, reduction="sum").item()
        sums["kl"] += divergence(t_logp, s_logp, "forward_kl").sum().item()
        sums["agree"] += (s_logp.argmax(-1) == t_logp.argmax(-1)).sum().item()
        count += targets.numel()
    result = {}
    for name, model in (("student", student), ("teacher", teacher)):
        loss = sums[f"{name}_nll"] / count
        result[name] = {"val_loss": loss, "perplexity": math.exp(loss),
                        "parameters": count_parameters(model),
                        "tokens_per_s": count / max(seconds[name], 1e-9)}
    result["kl_teacher_student"] = sums["kl"] / count
    result["top1_agreement"] = sums["agree"] / count
    result["student_speedup"] = result["student"]["tokens_per_s"] / result["teacher"]["tokens_per_s"]
    return result


def summary_line(m: dict) -> str:
    """One readable line of the headline numbers."""
    return (f"student {m['student']['val_loss']:.4f} vs teacher {m['teacher']['val_loss']:.4f} "
            f"nats/token (gate predicted {m['gate']['predicted_student_loss']:.4f}, "
            f"{m['gate']['coefficients']} coefficients); KL(teacher‖student) "
            f"{m['kl_teacher_student']:.4f}, top-1 agreement {m['top1_agreement']:.1%}, "
            f"student {m['student_speedup']:.1f}× faster")


def dvc_hashes(lock_path: Path = Path("dvc.lock")) -> dict[str, str]:
    """The md5 of every stage output recorded in ``dvc.lock`` (data lineage); {} before any lock."""
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    return {out["path"]: out.get("md5", "") for stage in lock.get("stages", {}).values()
            for out in stage.get("outs", [])}


def track_in_mlflow(cfg: Config, metrics: dict, decision: dict, student, manifest: dict) -> None:
    """Params, data hashes, decision, metrics, plots and the registered student."""
    import mlflow

    if mlflow.active_run() is None:
        return
    hashes = dvc_hashes()
    log_to_mlflow(params={"config": cfg.to_dict(), "dvc": hashes, "decision": decision["decision"]},
                  metrics={k: v for k, v in metrics.items() if k not in ("decision",)},
                  artifacts=[METRICS, DECISION, TRAIN_REPORT, DECISION_MAP,
                             REPORTS / "student_loss.png", REPORTS / "teacher_loss.png"])
    mlflow.set_tags({"distill.decision": decision["decision"],
                     "distill.data.prepared": hashes.get("data/prepared", "")})
    log_data_lineage(hashes, manifest)
    register_student(cfg, metrics, student)


def log_data_lineage(hashes: dict[str, str], manifest: dict) -> None:
    """Record the prepared data's DVC hash as the run's input dataset."""
    import mlflow
    import pandas as pd

    digest = hashes.get("data/prepared")
    if not digest:
        return
    frame = pd.DataFrame([{"split": k, "blocks": v["blocks"], "tokens": v["tokens"]}
                          for k, v in manifest["splits"].items()])
    dataset = mlflow.data.from_pandas(frame, source=str(PREPARED.resolve()), name="prepared",
                                      digest=digest.removesuffix(".dir")[:36])
    mlflow.log_input(dataset, context="validation")


def register_student(cfg: Config, metrics: dict, model) -> None:
    """Log the student (already loaded) in the transformers flavour with its tokenizer and
    register a version."""
    import mlflow
    import transformers

    tokenizer = load_tokenizer(STUDENT_DIR)
    # Explicit requirements: inference by import fails where torchvision is absent.
    requirements = [f"torch=={torch.__version__.split('+')[0]}",
                    f"transformers=={transformers.__version__}"]
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer}, name="student",
        task="text-generation", registered_model_name=cfg.evaluate.registered_model,
        pip_requirements=requirements, metadata={"val_loss": metrics["student"]["val_loss"]})
    print(f"registered {cfg.evaluate.registered_model} version {info.registered_model_version}")


def main() -> None:
    """``python -m tasks.evaluate``."""
    stage_main("evaluate", run)


if __name__ == "__main__":
    main()
