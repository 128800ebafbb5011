"""The trainer the train stage and the calibration sweep share: the warmup–stable–decay
schedule, its cooldown branches, and a data order that does not depend on how rows arrive."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from distill.config import ConfigError, ModelConfig, OptimConfig, build_config, stable_end
from distill.training import (build_loss, data_order, epoch_rows, lr_lambda, shuffled_batches,
                              train_with_cooldowns)


def test_wsd_warms_up_holds_then_cools_down_to_the_floor_at_the_last_step():
    optim = OptimConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", cooldown_fraction=0.2)
    f = lr_lambda(optim)
    assert stable_end(optim) == 80
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(50) == 1.0 and f(79) == 1.0
    assert 0.1 < f(80) < 1.0 and f(99) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(80, 99))
    # the stable phase does not depend on the run's length: a shorter run is a branch of a longer one
    g = lr_lambda(dataclasses.replace(optim, steps=300))
    assert [f(s) for s in range(80)] == [g(s) for s in range(80)]


def test_a_warmup_into_the_cooldown_is_refused():
    with pytest.raises(ConfigError, match="train.warmup_steps .* before the cooldown"):
        build_config({"train": {"steps": 100, "warmup_steps": 90}})


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_shuffled_batches_do_not_depend_on_chunking(chunk):
    rows = np.arange(300)
    whole = [b["row"] for b in shuffled_batches([{"row": rows}], 16, seed=3)]
    chunks = [{"row": rows[i:i + chunk]} for i in range(0, len(rows), chunk)]
    assert [b["row"].tolist() for b in shuffled_batches(chunks, 16, seed=3)] == [b.tolist() for b in whole]
    assert len(whole) == 300 // 16 and len(np.unique(np.concatenate(whole))) == 16 * (300 // 16)


def test_epochs_reshuffle_and_cover_the_data():
    rows = epoch_rows(data_order(100, 0), 10, 0, 25)
    assert rows.shape == (25, 10)
    assert sorted(rows[:10].ravel()) == list(range(100))
    assert not np.array_equal(rows[:10], rows[10:20])


def _tiny(seed=0):
    from distill.models import build_llama

    return build_llama(ModelConfig(layers=1, d_model=32, heads=2), 64, 17, seed, 0, 1)


def test_a_cooldown_branch_is_the_run_of_that_budget():
    """One WSD trunk with a cooldown branch at 20 steps gives the model a 20-step run gives,
    and the trunk's 40-step end is the 40-step run's."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = torch.from_numpy(((rng.integers(0, 64, (48, 1)) + np.arange(17)) % 64).astype(np.int64))
    rows = epoch_rows(data_order(48, 0), 8, 0, 40)
    loss = build_loss(type("S", (), {"loss": None, "z_loss": 1e-4})())

    def batch_of(idx):
        ids = data[idx]
        return ids[:, :-1], ids[:, 1:], None

    optim = OptimConfig(steps=40, batch_size=8, lr=0.01, warmup_steps=3, schedule="wsd")
    branched: dict[int, dict] = {}
    train_with_cooldowns(_tiny(), optim, loss, batch_of, rows, [20, 40],
                         lambda s, m: branched.__setitem__(s, {k: v.clone() for k, v in m.state_dict().items()}))
    for budget in (20, 40):
        alone: dict[int, dict] = {}
        train_with_cooldowns(_tiny(), dataclasses.replace(optim, steps=budget), loss, batch_of, rows, [budget],
                             lambda s, m: alone.__setitem__(s, m.state_dict()))
        for name, value in alone[budget].items():
            torch.testing.assert_close(branched[budget][name], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot branch"):
        train_with_cooldowns(_tiny(), dataclasses.replace(optim, schedule="cosine"), loss, batch_of, rows,
                             [20, 40], lambda s, m: None)
