"""Stage ``evaluate``: student vs teacher on the validation blocks, tracked in MLflow.

Metrics: validation cross-entropy and perplexity of both, KL(teacher ‖ student), top-1 and
top-5 agreement, the expected calibration error (ECE) of both, inference tokens/s and sizes
of both, and the gate's predicted vs the actual student loss; greedy samples of both from
fixed prompts. Writes ``reports/metrics.json`` (DVC metrics), the loss curves and
calibration tables (DVC plots), a reliability diagram and the gate's outcome as PNGs; logs
params, the DVC hashes of the data used, the git commit, the decision, metrics and plots to
MLflow. Its last step registers the student (transformers flavour, with its tokenizer) and
gives the version the alias ``champion`` or ``challenger`` (``distill.registry``), so a run
that fails before that point leaves the aliases untouched. A champion measured on other data
is first re-evaluated here, on this run's validation blocks (``champion_remeasure``).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from distill import registry
from distill.blocks import read_blocks
from distill.config import Config, EvaluateConfig
from distill.io import read_json, sha256_bytes, write_json
from distill.losses import divergence
from distill.models import count_parameters, load_causal_lm
from distill.plots import plot_gate_outcome, plot_reliability
from distill.tokenizer import load_tokenizer
from tasks.common import (DECISION, DECISION_MAP, METRICS, PREPARED, REPORTS, STUDENT_DIR,
                          TEACHER_DIR, TRAIN_REPORT, log_to_mlflow, stage_main)

LOSS_CURVES = REPORTS / "loss_curves.csv"
VAL_CURVE = REPORTS / "val_loss.csv"
CALIBRATION = REPORTS / "calibration.csv"
RELIABILITY_PNG = REPORTS / "reliability.png"
GATE_OUTCOME_PNG = REPORTS / "gate_outcome.png"
SAMPLES = REPORTS / "samples.json"
TOP_K_AGREEMENT = 5


def run(cfg: Config, out: Path = METRICS) -> dict:
    """Evaluate, write the reports and log/register in MLflow; returns the metrics."""
    manifest = read_json(PREPARED / "manifest.json")
    decision = read_json(DECISION)
    vocab = manifest["tokenizer"]["vocab_size"]
    _, blocks = read_blocks(PREPARED / "val", limit=cfg.evaluate.max_blocks)
    student = load_causal_lm(STUDENT_DIR, cfg.student.trust_remote_code).eval()
    teacher = load_causal_lm(TEACHER_DIR, cfg.teacher.trust_remote_code).eval()
    tokenizer = load_tokenizer(STUDENT_DIR)
    # First: it checks its settings against the models' context, before the long part.
    samples = generate_samples({"student": student, "teacher": teacher}, tokenizer, blocks,
                               cfg.evaluate)
    metrics, calibration = compare_models(student, teacher, blocks, cfg.evaluate.batch_size, vocab,
                                          cfg.evaluate.ece_bins)
    predicted = decision[decision["decision"]]["loss"]
    metrics.update(
        decision=decision["decision"],
        gate={"coefficients": decision["coefficients"], "in_support": decision["in_support"],
              "predicted_student_loss": predicted,
              "predicted_supervised_loss": decision["supervised"]["loss"],
              "predicted_distill_loss": decision["distill"]["loss"],
              "actual_minus_predicted": metrics["student"]["val_loss"] - predicted},
        val_blocks=len(blocks), val_tokens=int(blocks[:, 1:].size),
    )
    for name, folder in (("student", STUDENT_DIR), ("teacher", TEACHER_DIR)):
        metrics[name]["weights_bytes"] = weights_bytes(folder)
    write_json(out, metrics)
    write_json(SAMPLES, samples)
    write_reports(metrics, calibration, decision)
    print(summary_line(metrics))
    for sample in samples:
        print(f"prompt {sample['prompt']!r}\n  student → {sample['student']!r}\n"
              f"  teacher → {sample['teacher']!r}")
    track_in_mlflow(cfg, metrics, decision, student, tokenizer, manifest, blocks)
    return metrics


class Accumulator:
    """Running sums over the validation positions of one comparison (batch by batch)."""

    def __init__(self, ece_bins: int):
        self.sums = {"student_nll": 0.0, "teacher_nll": 0.0, "kl": 0.0, "agree": 0.0, "agree_top5": 0.0}
        self.bins = {name: np.zeros((3, ece_bins)) for name in ("student", "teacher")}
        self.count = 0

    def add(self, s_logp: torch.Tensor, t_logp: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch of flattened [positions, vocab] log-probabilities and their targets."""
        self.sums["student_nll"] += F.nll_loss(s_logp, targets, reduction="sum").item()
        self.sums["teacher_nll"] += F.nll_loss(t_logp, targets, reduction="sum").item()
        self.sums["kl"] += divergence(t_logp, s_logp, "forward_kl").sum().item()
        self.sums["agree"] += topk_agreement(s_logp, t_logp, 1)
        self.sums["agree_top5"] += topk_agreement(s_logp, t_logp, TOP_K_AGREEMENT)
        for name, logp in (("student", s_logp), ("teacher", t_logp)):
            self.bins[name] += calibration_counts(logp, targets, self.bins[name].shape[1])
        self.count += targets.numel()


def topk_agreement(s_logp: torch.Tensor, t_logp: torch.Tensor, k: int) -> int:
    """Positions where the teacher's most likely token is among the student's ``k`` most likely
    (k = 1: both argmaxes agree)."""
    teacher_top1 = t_logp.argmax(-1, keepdim=True)
    student_topk = s_logp.topk(k, dim=-1).indices
    return int((student_topk == teacher_top1).any(-1).sum().item())


def calibration_counts(logp: torch.Tensor, targets: torch.Tensor, bins: int) -> np.ndarray:
    """Per equal-width bin of the confidence (max next-token probability): [positions,
    summed confidence, correct argmax predictions], shape [3, bins]."""
    confidence, predicted = logp.exp().max(-1)
    return confidence_counts(confidence.numpy(), (predicted == targets).numpy(), bins)


def confidence_counts(confidence: np.ndarray, correct: np.ndarray, bins: int) -> np.ndarray:
    """[count, confidence sum, correct sum] per equal-width bin over [0, 1] (1.0 in the last)."""
    index = np.minimum((np.asarray(confidence, dtype=np.float64) * bins).astype(np.int64), bins - 1)
    return np.stack([np.bincount(index, minlength=bins),
                     np.bincount(index, weights=confidence, minlength=bins),
                     np.bincount(index, weights=np.asarray(correct, dtype=np.float64), minlength=bins)])


def expected_calibration_error(counts: np.ndarray) -> float:
    """ECE = Σ_bins (n_b / N) · |accuracy_b − confidence_b| from ``confidence_counts``."""
    n, conf, correct = counts
    total = n.sum()
    if total == 0:
        raise ValueError("expected calibration error of no positions")
    return float(np.abs(correct - conf).sum() / total)  # n_b/N · |c_b/n_b − s_b/n_b|


def reliability_table(counts: np.ndarray) -> dict[str, list[float]]:
    """Per bin: its edges, position count, mean confidence and accuracy (NaN when empty)."""
    n, conf, correct = counts
    edges = np.linspace(0, 1, len(n) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"bin_low": edges[:-1].tolist(), "bin_high": edges[1:].tolist(),
                "count": n.astype(int).tolist(), "confidence": (conf / n).tolist(),
                "accuracy": (correct / n).tolist()}


@torch.inference_mode()
def compare_models(student, teacher, blocks: np.ndarray, batch_size: int, vocab: int,
                   ece_bins: int = 15) -> tuple[dict, dict]:
    """Loss, perplexity, calibration, speed and size of both models, and how closely the
    student follows the teacher; returns (metrics, reliability table per model)."""
    acc = Accumulator(ece_bins)
    seconds = {"student": 0.0, "teacher": 0.0}
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[start:start + batch_size].astype(np.int64))
        inputs, targets = ids[:, :-1], ids[:, 1:].reshape(-1)
        logits = {}
        for name, model in (("student", student), ("teacher", teacher)):
            t0 = time.perf_counter()
            logits[name] = model(input_ids=inputs).logits[..., :vocab].float().flatten(0, 1)
            seconds[name] += time.perf_counter() - t0
        acc.add(F.log_softmax(logits["student"], -1), F.log_softmax(logits["teacher"], -1), targets)
    result: dict = {}
    for name, model in (("student", student), ("teacher", teacher)):
        loss = acc.sums[f"{name}_nll"] / acc.count
        result[name] = {"val_loss": loss, "perplexity": math.exp(loss),
                        "parameters": count_parameters(model),
                        "tokens_per_s": acc.count / max(seconds[name], 1e-9),
                        "ece": expected_calibration_error(acc.bins[name])}
    result["kl_teacher_student"] = acc.sums["kl"] / acc.count
    result["top1_agreement"] = acc.sums["agree"] / acc.count
    result["top5_agreement"] = acc.sums["agree_top5"] / acc.count
    result["student_speedup"] = result["student"]["tokens_per_s"] / result["teacher"]["tokens_per_s"]
    return result, {name: reliability_table(counts) for name, counts in acc.bins.items()}


@torch.inference_mode()
def generate_samples(models: dict, tokenizer, blocks: np.ndarray, cfg: EvaluateConfig) -> list[dict]:
    """Greedy continuations by each model of the same fixed prompts: the first
    ``cfg.samples`` validation blocks cut to ``cfg.sample_prompt_tokens`` tokens."""
    if cfg.samples == 0:
        return []
    context = min(m.config.max_position_embeddings for m in models.values())
    if cfg.sample_prompt_tokens + cfg.sample_tokens > context:
        raise ValueError(f"evaluate.sample_prompt_tokens + evaluate.sample_tokens "
                         f"({cfg.sample_prompt_tokens} + {cfg.sample_tokens}) exceed the models' "
                         f"context of {context} tokens")
    if cfg.sample_prompt_tokens > blocks.shape[1]:
        raise ValueError(f"evaluate.sample_prompt_tokens ({cfg.sample_prompt_tokens}) is longer "
                         f"than a validation block ({blocks.shape[1]} tokens)")
    prompts = torch.from_numpy(blocks[:cfg.samples, :cfg.sample_prompt_tokens].astype(np.int64))
    samples = [{"prompt": tokenizer.decode(p.tolist())} for p in prompts]
    for name, model in models.items():
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                             max_new_tokens=cfg.sample_tokens, min_new_tokens=cfg.sample_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id
                             if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        for sample, row in zip(samples, out[:, prompts.shape[1]:]):
            sample[name] = tokenizer.decode(row.tolist())
    return samples


def weights_bytes(folder: Path) -> int:
    """Bytes of a saved model's weight files, shards included (its size on disk, as served)."""
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in folder.glob(pattern))


def write_reports(metrics: dict, calibration: dict, decision: dict) -> None:
    """The DVC plots files (loss curves, calibration table) and the two PNGs."""
    history = read_json(TRAIN_REPORT)["history"] if TRAIN_REPORT.is_file() else []
    write_csv(LOSS_CURVES, [{"step": h["step"], "train_loss": h["loss"]} for h in history if "loss" in h])
    write_csv(VAL_CURVE, [{"step": h["step"], "val_loss": h["val_loss"]} for h in history
                          if "val_loss" in h])
    rows = [{"model": name, **dict(zip(table, values))} for name, table in calibration.items()
            for values in zip(*table.values())]
    write_csv(CALIBRATION, [row for row in rows if row["count"] > 0])  # empty bins have no mean
    plot_reliability(calibration, RELIABILITY_PNG,
                     ece={name: metrics[name]["ece"] for name in calibration})
    plot_gate_outcome(decision, metrics["student"]["val_loss"], metrics["teacher"]["val_loss"],
                      GATE_OUTCOME_PNG, decision_map=DECISION_MAP)


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows (dicts with the same keys) as a CSV with a header; no rows → only the header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0]) if rows else ["step"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def summary_line(m: dict) -> str:
    """One readable line of the headline numbers."""
    return (f"student {m['student']['val_loss']:.4f} vs teacher {m['teacher']['val_loss']:.4f} "
            f"nats/token (gate predicted {m['gate']['predicted_student_loss']:.4f}, "
            f"{m['gate']['coefficients']} coefficients); KL(teacher‖student) "
            f"{m['kl_teacher_student']:.4f}, top-1/top-5 agreement {m['top1_agreement']:.1%}/"
            f"{m['top5_agreement']:.1%}, ECE student {m['student']['ece']:.3f} teacher "
            f"{m['teacher']['ece']:.3f}, student {m['student_speedup']:.1f}× faster")


def dvc_hashes(lock_path: Path = Path("dvc.lock")) -> dict[str, str]:
    """The md5 of every stage output recorded in ``dvc.lock`` (data lineage); {} before any lock."""
    if not lock_path.is_file():
        return {}
    lock = yaml.safe_load(lock_path.read_text()) or {}
    return {out["path"]: out.get("md5", "") for stage in lock.get("stages", {}).values()
            for out in stage.get("outs", [])}


def data_version(hashes: dict[str, str], manifest: dict) -> str:
    """The prepared data's version for champion comparisons: its DVC hash from ``dvc.lock``;
    outside DVC (a stage run by hand before any lock), a hash of the manifest's shard hashes,
    marked ``manifest:`` so it never equals a DVC hash."""
    if hashes.get("data/prepared"):
        return hashes["data/prepared"]
    shards = {split: [s["hash"] for s in v["shards"]] for split, v in manifest["splits"].items()}
    return "manifest:" + sha256_bytes(repr((shards, manifest["tokenizer"]["hash"])).encode())[:32]


def track_in_mlflow(cfg: Config, metrics: dict, decision: dict, student, tokenizer,
                    manifest: dict, blocks: np.ndarray) -> None:
    """Params, data hashes, decision, metrics, plots, samples; last, the registered student
    and its alias."""
    import mlflow

    if mlflow.active_run() is None:
        return
    hashes = dvc_hashes()
    log_to_mlflow(params={"config": cfg.to_dict(), "dvc": hashes, "decision": decision["decision"]},
                  metrics={k: v for k, v in metrics.items() if k not in ("decision",)},
                  artifacts=[METRICS, DECISION, TRAIN_REPORT, DECISION_MAP, SAMPLES, LOSS_CURVES,
                             VAL_CURVE, CALIBRATION, RELIABILITY_PNG, GATE_OUTCOME_PNG,
                             REPORTS / "student_loss.png", REPORTS / "teacher_loss.png"])
    mlflow.set_tags({"distill.decision": decision["decision"],
                     "distill.data.prepared": hashes.get("data/prepared", "")})
    log_data_lineage(hashes, manifest)
    version = register_student(cfg, metrics, student, tokenizer)
    data = data_version(hashes, manifest)
    outcome = registry.assign_alias(
        registry.client(), cfg.evaluate.registered_model, version,
        registry.Evaluation(val_loss=metrics["student"]["val_loss"], data_hash=data,
                            val_blocks=metrics["val_blocks"]),
        run_id=mlflow.active_run().info.run_id,
        remeasure=champion_remeasure(cfg, blocks, data, manifest["tokenizer"]["vocab_size"]))
    print(outcome.message)


def champion_remeasure(cfg: Config, blocks: np.ndarray, data: str, vocab: int):
    """The registry's ``remeasure``: download a registered version and measure its validation
    loss on ``blocks`` (this run's data, ``data``), as the student's was measured. A version
    whose tokenizer is not the prepared data's cannot read these token ids: NotComparable."""
    def remeasure(version) -> registry.Evaluation:
        import tempfile

        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(
                f"models:/{cfg.evaluate.registered_model}/{version.version}", dst_path=tmp))
            model_dir, tokenizer_dir = hf_folders(local)
            if load_tokenizer(tokenizer_dir).get_vocab() != load_tokenizer(PREPARED / "tokenizer").get_vocab():
                raise registry.NotComparable(
                    f"version {version.version} has another tokenizer than the prepared data "
                    f"(losses per token of two vocabularies are not comparable)")
            model = load_causal_lm(model_dir, cfg.student.trust_remote_code).eval()
            loss = validation_loss(model, blocks, cfg.evaluate.batch_size, vocab)
        return registry.Evaluation(val_loss=loss, data_hash=data, val_blocks=len(blocks))
    return remeasure


def hf_folders(local: Path) -> tuple[Path, Path]:
    """The model folder (``config.json``) and tokenizer folder (``tokenizer.json``) of a model
    downloaded from the registry (the transformers flavour keeps them apart)."""
    configs = sorted(local.rglob("config.json"))
    tokenizers = sorted(local.rglob("tokenizer.json"))
    if not configs or not tokenizers:
        raise registry.NotComparable(f"the registered model under {local} has no "
                                     f"{'config.json' if not configs else 'tokenizer.json'}")
    return configs[0].parent, tokenizers[0].parent


@torch.inference_mode()
def validation_loss(model, blocks: np.ndarray, batch_size: int, vocab: int) -> float:
    """Mean next-token NLL (nats/token) of ``model`` on ``blocks``, computed as
    ``compare_models`` computes the student's (logits cut to the data's vocabulary)."""
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[start:start + batch_size].astype(np.int64))
        logits = model(input_ids=ids[:, :-1]).logits[..., :vocab].float().flatten(0, 1)
        total += F.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


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


def register_student(cfg: Config, metrics: dict, model, tokenizer) -> str:
    """Log the student (already loaded) in the transformers flavour with its tokenizer and
    register a version; returns the version number."""
    import mlflow
    import transformers

    # Explicit requirements: inference by import fails where torchvision is absent.
    requirements = [f"torch=={torch.__version__.split('+')[0]}",
                    f"transformers=={transformers.__version__}"]
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer}, name="student",
        task="text-generation", registered_model_name=cfg.evaluate.registered_model,
        pip_requirements=requirements, metadata={"val_loss": metrics["student"]["val_loss"]})
    print(f"registered {cfg.evaluate.registered_model} version {info.registered_model_version}")
    return str(info.registered_model_version)


def main() -> None:
    """``python -m tasks.evaluate``."""
    stage_main("evaluate", run)


if __name__ == "__main__":
    main()
