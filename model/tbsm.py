"""TBSM: Time-based Sequence Model (Ishkhanov et al., arXiv 2008.11922), one readable file.

A sample is one user's last `history` events plus a candidate event (the last of `history + 1`).
Every event goes through the same DLRM event tower (bottom MLP on a dense scalar, embeddings of
user, item and category, pairwise dot interactions, top MLP, L2 normalisation); the history is then
summarised with respect to the candidate by a time-series layer (TSL attention, multi-head
attention or an LSTM) and a head MLP gives the click logit.

Conventions that differ from the reference on purpose:
- item and category tables reserve row 0 for padding (a zero vector, never trained) and row 1 for
  out-of-vocabulary ids; real ids start at row 2. Padded history slots are masked out of the
  attention, so a short history behaves like a shorter sequence rather than a run of fake items.
- the default dense feature is time: log-scaled seconds between each event and the request time
  (the candidate's timestamp), computed here from raw Unix timestamps so a phone passes only those.
  `dense_feature="position"` gives the reference's constant t/21.
- `forward` returns logits; `score` applies the sigmoid.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

PADDING_ROW = 0
OOV_ROW = 1
RESERVED_ROWS = 2
BEHAVIOR_ROWS = 5  # behaviour embedding rows: 0 padding, then pv, buy, cart, fav (sdk_builder.formats.BEHAVIORS)
SECONDS_PER_MINUTE = 60.0
# log1p of a year in minutes is ~13; dividing by 10 keeps the feature near [0, 1.3].
TIME_FEATURE_SCALE = 10.0
INITS = ("normal", "reference")
# Measured on ml-latest-small (docs/benchmarks.md): small enough that ids never trained (a test
# user's row, a random negative item) stay near neutral, large enough that interactions differ
# between events from the first step.
EMBEDDING_INIT_STD = 0.01
NORM_EPS = 1e-12  # F.normalize's default: z = h / max(|h|, eps)


@dataclass
class TBSMConfig:
    num_users: int
    num_items: int  # item table rows, padding and OOV rows included
    num_categories: int  # category table rows, padding and OOV rows included
    emb_dim: int = 16
    history: int = 20
    model_type: str = "tsl"  # tsl | mha | rnn
    tsl_inner: str = "def"  # def: q = A^T A w | ind: q = A w | dot: q = w
    tsl_mechanism: str = "mlp"  # mlp: y = MLP(a) | mul: y = a
    tsl_num_heads: int = 1
    tsl_seq: bool = False  # head j of k sees only the last round(history * j / k) steps
    bottom_mlp: tuple[int, ...] = (16,)
    top_mlp: tuple[int, ...] = (15, 15)
    tsl_mlp: tuple[int, ...] = (15, 15)
    head_mlp: tuple[int, ...] = (60, 1)
    mha_dim: int = 120
    rnn_layers: int = 5
    dense_feature: str = "time"  # time | position
    use_behavior: bool = False  # add a behaviour embedding to each history event's item embedding
    # normal: item/category rows N(0, EMBEDDING_INIT_STD), user rows zero, MLP biases zero |
    # reference: uniform +-sqrt(1/rows) rows and DLRM's random MLP biases (stalls some seeds)
    init: str = "normal"

    def __post_init__(self) -> None:
        checks = {
            "model_type": (self.model_type, ("tsl", "mha", "rnn")),
            "tsl_inner": (self.tsl_inner, ("def", "ind", "dot")),
            "tsl_mechanism": (self.tsl_mechanism, ("mlp", "mul")),
            "dense_feature": (self.dense_feature, ("time", "position")),
            "init": (self.init, INITS),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"TBSMConfig.{name}={value!r}: expected one of {allowed}")
        if self.tsl_num_heads > 1 and self.tsl_inner == "dot":
            raise ValueError("TBSMConfig: several TSL heads need tsl_inner 'def' or 'ind'")
        if self.bottom_mlp[-1] != self.emb_dim:
            raise ValueError("TBSMConfig.bottom_mlp must end with emb_dim to interact with embeddings")
        self.bottom_mlp, self.top_mlp = tuple(self.bottom_mlp), tuple(self.top_mlp)
        self.tsl_mlp, self.head_mlp = tuple(self.tsl_mlp), tuple(self.head_mlp)

    @property
    def z_dim(self) -> int:
        return self.top_mlp[-1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TBSMConfig:
        return cls(**d)


def taobao_bench_config(**overrides) -> TBSMConfig:
    """The reference's Taobao benchmark configuration and table sizes."""
    base = dict(num_users=987_994, num_items=4_162_024, num_categories=9_439, dense_feature="position")
    return TBSMConfig(**{**base, **overrides})


def mlp(sizes: tuple[int, ...], *, final_activation: bool, init: str = "normal") -> nn.Sequential:
    """Linear+ReLU stack, weights as DLRM's create_mlp: W ~ N(0, sqrt(2/(in+out))).

    Biases: zero (`normal`), or DLRM's N(0, sqrt(1/out)) (`reference`). A random negative bias
    can switch a ReLU of a 15-wide layer off for every input from the start; with that, 2 of 5
    seeds on ml-latest-small never left validation AUC ~0.54.
    """
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(n_in, n_out)
        if not linear.weight.is_meta:  # on meta: shapes only, a checkpoint fills them (_embedding_table)
            with torch.no_grad():
                linear.weight.normal_(0.0, math.sqrt(2.0 / (n_in + n_out)))
                if init == "reference":
                    linear.bias.normal_(0.0, math.sqrt(1.0 / n_out))
                else:
                    linear.bias.zero_()
        layers.append(linear)
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _embedding_table(rows: int, dim: int, *, reserved: int, init: str, std: float = EMBEDDING_INIT_STD) -> nn.Embedding:
    """An id table whose first `reserved` rows (padding, OOV) are zero.

    `reference`: uniform(+-sqrt(1/rows)) as the reference. `normal`: N(0, std).
    """
    padding_idx = PADDING_ROW if reserved else None
    if torch.empty(0).is_meta:
        # Built to load a checkpoint into: `normal_` on the meta device runs torch._refs, whose first
        # call imports torch._dynamo (~1.5 s of every `build`), for values the checkpoint replaces.
        return nn.Embedding(rows, dim, sparse=True, padding_idx=padding_idx, _weight=torch.empty(rows, dim))
    table = nn.Embedding(rows, dim, sparse=True, padding_idx=padding_idx)
    if init == "reference":
        bound = math.sqrt(1.0 / rows)
        nn.init.uniform_(table.weight, -bound, bound)
    else:
        nn.init.normal_(table.weight, 0.0, std)
    # An unknown id then adds nothing to the interactions, instead of a random vector that no
    # training step ever corrected (no training id maps to the OOV row).
    with torch.no_grad():
        table.weight[:reserved].zero_()
    return table


def time_feature(timestamps: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
    """log-scaled minutes from each event to the request; integer subtraction keeps full precision."""
    seconds = (request_time.unsqueeze(-1) - timestamps).clamp(min=0).to(torch.float32)
    return torch.log1p(seconds / SECONDS_PER_MINUTE) / TIME_FEATURE_SCALE


class EventTower(nn.Module):
    """DLRM applied to every event at once: (dense, user, item, category) -> unit vector z."""

    def __init__(self, cfg: TBSMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bottom = mlp((1, *cfg.bottom_mlp), final_activation=True, init=cfg.init)
        init = cfg.init
        # `normal` starts user rows at zero: a user the model never trained on (a later user, a
        # new install) is then the average user instead of random noise in every interaction.
        self.user_emb = _embedding_table(cfg.num_users, cfg.emb_dim, reserved=0, init=init, std=0.0)
        self.item_emb = _embedding_table(cfg.num_items, cfg.emb_dim, reserved=RESERVED_ROWS, init=init)
        self.cat_emb = _embedding_table(cfg.num_categories, cfg.emb_dim, reserved=RESERVED_ROWS, init=init)
        self.behavior_emb = (
            _embedding_table(BEHAVIOR_ROWS, cfg.emb_dim, reserved=1, init=init) if cfg.use_behavior else None
        )
        self.top = mlp((cfg.emb_dim + 6, *cfg.top_mlp), final_activation=True, init=cfg.init)

    def forward_embedded(
        self, dense: torch.Tensor, user_vec: torch.Tensor, item_vec: torch.Tensor, cat_vec: torch.Tensor
    ) -> torch.Tensor:
        """dense (..., T) or (T,), user_vec (..., D), item/cat vectors (..., T, D) -> z (..., T, Z).

        The 6 pairwise dot products of [x, user, item, category] (strictly lower triangle, row by
        row, as in DLRM) are written out: broadcasting the user vector and a position-only `x`
        avoids materialising (events, 4, D) stacks, which dominate the step time on CPU.
        """
        x = self.bottom(dense.unsqueeze(-1))
        u = user_vec.unsqueeze(-2)
        interactions = torch.stack(
            [
                (x * u).sum(-1).expand(item_vec.shape[:-1]),
                (x * item_vec).sum(-1),
                (u * item_vec).sum(-1),
                (x * cat_vec).sum(-1),
                (u * cat_vec).sum(-1),
                (item_vec * cat_vec).sum(-1),
            ],
            dim=-1,
        )
        z = self.top(torch.cat([x.expand(*item_vec.shape[:-1], x.shape[-1]), interactions], dim=-1))
        return F.normalize(z, dim=-1, eps=NORM_EPS)

    def forward_fused(
        self, dense: torch.Tensor, user_vec: torch.Tensor, item_vec: torch.Tensor, cat_vec: torch.Tensor
    ) -> torch.Tensor:
        """`forward_embedded` for a (B, T) batch through `_FusedTowerFunction`, from per-event vectors
        (the trainer passes unique rows and indices instead: `forward_rows`)."""
        b, t, d = item_vec.shape
        rows = torch.cat([user_vec, item_vec.reshape(-1, d), cat_vec.reshape(-1, d)])
        events = torch.arange(b, b + 2 * b * t).view(2, b, t)
        return self.forward_rows(dense, rows, torch.arange(b), events)

    def forward_rows(
        self, dense: torch.Tensor, rows: torch.Tensor, user_index: torch.Tensor, event_index: torch.Tensor
    ) -> torch.Tensor:
        """The tower on vectors given as rows (R, D) and indices into them: user_index (B,) and
        event_index (2, B, T) (item rows, then category rows) -> z (B, T, Z).

        The trainer's path: `rows` holds each table row the batch reads once, so the backward
        accumulates each row's gradient in one index_add instead of one autograd gather per table.
        """
        x = self.bottom(dense.unsqueeze(-1))
        if x.dim() == 2:  # the position feature: one bottom output per timestep, shared by the batch
            x = x.unsqueeze(0)
        weights = [p for m in self.top if isinstance(m, nn.Linear) for p in (m.weight, m.bias)]
        return _FusedTowerFunction.apply(x, rows, user_index, event_index, *weights)


class _FusedTowerFunction(torch.autograd.Function):
    """`EventTower.forward_embedded` after the bottom MLP, with a hand-written backward (training).

    Same math as the eager tower; what differs is the layout: the top MLP runs feature-major,
    (features, events), because MKL's small GEMMs with 15-20 outputs are 2-3x faster writing a
    (15, 5376) result than a (5376, 15) one, and the L2 norm becomes a sum over rows. Autograd's
    ~60 nodes for the tower and its three gathers become one, the backward reuses the forward's
    products, and each row's gradient is accumulated by one index_add (autograd's gather backward
    is an index_put with accumulation, ~1.5x slower).
    Inputs: x (1 or B, T, D) (1: shared by the batch, the position feature), rows (R, D), user_index
    (B,), event_index (2, B, T), then weight and bias of each top-MLP layer. Output z (B, T, Z).
    """

    @staticmethod
    def forward(ctx, x, rows, user_index, event_index, *weights):
        _, b, t = event_index.shape
        d = rows.shape[1]
        n = b * t
        ws, bs = weights[0::2], weights[1::2]
        user = rows.index_select(0, user_index).unsqueeze(1)
        # Separate item and category tensors: ops on one (2, B, T, D) tensor were slower here, as it
        # no longer fits the L2 cache.
        i = rows.index_select(0, event_index[0].reshape(-1)).view(b, t, d)
        c = rows.index_select(0, event_index[1].reshape(-1)).view(b, t, d)
        pairs = torch.empty(6, b, t, dtype=rows.dtype)  # DLRM's strictly-lower-triangle order
        for row, (left, right) in enumerate(((x, user), (i, x), (i, user), (c, x), (c, user), (i, c))):
            torch.sum(left * right, -1, out=pairs[row])
        first = ws[0]
        x_part = torch.addmm(bs[0].unsqueeze(-1), first[:, :d], x.reshape(-1, d).t()).view(-1, x.shape[0], t)
        h = torch.mm(first[:, d:], pairs.view(6, n)).view(-1, b, t).add_(x_part).relu_().view(-1, n)
        hidden = [h]
        for w, bias in zip(ws[1:], bs[1:]):
            h = torch.addmm(bias.unsqueeze(-1), w, h).relu_()
            hidden.append(h)
        norm = (h * h).sum(0).sqrt_()
        z = h / norm.clamp(min=NORM_EPS)
        ctx.save_for_backward(x, user, i, c, user_index, event_index, pairs, z, norm, *hidden, *weights)
        ctx.layers, ctx.rows = len(ws), rows.shape[0]
        return z.t().contiguous().view(b, t, -1)

    @staticmethod
    def backward(ctx, grad_z):
        x, user, i, c, user_index, event_index, pairs, z, norm, *rest = ctx.saved_tensors
        k = ctx.layers
        hidden, ws = rest[:k], rest[k:][0::2]
        b, t, d = i.shape
        n = b * t
        shared_x = x.shape[0] == 1
        g = grad_z.reshape(n, -1).t().contiguous()
        # F.normalize divides by max(norm, eps); below eps the clamp passes no gradient to the norm.
        along = (g * z).sum(0).mul_(norm > NORM_EPS)
        g = g.sub_(z * along).div_(norm.clamp(min=NORM_EPS))
        grads = []
        for layer in range(k - 1, 0, -1):
            g = g.mul_(hidden[layer] > 0)  # ReLU: its output is > 0 exactly where its input was
            grads.append((torch.mm(g, hidden[layer - 1].t()), g.sum(1)))
            g = torch.mm(ws[layer].t(), g)
        g = g.mul_(hidden[0] > 0)
        first = ws[0]
        g_x = g.view(-1, b, t).sum(1) if shared_x else g
        grads.append((torch.cat([torch.mm(g_x, x.reshape(-1, d)), torch.mm(g, pairs.view(6, n).t())], dim=1), g.sum(1)))
        g_pairs = torch.mm(first[:, d:].t(), g).view(6, b, t, 1)
        g_i = c * g_pairs[5]
        g_i.addcmul_(x, g_pairs[1]).addcmul_(user, g_pairs[2])
        g_c = i * g_pairs[5]
        g_c.addcmul_(x, g_pairs[3]).addcmul_(user, g_pairs[4])
        g_u = i * g_pairs[2]
        g_u.addcmul_(c, g_pairs[4]).addcmul_(x, g_pairs[0])
        g_xe = i * g_pairs[1]
        g_xe.addcmul_(c, g_pairs[3]).addcmul_(user, g_pairs[0])
        g_x_in = torch.mm(g_x.t(), first[:, :d]).view(x.shape) + (g_xe.sum(0, keepdim=True) if shared_x else g_xe)
        g_rows = g_i.new_zeros(ctx.rows, d).index_add_(0, user_index, g_u.sum(1))
        g_rows.index_add_(0, event_index[0].reshape(-1), g_i.view(n, d))
        g_rows.index_add_(0, event_index[1].reshape(-1), g_c.view(n, d))
        weight_grads = [g for pair in reversed(grads) for g in pair]
        return (g_x_in, g_rows, None, None, *weight_grads)


class TSLHead(nn.Module):
    """One TSL attention head followed by its own head MLP."""

    def __init__(self, cfg: TBSMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        z, t = cfg.z_dim, cfg.history
        self.A = nn.Parameter(torch.empty(z, z)) if cfg.tsl_inner != "dot" else None
        if self.A is not None and not self.A.is_meta:
            nn.init.uniform_(self.A, -math.sqrt(1.0 / z), math.sqrt(1.0 / z))
        self.attention = (
            nn.Sequential(mlp((t, *cfg.tsl_mlp, t), final_activation=False, init=cfg.init), nn.Sigmoid())
            if cfg.tsl_mechanism == "mlp"
            else None
        )
        self.head = mlp((2 * z, *cfg.head_mlp), final_activation=False, init=cfg.init)

    def query(self, w: torch.Tensor) -> torch.Tensor:
        if self.cfg.tsl_inner == "dot":
            return w
        aw = torch.matmul(w, self.A.t())
        return torch.matmul(aw, self.A) if self.cfg.tsl_inner == "def" else aw

    def forward(self, history: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """history (B, T, Z) with padded steps zeroed, w (B, Z) -> logit (B,)."""
        # Broadcast products rather than bmm: a bmm of B tiny (T x Z) matrices is slower on CPU.
        scores = (history * self.query(w).unsqueeze(-2)).sum(-1)
        weights = self.attention(scores) if self.attention is not None else scores
        context = (weights.unsqueeze(-1) * history).sum(-2)
        return self.head(torch.cat([context, w], dim=-1)).squeeze(-1)


class MHAHead(nn.Module):
    """Multi-head attention of the candidate over the history (trained modules, unlike the reference)."""

    def __init__(self, cfg: TBSMConfig) -> None:
        super().__init__()
        z, d = cfg.z_dim, cfg.mha_dim
        if d % cfg.tsl_num_heads:
            raise ValueError(f"mha_dim {d} is not divisible by tsl_num_heads {cfg.tsl_num_heads}")
        self.heads = cfg.tsl_num_heads
        self.q = nn.Linear(z, d, bias=False)
        self.k = nn.Linear(z, d, bias=False)
        self.v = nn.Linear(z, d, bias=False)
        self.head = mlp((d + z, *cfg.head_mlp), final_activation=False, init=cfg.init)

    def forward(self, history: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = history.shape
        split = lambda x: x.view(b, -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(w).unsqueeze(1)), split(self.k(history)), split(self.v(history))
        logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        # Padded keys get a large negative logit; their values are zero, so an all-padding
        # history yields a zero context instead of NaN.
        logits = logits + (mask.to(logits.dtype).unsqueeze(1).unsqueeze(1) - 1.0) * 1e9
        context = torch.matmul(torch.softmax(logits, dim=-1), v).transpose(1, 2).reshape(b, -1)
        return self.head(torch.cat([context, w], dim=-1)).squeeze(-1)


class RNNHead(nn.Module):
    def __init__(self, cfg: TBSMConfig) -> None:
        super().__init__()
        z = cfg.z_dim
        self.lstm = nn.LSTM(z, z, num_layers=cfg.rnn_layers, batch_first=True)
        self.head = mlp((2 * z, *cfg.head_mlp), final_activation=False, init=cfg.init)

    def forward(self, history: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(history)
        return self.head(torch.cat([out[:, -1], w], dim=-1)).squeeze(-1)


class TBSM(nn.Module):
    def __init__(self, cfg: TBSMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = EventTower(cfg)
        if cfg.model_type == "tsl":
            self.heads = nn.ModuleList(TSLHead(cfg) for _ in range(cfg.tsl_num_heads))
            k = cfg.tsl_num_heads
            self.combine = mlp((k, k + 4, 1), final_activation=False, init=cfg.init) if k > 1 else None
        elif cfg.model_type == "mha":
            self.mha = MHAHead(cfg)
        else:
            self.rnn = RNNHead(cfg)
        self.materialize_constants()

    def materialize_constants(self) -> None:
        """(Re)create the non-learned buffers; call after building the model on the meta device."""
        cfg = self.cfg
        if cfg.model_type == "tsl":
            k = cfg.tsl_num_heads
            steps = [round(cfg.history * (j + 1) / k) if cfg.tsl_seq else cfg.history for j in range(k)]
            first_visible = torch.tensor([cfg.history - s for s in steps], device="cpu")
            visibility = torch.arange(cfg.history, device="cpu").unsqueeze(0) >= first_visible.unsqueeze(1)
            self.register_buffer("head_visibility", visibility.float(), persistent=False)
        position = torch.arange(cfg.history + 1, dtype=torch.float32, device="cpu") / (cfg.history + 1)
        self.register_buffer("position_feature", position, persistent=False)

    def dense_features(self, timestamps: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
        if self.cfg.dense_feature == "position":
            return self.position_feature[: timestamps.shape[-1]]  # (T,): broadcast over the batch
        return time_feature(timestamps, request_time)

    def forward(
        self,
        user_rows: torch.Tensor,
        item_rows: torch.Tensor,
        cat_rows: torch.Tensor,
        behaviors: torch.Tensor,
        timestamps: torch.Tensor,
    ) -> torch.Tensor:
        """Click logits for a batch of samples.

        user_rows (B,); item_rows, cat_rows, behaviors, timestamps (B, history + 1), left-padded,
        the candidate last. The request time is the candidate's timestamp.
        """
        tower = self.tower
        return self.forward_vectors(
            tower.user_emb(user_rows), tower.item_emb(item_rows), tower.cat_emb(cat_rows), behaviors, timestamps,
            item_rows != PADDING_ROW,
        )

    def forward_vectors(
        self,
        user_vec: torch.Tensor,
        item_vec: torch.Tensor,
        cat_vec: torch.Tensor,
        behaviors: torch.Tensor,
        timestamps: torch.Tensor,
        real_event: torch.Tensor,
        behavior_vec: torch.Tensor | None = None,
        fused: bool = False,
    ) -> torch.Tensor:
        """`forward` after the id-table lookups (the trainer gathers rows itself, once per unique id).

        `fused`: the event tower as one autograd node with a hand-written backward (same math,
        float32 rounding aside; tests/test_model.py compares the gradients).
        """
        if self.tower.behavior_emb is not None:
            if behavior_vec is None:
                behavior_vec = self.tower.behavior_emb(behaviors)
            # A candidate's behaviour is unknown at request time: only history events get one.
            history_only = torch.ones_like(behaviors, dtype=item_vec.dtype)
            history_only[:, -1] = 0
            item_vec = item_vec + behavior_vec * history_only.unsqueeze(-1)
        dense = self.dense_features(timestamps, timestamps[:, -1])
        tower = self.tower.forward_fused if fused else self.tower.forward_embedded
        z = tower(dense, user_vec, item_vec, cat_vec)
        return self.attend(z[:, :-1], z[:, -1], real_event[:, :-1])

    def forward_rows(
        self,
        rows: torch.Tensor,
        user_index: torch.Tensor,
        event_index: torch.Tensor,
        timestamps: torch.Tensor,
        real_event: torch.Tensor,
    ) -> torch.Tensor:
        """`forward` from the unique table rows a batch reads, rows (R, D), and indices into them:
        user_index (B,), event_index (2, B, T) (items, then categories). The trainer's path; no
        behaviour embedding (`EventTower.forward_rows`)."""
        dense = self.dense_features(timestamps, timestamps[:, -1])
        z = self.tower.forward_rows(dense, rows, user_index, event_index)
        return self.attend(z[:, :-1], z[:, -1], real_event[:, :-1])

    def attend(self, history: torch.Tensor, w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """history z (B, T, Z), candidate z (B, Z), mask (B, T) true for real events -> logits (B,)."""
        history = history * mask.unsqueeze(-1).to(history.dtype)
        if self.cfg.model_type == "mha":
            return self.mha(history, w, mask)
        if self.cfg.model_type == "rnn":
            return self.rnn(history, w)
        if self.combine is None:
            return self.heads[0](history, w)
        head_logits = [
            head(history * visible.unsqueeze(-1), w) for head, visible in zip(self.heads, self.head_visibility)
        ]
        return self.combine(torch.sigmoid(torch.stack(head_logits, dim=-1))).squeeze(-1)

    def score(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(*inputs))

    @torch.no_grad()
    def rank(
        self,
        user_rows: torch.Tensor,
        item_rows: torch.Tensor,
        cat_rows: torch.Tensor,
        behaviors: torch.Tensor,
        timestamps: torch.Tensor,
        request_time: torch.Tensor,
        cand_items: torch.Tensor,
        cand_cats: torch.Tensor,
        logits: bool = False,
    ) -> torch.Tensor:
        """Probabilities (or logits) of N candidates per history: (C,) users, (C, T) histories, (C,)
        request times, (C, N) candidates -> (C, N). Equal to `score` on C*N samples that repeat each
        history, but the event tower runs once per history event instead of once per sample."""
        tower = self.tower
        c, n = cand_items.shape
        user_vec = tower.user_emb(user_rows)
        item_vec = tower.item_emb(item_rows)
        if tower.behavior_emb is not None:
            item_vec = item_vec + tower.behavior_emb(behaviors)
        history = tower.forward_embedded(self.dense_features(timestamps, request_time), user_vec, item_vec, tower.cat_emb(cat_rows))
        cand_dense = self.dense_features(request_time.unsqueeze(-1).expand(c, n), request_time)
        if self.cfg.dense_feature == "position":
            cand_dense = self.position_feature[-1:].expand(c, n)
        w = tower.forward_embedded(cand_dense, user_vec, tower.item_emb(cand_items), tower.cat_emb(cand_cats))
        t = history.shape[1]
        out = self.attend(history.unsqueeze(1).expand(c, n, t, -1).reshape(c * n, t, -1), w.reshape(c * n, -1),
                          (item_rows != PADDING_ROW).unsqueeze(1).expand(c, n, t).reshape(c * n, t))
        return (out if logits else torch.sigmoid(out)).reshape(c, n)

    def with_logit_scale(self, scale: float) -> TBSM:
        """This model with every logit multiplied by `scale` (> 0), sharing the id tables: the last
        layer of each head (or of the combining MLP) is a scaled copy. Ranking is unchanged; it lets
        a blend sigmoid(scale * logit + prior) stay in float32 range however large the prior."""
        if self.cfg.model_type != "tsl" or scale == 1.0:
            return self
        scaled = copy.copy(self)
        scaled._modules = dict(self._modules)
        last = "combine" if self.combine is not None else "heads"
        scaled._modules[last] = copy.deepcopy(self._modules[last])  # a few thousand weights, not the tables
        with torch.no_grad():
            for module in [scaled.combine] if self.combine is not None else [h.head for h in scaled.heads]:
                final = [m for m in module if isinstance(m, nn.Linear)][-1]
                final.weight.mul_(scale)
                final.bias.mul_(scale)
        return scaled

    def embedding_tables(self) -> dict[str, nn.Embedding]:
        tables = {"user": self.tower.user_emb, "item": self.tower.item_emb, "category": self.tower.cat_emb}
        return tables

    def parameter_table(self) -> dict[str, int]:
        """Parameter counts: the three id tables and everything else."""
        counts = {name: t.weight.numel() for name, t in self.embedding_tables().items()}
        table_ids = {id(t.weight) for t in self.embedding_tables().values()}
        counts["other"] = sum(p.numel() for p in self.parameters() if id(p) not in table_ids)
        counts["total"] = sum(counts.values())
        return counts
