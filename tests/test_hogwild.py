"""Hogwild training (`TrainConfig.workers` > 1): a forked peer trains in the same memory."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.tbsm import PADDING_ROW, TBSM
from model.train import HogwildPeer, TBSMOptimizer, TrainConfig, fit
from tests.test_model import small_config, tiny_batch


def batches_in_halves(cfg, count: int):
    """Even batches read item rows 2..39 only, odd ones 40..77 only (so each row has one trainer)."""
    out = []
    for k in range(count):
        batch = tiny_batch(cfg, n=32, seed=k)
        real = batch.item_rows != PADDING_ROW
        rows = batch.item_rows % 38 + (2 if k % 2 == 0 else 40)
        out.append(replace(batch, item_rows=torch.where(real, rows, batch.item_rows)))
    return out


def test_the_peer_s_updates_reach_the_caller_s_model_and_validation_waits_for_both():
    torch.manual_seed(0)
    cfg = small_config(num_items=80)
    model = TBSM(cfg)
    before = model.tower.item_emb.weight.detach().clone()
    batches = batches_in_halves(cfg, 6)
    validated_at = []

    def validate():
        validated_at.append(state_steps[-1] if state_steps else None)
        return {"val_hr10": 0.0}

    state_steps: list[int] = []
    state = fit(model, TBSMOptimizer(model, lr=0.05, shared=True), TrainConfig(epochs=1, eval_every=2, workers=2),
                lambda epoch, part=(0, 1): iter(batches[part[0]::part[1]]), len(batches),
                validate=validate, on_best=lambda st, metrics: None,
                progress=lambda step, loss: state_steps.append(step))
    changed = (model.tower.item_emb.weight != before).any(1)
    assert changed[2:40].all(), "rows only this process trained"
    assert changed[40:78].all(), "rows only the forked peer trained: its writes must land in shared memory"
    assert not changed[78:].any(), "rows no batch reads"
    assert [h["step"] for h in state.history] == [2, 4, 6]
    assert state.step == 6
    assert all(h["train_loss"] is not None for h in state.history)


def test_a_failing_peer_is_reported_not_hidden():
    cfg = small_config(num_items=80)
    model = TBSM(cfg)
    broken = replace(tiny_batch(cfg, n=8), item_rows=torch.full((8, cfg.history + 1), 10_000))
    peer = HogwildPeer(model, TBSMOptimizer(model, lr=0.05, shared=True), [broken])
    try:
        peer.start(1)
        with pytest.raises(RuntimeError, match="Hogwild training process failed: IndexError"):
            peer.finish()
    finally:
        peer.close()


def test_hogwild_needs_a_shared_optimizer():
    model = TBSM(small_config())
    with pytest.raises(ValueError, match="shared=True"):
        HogwildPeer(model, TBSMOptimizer(model, lr=0.05), [])
