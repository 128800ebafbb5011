"""Calibration: fit the gate's scaling laws on this project's own data.

A sweep of small training runs — supervised students (sizes × token budgets) and distilled
students (sizes × budgets × teachers), each configuration with several seeds — trained by the
train stage's own trainer in Ray tasks, then the supervised law (Eq. 1) and the
distillation law (Eq. 8) fitted to the mean validation loss of each configuration with
``distill.law``'s procedure, their held-out error, bootstrap intervals, a coefficients JSON
that ``load_coefficients`` reads and a PNG of the fits.

Design choices (why):

* One trainer: a point is trained by ``distill.training.train_with_cooldowns`` — the train
  stage's model (``build_llama``), optimizer and schedule (``make_optimizer``), step
  (``train_step``), loss (``build_loss``, with ``distill.z_loss`` for supervised runs too) and
  data order (``open_dataset``'s seeded permutation through the worker's shuffle window,
  :func:`distill.training.epoch_rows`); only the driver differs (no Ray Train for a point).
  A point at the pipeline's student size, steps and seed is the train stage's run.
* Warmup–stable–decay (``train.schedule: wsd``, Hägele et al. 2024): every budget of one
  (kind, size, seed, teacher) is a cooldown branch of one run (:meth:`SweepPoint.run`), so
  the four budgets cost about the longest one. A swept teacher's one run likewise gives
  ``calibrate.teacher_strengths`` teachers (its cooldowns at ``teacher_steps``, /2, /4): with
  the pipeline's teacher, Eq. 8's teacher terms see ≥ 3 teacher losses, and weak teachers
  distilling longer-trained students give configurations where supervised training wins.
* The learning rate is ``train.lr`` at the pipeline student's width, scaled by
  ``(student.d_model / d_model) ^ lr_width_exponent``.
* Distillation points train on exactly the loss of the pipeline's offline branch: top-k at
  ``distill.top_k`` from the same labeler (``HFLabeler``: same ``topk_labels``, same float16
  rounding as label shards), ``distill.alpha``, τ, divergence, z-loss. The labels are made
  once per teacher *in memory* (a Ray task; the arrays go through Ray's object store to the
  points) instead of on disk or online: a 4×128 teacher forward costs ~1.5× a 2×64 student
  step on one CPU, and a sweep point revisits each block ~once per 1000 steps, so labeling
  each block once is several times cheaper than an online teacher in every step.
* Each point's result is stored under a content address (the point, the data's hashes, the
  loss settings, the teacher's identity, and the fingerprint of the code that trains a point,
  :func:`point_code_fingerprint`): a re-run skips finished points, and a change to the
  training loop, the loss, the model or the labeler runs them again.

No Prefect or DVC here; ``tasks/calibrate.py`` is the stage, ``flows/calibrate.py`` the flow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.config import (DISTILLATION_LAW_PARAMS, SUPERVISED_LAW_PARAMS, Config, DistillConfig,
                            ModelConfig, OptimConfig, distills, heldout_count, parse_steps,
                            parse_student_sizes, sweep_teachers, teacher_size)
from distill.io import read_json, sha256_bytes, write_json
from distill.provenance import code_fingerprint
from distill.law import (CoefficientSet, coefficient_set_from_fits, distillation_error_floor,
                         distillation_loss, fit_distillation, fit_supervised, heldout_error, save_coefficients,
                         supervised_loss)
from distill.storage import CALIBRATION

KINDS = ("supervised", "distill")


# ---------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class SweepPoint:
    """One training run of the sweep (picklable: it travels to a Ray task)."""

    kind: str          # "supervised", "distill", or "teacher" (a swept teacher's own run, not fitted)
    layers: int
    d_model: int
    heads: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    grad_clip: float
    seed: int
    teacher: str = ""  # distill: "pipeline" or "<layers>x<d_model>@<steps>", a swept teacher's run
    schedule: str = "wsd"
    cooldown_fraction: float = 0.2
    z_loss: float = 1e-4   # supervised points' z-loss (distill.z_loss, as the train stage)

    @property
    def size(self) -> str:
        """``"<layers>x<d_model>"``."""
        return f"{self.layers}x{self.d_model}"

    def model(self) -> ModelConfig:
        """The student's architecture (scratch Llama)."""
        return ModelConfig(model="scratch", layers=self.layers, d_model=self.d_model, heads=self.heads)

    def optim(self) -> OptimConfig:
        """The optimiser settings (one final evaluation, no intermediate ones)."""
        return OptimConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           min_lr_ratio=self.min_lr_ratio, warmup_steps=self.warmup_steps,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                           eval_every=self.steps, schedule=self.schedule,
                           cooldown_fraction=self.cooldown_fraction)

    def run(self) -> "SweepPoint":
        """The training run this point is a budget of: with warmup–stable–decay every budget of
        one (kind, size, seed, teacher) is a cooldown branch of one run; cosine runs are one
        budget each."""
        return dataclasses.replace(self, steps=0) if self.schedule == "wsd" else self

    def describe(self) -> str:
        """A short human-readable name."""
        who = f" <- {self.teacher}" if self.kind == "distill" else ""
        return f"{self.kind} {self.size} {self.steps} steps{who}"


def lr_for_width(cfg: Config, d_model: int) -> float:
    """``train.lr`` at the pipeline student's width, scaled by width^-lr_width_exponent."""
    return cfg.train.lr * (cfg.student.d_model / d_model) ** cfg.calibrate.lr_width_exponent


def warmup_for_steps(cfg: Config, steps: int) -> int:
    """The warm-up of a ``steps`` run: warmup–stable–decay keeps ``train.warmup_steps`` at every
    budget (the budgets share their stable phase); cosine applies the pipeline's warm-up share
    of ``train.steps`` (same schedule shape)."""
    if cfg.train.warmup_steps == 0:
        return 0
    if cfg.train.schedule == "wsd":
        return min(steps - 1, cfg.train.warmup_steps)
    share = cfg.train.warmup_steps / cfg.train.steps
    return min(steps - 1, max(1, round(share * steps)))


def plan_points(cfg: Config) -> list[SweepPoint]:
    """Supervised points (sizes × budgets × seeds), each swept teacher's own runs (``teacher``:
    its size at each of its strengths' budgets, one seed), then distillation points (teachers ×
    sizes × budgets × seeds; a swept teacher distills only the students smaller than itself,
    see :func:`distill.config.distills`)."""
    cal = cfg.calibrate
    sizes, budgets = parse_student_sizes(cal.students), parse_steps(cal.steps)
    teachers = sweep_teachers(cal, budgets)
    seeds = [cfg.seed + i for i in range(cal.seeds)]

    def point(kind: str, layers: int, width: int, steps: int, seed: int, teacher: str = "") -> SweepPoint:
        return SweepPoint(kind=kind, layers=layers, d_model=width, heads=width // cal.head_dim,
                          steps=steps, batch_size=cfg.train.batch_size, lr=lr_for_width(cfg, width),
                          warmup_steps=warmup_for_steps(cfg, steps), min_lr_ratio=cfg.train.min_lr_ratio,
                          weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip,
                          seed=seed, teacher=teacher, schedule=cfg.train.schedule,
                          cooldown_fraction=cfg.train.cooldown_fraction, z_loss=cfg.distill.z_loss)

    points = [point("supervised", layers, width, steps, seed)
              for layers, width in sizes for steps in budgets for seed in seeds]
    for teacher in teachers:
        if teacher != "pipeline":
            ((layers, width),) = parse_student_sizes(teacher_size(teacher))
            points.append(point("teacher", layers, width, int(teacher.split("@")[1]), cfg.seed))
    points += [point("distill", layers, width, steps, seed, teacher)
               for teacher in teachers for layers, width in sizes for steps in budgets for seed in seeds
               if distills(teacher, (layers, width))]
    return points


def teacher_point(points: list[SweepPoint], teacher: str) -> SweepPoint:
    """The run saved as swept teacher ``"<size>@<steps>"``: the teacher point of that size and budget."""
    size, _, steps = teacher.partition("@")
    for p in points:
        if p.kind == "teacher" and p.size == size and str(p.steps) == steps:
            return p
    raise ValueError(f"calibrate.teachers: no teacher run {teacher!r} in the sweep")


def group_runs(points: list[SweepPoint], indices: list[int]) -> list[list[int]]:
    """``indices`` of ``points`` grouped by the run they are budgets of (:meth:`SweepPoint.run`)."""
    groups: dict[SweepPoint, list[int]] = {}
    for i in indices:
        groups.setdefault(points[i].run(), []).append(i)
    return list(groups.values())


# ---------------------------------------------------------------------------- keys and the store

@dataclass(frozen=True)
class SweepContext:
    """What, besides the point, decides its result: the data, the evaluation, the loss, the teachers."""

    data_hash: str
    eval_blocks: int
    loss: dict[str, Any]                 # distill settings + top_k (distillation points only)
    pipeline_teacher: str                # fingerprint of the teacher stage's model

    def teacher_identity(self, point: SweepPoint, points: list[SweepPoint]) -> str:
        """The pipeline teacher's fingerprint, or the key of the sweep point that is the teacher."""
        if point.teacher == "pipeline":
            return f"pipeline:{self.pipeline_teacher}"
        return f"sweep:{point_key(teacher_point(points, point.teacher), self, points)}"


def point_code_fingerprint() -> str:
    """The fingerprint of the code that trains and measures a sweep point: this module's
    import closure (the training step, loss, model, labeler, data reading), except
    ``distill.law``, which fits the finished points and never changes one."""
    return code_fingerprint("distill.calibration", exclude=("distill.law",))


def point_key(point: SweepPoint, ctx: SweepContext, points: list[SweepPoint]) -> str:
    """Content address of a point's result: same point, data, loss, teacher and code → same key."""
    payload = {"code": point_code_fingerprint(), "point": dataclasses.asdict(point),
               "data": ctx.data_hash, "eval_blocks": ctx.eval_blocks}
    if point.kind == "distill":
        payload["loss"] = ctx.loss
        payload["teacher"] = ctx.teacher_identity(point, points)
    return sha256_bytes(json.dumps(payload, sort_keys=True).encode())[:20]


def data_hash(manifest: dict) -> str:
    """One hash over the prepared shards' content hashes and the tokenizer's."""
    shards = [s["hash"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    return sha256_bytes(json.dumps([shards, manifest["tokenizer"]["hash"]]).encode())[:20]


def loss_settings(distill: DistillConfig) -> dict[str, Any]:
    """The settings of the distillation loss that change a distilled student's loss."""
    keys = ("alpha", "temperature", "divergence", "jsd_beta", "z_loss", "top_k")
    return {k: getattr(distill, k) for k in keys}


class PointStore:
    """Finished points as ``<root>/points/<key>.json`` (written atomically, when complete), and
    the models of supervised points reused as teachers under ``<root>/models/<key>/``."""

    def __init__(self, root: str | Path, mirror=None):
        self.root = Path(root)
        self.mirror = mirror  # a distill.storage.Storage keeping a copy of every record (storage.root)

    def path(self, key: str) -> Path:
        """The record file of ``key``."""
        return self.root / "points" / f"{key}.json"

    def get(self, key: str) -> dict | None:
        """The stored record of ``key``, or None when the point has not finished."""
        path = self.path(key)
        return read_json(path) if path.is_file() else None

    def put(self, key: str, record: dict) -> Path:
        """Store a finished point's record (atomic: a killed run leaves no partial record)."""
        path = write_json(self.path(key), record)
        if self.mirror is not None:
            self.mirror.upload(path, CALIBRATION, "points", path.name)
        return path

    def model_dir(self, key: str) -> Path:
        """Where the model of a supervised point reused as a teacher is kept."""
        return self.root / "models" / key


# ---------------------------------------------------------------------------- one point

@dataclass
class SweepData:
    """The prepared blocks every point trains and evaluates on."""

    train: np.ndarray        # [n, T] int32
    val: np.ndarray          # [m, T] int32, the first ``evaluate.max_blocks`` validation blocks
    vocab_size: int
    eos_id: int
    pad_id: int | None
    tokenizer_dir: str

    @property
    def block_size(self) -> int:
        return int(self.train.shape[1])


def load_sweep_data(prepared: Path, manifest: dict, eval_blocks: int) -> SweepData:
    """Train blocks and the validation blocks the pipeline evaluates on (the same first ones)."""
    from distill.blocks import read_blocks

    _, train = read_blocks(prepared / "train")
    _, val = read_blocks(prepared / "val", limit=eval_blocks)
    tok = manifest["tokenizer"]
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{prepared}: the sweep needs train and validation blocks "
                         f"(found {len(train)} and {len(val)})")
    return SweepData(train=np.ascontiguousarray(train, np.int32), val=np.ascontiguousarray(val, np.int32),
                     vocab_size=tok["vocab_size"], eos_id=tok["eos_id"], pad_id=tok["pad_id"],
                     tokenizer_dir=str((prepared / "tokenizer").resolve()))


def batch_indices(n_blocks: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch] block indices in the train stage's order for ``seed``: ``open_dataset``'s
    seeded permutation, each epoch through the worker's shuffle window, incomplete batches dropped."""
    from distill.training import data_order, epoch_rows

    if n_blocks < batch_size:
        raise ValueError(f"calibrate: {n_blocks} train blocks are fewer than one batch "
                         f"(train.batch_size = {batch_size})")
    return epoch_rows(data_order(n_blocks, seed), batch_size, seed, steps)


def sparse_teacher(labels: dict, idx: np.ndarray):
    """The stored top-k labels of blocks ``idx`` as the loss's ``SparseTeacher`` [B·(T-1), k]."""
    from distill.losses import SparseTeacher

    ids = torch.from_numpy(labels["topk_ids"][idx].astype(np.int64))
    k = labels["k"]
    return SparseTeacher(ids=ids.view(-1, k),
                         logprobs=torch.from_numpy(labels["topk_logprobs"][idx].astype(np.float32)).view(-1, k),
                         rest=torch.from_numpy(labels["rest_logprob"][idx].astype(np.float32)).view(-1))


def point_loss(point: SweepPoint, loss: DistillConfig | None):
    """The train stage's loss for this point (``distill.training.build_loss``): the offline
    distillation loss, or next-token + the pipeline's z-loss when supervised."""
    from distill.training import build_loss

    # build_loss reads only ``.loss`` and ``.z_loss``: reusing it keeps the sweep's loss the pipeline's.
    return build_loss(types.SimpleNamespace(loss=loss if point.kind == "distill" else None,
                                            z_loss=point.z_loss))


def train_run(points: list[SweepPoint], data: SweepData, loss: DistillConfig | None = None,
              labels: dict | None = None, model_outs: list[str] | None = None, threads: int = 1) -> list[dict]:
    """Train the budgets ``points`` of one run (same :meth:`SweepPoint.run`) in this process with
    the train stage's trainer (``distill.training.train_with_cooldowns``: its schedule, data
    order, steps and loss) and return one record per point (N, D, final val loss, ...).

    ``labels`` (distillation): the teacher's top-k for every train block, from ``label_teacher``.
    ``model_outs``: per point, a folder to save its model in (HF format, to reuse it as a
    teacher) or ""."""
    from distill.models import build_llama, count_parameters
    from distill.training import eval_step, train_with_cooldowns

    first = points[0]
    if len({p.run() for p in points}) != 1:
        raise ValueError(f"train_run: {[p.describe() for p in points]} are not budgets of one run")
    if (first.kind == "distill") != (labels is not None):
        raise ValueError(f"{first.describe()}: distillation points need teacher labels, others none")
    outs = dict(zip((p.steps for p in points), model_outs or [""] * len(points)))
    torch.set_num_threads(threads)
    torch.manual_seed(first.seed)
    started = time.perf_counter()
    model = build_llama(first.model(), data.vocab_size, data.block_size, first.seed, data.eos_id, data.pad_id)
    n_params = count_parameters(model)["non_embedding"]
    train = torch.from_numpy(data.train.astype(np.int64))
    longest = max(p.steps for p in points)
    rows = batch_indices(len(data.train), first.batch_size, longest, first.seed)

    def batch_of(idx: np.ndarray) -> tuple:
        ids = train[idx]
        return ids[:, :-1], ids[:, 1:], sparse_teacher(labels, idx) if labels is not None else None

    losses: dict[int, float] = {}

    def on_budget(steps: int, trained) -> None:
        losses[steps] = eval_step(trained, data.val, first.batch_size, torch.device("cpu"))
        if not math.isfinite(losses[steps]):
            raise FloatingPointError(f"{first.describe()}: non-finite validation loss at {steps} steps")
        if outs.get(steps):
            save_sweep_model(trained, data, Path(outs[steps]))

    train_with_cooldowns(model, first.optim(), point_loss(first, loss), batch_of, rows,
                         [p.steps for p in points], on_budget)
    seconds = time.perf_counter() - started
    records = []
    for p in points:
        record = {"point": dataclasses.asdict(p), "kind": p.kind, "size": p.size, "N": n_params,
                  "D": p.steps * p.batch_size * (data.block_size - 1), "L": losses[p.steps],
                  "seconds": seconds * p.steps / sum(q.steps for q in points), "run_seconds": seconds}
        if labels is not None:
            record["L_T"] = labels["teacher_loss"]
        if outs.get(p.steps):
            record["model_dir"] = outs[p.steps]
        records.append(record)
    return records


def train_point(point: SweepPoint, data: SweepData, loss: DistillConfig | None = None,
                labels: dict | None = None, model_out: str = "", threads: int = 1) -> dict:
    """Train one sweep point alone in this process and return its record (see :func:`train_run`)."""
    return train_run([point], data, loss, labels, [model_out], threads)[0]


def save_sweep_model(model, data: SweepData, out: Path) -> None:
    """Save a sweep model for reuse as a teacher; the folder appears only when complete."""
    from distill.io import atomic_dir
    from distill.models import save_model
    from distill.tokenizer import load_tokenizer

    with atomic_dir(out) as tmp:
        save_model(model, load_tokenizer(data.tokenizer_dir), tmp)


def label_teacher(teacher_dir: str, data: SweepData, top_k: int, temperature: float,
                  batch_size: int = 32, threads: int = 1) -> dict:
    """The teacher's top-k labels of every train block (as the label stage makes them) and its
    validation loss L_T on the sweep's validation blocks."""
    from distill.models import load_causal_lm
    from distill.teachers.hf import HFLabeler
    from distill.training import eval_step

    labeler = HFLabeler(teacher_dir, top_k, temperature, data.vocab_size)
    torch.set_num_threads(threads)
    parts: dict[str, list[np.ndarray]] = {"topk_ids": [], "topk_logprobs": [], "rest_logprob": []}
    for start in range(0, len(data.train), batch_size):
        out = labeler({"input_ids": data.train[start:start + batch_size]})
        for name in parts:
            parts[name].append(out[name])
    n, positions = len(data.train), data.block_size - 1
    k = parts["topk_ids"][0].shape[1] // positions
    labels = {"topk_ids": np.concatenate(parts["topk_ids"]).reshape(n, positions, k),
              "topk_logprobs": np.concatenate(parts["topk_logprobs"]).reshape(n, positions, k),
              "rest_logprob": np.concatenate(parts["rest_logprob"]).reshape(n, positions)}
    teacher = load_causal_lm(teacher_dir)
    labels["teacher_loss"] = eval_step(teacher, data.val, batch_size, torch.device("cpu"))
    labels["k"] = k
    return labels


# ---------------------------------------------------------------------------- the sweep (Ray)

@dataclass
class SweepPlan:
    """The points, their keys, and which are finished already."""

    points: list[SweepPoint]
    keys: list[str]
    done: dict[str, dict]

    @property
    def pending(self) -> list[int]:
        """Indices of points still to run."""
        return [i for i, k in enumerate(self.keys) if k not in self.done]


def plan_sweep(points: list[SweepPoint], ctx: SweepContext, store: PointStore) -> SweepPlan:
    """Key every point and look up the finished ones in ``store``. A teacher run whose model is
    gone counts as unfinished while a point still needs that teacher."""
    keys = [point_key(p, ctx, points) for p in points]
    done = {k: r for k in keys if (r := store.get(k)) is not None}
    needed = {p.teacher for p, k in zip(points, keys) if p.kind == "distill" and k not in done}
    for teacher in needed - {"pipeline"}:
        tkey = point_key(teacher_point(points, teacher), ctx, points)
        if not store.model_dir(tkey).is_dir():
            done.pop(tkey, None)
    say_unused_points(store, set(keys))
    return SweepPlan(points, keys, done)


def say_unused_points(store: PointStore, keys: set[str]) -> None:
    """One line when the store holds points this sweep cannot reuse, and why."""
    stored = {p.stem for p in (store.root / "points").glob("*.json")}
    if unused := len(stored - keys):
        print(f"calibration store: {unused} stored points not reused (made by other code, data or "
              f"settings; this code is {point_code_fingerprint()[:12]})", flush=True)


def run_sweep(plan: SweepPlan, ctx: SweepContext, store: PointStore, data: SweepData,
              loss: DistillConfig, pipeline_teacher_dir: str, cpus_per_point: float,
              on_point: Callable[[SweepPoint, dict], None] | None = None) -> list[dict]:
    """Run the pending points as Ray tasks, one task per run (its budgets are cooldown branches,
    :func:`train_run`; a run with any budget pending runs whole), teachers' runs first and their
    labels as Ray dependencies of the distillation runs; store each record as it arrives and
    call ``on_point``; returns every point's record, in plan order."""
    import ray

    threads = max(1, int(round(cpus_per_point)))
    run_task = ray.remote(num_cpus=cpus_per_point, max_retries=0)(train_run)
    label_task = ray.remote(num_cpus=cpus_per_point, max_retries=0)(_label_from)
    data_ref = ray.put(data)
    teachers = {p.teacher for p in plan.points if p.kind == "distill"} - {"pipeline"}
    teacher_keys = {point_key(teacher_point(plan.points, t), ctx, plan.points): t for t in teachers}
    running: dict[Any, list[int]] = {}
    sources: dict[str, Any] = {"pipeline": pipeline_teacher_dir}
    runs = {plan.points[i].run() for i in plan.pending}
    pending = [i for i, p in enumerate(plan.points) if p.run() in runs]
    for group in group_runs(plan.points, pending):
        kinds = {plan.points[i].kind for i in group}
        if kinds & {"supervised", "teacher"}:
            outs = [str(store.model_dir(plan.keys[i]).resolve()) if plan.keys[i] in teacher_keys else ""
                    for i in group]
            ref = run_task.remote([plan.points[i] for i in group], data_ref, None, None, outs, threads)
            running[ref] = group
            for j, i in enumerate(group):
                if plan.keys[i] in teacher_keys:
                    sources[teacher_keys[plan.keys[i]]] = (ref, j)  # the label task waits for this model
    for key, teacher in teacher_keys.items():
        sources.setdefault(teacher, str(store.model_dir(key).resolve()))
    labels = {}
    for group in group_runs(plan.points, pending):
        point = plan.points[group[0]]
        if point.kind != "distill":
            continue
        if point.teacher not in labels:
            source = sources[point.teacher]
            ref, j = source if isinstance(source, tuple) else (source, -1)
            labels[point.teacher] = label_task.remote(ref, j, data_ref, loss.top_k, loss.temperature, threads)
        running[run_task.remote([plan.points[i] for i in group], data_ref, loss, labels[point.teacher],
                                None, threads)] = group
    records = dict(plan.done)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        group = running.pop(ready[0])
        for i, result in zip(group, ray.get(ready[0])):
            record = {**result, "key": plan.keys[i]}
            store.put(plan.keys[i], record)
            records[plan.keys[i]] = record
            if on_point is not None:
                on_point(plan.points[i], record)
    return [records[k] for k in plan.keys]


def _label_from(teacher: str | list[dict], index: int, data: SweepData, top_k: int, temperature: float,
                threads: int) -> dict:
    """``label_teacher`` for a teacher folder, or for the ``index``-th record of the sweep run
    that saved one."""
    teacher_dir = teacher if isinstance(teacher, str) else teacher[index]["model_dir"]
    return label_teacher(teacher_dir, data, top_k, temperature, threads=threads)


# ---------------------------------------------------------------------------- the fit

def configuration(record: dict) -> tuple:
    """What a run measures, seed aside: kind, size, budget, teacher."""
    return record["kind"], record["size"], record["D"], record["point"]["teacher"]


def mean_over_seeds(records: list[dict]) -> list[dict]:
    """One record per configuration (teachers' own runs dropped: they are not fitted): the
    first seed's record with ``L`` the mean over its seeds, ``L_runs`` each seed's loss and
    ``L_sem`` the standard error of the mean (0 with one seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["kind"] in KINDS:
            groups.setdefault(configuration(r), []).append(r)
    out = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r["point"]["seed"])
        losses = [float(r["L"]) for r in runs]
        sem = float(np.std(losses, ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else 0.0
        out.append({**runs[0], "L": float(np.mean(losses)), "L_runs": losses, "L_sem": sem,
                    "seeds": [r["point"]["seed"] for r in runs]})
    return out


@dataclass
class CalibrationFit:
    """The fitted coefficient set and, per point, prediction and whether it was held out."""

    coefficients: CoefficientSet
    heldout: dict[str, dict]          # kind -> held-out error (mean_abs, max_abs, n)
    points: list[dict] = field(default_factory=list)


def split_heldout(records: list[dict], share: float) -> set[str]:
    """Keys of the held-out points: per kind, the ``round(share·n)`` points whose keys (hashes,
    so a pseudo-random but reproducible choice) sort first."""
    held: set[str] = set()
    for kind in KINDS:
        keys = sorted(r["key"] for r in records if r["kind"] == kind)
        held.update(keys[: heldout_count(len(keys), share)])
    return held


def _arrays(records: list[dict], names: tuple[str, ...]) -> list[np.ndarray]:
    return [np.array([float(r[n]) for r in records]) for n in names]


def fit_calibration(records: list[dict], heldout_share: float, n_starts: int = 32,
                    n_bootstrap: int = 0, seed: int = 0, extra_quality: dict | None = None) -> CalibrationFit:
    """Fit Eq. 1 on the kept supervised points, then Eq. 8 on the kept distillation points,
    measure both on the held-out ones, and return the coefficient set (support = the fitted
    points' ranges, quality = fit and held-out errors, bootstrap intervals, point counts).
    ``records``: one per configuration (:func:`mean_over_seeds`)."""
    if len({configuration(r) for r in records}) != len(records):
        raise ValueError("fit_calibration: a configuration repeats (several seeds): average them "
                         "with mean_over_seeds first")
    held = split_heldout(records, heldout_share)
    sup = [r for r in records if r["kind"] == "supervised" and r["key"] not in held]
    dist = [r for r in records if r["kind"] == "distill" and r["key"] not in held]
    _check_enough_points(sup, dist, heldout_share)
    sup_fit = fit_supervised(*_arrays(sup, ("N", "D", "L")), n_starts=n_starts,
                             n_bootstrap=n_bootstrap, seed=seed)
    dist_fit = fit_distillation(*_arrays(dist, ("N", "D", "L_T", "L")), sup_fit.coefficients,
                                n_starts=n_starts, n_bootstrap=n_bootstrap, seed=seed)
    quality: dict[str, Any] = {"heldout_share": heldout_share, "bootstrap_resamples": n_bootstrap,
                               # Eq. 8's teacher terms need ≥ 3 distinct teacher losses to be identifiable
                               "distinct_teacher_losses": len({round(float(r["L_T"]), 6) for r in dist}),
                               **(extra_quality or {})}
    coefs = coefficient_set_from_fits("calibrated", sup_fit, dist_fit, quality)
    heldout = heldout_errors(coefs, [r for r in records if r["key"] in held])
    coefs.quality.update({f"heldout_{kind}": err for kind, err in heldout.items()})
    coefs.quality.update(form_diagnostics(coefs, [r for r in records if r["key"] not in held], "fitted"))
    coefs.quality.update(form_diagnostics(coefs, [r for r in records if r["key"] in held], "heldout"))
    for name, fit in (("supervised", sup_fit), ("distillation", dist_fit)):
        if fit.intervals is not None:
            coefs.quality[f"{name}_intervals_95"] = {k: list(v) for k, v in fit.intervals.items()}
    return CalibrationFit(coefs, heldout, predictions(coefs, records, held))


def form_diagnostics(coefs: CoefficientSet, records: list[dict], which: str) -> dict[str, Any]:
    """What the fitted laws can promise on ``records`` (``which``: fitted or heldout), for
    the coefficients' quality record; keys are suffixed ``_<which>``:

    * ``distillation_error_floor``: the error Eq. 8 must make on some distilled point whatever
      its coefficients (a student below its teacher's loss), and ``distill_below_teacher``,
      on how many points;
    * ``margin_error``: mean |predicted − measured| of L_supervised − L_distilled over the
      (size, budget, teacher) with both branches trained, in nats, and ``margin_mean_abs``,
      the mean |measured margin|. The gate's choice is only as reliable as the first is
      small against the margin it predicts (the gate warns when it is not)."""
    dist = [r for r in records if r["kind"] == "distill"]
    sup = {(r["size"], r["D"]): r["L"] for r in records if r["kind"] == "supervised"}
    out: dict[str, Any] = {}
    if dist:
        floor = distillation_error_floor(*_arrays(dist, ("L_T", "L")))
        out[f"distillation_error_floor_{which}"] = float(floor.max())
        out[f"distill_below_teacher_{which}"] = int(np.count_nonzero(floor))
    pairs = [(r, sup[(r["size"], r["D"])]) for r in dist if (r["size"], r["D"]) in sup]
    if pairs:
        predicted = [float(supervised_loss(r["N"], r["D"], coefs.supervised)) - predict_record(coefs, r)
                     for r, _ in pairs]
        measured = [s - r["L"] for r, s in pairs]
        out[f"margin_error_{which}"] = float(np.mean(np.abs(np.subtract(predicted, measured))))
        out[f"margin_mean_abs_{which}"] = float(np.mean(np.abs(measured)))
        out[f"margin_pairs_{which}"] = len(pairs)
    return out


def _check_enough_points(sup: list[dict], dist: list[dict], heldout_share: float) -> None:
    """A law cannot be fitted to fewer points than it has coefficients: say which and what to change."""
    for kind, kept, need in (("supervised", sup, SUPERVISED_LAW_PARAMS), ("distillation", dist, DISTILLATION_LAW_PARAMS)):
        if len(kept) < need:
            raise ValueError(f"calibrate: {len(kept)} {kind} points left to fit after holding out "
                             f"calibrate.heldout_share = {heldout_share}, fewer than the {need} "
                             f"coefficients of the {kind} law; add calibrate.students, calibrate.steps "
                             f"or calibrate.teachers, or lower calibrate.heldout_share")


def heldout_errors(coefs: CoefficientSet, held: list[dict]) -> dict[str, dict]:
    """Relative prediction error of each law on its held-out points (kinds without any left out)."""
    out = {}
    sup = [r for r in held if r["kind"] == "supervised"]
    dist = [r for r in held if r["kind"] == "distill"]
    if sup:
        out["supervised"] = heldout_error(coefs, *_arrays(sup, ("N", "D", "L")))
    if dist:
        n, d, l_t, loss = _arrays(dist, ("N", "D", "L_T", "L"))
        out["distill"] = heldout_error(coefs, n, d, loss, L_T=l_t)
    return out


def predict_record(coefs: CoefficientSet, record: dict) -> float:
    """The law's prediction for one point (supervised law, or distillation law with its L_T)."""
    if record["kind"] == "supervised":
        return float(supervised_loss(record["N"], record["D"], coefs.supervised))
    return float(distillation_loss(record["N"], record["D"], record["L_T"], coefs))


def predictions(coefs: CoefficientSet, records: list[dict], held: set[str]) -> list[dict]:
    """Each record with the law's prediction, its relative error and whether it was held out."""
    out = []
    for r in records:
        pred = predict_record(coefs, r)
        out.append({**r, "predicted": pred, "relative_error": (pred - r["L"]) / r["L"],
                    "heldout": r["key"] in held})
    return out


def write_calibration(fit: CalibrationFit, coefficients_path: Path, points_path: Path,
                      plot_path: Path) -> None:
    """The coefficients JSON (for the gate), every point with its prediction, and the PNG."""
    save_coefficients(fit.coefficients, coefficients_path)
    write_json(points_path, {"heldout": fit.heldout, "points": fit.points})
    plot_calibration(fit, plot_path)


# ---------------------------------------------------------------------------- plots

def plot_calibration(fit: CalibrationFit, path: str | Path) -> Path:
    """Two panels: measured loss vs tokens per size with the supervised law's curves, and the
    same for distillation per (size, teacher) with Eq. 8's curves. Filled markers are fitted
    points, open ones held out; bars are the standard error over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    coefs = fit.coefficients
    for ax, kind in zip(fig.subplots(1, 2), KINDS):
        groups: dict[tuple, list[dict]] = {}
        for p in fit.points:
            if p["kind"] == kind:
                groups.setdefault((p["size"], p.get("L_T")), []).append(p)
        for i, ((size, l_t), pts) in enumerate(sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or 0))):
            color = f"C{i % 10}"
            d = np.geomspace(min(p["D"] for p in pts) / 1.5, max(p["D"] for p in pts) * 1.5, 60)
            n = pts[0]["N"]
            curve = (supervised_loss(n, d, coefs.supervised) if kind == "supervised"
                     else distillation_loss(n, d, l_t, coefs))
            label = size if kind == "supervised" else f"{size} <- L_T {l_t:.3f}"
            ax.plot(d, curve, color=color, linewidth=1, label=label)
            for p in pts:  # error bars: the standard error of the mean over seeds
                ax.errorbar(p["D"], p["L"], yerr=p.get("L_sem", 0.0), fmt="o", color=color, capsize=2,
                            markerfacecolor="none" if p["heldout"] else color)
        ax.set_xscale("log")
        ax.set_xlabel("student tokens D")
        ax.set_ylabel("validation loss (nats/token)")
        err = fit.heldout.get(kind)
        title = f"{kind} law (Eq. {'1' if kind == 'supervised' else '8'})"
        if err:
            title += f": held-out mean |err| {100 * err['mean_abs']:.2f}%, max {100 * err['max_abs']:.2f}%"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("calibration: mean over seeds ± standard error (open = held out) and fitted laws",
                 fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
