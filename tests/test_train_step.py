"""The trainer's fast path (unique rows gathered once, hand-written tower backward, one Adagrad
update for all tables) against plain autograd on per-table leaves, on small models whose tables
are small enough that most rows repeat within a batch."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.tbsm import PADDING_ROW, TBSM, TBSMConfig
from model.train import TBSMOptimizer, dedup, train_step, unique_inverse
from sdk_builder.data.dataset import Batch

T0 = 1_700_000_000


def small_model(seed: int = 0, **overrides) -> TBSM:
    torch.manual_seed(seed)
    model = TBSM(TBSMConfig(**{**dict(num_users=5, num_items=30, num_categories=7), **overrides}))
    with torch.no_grad():  # interactions large enough to matter (user rows start at zero)
        for table in model.embedding_tables().values():
            table.weight[2:].normal_(0.0, 0.3)
    return model


def batch_of(cfg: TBSMConfig, n: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    t = cfg.history + 1
    users = torch.randint(0, cfg.num_users, (n,), generator=g)
    items = torch.randint(2, cfg.num_items, (n, t), generator=g)
    cats = torch.randint(2, cfg.num_categories, (n, t), generator=g)
    timestamps = T0 + torch.cumsum(torch.randint(1, 50_000, (n, t), generator=g), dim=1)
    for b in range(0, n, 3):  # every third sample has a short, left-padded history
        items[b, : b % t], cats[b, : b % t], timestamps[b, : b % t] = PADDING_ROW, PADDING_ROW, 0
    labels = (torch.rand(n, generator=g) < 0.4).float()
    return Batch(users, items, cats, torch.zeros_like(items), timestamps, labels)


def test_unique_inverse_is_np_unique():
    rng = np.random.default_rng(0)
    # Large table first, then smaller ones: the scratch array is reused across tables and batches.
    for table_rows, shape in [(4_000_000, (64, 21)), (30, (64, 21)), (5, (64,)), (4_000_000, (1,)), (9, (3, 4))]:
        for _ in range(3):
            rows = rng.integers(0, table_rows, shape)
            unique, inverse = unique_inverse(rows, table_rows)
            expected_unique, expected_inverse = np.unique(rows, return_inverse=True)
            assert np.array_equal(unique, expected_unique)
            assert np.array_equal(inverse, expected_inverse.reshape(shape))


@pytest.mark.parametrize("dense_feature", ["position", "time"])
def test_row_gradients_equal_autograd(dense_feature):
    """Gradients of the unique rows (accumulated over every event that reads them) and of the dense
    weights: `forward_rows` with the hand-written backward vs autograd through per-table gathers."""
    model = small_model(dense_feature=dense_feature)
    batch = batch_of(model.cfg, 48, seed=1)
    deduped = dedup(model, batch)
    users, items, cats, _, timestamps = batch.inputs()
    tables = [t.weight.detach() for t in model.embedding_tables().values()]
    real_event = items != PADDING_ROW

    model.zero_grad()
    leaves = [t[torch.from_numpy(u)].requires_grad_() for t, (u, _) in zip(tables, deduped.rows)]
    vectors = [leaf[torch.from_numpy(inverse)] for leaf, (_, inverse) in zip(leaves, deduped.rows)]
    plain_logits = model.forward_vectors(*vectors, batch.behaviors, timestamps, real_event, fused=False)
    F.binary_cross_entropy_with_logits(plain_logits, batch.labels).backward()
    plain_rows = torch.cat([leaf.grad for leaf in leaves])
    plain_dense = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    rows = torch.cat([leaf.detach() for leaf in leaves]).requires_grad_()
    fast_logits = model.forward_rows(rows, torch.from_numpy(deduped.rows[0][1]), deduped.event_index, timestamps,
                                     real_event)
    F.binary_cross_entropy_with_logits(fast_logits, batch.labels).backward()
    fast_dense = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert len(deduped.rows[1][0]) < items.numel() / 10  # rows repeat: accumulation is exercised
    assert torch.allclose(fast_logits, plain_logits, atol=1e-5, rtol=0)
    assert torch.count_nonzero(plain_rows) > 0
    assert torch.allclose(rows.grad, plain_rows, atol=1e-6, rtol=1e-5), (rows.grad - plain_rows).abs().max()
    assert fast_dense.keys() == plain_dense.keys() and any(n.startswith("tower.top") for n in fast_dense)
    for name, grad in plain_dense.items():
        assert torch.allclose(fast_dense[name], grad, atol=1e-6, rtol=1e-5), name


def test_fast_steps_follow_the_autograd_trajectory():
    """Several Adagrad steps (with the logQ correction) from the same warmed-up state: the same losses
    and weights either way. Warmed by two plain steps: from an empty state Adagrad's first update is
    lr * sign(g), which float rounding can flip for gradients that are ~0."""
    model = small_model(seed=2)
    optimizer = TBSMOptimizer(model, lr=0.05)
    log_q = torch.log_softmax(torch.linspace(0.0, 1.0, model.cfg.num_items), 0)
    for seed in range(2):
        train_step(model, optimizer, batch_of(model.cfg, 48, seed), log_q, fused=False)
    fast_model = copy.deepcopy(model)
    fast_optimizer = TBSMOptimizer(fast_model, lr=0.05)
    fast_optimizer.load_state_dict(optimizer.state_dict())
    start = {k: v.clone() for k, v in model.state_dict().items()}

    for seed in range(2, 6):
        batch = batch_of(model.cfg, 48, seed)
        deduped = dedup(fast_model, batch)
        assert deduped.event_index is not None  # the fast path is the one taken
        plain_loss = train_step(model, optimizer, batch, log_q, fused=False)
        fast_loss = train_step(fast_model, fast_optimizer, deduped, log_q)
        assert fast_loss == pytest.approx(plain_loss, abs=1e-6)
    plain, fast = model.state_dict(), fast_model.state_dict()
    for name in plain:
        assert torch.allclose(fast[name], plain[name], atol=1e-5, rtol=1e-5), name
    assert not torch.equal(plain["tower.item_emb.weight"], start["tower.item_emb.weight"])
    assert not torch.equal(plain["tower.top.0.weight"], start["tower.top.0.weight"])
    for mine, theirs in zip(fast_optimizer.table_sum, optimizer.table_sum):
        assert torch.allclose(mine, theirs, atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(fast["tower.item_emb.weight"][PADDING_ROW]) == 0
