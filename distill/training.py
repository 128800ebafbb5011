"""Training under Ray Train: ``train_step``, ``eval_step``, ``train_loop_per_worker`` and the driver.

One code path trains both the scratch teacher (supervised) and the student (distillation
from offline top-k labels, or supervised). Workers read their data shard through Ray Data,
average gradients with one all-reduce per step (gloo on CPU, NCCL on GPU), checkpoint every
``checkpoint_every`` steps (model, optimizer, scheduler, RNG, data position) and resume from
the latest checkpoint when Ray Train restarts them or the driver is re-run with the same
inputs, settings and code (the run name is their fingerprint, :mod:`distill.provenance`):
Ray Train restores ``runs/<name>`` whenever it exists, finished or not, so a run of other
code must have another name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distill.config import DistillConfig, ModelConfig, OptimConfig, stable_end
from distill.io import sha256_bytes
from distill.losses import IGNORE_INDEX, DistillationLoss, SparseTeacher, exact_sample_frequencies
from distill.provenance import code_fingerprint, fingerprint
from distill.storage import read_text, resolve_storage, runs_uri, storage_for_ray_train, write_text


def training_code_fingerprint() -> str:
    """The fingerprint of the code that computes trained weights from a ``TrainSpec``: this
    module's import closure (losses, models, data reading, config)."""
    return code_fingerprint("distill.training")


@dataclass
class TrainSpec:
    """Everything a training run needs; picklable, so it travels to the Ray workers."""

    role: str                         # "teacher" or "student": names the run and MLflow keys
    model: ModelConfig
    optim: OptimConfig
    loss: DistillConfig | None        # None: supervised next-token training
    data_paths: list[str]             # parquet shards (prepared blocks or label shards)
    val_paths: list[str]
    tokenizer_dir: str
    vocab_size: int
    block_size: int
    eos_id: int
    pad_id: int | None
    storage_path: str
    seed: int = 0
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    checkpoint_every: int = 50
    max_failures: int = 2
    eval_blocks: int = 64
    log_every: int = 10
    label_meta: dict = field(default_factory=dict)
    teacher_dir: str = ""             # set: online distillation from this teacher's full logits
    z_loss: float = 1e-4              # supervised runs' z-loss (distill.z_loss; loss has its own)
    tracking_uri: str = ""
    mlflow_run_id: str = ""
    data_hash: str = ""
    # set where the spec is made (the driver), so every worker names the same run
    code: str = field(default_factory=training_code_fingerprint)

    def run_name(self) -> str:
        """Same inputs, settings and code → same name → Ray Train resumes that run; anything
        else → another name → a fresh run (never a finished run of other code exported again)."""
        settings = dataclasses.asdict(self)
        for volatile in ("mlflow_run_id", "tracking_uri", "storage_path", "max_failures",
                         "data_paths", "val_paths", "tokenizer_dir", "teacher_dir", "data_hash", "code"):
            settings.pop(volatile)
        return f"{self.role}-{fingerprint(inputs=self.data_hash, settings=settings, code=self.code)[:12]}"


@dataclass
class TrainResult:
    """What the driver gets back: the final HF model folder and the metric history."""

    model_dir: Path
    history: list[dict]
    final: dict
    resumed_from: list[int] = field(default_factory=list)  # steps of the checkpoints resumed from


# ---------------------------------------------------------------------------- steps

def lr_lambda(optim: OptimConfig):
    """Linear warm-up to 1, then (``schedule``) cosine decay to ``min_lr_ratio``, or a constant
    rate until the last ``cooldown_fraction`` of the steps and a (1-sqrt) cooldown to
    ``min_lr_ratio`` that reaches it at the last step (warmup–stable–decay)."""
    start = stable_end(optim)

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "wsd":
            if step < start:
                return 1.0
            progress = min(1.0, (step - start + 1) / (optim.steps - start))
            return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * (1.0 - math.sqrt(progress))
        progress = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine
    return factor


def make_optimizer(model: torch.nn.Module, optim: OptimConfig):
    """AdamW (decay on matrices only) and its warm-up + cosine or WSD scheduler."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(0.9, 0.95), eps=1e-8)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim))


def branch_optimizer(model: torch.nn.Module, optimizer, optim: OptimConfig, step: int):
    """An optimizer for ``model`` (a copy of the one ``optimizer`` trains) with a copy of its
    state after ``step`` steps, and the scheduler of ``optim`` positioned at ``step``: what a
    run of ``optim.steps`` steps would hold there, if its schedule agrees up to ``step``."""
    import copy

    opt, _ = make_optimizer(model, optim)
    # deep copy: load_state_dict keeps same-device tensors, and the branch must not step the trunk's moments
    opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim), last_epoch=step - 1)


def hidden_and_head(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states [B, T, H] and the output projection [V, H] of an HF causal LM."""
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=input_ids).last_hidden_state
    return hidden, model.get_output_embeddings().weight


def batch_to_tensors(batch: dict, device: torch.device, k: int | None, samples: int = 0) -> tuple:
    """A numpy batch → (inputs [B, T-1], targets [B, T-1], SparseTeacher or None).

    ``samples`` > 0: sampled (RS-KD) labels; their stored log-frequencies become the exact
    log(count / samples).

    Label rows of every mode carry ``loss_from``/``length`` (:mod:`distill.labels`): targets
    outside ``loss_from ≤ p < length-1`` (a hard label's prompt and padding) become the
    ignore index. Prepared blocks (supervised) have no such columns: every position counts."""
    ids = torch.from_numpy(np.stack(batch["input_ids"]).astype(np.int64)).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    if "loss_from" in batch:
        pos = torch.arange(targets.shape[1], device=device)
        start = torch.from_numpy(np.asarray(batch["loss_from"], np.int64)).to(device)[:, None]
        end = torch.from_numpy(np.asarray(batch["length"], np.int64)).to(device)[:, None] - 1
        targets = targets.masked_fill((pos < start) | (pos >= end), IGNORE_INDEX)
    teacher = None
    if k is not None:
        n = inputs.numel()
        logprobs = torch.from_numpy(np.stack(batch["topk_logprobs"]).astype(np.float32)).to(device).view(n, k)
        teacher = SparseTeacher(
            ids=torch.from_numpy(np.stack(batch["topk_ids"]).astype(np.int64)).to(device).view(n, k),
            logprobs=exact_sample_frequencies(logprobs, samples) if samples else logprobs,
            rest=torch.from_numpy(np.stack(batch["rest_logprob"]).astype(np.float32)).to(device).view(n),
        )
    return inputs, targets, teacher


def train_step(model, loss_fn, optimizer, scheduler, batch, grad_clip: float, world: int):
    """One optimizer step; returns the loss parts as floats. Non-finite loss raises."""
    inputs, targets, teacher = batch
    model.train()
    hidden, head = hidden_and_head(model, inputs)
    parts = loss_fn(hidden.flatten(0, 1), head, targets.flatten(), teacher)
    if not torch.isfinite(parts.total):
        raise FloatingPointError(f"non-finite loss {parts.total.item()}")
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    if world > 1:
        allreduce_gradients(model, world)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
    optimizer.step()
    scheduler.step()
    return {"loss": parts.total.item(), "ntp": parts.ntp.item(), "kd": parts.kd.item(),
            "z": parts.z.item(), "grad_norm": float(norm) if norm is not None else 0.0}


def allreduce_gradients(model, world: int) -> None:
    """Average gradients across workers with one flat all-reduce."""
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.inference_mode()
def eval_step(model, blocks: np.ndarray, batch_size: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` on ``blocks`` [n, T]."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[start:start + batch_size].astype(np.int64)).to(device)
        logits = model(input_ids=ids[:, :-1]).logits.float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / max(1, count)


# ---------------------------------------------------------------------------- data order

def shuffle_window(batch_size: int) -> int:
    """Rows shuffled together within an epoch: a whole number of batches, at least 64 rows."""
    return batch_size * max(4, math.ceil(64 / batch_size))


def shuffled_batches(chunks, batch_size: int, seed: int):
    """Batches of ``batch_size`` rows from a stream of column chunks (dicts of equal-length
    arrays), the rows of each window of ``shuffle_window`` rows permuted by ``seed``; an
    incomplete last batch is dropped. The output depends on the rows and their order only,
    not on how the stream is chunked: the train stage (Ray Data shard) and a sweep point
    (rows in memory) see the same batches for the same rows and seed."""
    rng = np.random.default_rng(seed)
    window = shuffle_window(batch_size)
    pending: dict[str, list] = {}
    held = 0

    def emit(take: int):
        cols = {k: np.concatenate(v) for k, v in pending.items()}
        rest = {k: [c[take:]] for k, c in cols.items()}
        order = rng.permutation(take)
        for start in range(0, take - batch_size + 1, batch_size):
            yield {k: c[:take][order[start:start + batch_size]] for k, c in cols.items()}
        return rest

    for chunk in chunks:
        for k, v in chunk.items():
            pending.setdefault(k, []).append(np.asarray(v))
        held += len(next(iter(chunk.values())))
        while held >= window:
            pending = yield from emit(window)
            held -= window
    if held >= batch_size:
        yield from emit(held)


def epoch_rows(order: np.ndarray, batch_size: int, seed: int, steps: int) -> np.ndarray:
    """[steps, batch] indices into the data, in the order the train stage's worker (one worker)
    reads them: ``order`` (``open_dataset``'s seeded permutation) epoch after epoch, each epoch
    through ``shuffled_batches`` seeded ``seed + epoch``."""
    if len(order) < batch_size:
        raise ValueError(f"the training data has fewer blocks ({len(order)}) than one batch ({batch_size})")
    rows, epoch = [], 0
    while len(rows) < steps:
        rows += [b["row"] for b in shuffled_batches([{"row": order}], batch_size, seed + epoch)]
        epoch += 1
    return np.stack(rows[:steps])


def data_order(n_rows: int, seed: int) -> np.ndarray:
    """The seeded permutation ``open_dataset`` puts small data in."""
    return np.random.default_rng(seed).permutation(n_rows)


def train_with_cooldowns(model, optim: OptimConfig, loss_fn, batch_of, rows: np.ndarray,
                         budgets: list[int], on_budget, grad_clip: float | None = None) -> None:
    """Train ``model`` in this process, with the train stage's steps, schedule and data order
    (``rows`` from :func:`epoch_rows`; ``batch_of(rows)`` gives a step's tensors), and call
    ``on_budget(steps, model)`` with the model a run of ``optim`` at each of ``budgets`` steps
    ends with. Warmup–stable–decay: one trunk at the stable rate, each shorter budget's
    cooldown a branch copied from it (Hägele et al. 2024), so all budgets cost about the
    longest one. Cosine: the schedule depends on the run's length, so only one budget."""
    import copy

    budgets = sorted(set(budgets))
    if optim.schedule != "wsd" and len(budgets) > 1:
        raise ValueError(f"schedule {optim.schedule!r} cannot branch budgets {budgets} from one run (use wsd)")
    if len(rows) < budgets[-1]:
        raise ValueError(f"{len(rows)} batches of rows for a {budgets[-1]}-step run")
    clip = optim.grad_clip if grad_clip is None else grad_clip
    trunk_optim = dataclasses.replace(optim, steps=budgets[-1])
    optimizer, scheduler = make_optimizer(model, trunk_optim)
    step = 0
    for budget in budgets[:-1]:
        branch_optim = dataclasses.replace(optim, steps=budget)
        for step in range(step, stable_end(branch_optim)):
            train_step(model, loss_fn, optimizer, scheduler, batch_of(rows[step]), clip, 1)
        step = stable_end(branch_optim)
        branch = copy.deepcopy(model)
        b_opt, b_sched = branch_optimizer(branch, optimizer, branch_optim, step)
        for s in range(step, budget):
            train_step(branch, loss_fn, b_opt, b_sched, batch_of(rows[s]), clip, 1)
        on_budget(budget, branch)
    for s in range(step, budgets[-1]):
        train_step(model, loss_fn, optimizer, scheduler, batch_of(rows[s]), clip, 1)
    on_budget(budgets[-1], model)


# ---------------------------------------------------------------------------- worker

def build_or_load_model(spec: TrainSpec):
    """A fresh scratch model, or the local HF model named by ``spec.model.model``."""
    from distill.models import build_llama, load_causal_lm

    if spec.model.model == "scratch":
        return build_llama(spec.model, spec.vocab_size, spec.block_size, spec.seed,
                           spec.eos_id, spec.pad_id)
    return load_causal_lm(spec.model.model, spec.model.trust_remote_code)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: train ``config['spec']``, checkpoint, resume, report."""
    import ray.train
    import ray.train.torch

    spec: TrainSpec = config["spec"]
    refuse_if_diverged(spec)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, round(spec.cpus_per_worker)))
    device = ray.train.torch.get_device()
    model = build_or_load_model(spec).to(device)
    if world > 1:
        broadcast_parameters(model)
    optimizer, scheduler = make_optimizer(model, spec.optim)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "history": [], "resumed_from": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_training_state(Path(d), model, optimizer, scheduler, rank)
    loss_fn = build_loss(spec)
    k = spec.label_meta.get("k") if spec.loss is not None and not spec.teacher_dir else None
    online_teacher = load_online_teacher(spec, device)
    shard = ray.train.get_dataset_shard("train")
    val_blocks = load_val_blocks(spec) if rank == 0 else None
    logger = MlflowWorkerLogger(spec) if rank == 0 else None
    per_worker = max(1, spec.optim.batch_size // world)
    tokens_per_step = per_worker * world * (spec.block_size - 1)
    t0 = time.perf_counter()
    while state["step"] < spec.optim.steps:
        rows = shard.iter_batches(batch_size=shuffle_window(per_worker), batch_format="numpy")
        iterator = shuffled_batches(rows, per_worker, spec.seed + state["epoch"])
        for i, batch in enumerate(iterator):
            if i < state["batch_in_epoch"]:
                continue  # resuming mid-epoch: skip what was already trained on
            try:
                tensors = batch_to_tensors(batch, device, k, spec.label_meta.get("samples", 0))
                if online_teacher is not None:
                    tensors = with_online_labels(online_teacher, tensors, spec.vocab_size)
                metrics = train_step(model, loss_fn, optimizer, scheduler, tensors,
                                     spec.optim.grad_clip, world)
            except FloatingPointError as exc:
                message = (f"{spec.role} training diverged at step {state['step'] + 1}: {exc}; "
                           f"last good checkpoint: step {state.get('last_checkpoint_step', 'none')} "
                           f"under {spec.storage_path}/{spec.run_name()}")
                mark_diverged(spec, message)
                raise FloatingPointError(message) from exc
            state["step"] += 1
            state["batch_in_epoch"] = i + 1
            metrics.update(step=state["step"], lr=scheduler.get_last_lr()[0],
                           tokens=state["step"] * tokens_per_step,
                           tokens_per_s=(state["step"] * tokens_per_step) / (time.perf_counter() - t0))
            if rank == 0 and state["step"] % spec.optim.eval_every == 0:
                metrics["val_loss"] = eval_step(model, val_blocks, per_worker, device)
            if rank == 0 and (state["step"] % spec.log_every == 0 or "val_loss" in metrics):
                state["history"].append(metrics)
                logger.log(metrics)
                print_progress(spec, metrics)
            if state["step"] % spec.checkpoint_every == 0 and state["step"] < spec.optim.steps:
                report_checkpoint(spec, model, optimizer, scheduler, state, metrics, rank, final=False)
                state["last_checkpoint_step"] = state["step"]
            if state["step"] >= spec.optim.steps:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            if state["step"] == 0:
                raise ValueError(f"{spec.role}: the training data has fewer blocks than one batch "
                                 f"({per_worker} per worker)")
    final = {"step": state["step"]}
    if rank == 0:
        final["val_loss"] = eval_step(model, val_blocks, per_worker, device)
        logger.log({"final_val_loss": final["val_loss"], "step": state["step"]})
    report_checkpoint(spec, model, optimizer, scheduler, state, final, rank, final=True)


def divergence_marker(spec: TrainSpec) -> str:
    """File that records a divergence of this run (same inputs → same run → same NaN)."""
    return f"{spec.storage_path.rstrip('/')}/{spec.run_name()}/DIVERGED"  # a folder or s3:// URI


def mark_diverged(spec: TrainSpec, message: str) -> None:
    """Record the divergence so a restarted worker stops instead of training on."""
    write_text(divergence_marker(spec), message)


def refuse_if_diverged(spec: TrainSpec) -> None:
    """A diverged run is never continued: Ray Train's restarts (max_failures) stop here too."""
    path = divergence_marker(spec)
    if (message := read_text(path)) is not None:
        raise FloatingPointError(f"{message} (recorded in {path}; change the parameters, "
                                 f"e.g. a lower learning rate, to start a new run)")


def load_online_teacher(spec: TrainSpec, device: torch.device):
    """The frozen teacher for online distillation, or None for offline/supervised runs."""
    if not spec.teacher_dir or spec.loss is None:
        return None
    from distill.models import load_causal_lm

    teacher = load_causal_lm(spec.teacher_dir).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def with_online_labels(teacher, tensors: tuple, vocab: int) -> tuple:
    """Add the teacher's full logits [N, V] for the batch (padding rows beyond ``vocab`` cut)."""
    from distill.losses import DenseTeacher

    inputs, targets, _ = tensors
    logits = teacher(input_ids=inputs).logits[..., :vocab]
    return inputs, targets, DenseTeacher(logits.flatten(0, 1))


def broadcast_parameters(model) -> None:
    """Start every worker from rank 0's weights."""
    import torch.distributed as dist

    for p in model.parameters():
        dist.broadcast(p.data, src=0)


def build_loss(spec: TrainSpec) -> DistillationLoss:
    """The distillation loss, or plain NTP (+ ``spec.z_loss``) when supervised."""
    if spec.loss is None:
        return DistillationLoss(alpha=0.0, z_loss=spec.z_loss)
    c = spec.loss
    return DistillationLoss(alpha=c.alpha, temperature=c.temperature, kind=c.divergence,
                            beta=c.jsd_beta, z_loss=c.z_loss, chunk_positions=c.chunk_positions)


def load_val_blocks(spec: TrainSpec) -> np.ndarray:
    """The first ``eval_blocks`` validation blocks (rank 0 evaluates)."""
    from distill.blocks import iter_shard_blocks

    parts, n = [], 0
    for path in spec.val_paths:
        for _, arr in iter_shard_blocks(Path(path)):
            parts.append(arr)
            n += len(arr)
        if n >= spec.eval_blocks:
            break
    return np.concatenate(parts)[: spec.eval_blocks]


def print_progress(spec: TrainSpec, m: dict) -> None:
    """One progress line per log step (Ray forwards worker output to the driver)."""
    val = f" val {m['val_loss']:.4f}" if "val_loss" in m else ""
    print(f"[{spec.role}] step {m['step']}/{spec.optim.steps} loss {m['loss']:.4f} "
          f"ntp {m['ntp']:.4f} kd {m['kd']:.4f}{val} lr {m['lr']:.2e} "
          f"{m['tokens_per_s']:.0f} tok/s", flush=True)


class MlflowWorkerLogger:
    """Logs metrics from rank 0 into the stage's MLflow run (Ray Train V2 has no MLflow callback)."""

    def __init__(self, spec: TrainSpec):
        self.client = None
        if spec.tracking_uri and spec.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id, self.prefix = MlflowClient(spec.tracking_uri), spec.mlflow_run_id, spec.role

    def log(self, metrics: dict) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        step, now = int(metrics.get("step", 0)), int(time.time() * 1000)
        batch = [Metric(f"{self.prefix}/{k}", float(v), now, step)
                 for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=batch)


# ---------------------------------------------------------------------------- checkpoints

def report_checkpoint(spec, model, optimizer, scheduler, state, metrics, rank, final: bool) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_training_state(Path(tmp), model, optimizer, scheduler, state)
            if final:
                save_hf_model(spec, model, Path(tmp) / "hf")
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report({**clean, "final": final}, checkpoint=checkpoint)


def save_training_state(d: Path, model, optimizer, scheduler, state: dict) -> None:
    """Model, optimizer, scheduler, RNG and data position, everything resume needs."""
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate()},
                "position": {k: state[k] for k in ("step", "epoch", "batch_in_epoch")}},
               d / "state.pt")
    (d / "history.json").write_text(json.dumps(state["history"]))
    (d / "resumes.json").write_text(json.dumps(state["resumed_from"]))


def load_training_state(d: Path, model, optimizer, scheduler, rank: int) -> dict:
    """Restore what ``save_training_state`` wrote; returns the data position and history."""
    blob = torch.load(d / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(blob["model"])
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    np.random.set_state(blob["rng"]["numpy"])
    random.setstate(blob["rng"]["python"])
    history = json.loads((d / "history.json").read_text())
    step = blob["position"]["step"]
    resumed = json.loads((d / "resumes.json").read_text()) + [step]
    if rank == 0:
        print(f"resumed from checkpoint at step {step}", flush=True)
    return {**blob["position"], "history": history, "last_checkpoint_step": step, "resumed_from": resumed}


def save_hf_model(spec: TrainSpec, model, out: Path) -> None:
    """The trained model in HF format (safetensors) with its tokenizer."""
    from distill.models import save_model
    from distill.tokenizer import load_tokenizer

    save_model(model, load_tokenizer(spec.tokenizer_dir), out)


# ---------------------------------------------------------------------------- driver

SMALL_DATA_BYTES = 256 * 1024 * 1024


def open_dataset(paths: list[str], seed: int):
    """A Ray dataset over parquet shards, its rows in a seeded random order.

    Prepared blocks lie in document order (a document's blocks are adjacent), and the
    workers' local shuffle buffer only mixes a few dozen rows: without a global shuffle a
    batch holds a handful of documents and the student trains measurably worse. Small data
    is read by the driver into the object store and permuted once (starting Ray Data read
    tasks costs ~10 s before the first batch on 2 cores); large data is read by Ray Data
    tasks in a seeded random block order (paths must then be on storage every node sees).
    The order is a function of ``seed`` alone, so a resumed run sees the same batches.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    if sum(os.path.getsize(p) for p in paths) <= SMALL_DATA_BYTES:
        table = pa.concat_tables([pq.read_table(p) for p in paths])
        order = np.random.default_rng(seed).permutation(table.num_rows)
        return ray.data.from_arrow(table.take(order))
    return ray.data.read_parquet(paths).randomize_block_order(seed=seed)


def run_training(spec: TrainSpec, out_dir: Path) -> TrainResult:
    """Train with Ray Train's ``TorchTrainer`` and copy the final HF model to ``out_dir``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    say_resume_or_fresh(spec)
    dataset = open_dataset(spec.data_paths, spec.seed)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if spec.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.cpus_per_worker}),
        run_config=RunConfig(name=spec.run_name(), **storage_for_ray_train(spec.storage_path),
                             failure_config=FailureConfig(max_failures=spec.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        hf_dir = Path(d) / "hf"
        if not hf_dir.is_dir():
            raise RuntimeError(f"{spec.role}: the final checkpoint {result.checkpoint.path} has no model")
        history = json.loads((Path(d) / "history.json").read_text())
        resumed_from = json.loads((Path(d) / "resumes.json").read_text())
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(hf_dir, tmp)
    from distill.io import replace_dir

    replace_dir(tmp, out_dir)
    return TrainResult(model_dir=out_dir, history=history, final=dict(result.metrics or {}),
                       resumed_from=resumed_from)


def say_resume_or_fresh(spec: TrainSpec) -> None:
    """One line on whether this run continues an earlier one (same fingerprint) or starts
    fresh, naming the runs of the same role that are not resumed because they differ."""
    storage, name = resolve_storage(spec.storage_path), spec.run_name()  # a folder or s3:// URI
    if name in storage.folders():
        print(f"{spec.role}: run {name} exists (same data, settings and code {spec.code[:12]}): "
              f"Ray Train resumes it from its latest checkpoint", flush=True)
        return
    others = [f for f in storage.folders() if f.startswith(f"{spec.role}-")]
    why = (f"; not resuming {', '.join(others)} (other data, settings or code)" if others else "")
    print(f"{spec.role}: new run {name} (code {spec.code[:12]}){why}", flush=True)


def spec_from_config(cfg, role: str, model: ModelConfig, optim: OptimConfig,
                     loss: DistillConfig | None, data_paths: list[Path], val_paths: list[Path],
                     prepared_dir: Path, manifest: dict, storage: Path, **extra) -> TrainSpec:
    """A ``TrainSpec`` from the validated config and the prepared data's manifest."""
    tok = manifest["tokenizer"]
    # The run name must change with the data, or Ray Train would "resume" a finished run
    # on old data: hash the prepared shards' content hashes and the data file names
    # (label files are named by their content address).
    shard_hashes = [s["hash"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    data_hash = sha256_bytes(json.dumps([shard_hashes, [Path(p).name for p in data_paths],
                                         tok["hash"], model_inputs(model, extra.get("teacher_dir", ""))]).encode())
    return TrainSpec(
        role=role, model=model, optim=optim, loss=loss,
        data_paths=[str(Path(p).resolve()) for p in data_paths],
        val_paths=[str(Path(p).resolve()) for p in val_paths],
        tokenizer_dir=str((prepared_dir / "tokenizer").resolve()),
        vocab_size=tok["vocab_size"], block_size=manifest["block_size"],
        eos_id=tok["eos_id"], pad_id=tok["pad_id"], storage_path=runs_uri(cfg, storage),
        seed=cfg.seed, num_workers=cfg.train.num_workers, cpus_per_worker=cfg.train.cpus_per_worker,
        use_gpu=cfg.train.use_gpu, checkpoint_every=cfg.train.checkpoint_every,
        max_failures=cfg.train.max_failures, eval_blocks=cfg.evaluate.max_blocks,
        data_hash=data_hash[:16], z_loss=cfg.distill.z_loss, **extra)


def model_inputs(model: ModelConfig, teacher_dir: str) -> dict[str, str]:
    """The content of the models a run reads, which its paths alone do not identify: a local
    HF model it starts from and the online teacher (a retrained teacher in the same folder
    must not resume a run distilled from the old one)."""
    from distill.models import model_fingerprint

    found = {}
    if model.model != "scratch":
        found["init"] = model_fingerprint(model.model)
    if teacher_dir:
        found["teacher"] = model_fingerprint(teacher_dir)
    return found


def tokens_per_run(optim: OptimConfig, block_size: int, num_workers: int) -> int:
    """Training tokens D a run consumes: steps × global batch × predicted positions per block."""
    per_worker = max(1, optim.batch_size // num_workers)
    return optim.steps * per_worker * num_workers * (block_size - 1)
