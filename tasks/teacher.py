"""Stage ``teacher``: pretrain a small teacher here (``scratch``) or adopt a local HF model.

Writes ``models/teacher/`` (HF format, safetensors) and ``models/teacher.json`` with the
fingerprint that every label shard will carry, the parameter counts and tokens the gate
needs, and the teacher's validation loss L_T (nats/token).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from distill.blocks import read_blocks, shard_paths
from distill.config import Config
from distill.io import atomic_dir, read_json, write_json
from distill.models import (check_vocab_compatible, count_parameters, load_causal_lm,
                            logits_vocab, model_fingerprint, require_model_folder)
from distill.plots import plot_loss_curves
from distill.raylocal import init_ray
from distill.tokenizer import load_tokenizer, tokenizer_hash
from distill.teachers.hf import HFLabeler
from distill.training import run_training, spec_from_config, tokens_per_run
from tasks.common import (PREPARED, REPORTS, RUNS, TEACHER_DIR, TEACHER_JSON, log_to_mlflow,
                          mlflow_target, stage_main)


def run(cfg: Config, out: Path = TEACHER_DIR, info_path: Path = TEACHER_JSON) -> dict:
    """Produce the teacher model and ``teacher.json``; returns the latter's content."""
    manifest = read_json(PREPARED / "manifest.json")
    history: list[dict] = []
    if cfg.teacher.model == "scratch":
        history, tokens = pretrain_teacher(cfg, manifest, out)
    else:
        adopt_teacher(cfg, out)
        tokens = cfg.teacher.pretrain_tokens
    model = load_causal_lm(out, cfg.teacher.trust_remote_code)
    logits_vocab(model.config.vocab_size, manifest["tokenizer"]["vocab_size"], str(out))
    _, val_blocks = read_blocks(PREPARED / "val", limit=cfg.evaluate.max_blocks)
    val_loss = teacher_val_loss(model, val_blocks, manifest["tokenizer"]["vocab_size"],
                                cfg.evaluate.batch_size)
    info = {
        "source": cfg.teacher.model,
        "fingerprint": model_fingerprint(out),
        "tokenizer_hash": tokenizer_hash(out),
        "parameters": count_parameters(model),
        "tokens": tokens,
        "val_loss": val_loss,  # L_T, read by the gate
        "val_loss_method": "teacher_nll of the HF labeler on the val blocks",
        "val_blocks": len(val_blocks),
        "config": dataclasses.asdict(cfg.teacher),
        "history": history,
    }
    write_json(info_path, info)
    curve = plot_loss_curves({"teacher": history}, REPORTS / "teacher_loss.png") if history else None
    log_to_mlflow(params={"teacher": info["config"]},
                  metrics={"teacher_val_loss": val_loss, "teacher_tokens": tokens,
                           "teacher_params": info["parameters"]},
                  artifacts=[info_path] + ([curve] if curve else []))
    print(f"teacher {info['fingerprint'][:12]}: {info['parameters']['non_embedding']:,} non-embedding "
          f"parameters, {tokens:,.0f} tokens, validation loss {val_loss:.4f} nats/token")
    return info


def teacher_val_loss(model, blocks, vocab_size: int, batch_size: int) -> float:
    """L_T: the teacher's mean NLL of the real next tokens on ``blocks`` [n, T], computed by the
    labeler's own code path (``teacher_nll``), the number the label stage records for the train
    blocks in the same pass. A val block the labeler cannot take is an error naming it."""
    labeler = HFLabeler.from_model(model, k=1, temperature=1.0, vocab_size=vocab_size,
                                   block_size=blocks.shape[1])
    nll = []
    for start in range(0, len(blocks), batch_size):
        chunk = blocks[start:start + batch_size]
        out = labeler({"block_id": np.arange(start, start + len(chunk)).astype(str), "input_ids": chunk})
        bad = [e for e in out["error"] if e]
        if bad:
            raise ValueError(f"teacher: val blocks cannot be labeled by the teacher: {bad[0]}")
        nll.append(out["teacher_nll"])
    return float(np.concatenate(nll).mean())


def pretrain_teacher(cfg: Config, manifest: dict, out: Path) -> tuple[list[dict], int]:
    """Train the scratch teacher with Ray Train (supervised next-token loss)."""
    spec = spec_from_config(cfg, "teacher", cfg.teacher, cfg.teacher.optim, None,
                            shard_paths(PREPARED / "train"), shard_paths(PREPARED / "val"),
                            PREPARED, manifest, RUNS, **mlflow_target(cfg))
    init_ray(cfg.ray)
    result = run_training(spec, out)
    return result.history, tokens_per_run(cfg.teacher.optim, manifest["block_size"], spec.num_workers)


def adopt_teacher(cfg: Config, out: Path) -> None:
    """Check a local HF teacher (model, same tokenizer as the data) and link it into ``out``."""
    src = Path(cfg.teacher.model)
    require_model_folder(src)  # loading it happens once, from `out`, after adoption
    teacher_tok = load_tokenizer(src, cfg.teacher.trust_remote_code)
    data_tok = load_tokenizer(PREPARED / "tokenizer")
    check_vocab_compatible(teacher_tok.get_vocab(), data_tok.get_vocab(),
                           f"teacher.model {src}", f"prepared data tokenizer ({cfg.data.tokenizer})")
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    # Hard links make adopting a multi-GB teacher instant when on the same file system.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main() -> None:
    """``python -m tasks.teacher``."""
    stage_main("teacher", run)


if __name__ == "__main__":
    main()
