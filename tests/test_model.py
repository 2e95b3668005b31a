"""TBSM model: parameter counts, faithfulness of the vectorised forward, padding, variants, dense features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.tbsm import OOV_ROW, PADDING_ROW, TBSM, TBSMConfig, taobao_bench_config
from model.train import TBSMOptimizer, train_step
from sdk_builder.data.dataset import Batch

HIST = 20
T0 = 1_511_568_000


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    "overrides, other",
    [({}, 3_638), ({"tsl_num_heads": 2}, 6_684), ({"tsl_inner": "dot"}, 3_413)],
)
def test_parameter_table_matches_reference(overrides, other):
    with torch.device("meta"):
        model = TBSM(taobao_bench_config(**overrides))
    table = model.parameter_table()
    assert table["user"] == 15_807_904
    assert table["item"] == 66_592_384
    assert table["category"] == 151_024
    assert table["other"] == other
    assert table["total"] == 15_807_904 + 66_592_384 + 151_024 + other


# ---------------------------------------------------------------- helpers


def small_config(**overrides) -> TBSMConfig:
    base = dict(num_users=7, num_items=40, num_categories=9)
    return TBSMConfig(**{**base, **overrides})


def random_inputs(cfg: TBSMConfig, batch: int, *, seed: int = 0, padded: list[int] | None = None):
    """(user, items, cats, behaviors, timestamps); sample b has padded[b] left-padded history slots."""
    g = torch.Generator().manual_seed(seed)
    t = cfg.history + 1
    users = torch.randint(0, cfg.num_users, (batch,), generator=g)
    items = torch.randint(2, cfg.num_items, (batch, t), generator=g)
    cats = torch.randint(2, cfg.num_categories, (batch, t), generator=g)
    behaviors = torch.randint(1, 5, (batch, t), generator=g)
    gaps = torch.randint(1, 50_000, (batch, t), generator=g)
    timestamps = T0 + torch.cumsum(gaps, dim=1)
    for b, k in enumerate(padded or []):
        items[b, :k] = PADDING_ROW
        cats[b, :k] = PADDING_ROW
        behaviors[b, :k] = 0
        timestamps[b, :k] = 0
    return users, items, cats, behaviors, timestamps


def reference_forward(model: TBSM, users, items, cats, timestamps) -> torch.Tensor:
    """Independent per-timestep implementation of the spec (one DLRM tower call per event)."""
    cfg = model.cfg
    tower = model.tower
    t_len = items.shape[1]
    b = items.shape[0]
    e_user = tower.user_emb.weight[users]
    zs = []
    for t in range(t_len):
        if cfg.dense_feature == "position":
            dense = torch.full((b, 1), t / t_len)
        else:
            age = (timestamps[:, -1] - timestamps[:, t]).clamp(min=0).double()
            dense = (torch.log1p(age / 60.0) / 10.0).float().unsqueeze(1)
        x = dense
        for layer in tower.bottom:
            x = layer(x)
        stack = torch.stack([x, e_user, tower.item_emb.weight[items[:, t]], tower.cat_emb.weight[cats[:, t]]], dim=1)
        gram = torch.bmm(stack, stack.transpose(1, 2))  # (B, 4, 4)
        pairs = [gram[:, i, j] for i in range(4) for j in range(i)]  # strictly lower triangle, row by row
        r = torch.cat([x, torch.stack(pairs, dim=1)], dim=1)
        assert r.shape[1] == 22
        z = r
        for layer in tower.top:
            z = layer(z)
        zs.append(z / z.norm(dim=1, keepdim=True).clamp(min=1e-12))
    history = torch.stack(zs[:-1], dim=1)  # (B, 20, 15)
    real = (items[:, :-1] != PADDING_ROW).float().unsqueeze(-1)
    history = history * real
    w = zs[-1]
    assert cfg.model_type == "tsl" and cfg.tsl_num_heads == 1 and cfg.tsl_mechanism == "mlp"
    head = model.heads[0]
    A = head.A
    logits = []
    for s in range(b):
        ws = w[s].unsqueeze(1)  # column vector (15, 1)
        q = A.t() @ (A @ ws) if cfg.tsl_inner == "def" else (A @ ws if cfg.tsl_inner == "ind" else ws)
        a = (history[s] @ q).squeeze(1)  # (20,)
        y = a
        for layer in head.attention:
            y = layer(y)
        c = (y.unsqueeze(1) * history[s]).sum(0)
        logits.append(head.head(torch.cat([c, w[s]])).squeeze())
    return torch.stack(logits)


# ---------------------------------------------------------------- faithfulness


@pytest.mark.parametrize("dense_feature", ["time", "position"])
@pytest.mark.parametrize("tsl_inner", ["def", "ind", "dot"])
def test_vectorised_forward_equals_per_timestep_loop(dense_feature, tsl_inner):
    torch.manual_seed(1)
    cfg = small_config(dense_feature=dense_feature, tsl_inner=tsl_inner)
    model = TBSM(cfg).eval()
    with torch.no_grad():  # make the embeddings large enough that interactions matter
        for table in model.embedding_tables().values():
            table.weight.mul_(10.0)
        model.tower.item_emb.weight[:2].zero_()
        model.tower.cat_emb.weight[:2].zero_()
    inputs = random_inputs(cfg, 6, padded=[0, 3, 0, 19, 0, 7])
    users, items, cats, behaviors, timestamps = inputs
    with torch.no_grad():
        ours = model(*inputs)
        ref = reference_forward(model, users, items, cats, timestamps)
    assert ours.shape == (6,)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (ours - ref).abs().max()
    # guard against a vacuous comparison: the logits differ between samples
    assert ours.std() > 1e-4


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("model_type", ["tsl", "mha", "rnn"])
def test_padded_slots_contribute_nothing(model_type):
    torch.manual_seed(0)
    cfg = small_config(model_type=model_type)
    model = TBSM(cfg).eval()
    users, items, cats, behaviors, timestamps = random_inputs(cfg, 4, seed=3, padded=[5, 5, 12, 1])
    with torch.no_grad():
        base = model(users, items, cats, behaviors, timestamps)
        # junk in the padded slots (item row stays 0): category, behaviour, timestamp change
        cats2, beh2, ts2 = cats.clone(), behaviors.clone(), timestamps.clone()
        g = torch.Generator().manual_seed(9)
        for b, k in enumerate([5, 5, 12, 1]):
            cats2[b, :k] = torch.randint(2, cfg.num_categories, (k,), generator=g)
            beh2[b, :k] = torch.randint(1, 5, (k,), generator=g)
            ts2[b, :k] = timestamps[b, k] - torch.randint(1, 10_000, (k,), generator=g)
        assert torch.equal(model(users, items, cats2, beh2, ts2), base)
        # control: the same change in a real (unpadded) slot does change the output
        cats3 = cats.clone()
        cats3[:, 15] = (cats3[:, 15] - 2 + 1) % (cfg.num_categories - 2) + 2
        assert not torch.equal(model(users, items, cats3, behaviors, timestamps), base)


def test_padding_row_item_does_not_leak_through_real_embedding():
    """Even if someone writes a non-zero vector into the padding row, a padded slot is masked."""
    torch.manual_seed(0)
    cfg = small_config()
    model = TBSM(cfg).eval()
    inputs = random_inputs(cfg, 3, seed=5, padded=[4, 0, 10])
    with torch.no_grad():
        base = model(*inputs)
        model.tower.item_emb.weight[PADDING_ROW].uniform_(-1, 1)
        model.tower.cat_emb.weight[PADDING_ROW].uniform_(-1, 1)
        assert torch.allclose(model(*inputs), base, atol=1e-7)


def test_oov_and_padding_rows_are_zero_at_init():
    from model.tbsm import EMBEDDING_INIT_STD

    for init in ("reference", "normal"):
        torch.manual_seed(0)
        model = TBSM(small_config(num_items=1000, num_categories=100, init=init))
        for table in (model.tower.item_emb, model.tower.cat_emb):
            assert torch.count_nonzero(table.weight[PADDING_ROW]) == 0
            assert torch.count_nonzero(table.weight[OOV_ROW]) == 0
            rest = table.weight[2:]
            if init == "reference":
                bound = math.sqrt(1.0 / table.weight.shape[0])
                assert rest.abs().max() <= bound and rest.abs().max() > 0.5 * bound
            else:
                assert abs(float(rest.std()) - EMBEDDING_INIT_STD) < 0.1 * EMBEDDING_INIT_STD
        users = model.tower.user_emb.weight
        biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear)]
        if init == "reference":
            assert torch.count_nonzero(users[0]) > 0  # users have no reserved rows
            assert all(torch.count_nonzero(b) > 0 for b in biases)
        else:
            # a never-trained user is the average user; no ReLU starts switched off by its bias
            assert torch.count_nonzero(users) == 0
            assert all(torch.count_nonzero(b) == 0 for b in biases)


# ---------------------------------------------------------------- variants train


def tiny_batch(cfg: TBSMConfig, n: int = 64, seed: int = 0) -> Batch:
    users, items, cats, behaviors, timestamps = random_inputs(cfg, n, seed=seed, padded=[3] * (n // 4))
    g = torch.Generator().manual_seed(seed + 1)
    labels = (torch.rand(n, generator=g) < 0.5).float()
    # a learnable signal: positives' candidates are items 2..9
    items[:, -1] = torch.where(labels > 0, items[:, -1] % 8 + 2, items[:, -1] % 20 + 12)
    return Batch(users, items, cats, behaviors, timestamps, labels)


@pytest.mark.parametrize("model_type", ["mha", "rnn", "tsl"])
def test_variants_train_and_loss_goes_down(model_type):
    torch.manual_seed(0)
    cfg = small_config(model_type=model_type, num_items=40)
    model = TBSM(cfg)
    batch = tiny_batch(cfg)
    optimizer = TBSMOptimizer(model, lr=0.05)
    losses = [train_step(model, optimizer, batch) for _ in range(40)]
    assert losses[-1] < 0.8 * losses[0], losses
    # padding rows were never trained
    assert torch.count_nonzero(model.tower.item_emb.weight[PADDING_ROW]) == 0
    assert torch.count_nonzero(model.tower.cat_emb.weight[PADDING_ROW]) == 0


@pytest.mark.parametrize("model_type", ["mha", "rnn"])
def test_variant_modules_are_created_in_init_and_get_gradients(model_type):
    torch.manual_seed(0)
    cfg = small_config(model_type=model_type)
    model = TBSM(cfg)
    sub = model.mha if model_type == "mha" else model.rnn
    sub_params = list(sub.parameters())
    assert sub_params, "the sequence module has no parameters"
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in sub_params)
    if model_type == "mha":
        assert sub.q.weight.shape == (120, 15) and sub.k.weight.shape == (120, 15) and sub.v.weight.shape == (120, 15)
        assert sum(p.numel() for p in sub.head.parameters()) == 135 * 60 + 60 + 61
    else:
        assert sub.lstm.num_layers == 5 and sub.lstm.input_size == 15 and sub.lstm.hidden_size == 15
    # deterministic in eval: modules are not re-created per call
    inputs = random_inputs(cfg, 8, seed=2, padded=[2] * 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(*inputs), model(*inputs))
    model.train()
    batch = tiny_batch(cfg)
    loss = F.binary_cross_entropy_with_logits(model(*batch.inputs()), batch.labels)
    loss.backward()
    for name, p in sub.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


# ---------------------------------------------------------------- tsl_seq


def test_tsl_seq_first_head_ignores_oldest_ten_events():
    torch.manual_seed(0)
    cfg = small_config(tsl_num_heads=2, tsl_seq=True)
    model = TBSM(cfg).eval()
    captured: dict[int, torch.Tensor] = {}
    for j, head in enumerate(model.heads):
        head.register_forward_hook(lambda mod, args, out, j=j: captured.__setitem__(j, out.detach().clone()))
    users, items, cats, behaviors, timestamps = random_inputs(cfg, 5, seed=4)
    with torch.no_grad():
        full = model(users, items, cats, behaviors, timestamps)
        before = dict(captured)
        items2, cats2, ts2 = items.clone(), cats.clone(), timestamps.clone()
        items2[:, :10] = (items2[:, :10] - 2 + 7) % (cfg.num_items - 2) + 2
        cats2[:, :10] = (cats2[:, :10] - 2 + 3) % (cfg.num_categories - 2) + 2
        ts2[:, :10] -= 1000
        changed = model(users, items2, cats2, behaviors, ts2)
    # head 1 of 2 sees round(20 * 1/2) = 10 most recent events
    assert torch.equal(captured[0], before[0])
    assert not torch.allclose(captured[1], before[1])  # head 2 sees all 20
    assert not torch.allclose(changed, full)
    # and head 1 does react to its own window
    with torch.no_grad():
        items3 = items.clone()
        items3[:, 12] = (items3[:, 12] - 2 + 7) % (cfg.num_items - 2) + 2
        model(users, items3, cats, behaviors, timestamps)
    assert not torch.allclose(captured[0], before[0])


# ---------------------------------------------------------------- dense features


def test_time_feature_depends_only_on_age():
    torch.manual_seed(0)
    cfg = small_config(dense_feature="time")
    model = TBSM(cfg).eval()
    users, items, cats, behaviors, timestamps = random_inputs(cfg, 4, seed=6, padded=[0, 4, 0, 9])
    real = items != PADDING_ROW
    with torch.no_grad():
        base = model(users, items, cats, behaviors, timestamps)
        shifted = torch.where(real, timestamps + 123_456_789, timestamps)
        assert torch.allclose(model(users, items, cats, behaviors, shifted), base, atol=1e-6)
        shifted_all = timestamps + 86_400 * 365
        assert torch.allclose(model(users, items, cats, behaviors, shifted_all), base, atol=1e-6)
        # control: changing one event's age changes the output
        moved = timestamps.clone()
        moved[:, 14] -= 3 * 86_400
        assert not torch.allclose(model(users, items, cats, behaviors, moved), base, atol=1e-6)


def test_position_feature_ignores_timestamps():
    torch.manual_seed(0)
    cfg = small_config(dense_feature="position")
    model = TBSM(cfg).eval()
    users, items, cats, behaviors, timestamps = random_inputs(cfg, 4, seed=7)
    g = torch.Generator().manual_seed(1)
    other = torch.randint(0, 2_000_000_000, timestamps.shape, generator=g)
    with torch.no_grad():
        assert torch.equal(model(users, items, cats, behaviors, other), model(users, items, cats, behaviors, timestamps))


# ---------------------------------------------------------------- the trainer's fast paths


def _gradients(model: TBSM, inputs, labels, vectors, fused: bool):
    users, items, cats, behaviors, timestamps = inputs
    leaves = [v.detach().clone().requires_grad_() for v in vectors]
    model.zero_grad()
    logits = model.forward_vectors(*leaves[:3], behaviors, timestamps, items != PADDING_ROW,
                                   behavior_vec=leaves[3] if len(leaves) > 3 else None, fused=fused)
    F.binary_cross_entropy_with_logits(logits, labels).backward()
    dense = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), dense, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("overrides", [
    {"dense_feature": "time"},
    {"dense_feature": "position"},
    {"dense_feature": "time", "top_mlp": (20, 12, 15), "use_behavior": True},
])
def test_fused_tower_gives_autograd_gradients(overrides):
    """The hand-written backward of the event tower against plain autograd on the same batch."""
    torch.manual_seed(3)
    cfg = small_config(**overrides)
    model = TBSM(cfg)
    with torch.no_grad():  # interactions large enough to matter (user rows start at zero)
        for table in model.embedding_tables().values():
            table.weight.normal_(0.0, 0.3)
    inputs = random_inputs(cfg, 32, seed=11, padded=[0, 4, 20, 9] * 8)
    users, items, cats, behaviors, _ = inputs
    tower = model.tower
    vectors = [tower.user_emb.weight[users], tower.item_emb.weight[items], tower.cat_emb.weight[cats]]
    if cfg.use_behavior:
        vectors.append(tower.behavior_emb.weight[behaviors])
    labels = (torch.arange(32) % 3 == 0).float()
    plain_logits, plain_dense, plain_vectors = _gradients(model, inputs, labels, vectors, fused=False)
    fused_logits, fused_dense, fused_vectors = _gradients(model, inputs, labels, vectors, fused=True)
    assert torch.allclose(fused_logits, plain_logits, atol=1e-5, rtol=0)
    assert plain_dense.keys() == fused_dense.keys()
    tower_params = [n for n in plain_dense if n.startswith("tower.")]
    assert len(tower_params) >= 4
    for name in plain_dense:
        assert torch.allclose(fused_dense[name], plain_dense[name], atol=1e-5, rtol=1e-5), name
        assert name.startswith("tower.bottom") or torch.count_nonzero(plain_dense[name]) > 0, name  # not vacuous
    for plain, fused in zip(plain_vectors, fused_vectors):
        assert torch.count_nonzero(plain) > 0
        assert torch.allclose(fused, plain, atol=1e-5, rtol=1e-5), (fused - plain).abs().max()


def test_fused_train_step_updates_like_autograd():
    """From the same model and Adagrad state, one step (sparse rows and dense weights) lands on the
    same weights either way. The state is warmed by two steps first: from an empty state Adagrad's
    first update is lr * sign(g), which float rounding can flip for gradients that are ~0."""
    import copy

    torch.manual_seed(0)
    cfg = small_config(num_items=40)
    model = TBSM(cfg)
    optimizer = TBSMOptimizer(model, lr=0.05)
    for seed in range(2):
        train_step(model, optimizer, tiny_batch(cfg, seed=seed), fused=False)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    fused_model = copy.deepcopy(model)
    fused_optimizer = TBSMOptimizer(fused_model, lr=0.05)
    fused_optimizer.load_state_dict(optimizer.state_dict())
    batch = tiny_batch(cfg, seed=2)
    plain_loss = train_step(model, optimizer, batch, fused=False)
    fused_loss = train_step(fused_model, fused_optimizer, batch, fused=True)
    assert fused_loss == pytest.approx(plain_loss, abs=1e-6)
    plain, fused = model.state_dict(), fused_model.state_dict()
    assert plain.keys() == fused.keys()
    for name in plain:
        assert torch.allclose(fused[name], plain[name], atol=1e-5, rtol=0), (name, (fused[name] - plain[name]).abs().max())
    for name in ("tower.item_emb.weight", "tower.cat_emb.weight", "tower.user_emb.weight", "tower.top.0.weight",
                 "tower.bottom.0.weight"):
        assert (plain[name] - start[name]).abs().max() > 1e-4, name  # the step moved it
    assert torch.allclose(fused_optimizer.dense_sum, optimizer.dense_sum, atol=1e-5, rtol=1e-4)


def test_prefetched_keeps_order_and_reraises():
    from model.train import prefetched

    assert list(prefetched(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad batch 2")

    got = []
    with pytest.raises(ValueError, match="bad batch 2"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1]


def test_fit_with_prefetch_trains_the_same_model():
    import copy

    from model.train import TrainConfig, fit

    torch.manual_seed(0)
    cfg = small_config(num_items=40)
    models = [TBSM(cfg)]
    models.append(copy.deepcopy(models[0]))
    batches = [tiny_batch(cfg, n=32, seed=s) for s in range(6)]
    for model, prefetch in zip(models, (False, True)):
        fit(model, TBSMOptimizer(model, lr=0.05), TrainConfig(epochs=2), lambda epoch: iter(batches), len(batches),
            validate=lambda: {"val_hr10": 0.0}, on_best=lambda state, metrics: None, prefetch=prefetch)
    a, b = models[0].state_dict(), models[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
