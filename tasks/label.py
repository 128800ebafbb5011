"""Stage ``label``: the teacher's top-k soft labels for every train block, via Ray Data.

Content-addressed and resumable: each prepared train shard is labeled into a file named
by the hash of its blocks and the label settings (``LabelSettings.key``). Files that
exist are complete (written under a temporary name, then renamed) and are never
recomputed; an interrupted run resumes with the missing shards; shards no longer needed
are removed. ``manifest.json`` is written last. With a ``supervised`` decision the stage
writes an explicit "skipped" manifest instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill.config import Config
from distill.io import read_json, write_json
from distill.labels import (LabelSettings, labels_table, plan_label_shards, settings_for_run,
                            write_label_shard)
from distill.raylocal import init_ray
from distill.teachers import resolve_backend
from tasks.common import DECISION, LABELS, PREPARED, TEACHER_DIR, TEACHER_JSON, log_to_mlflow, stage_main


def run(cfg: Config, out: Path = LABELS) -> dict:
    """Label what is missing under ``out`` and write its manifest; returns the manifest."""
    decision = read_json(DECISION)
    out.mkdir(parents=True, exist_ok=True)
    if decision["decision"] != "distill":
        return write_skipped(out, f"gate decided {decision['decision']!r}: {decision.get('reason', '')}")
    if cfg.distill.source == "online":
        return write_skipped(out, "distill.source = online: the teacher runs inside training")
    result = label_train_blocks(cfg, out, read_json(TEACHER_JSON), read_json(PREPARED / "manifest.json"))
    log_to_mlflow(params={"label": {"k": result["settings"]["k"], "temperature": cfg.distill.temperature,
                                    "backend": resolve_backend(cfg.label.backend, cfg.distill.temperature)}},
                  metrics={"label_" + k: v for k, v in result.items() if isinstance(v, (int, float))})
    return result


def label_train_blocks(cfg: Config, out: Path, teacher: dict, manifest: dict) -> dict:
    """Label the train shards not yet labeled under ``out`` with this run's settings, drop
    stale ones, and write the manifest last; returns it."""
    settings = settings_for_run(cfg.distill.top_k, cfg.distill.temperature, teacher, manifest)
    shards = plan_label_shards(settings, manifest)
    pending = [s for s in shards if not (out / s["label_file"]).is_file()]
    print(f"labeling {len(pending)} of {len(shards)} train shards "
          f"({len(shards) - len(pending)} already labeled with these settings)")
    if pending:
        label_shards(cfg, pending, settings, manifest, out)
    remove_stale(out, {s["label_file"] for s in shards})
    result = summarise(out, shards, settings, labeled_now=len(pending))
    write_json(out / "manifest.json", result)  # the completion marker, written last
    return result


def write_skipped(out: Path, reason: str) -> dict:
    """The explicit manifest of a run that needs no labels; old label files stay as cache."""
    result = {"status": "skipped", "reason": reason}
    write_json(out / "manifest.json", result)
    print(f"label stage skipped: {result['reason']}")
    return result


def label_shards(cfg: Config, pending: list[dict], settings: LabelSettings, manifest: dict,
                 out: Path) -> None:
    """Run the teacher over the pending shards with a Ray Data actor pool; write each shard whole."""
    import ray.data

    backend = resolve_backend(cfg.label.backend, cfg.distill.temperature)
    init_ray(cfg.ray)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    paths = [str((PREPARED / "train" / s["file"]).resolve()) for s in pending]
    ds = ray.data.read_parquet(paths, include_paths=True)
    labeler, kwargs = teacher_backend(cfg, backend, settings, manifest)
    ds = ds.map_batches(labeler, fn_constructor_kwargs=kwargs, batch_size=cfg.label.batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.label.num_actors),
                        num_cpus=cfg.label.cpus_per_actor, num_gpus=cfg.label.gpus_per_actor or None)
    expected = {p: s for p, s in zip(paths, pending)}
    writer = ShardWriter(out, expected, settings)
    for batch in ds.iter_batches(batch_size=cfg.label.batch_size, batch_format="numpy"):
        writer.add(batch)
    writer.finish()


def teacher_backend(cfg: Config, backend: str, settings: LabelSettings, manifest: dict):
    """The map_batches callable class of the chosen backend and its constructor arguments."""
    kwargs = {"model_dir": str(TEACHER_DIR.resolve()), "k": settings.k,
              "temperature": settings.temperature, "vocab_size": manifest["tokenizer"]["vocab_size"],
              "trust_remote_code": cfg.teacher.trust_remote_code}
    if backend == "hf":
        from distill.teachers.hf import HFLabeler

        return HFLabeler, {**kwargs, "dtype": cfg.label.dtype, "use_gpu": cfg.label.gpus_per_actor > 0}
    from distill.teachers.vllm import VLLMLabeler

    return VLLMLabeler, {**kwargs, "dtype": cfg.label.dtype}


class ShardWriter:
    """Collects labeled rows per source shard (they arrive in order) and writes complete shards."""

    def __init__(self, out: Path, expected: dict[str, dict], settings: LabelSettings):
        self.out, self.expected, self.settings = out, expected, settings
        self.parts: dict[str, list[dict]] = {}
        self.rows: dict[str, int] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        for path in dict.fromkeys(batch["path"]):
            mask = batch["path"] == path
            self.parts.setdefault(path, []).append({k: v[mask] for k, v in batch.items()})
            self.rows[path] = self.rows.get(path, 0) + int(mask.sum())
            if self.rows[path] == self.expected[path]["blocks"]:
                self._write(path)

    def _write(self, path: str) -> None:
        parts = self.parts.pop(path)
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        shard = self.expected[path]
        write_label_shard(labels_table(merged, self.settings), self.out / shard["label_file"])
        print(f"labeled {shard['file']} → {shard['label_file']} ({shard['blocks']} blocks)")

    def finish(self) -> None:
        """Every pending shard must have been written completely."""
        missing = [p for p in self.expected if not (self.out / self.expected[p]["label_file"]).is_file()]
        if missing:
            raise RuntimeError(f"labeling ended with incomplete shards: {missing} "
                               f"(rows seen: {[self.rows.get(p, 0) for p in missing]})")


def remove_stale(out: Path, keep: set[str]) -> None:
    """Delete label files (and leftovers of interrupted writes) that no current shard needs."""
    for path in out.glob("*labels-*.parquet*"):
        if path.name not in keep:
            path.unlink()


def summarise(out: Path, shards: list[dict], settings: LabelSettings, labeled_now: int) -> dict:
    """The label manifest: settings, shards, sizes, and the teacher's train NLL from the labels."""
    import pyarrow.parquet as pq

    blocks = sum(s["blocks"] for s in shards)
    nll = [pq.read_table(out / s["label_file"], columns=["teacher_nll"]).column(0).to_numpy()
           for s in shards]
    first = pq.read_table(out / shards[0]["label_file"], columns=["rest_logprob"]).column(0)
    positions = blocks * len(first[0])
    size = sum((out / s["label_file"]).stat().st_size for s in shards)
    return {"status": "complete", "settings": settings.__dict__, "blocks": blocks,
            "positions": positions, "shards": [{k: s[k] for k in ("file", "label_file", "blocks", "key")}
                                               for s in shards],
            "labeled_now": labeled_now, "reused": len(shards) - labeled_now, "bytes": size,
            "bytes_per_position": size / positions,
            "teacher_train_nll": float(np.concatenate(nll).mean())}


def main() -> None:
    """``python -m tasks.label``."""
    stage_main("label", run)


if __name__ == "__main__":
    main()
