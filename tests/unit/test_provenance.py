"""Provenance: import closures, code fingerprints, and every cache key that uses them."""

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest

from distill import calibration
from distill.config import DistillConfig, LabelConfig, ModelConfig, OptimConfig
from distill.labels import (KEEP_SETTINGS, LabelSettings, labels_table, retention_plan, settings_for_run,
                            write_label_shard)
from distill.provenance import code_fingerprint, fingerprint, import_closure
from distill.training import TrainSpec

ROOT = Path(__file__).resolve().parents[2]


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def project(tmp_path):
    """A tiny project: lazy, relative, ``from pkg import module`` and third-party imports."""
    write(tmp_path, "pkg/__init__.py", "")
    write(tmp_path, "pkg/entry.py", "import numpy\nfrom pkg import direct\n"
                                    "def f():\n    from .lazy import g\n    return g\n")
    write(tmp_path, "pkg/direct.py", "from pkg.sub.deep import X\n")
    write(tmp_path, "pkg/lazy.py", "import pkg.sub\n")
    write(tmp_path, "pkg/sub/__init__.py", "")
    write(tmp_path, "pkg/sub/deep.py", "X = 1\n")
    write(tmp_path, "pkg/unused.py", "import pkg.entry\n")
    return tmp_path


def test_closure_follows_lazy_relative_and_package_imports(project):
    closure = import_closure(["pkg.entry"], root=project, packages=["pkg"])
    assert closure == ["pkg/__init__.py", "pkg/direct.py", "pkg/entry.py", "pkg/lazy.py",
                       "pkg/sub/__init__.py", "pkg/sub/deep.py"]
    assert "pkg/unused.py" not in closure
    assert "pkg/lazy.py" not in import_closure(["pkg.entry"], root=project, packages=["pkg"],
                                               exclude=["pkg.lazy"])


def test_closure_of_an_unknown_module_is_an_error(project):
    with pytest.raises(ValueError, match="pkg.nope"):
        import_closure(["pkg.nope"], root=project, packages=["pkg"])
    with pytest.raises(ValueError, match="not a file of the project's packages"):
        import_closure(["pkg.entry"], root=project, packages=["distill"])


def test_code_fingerprint_changes_with_any_file_of_the_closure_only(project):
    before = code_fingerprint("pkg.entry", root=project, packages=["pkg"])
    write(project, "pkg/unused.py", "import pkg.entry\n# edited\n")
    assert code_fingerprint("pkg.entry", root=project, packages=["pkg"]) == before  # cached, and not in the closure
    write(project, "pkg/sub/deep.py", "X = 2\n")
    from distill.provenance import _code_fingerprint

    _code_fingerprint.cache_clear()  # one process computes it once; a new process sees the edit
    assert code_fingerprint("pkg.entry", root=project, packages=["pkg"]) != before


def test_fingerprint_separates_inputs_settings_and_code():
    base = fingerprint(inputs="d1", settings={"lr": 1.0}, code="c1")
    assert base == fingerprint(inputs="d1", settings={"lr": 1.0}, code="c1")
    assert len({base, fingerprint(inputs="d2", settings={"lr": 1.0}, code="c1"),
                fingerprint(inputs="d1", settings={"lr": 2.0}, code="c1"),
                fingerprint(inputs="d1", settings={"lr": 1.0}, code="c2")}) == 4
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint(settings={"x": object()})


def spec(**changes) -> TrainSpec:
    base = dict(role="student", model=ModelConfig(), optim=OptimConfig(), loss=None, data_paths=["/a"],
                val_paths=["/b"], tokenizer_dir="/t", vocab_size=10, block_size=8, eos_id=0, pad_id=None,
                storage_path="/runs", data_hash="d")
    return TrainSpec(**{**base, **changes})


def test_run_name_changes_with_code_data_and_settings_not_with_paths():
    name = spec().run_name()
    assert spec().code == code_fingerprint("distill.training")
    assert name == spec(storage_path="/elsewhere", data_paths=["/c"], mlflow_run_id="x").run_name()
    others = {spec(code="other").run_name(), spec(data_hash="e").run_name(),
              spec(optim=OptimConfig(lr=1e-4)).run_name(), spec(loss=DistillConfig()).run_name()}
    assert name not in others and len(others) == 4


TEACHER = {"fingerprint": "tf"}
MANIFEST = {"tokenizer": {"hash": "th", "vocab_size": 64}}


def test_label_settings_carry_backend_dtype_and_labeler_code():
    hf = settings_for_run(8, 1.0, TEACHER, MANIFEST, LabelConfig(backend="hf"))
    assert (hf.backend, hf.dtype) == ("hf", "float32")
    assert hf.code == code_fingerprint("distill.teachers.hf", "distill.labels")
    vllm = settings_for_run(8, 1.0, TEACHER, MANIFEST, LabelConfig(backend="vllm"))
    assert vllm.backend == "vllm" and vllm.code == code_fingerprint("distill.teachers.vllm", "distill.labels")
    bf16 = settings_for_run(8, 1.0, TEACHER, MANIFEST, LabelConfig(backend="hf", dtype="bfloat16"))
    assert len({hf.key("s"), vllm.key("s"), bf16.key("s"),
                dataclasses.replace(hf, code="other").key("s")}) == 4
    # τ ≠ 1 always labels with hf (vLLM's log-probs are raw), whatever `auto` finds
    assert settings_for_run(8, 2.0, TEACHER, MANIFEST, LabelConfig(backend="auto")).backend == "hf"


def shard(out: Path, settings: LabelSettings, name: str, age: float) -> Path:
    batch = {"block_id": np.array(["b"]), "input_ids": np.zeros((1, 4), np.int32),
             "topk_ids": np.zeros((1, 3 * settings.k), np.int32),
             "topk_logprobs": np.zeros((1, 3 * settings.k), np.float16),
             "rest_logprob": np.zeros((1, 3), np.float16), "teacher_nll": np.zeros(1, np.float32)}
    path = out / name
    write_label_shard(labels_table(batch, settings), path)
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def test_retention_keeps_the_most_recently_used_settings_and_says_why_others_go(tmp_path):
    settings = [LabelSettings("t", "h", 2, 1.0, dtype=d) for d in ("float32", "bfloat16", "float16")]
    newest = shard(tmp_path, settings[0], "labels-a.parquet", age=10)
    older = shard(tmp_path, settings[1], "labels-b.parquet", age=100)
    oldest = shard(tmp_path, settings[2], "labels-c.parquet", age=1000)
    leftover = tmp_path / ".labels-d.parquet.tmp"
    leftover.write_bytes(b"partial")
    junk = tmp_path / "labels-e.parquet"
    junk.write_bytes(b"not parquet")
    keep, remove = retention_plan([newest, older, oldest, leftover, junk], keep_settings=3)
    assert sorted(keep) == sorted([newest, older])
    reasons = dict(remove)
    assert set(reasons) == {oldest, leftover, junk}
    assert "interrupted" in reasons[leftover] and "not a usable label shard" in reasons[junk]
    assert "float16" in reasons[oldest]
    assert KEEP_SETTINGS >= 2  # the current settings and at least one to switch back to


def test_calibration_point_key_follows_the_training_code(monkeypatch):
    cfg_points = [calibration.SweepPoint("supervised", 1, 8, 2, 10, 4, 1e-3, 1, 0.1, 0.0, 1.0, 0)]
    ctx = calibration.SweepContext("data", 4, {}, "teacher")
    key = calibration.point_key(cfg_points[0], ctx, cfg_points)
    closure = import_closure(["distill.calibration"], exclude=["distill.law"])
    assert {"distill/training.py", "distill/losses.py", "distill/models.py",
            "distill/teachers/hf.py"} <= set(closure) and "distill/law.py" not in closure
    monkeypatch.setattr(calibration, "point_code_fingerprint", lambda: "other code")
    assert calibration.point_key(cfg_points[0], ctx, cfg_points) != key


def test_a_change_to_the_training_code_reruns_stored_sweep_points(tmp_path, monkeypatch, capsys):
    points = [calibration.SweepPoint("supervised", 1, 8, 2, 10, 4, 1e-3, 1, 0.1, 0.0, 1.0, seed)
              for seed in (0, 1)]
    ctx = calibration.SweepContext("data", 4, {}, "teacher")
    store = calibration.PointStore(tmp_path)
    for point in points:
        store.put(calibration.point_key(point, ctx, points), {"L": 1.0})
    assert calibration.plan_sweep(points, ctx, store).pending == []
    monkeypatch.setattr(calibration, "point_code_fingerprint", lambda: "a fixed training loop")
    assert calibration.plan_sweep(points, ctx, store).pending == [0, 1]
    assert "2 stored points not reused (made by other code" in capsys.readouterr().out


def test_the_models_a_run_reads_enter_its_inputs(tmp_path):
    """An online teacher (or a start model) retrained in the same folder is another input."""
    from distill.models import build_llama
    from distill.training import model_inputs

    assert model_inputs(ModelConfig(), "") == {}
    build_llama(ModelConfig(layers=1, d_model=16, heads=2), 64, 16, seed=0).save_pretrained(tmp_path / "t")
    first = model_inputs(ModelConfig(), str(tmp_path / "t"))
    build_llama(ModelConfig(layers=1, d_model=16, heads=2), 64, 16, seed=1).save_pretrained(tmp_path / "t")
    second = model_inputs(ModelConfig(model=str(tmp_path / "t")), str(tmp_path / "t"))
    assert first["teacher"] != second["teacher"] and second["init"] == second["teacher"]
