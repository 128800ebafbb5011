"""The one typed configuration, loaded from ``params.yaml`` and validated once.

Every section of ``params.yaml`` is a frozen dataclass below. ``load_config`` turns the
YAML into a ``Config`` and fails *before any work* with a ``ConfigError`` that names the
key path (``train.lr``) and what is allowed, for an unknown key, a wrong type or an
out-of-range value. The stages receive the ``Config`` and never read the file again.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


def _choice(*allowed: str) -> dict:
    return {"choices": allowed}


@dataclass(frozen=True)
class DataConfig:
    """Where the corpus comes from and how it becomes token blocks."""

    # "stdlib" (the interpreter's own standard library), a local file/folder
    # (.txt/.py/.jsonl/.parquet), or "hf:<name>[:<split>]" for a `datasets` corpus.
    source: str = "stdlib"
    text_field: str = field(default="text", metadata={})
    max_documents: int = field(default=0, metadata=_range(0))  # 0 = all
    # The piece size: a longer text (a big file, a long record) is cut at paragraph
    # boundaries into documents of at most this many characters; nothing is dropped.
    max_doc_chars: int = field(default=200_000, metadata=_range(64))
    val_fraction: float = field(default=0.05, metadata=_range(0.0, 0.5, lo_open=True))
    # "bpe" trains a byte-level BPE here; anything else is a local HF tokenizer path.
    tokenizer: str = "bpe"
    vocab_size: int = field(default=2048, metadata=_range(260, 1_000_000))
    block_size: int = field(default=128, metadata=_range(8, 1_000_000))
    shard_blocks: int = field(default=2048, metadata=_range(1))
    # Document tails (shorter than a block) are packed in this many buckets by document hash:
    # an added document changes only tail blocks of its bucket (more buckets: fewer relabeled
    # blocks, more dropped remainders — each bucket's last partial block).
    tail_buckets: int = field(default=16, metadata=_range(1, 256))  # one spill file each while packing
    # The BPE trains on the train documents in hash order up to this many characters (a
    # deterministic sample; the whole train split of a small corpus).
    tokenizer_sample_chars: int = field(default=20_000_000, metadata=_range(1000))
    # Tokenise-and-pack engine: "local" (this process, the tokenizer's threads), "ray" (Ray
    # Data over the cluster's or this machine's cores), "auto" (ray above ray_above_mb).
    engine: str = field(default="auto", metadata=_choice("auto", "local", "ray"))
    ray_above_mb: float = field(default=256.0, metadata=_range(0.0))  # kept text, in MB (10^6 chars)
    # Characters per tokenise batch: enough for the tokenizer's threads, bounded since its
    # encodings cost ~100 bytes a token.
    batch_chars: int = field(default=2_000_000, metadata=_range(1))


@dataclass(frozen=True)
class ModelConfig:
    """A causal LM: ``scratch`` builds a Llama-style one from the sizes, else a local HF path."""

    model: str = "scratch"
    layers: int = field(default=2, metadata=_range(1, 512))
    d_model: int = field(default=64, metadata=_range(8, 65536))
    heads: int = field(default=4, metadata=_range(1, 1024))
    ffn: int = field(default=0, metadata=_range(0))  # 0 = 8/3 · d_model rounded to 32
    trust_remote_code: bool = False


@dataclass(frozen=True)
class OptimConfig:
    """How one model is optimised: AdamW, linear warm-up, then cosine decay or warmup–stable–decay,
    clipping."""

    steps: int = field(default=200, metadata=_range(1))
    batch_size: int = field(default=16, metadata=_range(1))
    lr: float = field(default=3e-3, metadata=_range(0.0, 10.0, lo_open=True))
    min_lr_ratio: float = field(default=0.1, metadata=_range(0.0, 1.0))
    warmup_steps: int = field(default=20, metadata=_range(0))
    weight_decay: float = field(default=0.1, metadata=_range(0.0, 10.0))
    grad_clip: float = field(default=1.0, metadata=_range(0.0))
    eval_every: int = field(default=50, metadata=_range(1))
    # wsd: warm-up, a constant (stable) rate, then a (1-sqrt) cooldown to min_lr_ratio over the
    # last cooldown_fraction of the steps (Hägele et al. 2024). The stable phase does not depend
    # on the run's length, so a run's cooldowns branched from it give the loss at every
    # shorter budget (the calibration sweep trains one run per size and seed). cosine: the
    # classic decay over all steps (each budget its own run).
    schedule: str = field(default="wsd", metadata=_choice("wsd", "cosine"))
    cooldown_fraction: float = field(default=0.2, metadata=_range(0.0, 1.0, lo_open=True))


@dataclass(frozen=True)
class TeacherConfig(ModelConfig):
    """The teacher: pretrained here from scratch (embedded default) or a local HF model."""

    layers: int = field(default=4, metadata=_range(1, 512))
    d_model: int = field(default=128, metadata=_range(8, 65536))
    # Pretraining tokens D_T of a given (non-scratch) teacher, for the gate's paper law;
    # 0 = unknown. A scratch teacher's D_T is counted by the teacher stage.
    pretrain_tokens: float = field(default=0.0, metadata=_range(0.0))
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class StudentConfig(ModelConfig):
    """The student architecture (training settings live in ``train``)."""


@dataclass(frozen=True)
class GateConfig:
    """The scaling-law gate: which coefficients, which scenario, or a forced decision."""

    coefficients: str = "auto"  # auto (calibrated if present, else paper) | paper | <path>
    # What is fixed: data-limited (the student's tokens: both branches train on train.steps'
    # tokens, the teacher's cost is not charged) or compute-limited (the FLOPs of training
    # the student supervised for train.steps: distillation gets what is left after the
    # scenario's teacher costs, Eq. 9, and trains for fewer steps or not at all).
    question: str = field(default="data-limited", metadata=_choice("data-limited", "compute-limited"))
    scenario: str = field(
        default="teacher-inference",
        metadata=_choice("best-case", "teacher-inference", "teacher-pretraining",
                         "teacher-pretraining+inference"),
    )
    force: str = field(default="none", metadata=_choice("none", "distill", "supervised"))


@dataclass(frozen=True)
class CalibrateConfig:
    """The calibration sweep that fits the gate's laws on this project's data (``calibrate`` stage).

    Supervised points: every student size × every budget. Distillation points: every student
    size × every budget × every teacher. Optimiser settings (batch, warm-up share, schedule,
    decay, clipping) come from ``train``, so a sweep point with the pipeline's student size
    and steps is the pipeline's own training run.
    """

    # Student sizes "<layers>x<d_model>", comma-separated; heads = d_model / head_dim.
    students: str = "2x32, 2x48, 2x64"
    head_dim: int = field(default=16, metadata=_range(1, 65536))
    # Token budgets as optimizer steps at train.batch_size, comma-separated.
    steps: str = "75, 120, 190, 300"
    # Teachers: "pipeline" (the teacher stage's model) and/or "<layers>x<d_model>" (a
    # supervised sweep model of that size trained for teacher_steps, reused as a teacher, as
    # the paper did; it distills the students smaller than itself).
    teachers: str = "pipeline, 3x96"
    # Budget of a swept teacher in optimizer steps (0 = the largest of steps). Longer than the
    # students' budgets keeps the teacher stronger than every student it teaches: Eq. 8 has
    # the teacher's loss as its floor and cannot describe a student that outlearns it. A
    # teacher's own run is not a configuration of the fit (one seed, possibly several epochs).
    teacher_steps: int = field(default=600, metadata=_range(0))
    # Strengths of each swept teacher: its one run's cooldown branches at teacher_steps,
    # teacher_steps/2, /4, … (warmup–stable–decay), so Eq. 8's teacher terms see several
    # teacher losses; the weak ones give configurations where supervised training wins.
    teacher_strengths: int = field(default=3, metadata=_range(1, 8))
    # Runs per configuration, seeds seed, seed+1, …: the fit takes their mean loss. At this
    # scale one run's loss moves by ~1 % with the seed (initialisation and data order),
    # as much as the margin between the branches.
    seeds: int = field(default=3, metadata=_range(1))
    # Learning rate of a size: train.lr · (student.d_model / d_model) ^ lr_width_exponent.
    lr_width_exponent: float = field(default=0.5, metadata=_range(0.0, 4.0))
    # Share of each kind's points held out of the fit to measure its prediction error (0 = none).
    heldout_share: float = field(default=0.2, metadata=_range(0.0, 0.9))
    bootstrap: int = field(default=50, metadata=_range(0))   # bootstrap resamples for CIs (0 = none)
    fit_starts: int = field(default=32, metadata=_range(1))   # L-BFGS-B starts (best grid points)
    cpus_per_point: float = field(default=1.0, metadata=_range(0.0, lo_open=True))  # Ray task size


@dataclass(frozen=True)
class DistillConfig:
    """The loss: ``(1-alpha)·NTP + alpha·KD + z_loss·Z`` with top-k soft labels."""

    alpha: float = field(default=0.5, metadata=_range(0.0, 1.0))
    temperature: float = field(default=1.0, metadata=_range(0.0, 100.0, lo_open=True))
    divergence: str = field(default="forward_kl",
                            metadata=_choice("forward_kl", "reverse_kl", "jsd"))
    jsd_beta: float = field(default=0.5, metadata=_range(0.0, 1.0))
    z_loss: float = field(default=1e-4, metadata=_range(0.0))
    # offline: top-k labels from the label stage; online: the teacher runs inside each
    # training step and gives full logits (when it fits beside the student).
    source: str = field(default="offline", metadata=_choice("offline", "online"))
    top_k: int = field(default=32, metadata=_range(1))
    chunk_positions: int = field(default=1024, metadata=_range(1))
    # offline label kind: topk (top_k log-probs + rest) | sampled (RS-KD: `samples` draws per
    # position from the teacher at τ, stored as distinct ids with counts; forward KL, HF backend)
    label_kind: str = field(default="topk", metadata=_choice("topk", "sampled"))
    samples: int = field(default=32, metadata=_range(1, 2048))  # float16 log-counts stay exact


@dataclass(frozen=True)
class LabelConfig:
    """How the teacher labels the train blocks (Ray Data actor pool)."""

    backend: str = field(default="auto", metadata=_choice("auto", "hf", "vllm"))
    batch_size: int = field(default=16, metadata=_range(1))
    num_actors: int = field(default=1, metadata=_range(1))
    cpus_per_actor: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    gpus_per_actor: float = field(default=0.0, metadata=_range(0.0))
    dtype: str = field(default="float32", metadata=_choice("float32", "bfloat16", "float16"))
    # soft: top-k log-probs of the corpus text (teacher forcing); hard: the teacher's
    # generations for prompts (the first prompt_tokens of each block); hard+soft: the
    # generations with the top-k log-probs of every generated token.
    mode: str = field(default="soft", metadata=_choice("soft", "hard", "hard+soft"))
    prompt_tokens: int = field(default=32, metadata=_range(1))     # hard modes: prompt length
    max_new_tokens: int = field(default=64, metadata=_range(1))    # hard modes: generation cap
    sampling: str = field(default="greedy", metadata=_choice("greedy", "sample"))
    # hard modes with sampling: sample; seeded per block by the top-level seed
    gen_temperature: float = field(default=1.0, metadata=_range(0.0, 100.0, lo_open=True))
    top_p: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))
    # vLLM: GPUs one engine spans (its actor needs that many: label.gpus_per_actor); on CPU
    # (gpus_per_actor 0) that many worker processes of vLLM's CPU build
    tensor_parallel_size: int = field(default=1, metadata=_range(1, 1024))
    gpu_memory_utilization: float = field(default=0.85, metadata=_range(0.0, 1.0, lo_open=True))
    # vLLM: KV cache size in GiB (0 = vLLM sizes it; on CPU then VLLM_CPU_KVCACHE_SPACE or
    # its default); soft labels need only one block per sequence
    kv_cache_gib: float = field(default=0.0, metadata=_range(0.0))
    # vLLM: no torch.compile / CUDA graphs (engine start in seconds, not tens of seconds)
    enforce_eager: bool = False
    # HF backend: at most this many pending blocks are labeled in the stage's own process
    # (same labeler, same batches) — starting Ray and an actor pool costs more than the work
    # (an incremental run after a few new documents); 0 = always the Ray Data pool.
    inline_blocks: int = field(default=512, metadata=_range(0))


@dataclass(frozen=True)
class TrainConfig(OptimConfig):
    """Student training under Ray Train."""

    num_workers: int = field(default=1, metadata=_range(1))
    cpus_per_worker: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    use_gpu: bool = False
    checkpoint_every: int = field(default=50, metadata=_range(1))
    max_failures: int = field(default=2, metadata=_range(0))


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluation and registration."""

    max_blocks: int = field(default=256, metadata=_range(1))
    batch_size: int = field(default=16, metadata=_range(1))
    registered_model: str = "distill-student"
    # Equal-width confidence bins of the expected calibration error (max next-token probability).
    ece_bins: int = field(default=15, metadata=_range(2, 1000))
    # Greedy samples of both models from fixed prompts: the first `samples` validation blocks,
    # cut to `sample_prompt_tokens` tokens, continued by `sample_tokens` tokens (0 samples = none).
    samples: int = field(default=3, metadata=_range(0, 100))
    sample_prompt_tokens: int = field(default=8, metadata=_range(1))
    sample_tokens: int = field(default=16, metadata=_range(1))


@dataclass(frozen=True)
class RayConfig:
    """Empty address starts a local Ray sized to this machine; ``auto`` joins a cluster."""

    address: str = ""
    num_cpus: int = field(default=0, metadata=_range(0))  # 0 = all of this machine's
    object_store_mb: int = field(default=512, metadata=_range(64))


@dataclass(frozen=True)
class MlflowConfig:
    """Tracking store; empty ``tracking_uri`` means sqlite under ``mlflow/`` (absolute)."""

    tracking_uri: str = ""
    experiment: str = "distill"


@dataclass(frozen=True)
class StorageConfig:
    """Where runs' checkpoints, label shards, calibration points, MLflow artifacts and the DVC
    remote live: ``""`` = this project's folders (as before); an absolute folder, or
    ``s3://bucket/prefix`` (endpoint and credentials: the standard AWS variables,
    ``AWS_ENDPOINT_URL`` for a non-AWS store)."""

    root: str = ""


@dataclass(frozen=True)
class Config:
    """The whole ``params.yaml``."""

    seed: int = field(default=0, metadata=_range(0))
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for logging and hashing)."""
        return dataclasses.asdict(self)


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read ``params.yaml`` (plus dotted ``overrides``) into a validated ``Config``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return build_config(raw, source=str(path))


def build_config(raw: dict[str, Any], source: str = "params") -> Config:
    """Validate a nested dict against the schema; errors name ``source`` and the key path."""
    cfg = _build(Config, raw, prefix="", source=source)
    _check_cross_field(cfg, source)
    return cfg


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
    node[leaf] = value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        allowed = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]} (allowed: {allowed})")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, fields[name], f"{prefix}{name}", source)
    return cls(**values)


def _coerce(hint: Any, value: Any, f: dataclasses.Field, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, prefix=f"{key}.", source=source)
    value = _check_type(hint, value, key, source)
    _check_constraints(value, f.metadata, key, source)
    return value


def _check_type(hint: Any, value: Any, key: str, source: str) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        raise TypeError(f"unsupported union type for {key}")  # schema bug, not user error
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)  # YAML writes 1e6 as a float
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key} must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported type {hint} for {key}")


def _check_constraints(value: Any, meta: Any, key: str, source: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(meta["choices"])
        raise ConfigError(f"{source}: {key} = {value!r} is not allowed (allowed: {allowed})")
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and value > hi
        if too_low or too_high:
            lo_txt = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
            hi_txt = "" if hi is None else f"<= {hi}"
            bounds = " and ".join(t for t in (lo_txt, hi_txt) if t)
            raise ConfigError(f"{source}: {key} = {value!r} is out of range (must be {bounds})")


SUPERVISED_LAW_PARAMS, DISTILLATION_LAW_PARAMS = 6, 9  # coefficients of Eq. 1 and Eq. 8


def parse_student_sizes(text: str, key: str = "calibrate.students") -> list[tuple[int, int]]:
    """``"1x48, 2x64"`` → ``[(1, 48), (2, 64)]``; a ConfigError names ``key`` on bad input."""
    sizes = []
    for item in (t.strip() for t in text.split(",")):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"{key}: {item!r} is not a size; write <layers>x<d_model>, e.g. 2x64, "
                              f"comma-separated")
        sizes.append((int(parts[0]), int(parts[1])))
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"{key}: sizes repeat in {text!r}")
    return sizes


def parse_steps(text: str, key: str = "calibrate.steps") -> list[int]:
    """``"100, 200"`` → ``[100, 200]`` (distinct positive integers, sorted)."""
    items = [t.strip() for t in text.split(",")]
    if not all(t.isdigit() and int(t) > 0 for t in items):
        raise ConfigError(f"{key}: {text!r} must be positive integers (optimizer steps), comma-separated")
    steps = sorted(int(t) for t in items)
    if len(set(steps)) != len(steps):
        raise ConfigError(f"{key}: budgets repeat in {text!r}")
    return steps


def parse_teachers(text: str, key: str = "calibrate.teachers") -> list[str]:
    """``"pipeline, 3x96"`` → ``["pipeline", "3x96"]`` (``pipeline`` or sizes, no repeats)."""
    teachers = []
    for item in (t.strip().lower() for t in text.split(",")):
        if item != "pipeline":
            ((layers, width),) = parse_student_sizes(item, key)
            item = f"{layers}x{width}"
        teachers.append(item)
    if len(set(teachers)) != len(teachers):
        raise ConfigError(f"{key}: teachers repeat in {text!r}")
    return teachers


def sweep_teachers(cal: "CalibrateConfig", steps: list[int]) -> list[str]:
    """The sweep's teachers: ``pipeline`` and, per swept size, ``"<size>@<steps>"`` at each of
    its ``teacher_strengths`` budgets (``teacher_steps`` halved, smallest first)."""
    top = teacher_budget(cal.teacher_steps, steps)
    out = []
    for teacher in parse_teachers(cal.teachers):
        if teacher == "pipeline":
            out.append(teacher)
            continue
        budgets = sorted({max(1, round(top / 2 ** i)) for i in range(cal.teacher_strengths)})
        out += [f"{teacher}@{b}" for b in budgets]
    return out


def teacher_size(teacher: str) -> str:
    """``"3x96@150"`` → ``"3x96"`` (a swept teacher's size; ``pipeline`` stays)."""
    return teacher.split("@")[0]


def distills(teacher: str, student: tuple[int, int]) -> bool:
    """Whether the sweep distills ``student`` (layers, d_model) from ``teacher``: the
    pipeline's teacher distills every student, a swept teacher only students smaller than
    itself (layers·d_model², ∝ non-embedding size). Eq. 8 predicts a student above its
    teacher's loss; an equal or larger student is self-distillation or weak-to-strong,
    outside the law, and measured at or below its teacher it only bends the fit."""
    if teacher == "pipeline":
        return True
    ((t_layers, t_width),) = parse_student_sizes(teacher_size(teacher), "calibrate.teachers")
    return student[0] * student[1] ** 2 < t_layers * t_width ** 2


def teacher_budget(teacher_steps: int, steps: list[int], key: str = "calibrate.teacher_steps") -> int:
    """A swept teacher's budget: ``teacher_steps``, or the largest student budget when 0. It
    may not be shorter than a student's budget (the teacher is the longest run of its size)."""
    if teacher_steps == 0:
        return steps[-1]
    if teacher_steps < steps[-1]:
        raise ConfigError(f"{key}: {teacher_steps} is shorter than the largest student budget "
                          f"({steps[-1]} in calibrate.steps); use 0 (= that budget) or at least {steps[-1]}")
    return teacher_steps


def cooldown_steps(optim: OptimConfig) -> int:
    """Steps of a warmup–stable–decay run's cooldown: ``cooldown_fraction`` of its steps, at least 1."""
    return min(optim.steps, max(1, round(optim.cooldown_fraction * optim.steps)))


def stable_end(optim: OptimConfig) -> int:
    """The step where a warmup–stable–decay run's cooldown starts (its stable phase ends)."""
    return optim.steps - cooldown_steps(optim)


def heldout_count(n_points: int, share: float) -> int:
    """How many of ``n_points`` a held-out ``share`` keeps out of the fit."""
    return int(round(n_points * share))


def _check_calibrate(cfg: Config, source: str) -> None:
    """Sizes, budgets and teachers parse; heads divide; enough points remain for both fits."""
    cal = cfg.calibrate
    students = parse_student_sizes(cal.students, f"{source}: calibrate.students")
    steps = parse_steps(cal.steps, f"{source}: calibrate.steps")
    teachers = parse_teachers(cal.teachers, f"{source}: calibrate.teachers")
    teacher_budget(cal.teacher_steps, steps, f"{source}: calibrate.teacher_steps")
    swept = [size for t in teachers if t != "pipeline" for size in parse_student_sizes(t)]
    for layers, width in students + swept:
        if width % cal.head_dim:
            key = "students" if (layers, width) in students else "teachers"
            raise ConfigError(f"{source}: calibrate.{key}: d_model {width} of {layers}x{width} must "
                              f"be divisible by calibrate.head_dim ({cal.head_dim})")
    for kind, n, need in (("supervised", len(students) * len(steps), SUPERVISED_LAW_PARAMS),
                          ("distillation", len(steps) * sum(distills(t, s) for t in sweep_teachers(cal, steps)
                                                             for s in students),
                           DISTILLATION_LAW_PARAMS)):
        fitted = n - heldout_count(n, cal.heldout_share)
        if fitted < need:
            raise ConfigError(f"{source}: calibrate.students/steps/teachers give {n} {kind} configurations, "
                              f"{fitted} after calibrate.heldout_share = {cal.heldout_share}: the "
                              f"{kind} law has {need} coefficients, so the fit needs at least "
                              f"{need} points")


def _check_cross_field(cfg: Config, source: str) -> None:
    for section in ("teacher", "student"):
        m: ModelConfig = getattr(cfg, section)
        if m.model == "scratch" and m.d_model % m.heads:
            raise ConfigError(f"{source}: {section}.d_model ({m.d_model}) must be divisible by "
                              f"{section}.heads ({m.heads})")
    for section in ("teacher.optim", "train"):
        opt = cfg.teacher.optim if section == "teacher.optim" else cfg.train
        if opt.warmup_steps >= opt.steps:
            raise ConfigError(f"{source}: {section}.warmup_steps ({opt.warmup_steps}) must be "
                              f"smaller than {section}.steps ({opt.steps})")
        if opt.schedule == "wsd" and opt.warmup_steps > stable_end(opt):
            raise ConfigError(f"{source}: {section}.warmup_steps ({opt.warmup_steps}) must end before "
                              f"the cooldown starts (step {stable_end(opt)} = {section}.steps minus "
                              f"{section}.cooldown_fraction ({opt.cooldown_fraction}) of them)")
    if cfg.label.backend == "vllm" and cfg.distill.temperature != 1.0:
        # vLLM's prompt log-probs are raw (τ = 1); top-k alone cannot be re-tempered exactly.
        raise ConfigError(f"{source}: label.backend = vllm needs distill.temperature = 1.0 "
                          f"(got {cfg.distill.temperature}); use label.backend: hf for τ ≠ 1")
    _check_label_generation(cfg, source)
    _check_sampled_labels(cfg, source)
    _check_calibrate(cfg, source)
    _check_storage(cfg.storage.root, source)


def _check_storage(root: str, source: str) -> None:
    """``storage.root``: empty, an absolute folder, or ``s3://bucket[/prefix]``."""
    if not root:
        return
    if "://" in root:
        scheme, _, rest = root.partition("://")
        bucket = rest.split("/", 1)[0]
        if scheme != "s3" or len(bucket) < 3:
            raise ConfigError(f"{source}: storage.root = {root!r}: expected s3://<bucket of 3+ "
                              f"characters>[/prefix], an absolute folder, or \"\" (this project)")
    elif not Path(root).is_absolute():
        raise ConfigError(f"{source}: storage.root = {root!r}: a folder must be an absolute path "
                          f"(stages run in other working directories), or use s3://bucket/prefix")


def _check_sampled_labels(cfg: Config, source: str) -> None:
    """Sampled (RS-KD) labels estimate the teacher's distribution without bias for forward KL
    only, from teacher forcing, and need the full softmax (the HF backend)."""
    d, lab = cfg.distill, cfg.label
    if d.label_kind != "sampled":
        return
    if d.divergence != "forward_kl":
        raise ConfigError(f"{source}: distill.label_kind = sampled needs distill.divergence = forward_kl "
                          f"(got {d.divergence}): the sampled estimate is unbiased for forward KL only")
    if lab.mode != "soft":
        raise ConfigError(f"{source}: distill.label_kind = sampled needs label.mode = soft (got {lab.mode})")
    if lab.backend == "vllm":
        raise ConfigError(f"{source}: distill.label_kind = sampled needs label.backend hf or auto "
                          f"(got vllm): vLLM returns only top-k prompt log-probs, nothing to sample from")


def _check_label_generation(cfg: Config, source: str) -> None:
    """Hard-label rows (prompt + generation) must fit a block; vLLM actors need their TP GPUs."""
    lab = cfg.label
    if lab.mode != "soft" and lab.prompt_tokens + lab.max_new_tokens > cfg.data.block_size:
        raise ConfigError(f"{source}: label.prompt_tokens ({lab.prompt_tokens}) + label.max_new_tokens "
                          f"({lab.max_new_tokens}) must be at most data.block_size "
                          f"({cfg.data.block_size}): a hard-label row is prompt + generation, "
                          f"padded to one block")
    if lab.backend == "vllm" and 0 < lab.gpus_per_actor < lab.tensor_parallel_size:
        raise ConfigError(f"{source}: label.tensor_parallel_size ({lab.tensor_parallel_size}) needs "
                          f"label.gpus_per_actor ≥ {lab.tensor_parallel_size} (got "
                          f"{lab.gpus_per_actor}): one vLLM engine spans that many GPUs")
