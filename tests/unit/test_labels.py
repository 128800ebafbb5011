"""The label format: round trip through parquet, settings recorded and enforced."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distill.labels import (FORMAT_VERSION, LabelSettings, check_label_settings, labels_table, read_label_settings,
                            write_label_shard)
from distill.losses import topk_labels

SETTINGS = LabelSettings(teacher_fingerprint="abc", tokenizer_hash="def", k=4, temperature=1.0)


def make_batch(b=3, t=6, v=11, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, v, (b, t), generator=g)
    logits = torch.randn(b * (t - 1), v, generator=g)
    labels = topk_labels(logits, k, 1.0)
    return {
        "block_id": np.array([f"blk{i}" for i in range(b)]),
        "input_ids": ids.numpy().astype(np.int32),
        "topk_ids": labels.ids.view(b, -1).numpy().astype(np.int32),
        "topk_logprobs": labels.logprobs.view(b, -1).numpy().astype(np.float16),
        "rest_logprob": labels.rest.view(b, -1).numpy().astype(np.float16),
        "teacher_nll": np.ones(b, np.float32),
    }, labels


def test_round_trip(tmp_path):
    batch, labels = make_batch()
    path = tmp_path / "labels-x.parquet"
    write_label_shard(labels_table(batch, SETTINGS), path)
    table = pq.read_table(path)
    assert table.schema.field("topk_logprobs").type.value_type == "halffloat"
    back = np.stack(table.column("topk_logprobs").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert np.allclose(back.reshape(-1, 4), labels.logprobs.numpy(), atol=2e-3, rtol=1e-3)
    ids = np.stack(table.column("topk_ids").to_numpy(zero_copy_only=False))
    assert np.array_equal(ids.reshape(-1, 4), labels.ids.numpy())
    assert table.column("block_id").to_pylist() == ["blk0", "blk1", "blk2"]
    assert read_label_settings(path) == SETTINGS
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_mismatched_settings_are_refused(tmp_path):
    batch, _ = make_batch()
    path = tmp_path / "labels-y.parquet"
    write_label_shard(labels_table(batch, SETTINGS), path)
    check_label_settings([path], SETTINGS)
    other = LabelSettings(teacher_fingerprint="zzz", tokenizer_hash="def", k=8, temperature=1.0)
    with pytest.raises(ValueError, match="teacher_fingerprint: labels have 'abc', run wants 'zzz'") as err:
        check_label_settings([path], other)
    assert "k: labels have 4, run wants 8" in str(err.value)


def test_non_label_file_is_named(tmp_path):
    import pyarrow as pa

    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1]}), path)
    with pytest.raises(ValueError, match="plain.parquet: not a label shard"):
        read_label_settings(path)


def test_settings_key_depends_on_every_setting():
    keys = {SETTINGS.key("h"), SETTINGS.key("h2"),
            LabelSettings("abc", "def", 5, 1.0).key("h"), LabelSettings("abc", "def", 4, 2.0).key("h")}
    assert len(keys) == 4


# ----------------------------------------------------------------- block-level cache

def test_plan_labels_finds_missing_stale_and_duplicate_blocks():
    from distill.labels import plan_labels

    index = {"labels-a.parquet": ["b1", "b2"], "labels-b.parquet": ["b3", "old"],
             "labels-c.parquet": ["gone"], "labels-d.parquet": ["b2", "b4"]}
    plan = plan_labels(["b1", "b2", "b3", "b4", "b5", "b5"], index)
    assert plan.missing == ["b5"]
    assert plan.keep == {"labels-a.parquet": ["b1", "b2"]}
    assert plan.compact == {"labels-b.parquet": ["b3"], "labels-d.parquet": ["b4"]}  # b2 once
    assert plan.drop == ["labels-c.parquet"] and plan.cached == 4


def _labeled(ids, t=6, k=4):
    batch, _ = make_batch(b=len(ids), t=t, k=k)
    batch["block_id"] = np.array(ids)
    batch["error"] = np.array([""] * len(ids), dtype=object)
    batch["loss_from"], batch["length"] = np.zeros(len(ids), np.int32), np.full(len(ids), t, np.int32)
    return batch


def test_shard_writer_chunks_resume_and_compaction(tmp_path):
    """Shards are chunks of the pending order: a resumed run (pending = the rest) writes the
    same files as an uninterrupted one; compaction copies the wanted rows only."""
    from distill.labels import compact_shard, index_label_shards, plan_labels
    from tasks.label import ShardWriter

    ids = [f"blk{i}" for i in range(7)]
    full, part = tmp_path / "full", tmp_path / "part"
    full.mkdir(), part.mkdir()
    w = ShardWriter(full, SETTINGS, shard_blocks=3, total=7)
    for start in range(0, 7, 2):
        w.add(_labeled(ids[start:start + 2]))
    w.finish()
    index, other = index_label_shards(full, SETTINGS)
    assert sorted(map(len, index.values())) == [1, 3, 3] and not other
    # interrupted after the first shard: the resumed run labels the rest and ends identical
    first = ShardWriter(part, SETTINGS, shard_blocks=3, total=7)
    first.add(_labeled(ids[:3]))
    plan = plan_labels(ids, index_label_shards(part, SETTINGS)[0])
    assert plan.missing == ids[3:]
    rest = ShardWriter(part, SETTINGS, shard_blocks=3, total=4)
    rest.add(_labeled(plan.missing))
    rest.finish()
    assert sorted(p.name for p in part.iterdir()) == sorted(p.name for p in full.iterdir())
    # a shard whose blocks went partly stale is rewritten with the wanted rows only
    plan = plan_labels(ids[1:], index_label_shards(full, SETTINGS)[0])
    (name, keep), = plan.compact.items()
    new = compact_shard(full, name, keep, SETTINGS)
    assert not (full / name).exists()
    assert pq.read_table(full / new).column("block_id").to_pylist() == keep
    assert read_label_settings(full / new) == SETTINGS


def test_shard_writer_routes_errors_to_the_error_table(tmp_path):
    from distill.labels import write_error_table
    from tasks.label import ShardWriter

    batch = _labeled(["ok1", "bad", "ok2"])
    batch["error"] = np.array(["", "empty: 0 token(s), nothing to label (needs ≥ 2)", ""], dtype=object)
    w = ShardWriter(tmp_path, SETTINGS, shard_blocks=10, total=3)
    w.add(batch)
    w.finish()
    assert w.errors == [{"block_id": "bad", "reason": "empty: 0 token(s), nothing to label (needs ≥ 2)"}]
    (shard,) = tmp_path.glob("labels-*.parquet")
    assert pq.read_table(shard).column("block_id").to_pylist() == ["ok1", "ok2"]
    write_error_table(w.errors, tmp_path / "errors.parquet")
    assert pq.read_table(tmp_path / "errors.parquet").to_pylist() == w.errors
    short = ShardWriter(tmp_path, SETTINGS, shard_blocks=10, total=5)
    short.add(_labeled(["x"]))
    with pytest.raises(RuntimeError, match="returned 1 of 5 pending blocks"):
        short.finish()


def test_settings_carry_mode_and_generation():
    from distill.config import LabelConfig
    from distill.labels import settings_for_run

    teacher, manifest = {"fingerprint": "f"}, {"tokenizer": {"hash": "h", "vocab_size": 100}}
    soft = settings_for_run(32, 1.0, teacher, manifest)
    assert (soft.mode, soft.k, soft.generation) == ("soft", 32, "")
    hard = settings_for_run(32, 1.0, teacher, manifest, LabelConfig(mode="hard"), seed=0)
    both = settings_for_run(32, 1.0, teacher, manifest, LabelConfig(mode="hard+soft"), seed=0)
    assert hard.k == 0 and both.k == 32 and '"prompt_tokens": 32' in hard.generation
    sampled = [settings_for_run(32, 1.0, teacher, manifest, LabelConfig(mode="hard", sampling="sample"),
                                seed=s) for s in (0, 1)]
    assert len({s.key("x") for s in [soft, hard, both, *sampled]}) == 5
    # the seed only matters when sampling
    assert hard == settings_for_run(32, 1.0, teacher, manifest, LabelConfig(mode="hard"), seed=9)


def test_old_format_shards_are_refused_by_name(tmp_path):
    import json

    batch, _ = make_batch()
    table = labels_table(batch, SETTINGS)
    old = json.loads(table.schema.metadata[b"distill.labels"])
    old["format"] = 1
    pq.write_table(table.replace_schema_metadata({b"distill.labels": json.dumps(old).encode()}),
                   tmp_path / "labels-old.parquet")
    with pytest.raises(ValueError, match=f"labels-old.parquet: label format 1, this code reads format {FORMAT_VERSION}"):
        read_label_settings(tmp_path / "labels-old.parquet")


# ----------------------------------------------------------------- hard labels (HF backend)

GEN = {"prompt_tokens": 4, "max_new_tokens": 8, "sampling": "greedy", "temperature": None,
       "top_p": None, "seed": None}


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    from distill.config import ModelConfig
    from distill.models import build_llama

    path = tmp_path_factory.mktemp("teacher")
    model = build_llama(ModelConfig(layers=1, d_model=32, heads=2), 50, 16, 0, eos_id=1, pad_id=0)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4)
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def hard_labeler(path, mode="hard", **gen):
    import json

    from distill.teachers.hf import HFLabeler

    return HFLabeler(path, k=4, temperature=1.0, vocab_size=50, block_size=16, mode=mode,
                     generation=json.dumps({**GEN, **gen}), eos_id=1, pad_id=0)


def blocks(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {"block_id": np.array([f"b{i}" for i in range(n)]),
            "input_ids": rng.integers(2, 50, (n, 16)).astype(np.int32)}


def test_greedy_generation_is_the_teachers_argmax_and_rows_are_masked(tiny_teacher_dir):
    lab = hard_labeler(tiny_teacher_dir)
    batch = blocks()
    out = lab(batch)
    assert (out["error"] == "").all() and out["topk_ids"].shape == (4, 0)
    assert (out["loss_from"] == 3).all() and ((out["length"] > 4) & (out["length"] <= 12)).all()
    for row, length, src in zip(out["input_ids"], out["length"], batch["input_ids"]):
        assert np.array_equal(row[:4], src[:4])
        assert (row[length:] == 0).all()  # padding after the generation
        ids = torch.from_numpy(row[:length].astype(np.int64))[None]
        argmax = lab.model(input_ids=ids).logits[0, 3:length - 1].argmax(-1)  # no KV cache
        assert np.array_equal(argmax.numpy(), row[4:length])
        assert length == 12 or row[length - 1] == 1  # stopped at EOS or at max_new_tokens
    prompts = torch.from_numpy(batch["input_ids"][:, :4].astype(np.int64))
    logits = lab.model(input_ids=prompts).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), prompts[:, 1:].reshape(-1),
                                            reduction="none").view(4, 3).mean(-1)
    assert np.allclose(out["teacher_nll"], nll.detach().numpy(), atol=1e-5)


def test_hard_soft_rows_carry_topk_of_generated_positions(tiny_teacher_dir):
    lab = hard_labeler(tiny_teacher_dir, mode="hard+soft")
    out = lab(blocks())
    hard = hard_labeler(tiny_teacher_dir)(blocks())
    assert np.array_equal(out["input_ids"], hard["input_ids"])
    top = out["topk_ids"].reshape(4, 15, 4)
    for i, (row, length) in enumerate(zip(out["input_ids"], out["length"])):
        ids = torch.from_numpy(row[:length].astype(np.int64))[None]
        logits = lab.model(input_ids=ids).logits[0, 3:length - 1]
        ref = topk_labels(logits, 4, 1.0)
        assert np.array_equal(top[i, 3:length - 1], ref.ids.numpy())
        lp = out["topk_logprobs"].reshape(4, 15, 4)[i, 3:length - 1].astype(np.float32)
        assert np.allclose(lp, ref.logprobs.detach().numpy(), atol=2e-3)
        assert np.array_equal(top[i, :3], np.tile(np.arange(4), (3, 1)))  # filler, masked


def test_sampled_generations_are_seeded_per_block(tiny_teacher_dir):
    lab = hard_labeler(tiny_teacher_dir, sampling="sample", temperature=1.5, top_p=0.95, seed=7)
    batch = blocks(6)
    out = lab(batch)
    alone = lab({k: v[2:3] for k, v in batch.items()})
    assert np.array_equal(out["input_ids"][2], alone["input_ids"][0])  # batch-independent
    other_seed = hard_labeler(tiny_teacher_dir, sampling="sample", temperature=1.5, top_p=0.95, seed=8)(batch)
    assert not np.array_equal(out["input_ids"], other_seed["input_ids"])
    tiny_p = hard_labeler(tiny_teacher_dir, sampling="sample", temperature=1.0, top_p=1e-6, seed=7)(batch)
    greedy = hard_labeler(tiny_teacher_dir)(batch)
    assert np.array_equal(tiny_p["input_ids"], greedy["input_ids"])  # top_p → 0 is greedy


def test_too_long_for_the_teacher_is_an_error_row(tiny_teacher_dir):
    lab = hard_labeler(tiny_teacher_dir, max_new_tokens=20)  # 4 + 20 > 16 positions
    out = lab(blocks(2))
    assert all("too long for the teacher: 24 tokens exceed its max_position_embeddings of 16" in e
               for e in out["error"])


def test_soft_labels_need_no_block_ids_but_hard_labels_do(tiny_teacher_dir):
    """Calibration labels bare token arrays (soft); hard modes seed each block by its id."""
    from distill.teachers.hf import HFLabeler

    soft = HFLabeler(tiny_teacher_dir, k=4, temperature=1.0, vocab_size=50, block_size=16)
    batch = blocks(3)
    bare = soft({"input_ids": batch["input_ids"]})
    named = soft(batch)
    assert (bare["error"] == "").all()
    assert np.array_equal(bare["topk_ids"], named["topk_ids"])
    with pytest.raises(ValueError, match="need each row's block_id"):
        hard_labeler(tiny_teacher_dir)({"input_ids": batch["input_ids"]})


# ----------------------------------------------------------------- training on each mode

@pytest.mark.parametrize("mode", ["soft", "hard", "hard+soft"])
def test_training_step_on_each_label_mode(tiny_teacher_dir, tmp_path, mode):
    """Label rows of every mode → masked targets → one finite optimizer step."""
    from distill.config import ModelConfig, OptimConfig
    from distill.losses import IGNORE_INDEX, DistillationLoss
    from distill.models import build_llama
    from distill.teachers.hf import HFLabeler
    from distill.training import batch_to_tensors, make_optimizer, train_step

    if mode == "soft":
        lab = HFLabeler(tiny_teacher_dir, k=4, temperature=1.0, vocab_size=50, block_size=16)
    else:
        lab = hard_labeler(tiny_teacher_dir, mode=mode)
    out = lab(blocks())
    settings = LabelSettings("f", "h", 0 if mode == "hard" else 4, 1.0, mode=mode)
    write_label_shard(labels_table(out, settings), tmp_path / "labels-x.parquet")
    table = pq.read_table(tmp_path / "labels-x.parquet")
    batch = {c: np.stack(table.column(c).to_numpy(zero_copy_only=False)) if c != "block_id"
             else np.array(table.column(c).to_pylist()) for c in table.column_names
             if c not in ("loss_from", "length", "teacher_nll")}
    batch.update(loss_from=table.column("loss_from").to_numpy(), length=table.column("length").to_numpy())
    inputs, targets, teacher = batch_to_tensors(batch, torch.device("cpu"), 4 if mode != "hard" else None)
    valid = targets != IGNORE_INDEX
    if mode == "soft":
        assert valid.all() and teacher is not None
    else:
        for row, length in zip(valid, out["length"]):
            assert row.nonzero().flatten().tolist() == list(range(3, length - 1))
        assert (teacher is None) == (mode == "hard")
    student = build_llama(ModelConfig(layers=1, d_model=16, heads=2), 50, 16, 0)
    opt, sched = make_optimizer(student, OptimConfig(steps=2, warmup_steps=0))
    metrics = train_step(student, DistillationLoss(alpha=0.5), opt, sched, (inputs, targets, teacher), 1.0, 1)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert (metrics["kd"] > 0) == (mode != "hard")  # hard labels: cross-entropy only


@pytest.mark.parametrize("raw, fragment", [
    ({"label": {"mode": "hard", "prompt_tokens": 100, "max_new_tokens": 64}},
     "label.prompt_tokens (100) + label.max_new_tokens (64) must be at most data.block_size (128)"),
    ({"label": {"mode": "fuzzy"}}, "label.mode = 'fuzzy' is not allowed (allowed: soft, hard, hard+soft)"),
    ({"label": {"sampling": "beam"}}, "allowed: greedy, sample"),
    ({"label": {"top_p": 0.0}}, "label.top_p = 0.0 is out of range"),
    ({"label": {"gen_temperature": 0.0}}, "label.gen_temperature = 0.0 is out of range"),
    ({"label": {"backend": "vllm", "gpus_per_actor": 1, "tensor_parallel_size": 2}},
     "label.tensor_parallel_size (2) needs label.gpus_per_actor ≥ 2"),
    ({"data": {"tail_buckets": 0}}, "data.tail_buckets = 0 is out of range"),
    ({"data": {"tail_buckets": 257}}, "data.tail_buckets = 257 is out of range"),
])
def test_label_config_errors_name_the_key(raw, fragment):
    from distill.config import ConfigError, build_config

    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert fragment in str(err.value)


def test_soft_mode_ignores_generation_lengths():
    from distill.config import build_config

    build_config({"label": {"mode": "soft", "prompt_tokens": 100, "max_new_tokens": 64}})


@pytest.mark.parametrize("decision, raw, why", [
    ("supervised", {}, "gate decided 'supervised': law"),
    ("distill", {"distill": {"source": "online"}}, "distill.source = online"),
])
def test_label_stage_writes_an_explicit_skipped_manifest(tmp_path, monkeypatch, capsys, decision, raw, why):
    from distill.config import build_config
    from tasks.label import run

    monkeypatch.chdir(tmp_path)  # a skip reads only the decision: no data, no teacher
    Path("gate").mkdir()
    Path("gate/decision.json").write_text(json.dumps({"decision": decision, "reason": "law"}))
    result = run(build_config(raw), tmp_path / "labels")
    manifest = json.loads((tmp_path / "labels/manifest.json").read_text())
    assert result == manifest and manifest["status"] == "skipped" and why in manifest["reason"]
    assert f"label stage skipped: {manifest['reason']}" in capsys.readouterr().out


def test_a_shard_with_unknown_settings_fields_is_named_not_a_type_error(tmp_path):
    import pyarrow as pa

    from distill.labels import FORMAT_VERSION, META_KEY

    meta = {"format": FORMAT_VERSION, "teacher_fingerprint": "t", "tokenizer_hash": "h", "k": 4,
            "temperature": 1.0, "a_field_from_other_code": 1}
    table = pa.table({"block_id": ["b"]}).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, tmp_path / "labels-x.parquet")
    with pytest.raises(ValueError, match="labels-x.parquet: label settings .* not readable by this code"):
        read_label_settings(tmp_path / "labels-x.parquet")
