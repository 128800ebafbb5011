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
    max_doc_chars: int = field(default=200_000, metadata=_range(1))
    val_fraction: float = field(default=0.05, metadata=_range(0.0, 0.5, lo_open=True))
    # "bpe" trains a byte-level BPE here; anything else is a local HF tokenizer path.
    tokenizer: str = "bpe"
    vocab_size: int = field(default=2048, metadata=_range(260, 1_000_000))
    block_size: int = field(default=128, metadata=_range(8, 1_000_000))
    shard_blocks: int = field(default=2048, metadata=_range(1))


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
    """How one model is optimised: AdamW, linear warm-up then cosine decay, clipping."""

    steps: int = field(default=200, metadata=_range(1))
    batch_size: int = field(default=16, metadata=_range(1))
    lr: float = field(default=3e-3, metadata=_range(0.0, 10.0, lo_open=True))
    min_lr_ratio: float = field(default=0.1, metadata=_range(0.0, 1.0))
    warmup_steps: int = field(default=20, metadata=_range(0))
    weight_decay: float = field(default=0.1, metadata=_range(0.0, 10.0))
    grad_clip: float = field(default=1.0, metadata=_range(0.0))
    eval_every: int = field(default=50, metadata=_range(1))


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
    scenario: str = field(
        default="teacher-inference",
        metadata=_choice("best-case", "teacher-inference", "teacher-pretraining",
                         "teacher-pretraining+inference"),
    )
    force: str = field(default="none", metadata=_choice("none", "distill", "supervised"))


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


@dataclass(frozen=True)
class LabelConfig:
    """How the teacher labels the train blocks (Ray Data actor pool)."""

    backend: str = field(default="auto", metadata=_choice("auto", "hf", "vllm"))
    batch_size: int = field(default=16, metadata=_range(1))
    num_actors: int = field(default=1, metadata=_range(1))
    cpus_per_actor: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    gpus_per_actor: float = field(default=0.0, metadata=_range(0.0))
    dtype: str = field(default="float32", metadata=_choice("float32", "bfloat16", "float16"))


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
class Config:
    """The whole ``params.yaml``."""

    seed: int = field(default=0, metadata=_range(0))
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

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
    if cfg.label.backend == "vllm" and cfg.label.gpus_per_actor <= 0:
        raise ConfigError(f"{source}: label.backend = vllm needs label.gpus_per_actor > 0")
    if cfg.label.backend == "vllm" and cfg.distill.temperature != 1.0:
        # vLLM's prompt log-probs are raw (τ = 1); top-k alone cannot be re-tempered exactly.
        raise ConfigError(f"{source}: label.backend = vllm needs distill.temperature = 1.0 "
                          f"(got {cfg.distill.temperature}); use label.backend: hf for τ ≠ 1")
