"""The label format: round trip through parquet, settings recorded and enforced."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distill.labels import (LabelSettings, check_label_settings, labels_table, read_label_settings,
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
