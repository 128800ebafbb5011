"""Stage ``label``: teacher labels for every train block, via Ray Data, cached per block
(a few pending blocks — ``label.inline_blocks``, HF backend — are labeled in-process).

Modes (``label.mode``): ``soft`` (top-k log-probs of the corpus text), ``hard`` (teacher
generations for prompts) and ``hard+soft``; one schema (:mod:`distill.labels`).

Content-addressed, incremental and resumable: the label folder is a cache keyed by
block id (the hash of the block's tokens) under this run's label settings. Only train
blocks without a label are sent to the teacher, in chunks of ``data.shard_blocks``
written as new shards (under a temporary name, then renamed: a file that exists is
complete), so an interrupted run resumes with what is missing and adding documents labels
only their new blocks. Shards holding blocks no longer wanted are compacted by copying
rows (no teacher) or removed. Shards made with other settings (another teacher, k, mode,
backend, dtype or labeler code) stay, for the ``KEEP_SETTINGS`` most recently used
settings (:func:`distill.labels.retention_plan`), so switching back reuses them. Blocks the teacher cannot label go to ``errors.parquet``
(block id, reason), counted in the manifest. ``manifest.json`` is written last. With a
``supervised`` decision the stage writes an explicit "skipped" manifest instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from distill.config import Config
from distill.io import read_json, write_json
from distill.labels import (KEEP_SETTINGS, LabelSettings, compact_shard, index_label_shards,
                            labels_table, mark_used, plan_labels, retention_plan, settings_for_run,
                            shard_name, write_error_table, write_label_shard)
from distill.raylocal import init_ray
from distill.storage import LABELS as LABELS_IN_STORAGE
from distill.storage import Storage, resolve_storage
from tasks.common import (DECISION, LABELS, PREPARED, TEACHER_DIR, TEACHER_JSON, log_to_mlflow,
                          stage_main, write_skipped)

ERRORS_FILE = "errors.parquet"
SMALL_DATA_BYTES = 256 * 1024 * 1024  # below this the driver selects the pending blocks itself
READ_CONCURRENCY = 2  # parquet read tasks at once feeding the labeling actors (they take no CPU)


def run(cfg: Config, out: Path = LABELS) -> dict:
    """Label what is missing under ``out`` and write its manifest; returns the manifest."""
    decision = read_json(DECISION)
    out.mkdir(parents=True, exist_ok=True)
    if decision["decision"] != "distill":
        # old label files stay as cache
        return write_skipped("label", out / "manifest.json",
                             f"gate decided {decision['decision']!r}: {decision.get('reason', '')}")
    if cfg.distill.source == "online":
        return write_skipped("label", out / "manifest.json",
                             "distill.source = online: the teacher runs inside training")
    result = label_train_blocks(cfg, out, read_json(TEACHER_JSON), read_json(PREPARED / "manifest.json"))
    log_to_mlflow(params={"label": {"k": result["settings"]["k"], "temperature": cfg.distill.temperature,
                                    "mode": cfg.label.mode,
                                    "backend": result["settings"]["backend"]}},
                  metrics={"label_" + k: v for k, v in result.items() if isinstance(v, (int, float))},
                  artifacts=[out / ERRORS_FILE] if result["errors"] else None)
    return result


def label_train_blocks(cfg: Config, out: Path, teacher: dict, manifest: dict) -> dict:
    """Label the train blocks that have no label under ``out`` with this run's settings,
    compact or drop stale shards, and write the manifest last; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    # an interrupted run must not leave the previous run's manifest looking complete
    (out / "manifest.json").unlink(missing_ok=True)
    settings = settings_for_run(cfg.distill.top_k, cfg.distill.temperature, teacher, manifest,
                                cfg.label, cfg.seed, cfg.distill.label_kind, cfg.distill.samples)
    wanted = train_block_ids(manifest)
    mirror = label_mirror(cfg)
    if mirror is not None and (fetched := mirror.download_missing(out, LABELS_IN_STORAGE)):
        print(f"fetched {len(fetched)} label shards from {mirror.uri(LABELS_IN_STORAGE)}")
    index, unusable = index_label_shards(out, settings)
    plan = plan_labels(wanted, index)
    print(f"labeling {len(plan.missing)} of {len(wanted)} train blocks ({plan.cached} already "
          f"labeled with these settings: mode {settings.mode}, backend {settings.backend}, dtype "
          f"{settings.dtype}, labeler code {settings.code[:12]})")
    errors: list[dict] = []
    if plan.missing:
        errors = label_blocks(cfg, plan.missing, settings, manifest, out, mirror)
    for name, keep in plan.compact.items():
        print(f"compacting {name}: keeping {len(keep)} of {len(index[name])} blocks")
        compact_shard(out, name, keep, settings)
    for name in plan.drop:
        (out / name).unlink()
    kept_other = apply_retention(unusable)
    write_error_table(errors, out / ERRORS_FILE)
    shards, _ = index_label_shards(out, settings)
    if mirror is not None:
        upload_missing_shards(mirror, out, list(shards))
    mark_used(out, list(shards))
    if kept_other:
        print(f"kept {kept_other} shards of other label settings (up to {KEEP_SETTINGS} settings "
              f"are kept; switching back reuses them)")
    if not shards:
        first = errors[0]["reason"] if errors else "no train blocks"
        raise ValueError(f"label stage: none of {len(wanted)} train blocks could be labeled "
                         f"(first reason: {first}); see {out / ERRORS_FILE}")
    result = summarise(out, shards, settings, labeled_now=len(plan.missing) - len(errors),
                       reused=plan.cached, compacted=len(plan.compact), errors=errors)
    write_json(out / "manifest.json", result)  # the completion marker, written last
    return result


def label_mirror(cfg: Config) -> Storage | None:
    """The storage that keeps a copy of every label shard (``storage.root``), or None.

    The label folder stays the stage's DVC output; the copy under ``<root>/labels`` is the
    cache every node and every fresh clone shares: a run fetches the shards it lacks before
    planning, and each shard is uploaded as soon as it is written (a run stopped mid-way, on
    any node, resumes from what reached the store)."""
    storage = resolve_storage(cfg.storage.root)
    return storage if storage.explicit else None


def upload_missing_shards(mirror: Storage, out: Path, names: list[str]) -> None:
    """Upload the shards in ``names`` the store lacks (compacted ones, or a run without a store)."""
    stored = set(mirror.files(LABELS_IN_STORAGE))
    for name in names:
        if name not in stored:
            mirror.upload(out / name, LABELS_IN_STORAGE, name)


def apply_retention(other: list[Path]) -> int:
    """Remove what the label folder no longer keeps of other settings' files, saying why;
    returns how many shards of other settings stay."""
    keep, remove = retention_plan(other)
    for path, reason in remove:
        print(f"removing {path.name}: {reason}")
        path.unlink()
    return len(keep)


def train_block_ids(manifest: dict) -> list[str]:
    """The block ids of the prepared train split, in shard order."""
    ids: list[str] = []
    for path in train_shard_paths(manifest):
        ids.extend(pq.read_table(path, columns=["block_id"]).column(0).to_pylist())
    return ids


def label_blocks(cfg: Config, missing: list[str], settings: LabelSettings, manifest: dict,
                 out: Path, mirror: Storage | None = None) -> list[dict]:
    """Run the teacher over the ``missing`` blocks, writing shards of ``data.shard_blocks``
    labeled rows as they complete; returns the per-block errors.

    A Ray Data actor pool does the work, except that the HF backend labels at most
    ``label.inline_blocks`` pending blocks in this process: same labeler, same batches, same
    shards, without the seconds of starting Ray and a worker that loads the teacher."""
    backend = settings.backend  # resolved once, in settings_for_run
    writer = ShardWriter(out, settings, cfg.data.shard_blocks, total=len(missing), mirror=mirror)
    if backend == "hf" and len(missing) <= cfg.label.inline_blocks:
        print(f"labeling in this process ({len(missing)} ≤ label.inline_blocks = {cfg.label.inline_blocks})")
        batches = label_in_process(cfg, settings, manifest, missing)
    else:
        batches = label_with_ray(cfg, backend, settings, manifest, missing)
    for batch in batches:
        writer.add(batch)
    writer.finish()
    return writer.errors


def label_with_ray(cfg: Config, backend: str, settings: LabelSettings, manifest: dict,
                   missing: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Labeled batches of the ``missing`` blocks from a Ray Data actor pool, in order."""
    import ray.data

    init_ray(cfg.ray)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = pending_dataset(manifest, missing)
    labeler, kwargs = teacher_backend(cfg, backend, settings, manifest)
    cluster = ray.cluster_resources()
    gpus = actor_gpus(cfg.label, backend, cuda_available(), cluster.get("GPU", 0.0))
    check_actor_cpus(cfg.label, cluster.get("CPU", 0.0))
    ds = ds.map_batches(labeler, fn_constructor_kwargs=kwargs, batch_size=cfg.label.batch_size,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.label.num_actors),
                        num_cpus=cfg.label.cpus_per_actor, num_gpus=gpus or None)
    yield from ds.iter_batches(batch_size=cfg.label.batch_size, batch_format="numpy")


def cuda_available() -> bool:
    """Whether this (the driver's) host has CUDA: where it does, vLLM is the CUDA build."""
    import torch

    return torch.cuda.is_available()


def actor_gpus(label, backend: str, cuda: bool, cluster_gpus: float) -> float:
    """GPUs each labeling actor asks Ray for: ``label.gpus_per_actor``, refused where it
    cannot work. vLLM's CUDA build needs a GPU in its actor, ``tensor_parallel_size`` of them
    for TP > 1 (the TP workers are the actor's subprocesses, on its GPUs); and the cluster
    must hold ``num_actors`` × that many, or the actors never schedule and the job hangs.
    On a host without CUDA, vLLM's CPU build runs with none (``gpus_per_actor: 0``)."""
    gpus, tp = label.gpus_per_actor, label.tensor_parallel_size
    if backend == "vllm" and cuda and (gpus <= 0 or (tp > 1 and gpus < tp)):
        why = ("label.backend: auto chose vllm (CUDA and vllm are present)" if label.backend == "auto"
               else "label.backend: vllm on a host with CUDA")
        raise ValueError(f"{why}: each labeling actor needs label.gpus_per_actor ≥ "
                         f"{max(tp, 1)} (label.tensor_parallel_size = {tp}), got {gpus}. Fix: "
                         f"label.gpus_per_actor: {max(tp, 1)}, or label.backend: hf to label on CPU")
    if gpus > 0 and gpus * label.num_actors > cluster_gpus:
        raise ValueError(f"label.gpus_per_actor = {gpus} × label.num_actors = {label.num_actors} "
                         f"GPUs, but the Ray cluster has {cluster_gpus:g}: the labeling actors "
                         f"would never be scheduled. Fix: lower label.gpus_per_actor or "
                         f"label.num_actors, or join a cluster with more GPUs (RAY_ADDRESS)")
    return gpus


def check_actor_cpus(label, cluster_cpus: float) -> None:
    """Refuse a pool the Ray cluster cannot hold: ``num_actors`` × ``cpus_per_actor`` CPUs
    must exist, or the missing actors never schedule and the stage waits for ever. (The pool's
    input takes no CPU of its own: see :func:`pending_dataset`.)"""
    need = label.num_actors * label.cpus_per_actor
    if need > cluster_cpus + 1e-9:
        raise ValueError(f"label.num_actors = {label.num_actors} × label.cpus_per_actor = "
                         f"{label.cpus_per_actor:g} = {need:g} CPUs, but the Ray cluster has "
                         f"{cluster_cpus:g}: the labeling actors would never all be scheduled. "
                         f"Fix: lower label.num_actors or label.cpus_per_actor (fractions are "
                         f"allowed), or join a cluster with more CPUs (ray.address / RAY_ADDRESS)")


def label_in_process(cfg: Config, settings: LabelSettings, manifest: dict,
                     missing: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Labeled batches of the ``missing`` blocks from the HF labeler in this process, in order."""
    labeler_class, kwargs = teacher_backend(cfg, "hf", settings, manifest)
    labeler = labeler_class(**kwargs)
    for table in pending_tables(manifest, missing):
        for batch in table.to_batches(max_chunksize=cfg.label.batch_size):
            ids = batch.column("input_ids")
            yield labeler({"block_id": batch.column("block_id").to_numpy(zero_copy_only=False),
                           "input_ids": np.stack(ids.to_numpy(zero_copy_only=False))})


def pending_tables(manifest: dict, missing: list[str]) -> list[pa.Table]:
    """The ``missing`` train blocks as Arrow tables, in prepared-shard order (read here)."""
    wanted = pa.array(missing, type=pa.string())
    tables = [pq.read_table(p) for p in train_shard_paths(manifest)]
    tables = [t.filter(pc.is_in(t.column("block_id"), value_set=wanted)) for t in tables]
    return [t for t in tables if t.num_rows]


def train_shard_paths(manifest: dict) -> list[str]:
    """Absolute paths of the prepared train shards, in manifest order."""
    return [str((PREPARED / "train" / s["file"]).resolve()) for s in manifest["splits"]["train"]["shards"]]


def pending_dataset(manifest: dict, missing: list[str]):
    """A Ray dataset of the ``missing`` train blocks, in prepared-shard order."""
    import ray.data

    paths = train_shard_paths(manifest)
    if sum(Path(p).stat().st_size for p in paths) <= SMALL_DATA_BYTES:
        # Small data: the driver selects the rows (starting read tasks costs seconds on 2 cores).
        return ray.data.from_arrow(pending_tables(manifest, missing))
    # Not ray.data.read_parquet: its file listing is a Ray task asking for 1 CPU, which no
    # option lowers. With a pool holding every CPU (2 actors × 1 CPU on a 2-CPU machine) the
    # listing never ran and the actors waited for ever for input (measured: no block labeled
    # in 2 minutes, Ray Data's log showing "ListFiles - Tasks: 1" pending throughout; 1 actor
    # finished in 36 s). These read tasks ask for no CPU — reading a shard and keeping its
    # pending rows is light next to the teacher — and READ_CONCURRENCY bounds how many run.
    return ray.data.read_datasource(pending_blocks_source(paths, missing), num_cpus=0,
                                    concurrency=READ_CONCURRENCY,
                                    label_selector=on_this_node())


def on_this_node() -> dict[str, str]:
    """A Ray label selector for the driver's node: the prepared shards are files there (a
    cluster's other nodes cannot read them)."""
    import ray

    return {"ray.io/node-id": ray.get_runtime_context().get_node_id()}


def pending_blocks_source(paths: list[str], missing: list[str]):
    """A Ray Data datasource with one read task per prepared train shard, yielding that
    shard's ``missing`` rows (in shard order)."""
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    # in the object store once, not pickled into every read task
    wanted = ray.put(pa.array(missing, type=pa.string()))

    def read_shard(path: str) -> list[pa.Table]:
        table = pq.read_table(path)
        return [table.filter(pc.is_in(table.column("block_id"), value_set=ray.get(wanted)))]

    class PendingBlocks(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(Path(p).stat().st_size for p in paths)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None,
                           data_context=None) -> list[ReadTask]:
            return [ReadTask(lambda p=p: read_shard(p),
                             BlockMetadata(num_rows=None, size_bytes=Path(p).stat().st_size,
                                           exec_stats=None, input_files=[p]))
                    for p in paths]

    return PendingBlocks()


def teacher_backend(cfg: Config, backend: str, settings: LabelSettings, manifest: dict):
    """The map_batches callable class of the chosen backend and its constructor arguments."""
    tok = manifest["tokenizer"]
    kwargs = {"model_dir": str(TEACHER_DIR.resolve()), "k": settings.k,
              "temperature": settings.temperature, "vocab_size": tok["vocab_size"],
              "trust_remote_code": cfg.teacher.trust_remote_code, "block_size": manifest["block_size"],
              "mode": settings.mode, "generation": settings.generation,
              "eos_id": tok["eos_id"], "pad_id": tok["pad_id"]}
    if backend == "hf":
        from distill.teachers.hf import HFLabeler

        return HFLabeler, {**kwargs, "dtype": cfg.label.dtype, "use_gpu": cfg.label.gpus_per_actor > 0,
                           "samples": settings.samples, "sample_seed": settings.sample_seed}
    if settings.kind == "sampled":
        raise ValueError("distill.label_kind = sampled needs the HF backend (label.backend: hf): vLLM "
                         "returns only top-k prompt log-probs, so there is no full distribution to sample "
                         f"from (label.backend = {cfg.label.backend!r} resolved to {backend!r})")
    from distill.teachers.vllm import VLLMLabeler

    return VLLMLabeler, {**kwargs, "dtype": cfg.label.dtype,
                         "tensor_parallel_size": cfg.label.tensor_parallel_size,
                         "gpu_memory_utilization": cfg.label.gpu_memory_utilization,
                         "kv_cache_gib": cfg.label.kv_cache_gib,
                         "enforce_eager": cfg.label.enforce_eager}


class ShardWriter:
    """Collects labeled rows in arrival order and writes every ``shard_blocks`` of them as one
    complete, content-addressed shard; rows with an error go to ``errors``.

    The chunks depend only on the order of the pending blocks, so a resumed run (whose
    pending blocks are the uninterrupted run's minus the shards already written, a prefix)
    writes the same shards as an uninterrupted one."""

    COLUMNS = ("block_id", "input_ids", "topk_ids", "topk_logprobs", "rest_logprob",
               "teacher_nll", "loss_from", "length")

    def __init__(self, out: Path, settings: LabelSettings, shard_blocks: int, total: int,
                 mirror: Storage | None = None):
        self.out, self.settings, self.shard_blocks, self.total = out, settings, shard_blocks, total
        self.mirror = mirror
        self.parts: list[dict] = []
        self.buffered = 0
        self.seen = 0
        self.written = 0
        self.errors: list[dict] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        err = np.asarray(batch["error"], dtype=object)
        bad = np.array([bool(e) for e in err], dtype=bool)
        for block, reason in zip(batch["block_id"][bad], err[bad]):
            self.errors.append({"block_id": str(block), "reason": str(reason)})
        good = {k: np.asarray(batch[k])[~bad] for k in self.COLUMNS}
        self.seen += len(bad)
        if len(good["block_id"]):
            self.parts.append(good)
            self.buffered += len(good["block_id"])
        while self.buffered >= self.shard_blocks:
            self._write(self.shard_blocks)

    def _write(self, rows: int) -> None:
        merged = {k: np.concatenate([p[k] for p in self.parts]) for k in self.COLUMNS}
        chunk = {k: v[:rows] for k, v in merged.items()}
        rest = {k: v[rows:] for k, v in merged.items()}
        self.parts = [rest] if len(rest["block_id"]) else []
        self.buffered -= rows
        name = shard_name(self.settings, [str(b) for b in chunk["block_id"]])
        write_label_shard(labels_table(chunk, self.settings), self.out / name)
        if self.mirror is not None:
            self.mirror.upload(self.out / name, LABELS_IN_STORAGE, name)
        self.written += rows
        print(f"labeled {self.seen}/{self.total} blocks ({len(self.errors)} errors) → {name} "
              f"({rows} blocks)", flush=True)

    def finish(self) -> None:
        """Write the last partial shard; every pending block must have come back."""
        if self.buffered:
            self._write(self.buffered)
        if self.seen != self.total:
            raise RuntimeError(f"labeling returned {self.seen} of {self.total} pending blocks")


def summarise(out: Path, shards: dict[str, list[str]], settings: LabelSettings, labeled_now: int,
              reused: int, compacted: int, errors: list[dict]) -> dict:
    """The label manifest: settings, shards, sizes, errors, and the teacher's train NLL."""
    tables = {name: pq.read_table(out / name, columns=["teacher_nll", "loss_from", "length"])
              for name in shards}
    blocks = sum(t.num_rows for t in tables.values())
    positions = int(sum((pc.sum(pc.subtract(pc.subtract(t.column("length"), t.column("loss_from")), 1))
                         .as_py() or 0) for t in tables.values()))
    nll = np.concatenate([t.column("teacher_nll").to_numpy() for t in tables.values()])
    size = sum((out / name).stat().st_size for name in shards)
    return {"status": "complete", "settings": settings.__dict__, "blocks": blocks,
            "positions": positions,
            "shards": [{"label_file": name, "blocks": tables[name].num_rows} for name in sorted(shards)],
            "labeled_now": labeled_now, "reused": reused, "compacted_shards": compacted,
            "errors": len(errors), "error_file": ERRORS_FILE, "bytes": size,
            "bytes_per_position": size / max(positions, 1),
            # soft: the train NLL of the real next tokens; hard modes: of the prompts
            "teacher_train_nll": float(np.nanmean(nll)) if np.isfinite(nll).any() else None}


def main() -> None:
    """``python -m tasks.label``."""
    stage_main("label", run)


if __name__ == "__main__":
    main()
