"""Ray Train fault tolerance and online distillation, on the session's shared Ray."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from distill.blocks import write_block_shards
from distill.config import DistillConfig, ModelConfig, OptimConfig, RayConfig
from distill.models import build_llama
from distill.raylocal import init_ray
from distill.tokenizer import train_bpe
from distill.training import TrainSpec, run_training

pytestmark = pytest.mark.integration

VOCAB, BLOCK = 300, 64


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_ray):
    """Synthetic token blocks with structure (a noisy counter), a tokenizer, and Ray joined."""
    root = tmp_path_factory.mktemp("train-data")
    train_bpe([f"line {i} of some text {i % 13}" for i in range(400)], VOCAB, root / "tokenizer")
    rng = np.random.default_rng(0)
    start = rng.integers(0, VOCAB - 1, (640, 1))
    blocks = ((start + np.arange(BLOCK)) % (VOCAB - 2)).astype(np.int32)
    blocks[rng.random(blocks.shape) < 0.1] = 7  # some noise
    write_block_shards(blocks[:576], root / "train", 192)
    write_block_shards(blocks[576:], root / "val", 64)
    init_ray(RayConfig())
    yield root
    # Leave the shared head before the session stops it: a driver still connected when its
    # GCS dies exits the whole pytest process (status 1, the summary unprinted).
    import ray

    ray.shutdown()


def spec(data: Path, storage: Path, **kw) -> TrainSpec:
    base = dict(
        role="student", model=ModelConfig(layers=2, d_model=64, heads=4),
        optim=OptimConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=30),
        loss=None, data_paths=[str(p) for p in sorted((data / "train").glob("*.parquet"))],
        val_paths=[str(p) for p in sorted((data / "val").glob("*.parquet"))],
        tokenizer_dir=str(data / "tokenizer"), vocab_size=VOCAB, block_size=BLOCK, eos_id=0, pad_id=1,
        storage_path=str(storage), checkpoint_every=10, max_failures=2, eval_blocks=64, log_every=5)
    base.update(kw)
    return TrainSpec(**base)


def checkpoint_registered(run_dir: Path) -> bool:
    """Ray Train has registered a checkpoint (its manager snapshot names one), not just written it."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and "checkpoint_" in snapshot.read_text()


def own_train_worker_pids() -> list[int]:
    """PIDs of this test's live Ray Train workers: the RayTrainWorker actors of this driver's
    job, from the shared head's actor table (other sessions' workers are other jobs/heads)."""
    import ray
    from ray._private import state

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    table = state.actors(job_id=job, actor_state_name="ALIVE")
    infos = table.values() if isinstance(table, dict) else table
    return [int(info["Pid"]) for info in infos
            if "RayTrainWorker" in info["ActorClassName"] and info["Pid"]]


def kill_worker_after_first_checkpoint(run_dir: Path, killed: list) -> None:
    """Wait for the first registered checkpoint, then SIGKILL the worker process of this run,
    by the pid Ray reports for it (never every RayTrainWorker on the machine)."""
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint_registered(run_dir):
        time.sleep(0.05)
    for pid in own_train_worker_pids():
        proc = psutil.Process(pid)
        if any("RayTrainWorker" in part for part in proc.cmdline()):  # the pid is still that worker
            proc.kill()
            killed.append(pid)


def test_killed_worker_resumes_from_checkpoint(data, tmp_path):
    clean = run_training(spec(data, tmp_path / "clean"), tmp_path / "clean-model")
    assert clean.resumed_from == []
    faulty_spec = spec(data, tmp_path / "faulty")
    killed: list = []
    killer = threading.Thread(target=kill_worker_after_first_checkpoint,
                              args=(tmp_path / "faulty" / faulty_spec.run_name(), killed))
    killer.start()
    faulty = run_training(faulty_spec, tmp_path / "faulty-model")
    killer.join()
    assert len(killed) == 1, f"expected this run's one Ray Train worker, killed {killed}"
    assert faulty.resumed_from and faulty.resumed_from[0] >= 10  # from a checkpoint, not step 0
    assert (tmp_path / "faulty-model" / "model.safetensors").is_file()
    assert faulty.final["val_loss"] == pytest.approx(clean.final["val_loss"], abs=0.05)


def test_online_distillation_trains_from_full_teacher_logits(data, tmp_path):
    teacher_dir = tmp_path / "teacher"
    build_llama(ModelConfig(layers=2, d_model=64, heads=4), VOCAB, BLOCK, seed=3).save_pretrained(teacher_dir)
    result = run_training(spec(data, tmp_path / "runs", loss=DistillConfig(alpha=1.0),
                               teacher_dir=str(teacher_dir),
                               optim=OptimConfig(steps=20, batch_size=16, lr=3e-3, warmup_steps=2,
                                                 eval_every=10)), tmp_path / "student")
    kd = [h["kd"] for h in result.history if "kd" in h]
    assert kd and all(v > 0 for v in kd)  # the KD term was really computed from the teacher
    assert kd[-1] < kd[0]


def test_divergence_stops_training_naming_step_and_checkpoint(data, tmp_path):
    diverging = spec(data, tmp_path / "runs", max_failures=2,
                     optim=OptimConfig(steps=60, batch_size=16, lr=1e6, warmup_steps=1, grad_clip=0.0,
                                       eval_every=30))
    with pytest.raises(Exception) as err:
        run_training(diverging, tmp_path / "student")
    message = str(err.value)
    assert "training diverged at step" in message and "last good checkpoint" in message
    marker = tmp_path / "runs" / diverging.run_name() / "DIVERGED"
    assert marker.is_file()
    assert not (tmp_path / "student").exists()  # nothing that looks like a finished model


def test_a_sweep_point_is_the_train_stages_run(data, tmp_path):
    """One trainer: the calibration sweep's point (in-process driver, no Ray Train) and the
    train stage's run (Ray Train worker reading a Ray Data shard) of the same configuration and
    seed — model, schedule, data order over two epochs, loss with its z-loss — end with the
    same validation loss."""
    from distill.blocks import read_blocks
    from distill.calibration import SweepData, SweepPoint, train_point

    optim = OptimConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_every=30)
    stage = run_training(spec(data, tmp_path / "runs", optim=optim, z_loss=1e-3), tmp_path / "student")
    _, train = read_blocks(data / "train")
    _, val = read_blocks(data / "val", limit=64)
    sweep_data = SweepData(train=train, val=val, vocab_size=VOCAB, eos_id=0, pad_id=1,
                           tokenizer_dir=str(data / "tokenizer"))
    point = SweepPoint(kind="supervised", layers=2, d_model=64, heads=4, steps=optim.steps,
                       batch_size=optim.batch_size, lr=optim.lr, warmup_steps=optim.warmup_steps,
                       min_lr_ratio=optim.min_lr_ratio, weight_decay=optim.weight_decay,
                       grad_clip=optim.grad_clip, seed=0, schedule=optim.schedule,
                       cooldown_fraction=optim.cooldown_fraction, z_loss=1e-3)
    record = train_point(point, sweep_data)
    assert record["L"] == pytest.approx(stage.final["val_loss"], rel=1e-4)
    # and it is not a loss any configuration would reach: another seed's run differs
    other = train_point(dataclasses.replace(point, seed=1), sweep_data)
    assert abs(other["L"] - record["L"]) > 1e-3
