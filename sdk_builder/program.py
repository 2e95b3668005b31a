"""Per-user programs: slice the model for one user and a shard of items, export to ExecuTorch.

`UserProgram` holds exactly one user row, the shard's item rows, their category rows and what can
be computed from those alone: the candidate-side event-tower output `w` of every shard item (a
candidate's dense feature is a constant: age 0, or position 20/21). At request time only the 20
history events go through the event tower; each candidate costs a lookup, one attention pass and
the head.

`slice_constants` -> `UserProgram` -> `export_program`; lowering to bytes is a recipe's job
(`sdk_builder.recipes`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.tbsm import OOV_ROW, PADDING_ROW, RESERVED_ROWS, SECONDS_PER_MINUTE, TBSM, TIME_FEATURE_SCALE, TSLHead
from sdk_builder.formats import MAX_CANDIDATES, MAX_HISTORY, ProgramSpec, TensorSpec
from sdk_builder.shard import COUNT_DECODE
from sdk_builder.util import sorted_lookup


def program_spec() -> ProgramSpec:
    h = MAX_HISTORY
    return ProgramSpec(
        inputs=[
            TensorSpec(name="hist_items", dtype="int64", shape=[h], description="local item rows of the history, oldest first, left-padded with 0"),
            TensorSpec(name="hist_categories", dtype="int64", shape=[h], description="local category rows of the history events"),
            TensorSpec(name="hist_behaviors", dtype="int64", shape=[h], description="behaviour codes (manifest.behaviors), 0 in padding"),
            TensorSpec(name="hist_timestamps", dtype="int64", shape=[h], description="Unix seconds of the history events, 0 in padding"),
            TensorSpec(name="request_time", dtype="int64", shape=[1], description="Unix seconds of the ranking request"),
            TensorSpec(name="candidates", dtype="int64", shape=["n_candidates"], description=f"local item rows to score, 1..{MAX_CANDIDATES}"),
            TensorSpec(name="user_state", dtype="float32", shape=["state_size"],
                       description="the user state: [user vector (emb_dim), the user's share of the candidate top layer's "
                                   "bias (z_dim)]; the refreshed state when the app has one for this bundle, else "
                                   "manifest.user_state (state_size = len(manifest.user_state))"),
        ],
        outputs=[TensorSpec(name="scores", dtype="float32", shape=["n_candidates"],
                            description="score of each candidate in (0, 1), higher is better: sigmoid(model logit + shard prior)")],
    )


@dataclass(frozen=True)
class Shard:
    """Full-model rows kept in a per-user slice. Local row of items[i] is i + RESERVED_ROWS."""

    user_row: int
    item_rows: np.ndarray  # full-table rows, in local order
    category_rows: np.ndarray  # full-table rows, in local order
    # Each item's position in the shard policy's order at build time (local order); None: all last.
    item_position: np.ndarray | None = None
    # Each item's co-visited shard items (local rows, 0-padded) and their co-visit count codes
    # (`sdk_builder.shard.encode_counts`), [n, k]: the program re-ranks the policy's order from the
    # phone's own history with them (`live_positions`).
    neighbors: np.ndarray | None = None
    neighbor_codes: np.ndarray | None = None
    # b = w / (1 + w) for the run's prior weight w: the prior's share of the shipped score (0: the model alone).
    prior_scale: float = 0.0
    # Unix seconds of the last event the build saw (0: none): only later events re-rank the policy's
    # order on the phone, the earlier ones are already in it (with more seeds and longer co-visit lists).
    built_after: int = 0
    # Each item's slot (local order): the row of its entries in the per-item tables. None: its local
    # row. A rebuild keeps the slots of the items it keeps (`stable_slots`), so that an item entering
    # the sorted shard moves no other item's table rows: a patch carries only what changed.
    item_slot: np.ndarray | None = None


@dataclass(frozen=True)
class SliceLayout:
    """Rows of the per-user tables, reserved rows included, and the length of each item's co-visit
    list. Fixing them gives every user's program the same tensor shapes, so one exported program
    can be stamped with any user's constants."""

    item_rows: int
    category_rows: int
    neighbors: int = 0

    @staticmethod
    def exact(shard: Shard) -> SliceLayout:
        k = shard.neighbors.shape[1] if shard.neighbors is not None else 0
        return SliceLayout(len(shard.item_rows) + RESERVED_ROWS, len(shard.category_rows) + RESERVED_ROWS, k)


# The per-user constants of a program: everything else is shared by all users of a checkpoint.
# The user's own row is not one of them: it is the program's `user_state` input (`user_state`),
# so that the phone can rank with a refreshed row (`sdk_builder.refresh`).
USER_CONSTANTS = ("item_slot", "item_table", "category_table", "candidate_features", "candidate_category",
                  "candidate_position", "item_neighbors", "neighbor_weights", "prior_params")
# Seed weights of the on-device co-visit score: WEIGHT // (1 + age), age 0 the latest distinct item.
# Integers, so that the program and the eager reference break ties identically (lcm(1..12): exact
# 1 / (1 + age) ratios for the 12 latest seeds).
SEED_WEIGHT = 27720
# A seed's score in `live_positions`: above any co-visit score (at most MAX_HISTORY x k entries of
# COUNT_DECODE[-1] * SEED_WEIGHT < 2**43), with room for the event index, and times 65536 in int64.
SEED_KEY = 2**46
def _candidate_x(model: TBSM) -> torch.Tensor:
    """Bottom-MLP output of a candidate: its dense feature is a constant (age 0 or position 20/21)."""
    dense = model.position_feature[-1:] if model.cfg.dense_feature == "position" else torch.zeros(1)
    return model.tower.bottom(dense.unsqueeze(-1))[0]


@torch.no_grad()
def user_state(model: TBSM, user_row: int) -> torch.Tensor:
    """The user state, float32 [emb_dim + z_dim]: [user vector (D), the user's share of the
    candidate top layer's bias (Z)] (the x.u input of the first top layer for a candidate's constant x)."""
    u = model.tower.user_emb.weight[user_row].detach().to(torch.float32)
    return torch.cat([u, state_bias_share(model, u)]).contiguous()


def state_bias_share(model: TBSM, u: torch.Tensor) -> torch.Tensor:
    """The candidate top layer's bias share of a user vector `u` (differentiable in `u`)."""
    return model.tower.top[0].weight[:, model.cfg.emb_dim] * (_candidate_x(model) @ u)


@torch.no_grad()
def slice_constants(model: TBSM, shard: Shard, item_category: np.ndarray, layout: SliceLayout | None = None) -> dict[str, torch.Tensor]:
    """One user's constants: `item_category[full item row]` is the item's full category row.

    - `item_slot`: per local item row, its slot (int16; `Shard.item_slot`): the per-item tables below
      (`item_table`, `candidate_*`, `item_neighbors`, `neighbor_weights`) are stored by slot, and
      the program reads them at `item_slot[row]`;
    - `item_table`, `category_table`: the shard's rows (row 0 padding, row 1 OOV, zero-padded to
      the layout);
    - `candidate_features`: per shard item, the 3 interactions of the item as a candidate that do
      not involve the user (x.item, x.cat, item.cat): a candidate's x is a constant, so these are
      constants; u.item and u.cat are computed from the `user_state` input (a refreshed state moves them);
    - `candidate_category`: per local item row, its local category row (int16, widened in the
      graph: 2 bytes an item instead of int64's 8; OOV when the category is not in the shard, 0 for
      padding);
    - `candidate_position`: per local item row, its position in the build-time policy order
      (int16; the shard's size for padding, OOV and a shard without positions);
    - `item_neighbors`, `neighbor_weights`: per local item row, its co-visited shard items (int16
      [item_rows, k]) and their co-visit count codes (uint8, `sdk_builder.shard.encode_counts`), for `live_positions`;
    - `prior_params`: float32 [3], b (the prior's weight in the score) and `Shard.built_after` as two
      float32-exact halves (seconds // 65536, seconds % 65536).
    """
    layout = layout or SliceLayout.exact(shard)
    n_items, n_cats = len(shard.item_rows), len(shard.category_rows)
    if n_items + RESERVED_ROWS > layout.item_rows or n_cats + RESERVED_ROWS > layout.category_rows:
        raise ValueError(f"shard of {n_items} items / {n_cats} categories does not fit the layout {layout}")
    if layout.category_rows > np.iinfo(np.int16).max + 1:
        raise ValueError(f"{layout.category_rows} category rows do not fit candidate_category's int16 (at most 32768)")
    tower, emb = model.tower, model.cfg.emb_dim
    x = _candidate_x(model)
    items = torch.zeros(layout.item_rows, emb)
    items[RESERVED_ROWS : RESERVED_ROWS + n_items] = tower.item_emb.weight[torch.as_tensor(shard.item_rows)]
    items[OOV_ROW] = tower.item_emb.weight[OOV_ROW]
    cats = torch.zeros(layout.category_rows, emb)
    cats[RESERVED_ROWS : RESERVED_ROWS + n_cats] = tower.cat_emb.weight[torch.as_tensor(shard.category_rows)]
    cats[OOV_ROW] = tower.cat_emb.weight[OOV_ROW]
    # Local category row of every local item row (OOV when the category is not in the shard).
    item_cat_full = np.asarray(item_category)[np.asarray(shard.item_rows, dtype=np.int64)]
    pos, found = sorted_lookup(shard.category_rows, item_cat_full)
    local_cat = np.full(layout.item_rows, OOV_ROW, dtype=np.int64)
    local_cat[PADDING_ROW] = PADDING_ROW
    local_cat[RESERVED_ROWS : RESERVED_ROWS + n_items] = np.where(found, pos + RESERVED_ROWS, OOV_ROW)
    item_cat_vec = cats[torch.from_numpy(local_cat)]
    features = torch.stack([items @ x, item_cat_vec @ x, (items * item_cat_vec).sum(-1)], dim=-1)
    features[PADDING_ROW] = 0
    prior = slice_constants_prior(shard, layout)
    slot = prior["item_slot"].numpy().astype(np.int64)
    return {
        "item_table": by_slot(items, slot),
        "category_table": cats.contiguous(),
        "candidate_features": by_slot(features, slot),
        "candidate_category": by_slot(torch.from_numpy(local_cat.astype(np.int16)), slot),
        **prior,
    }


def slot_of_row(shard: Shard, layout: SliceLayout) -> np.ndarray:
    """`item_slot` (int64 [item_rows]): each local row's slot; reserved and layout padding rows keep their own."""
    slot = np.arange(layout.item_rows, dtype=np.int64)
    if shard.item_slot is not None:
        n = len(shard.item_rows)
        slot[RESERVED_ROWS : RESERVED_ROWS + n] = shard.item_slot
        if not np.array_equal(np.sort(shard.item_slot), np.arange(RESERVED_ROWS, RESERVED_ROWS + n)):
            raise ValueError("item_slot is not a permutation of the shard's local rows")
    return slot


def by_slot(table: torch.Tensor, slot: np.ndarray) -> torch.Tensor:
    """A per-row table stored by slot: row r moves to slot[r]."""
    out = torch.empty_like(table)
    out[torch.from_numpy(slot)] = table
    return out.contiguous()


def slice_constants_prior(shard: Shard, layout: SliceLayout) -> dict[str, torch.Tensor]:
    """The prior's constants of `slice_constants` (see there), and `item_slot`."""
    n_items = len(shard.item_rows)
    if layout.item_rows > np.iinfo(np.int16).max:
        raise ValueError(f"{n_items} shard items do not fit the int16 position and neighbour tables (at most 32765)")
    position = np.full(layout.item_rows, n_items, np.int64)
    if shard.item_position is not None:
        position[RESERVED_ROWS : RESERVED_ROWS + n_items] = shard.item_position
    k = max(layout.neighbors, 1)  # a zero-width table could not be stamped: one empty column instead
    neighbors = np.zeros((layout.item_rows, k), np.int64)
    codes = np.zeros((layout.item_rows, k), np.uint8)
    slot = slot_of_row(shard, layout)
    if shard.neighbors is not None:
        kept = min(k, shard.neighbors.shape[1])
        neighbors[RESERVED_ROWS : RESERVED_ROWS + n_items, :kept] = slot[shard.neighbors[:, :kept]]
        codes[RESERVED_ROWS : RESERVED_ROWS + n_items, :kept] = shard.neighbor_codes[:, :kept]
    codes[neighbors < RESERVED_ROWS] = 0  # `live_positions` relies on it: padding entries add nothing
    # Each list by slot, padding last: the program sums a list whatever its order, and a list whose
    # counts only reorder its items stores the same bytes (smaller patches).
    order = np.argsort(np.where(neighbors > 0, neighbors, np.iinfo(np.int64).max), axis=1, kind="stable")
    neighbors, codes = np.take_along_axis(neighbors, order, 1), np.take_along_axis(codes, order, 1)
    return {
        "item_slot": torch.from_numpy(slot.astype(np.int16)).contiguous(),
        "candidate_position": by_slot(torch.from_numpy(position.astype(np.int16)), slot),
        "item_neighbors": by_slot(torch.from_numpy(neighbors.astype(np.int16)), slot),
        "neighbor_weights": by_slot(torch.from_numpy(codes), slot),
        "prior_params": torch.tensor([shard.prior_scale, *divmod(int(shard.built_after), 65536)], dtype=torch.float32),
    }


class UserProgram(nn.Module):
    """The on-device program for one user. Inputs are local rows and the user state, see `program_spec`.

    Per-user constants (`USER_CONSTANTS`) are only ever read through gathers, which stay on the
    portable kernels: XNNPACK then sees them as runtime tensors, so they live in the program's
    constant data (stampable) and never inside a delegate blob.
    """

    def __init__(self, model: TBSM, constants: dict[str, torch.Tensor]) -> None:
        super().__init__()
        cfg = model.cfg
        if cfg.model_type != "tsl":
            raise ValueError(f"model type {cfg.model_type!r} cannot be exported yet: only 'tsl' models")
        self.cfg = cfg
        tower = model.tower
        for name in USER_CONSTANTS:
            self.register_buffer(name, constants[name].detach().clone())
        with torch.no_grad():
            self.behavior_table = (
                nn.Parameter(tower.behavior_emb.weight.detach().clone(), requires_grad=False)
                if tower.behavior_emb is not None else None
            )
            first, emb = tower.top[0], cfg.emb_dim
            folded = nn.Linear(5, first.out_features)
            # First top layer inputs: [x (emb), x.u, x.item, u.item, x.cat, u.cat, item.cat]; the
            # constant x folds into the bias, the user's x.u share is added from `user_state`.
            # Our order: the constant features (x.item, x.cat, item.cat), then u.item, u.cat.
            folded.weight.copy_(first.weight[:, [emb + k for k in (1, 3, 5, 2, 4)]])
            folded.bias.copy_(first.bias + first.weight[:, :emb] @ _candidate_x(model))
            self.candidate_first = folded
            self.candidate_rest = nn.Sequential(*list(tower.top)[1:])
        self.bottom = tower.bottom
        self.top = tower.top
        self.heads = model.heads
        self.combine = model.combine
        # One (T, 1) column a head: selecting a row of the (H, T) matrix cost a copy every call.
        self.head_visibility = [f"head_visibility_{k}" for k in range(len(model.heads))]
        for name, visible in zip(self.head_visibility, model.head_visibility):
            self.register_buffer(name, visible.unsqueeze(-1).clone())
        self.register_buffer("position_feature", model.position_feature[:-1].clone())
        self.register_buffer("ones_d", torch.ones(1, cfg.emb_dim))
        self.register_buffer("ones_z", torch.ones(1, cfg.z_dim))
        self.register_buffer("param_rows", torch.arange(3))
        self.register_buffer("count_decode", torch.from_numpy(COUNT_DECODE))
        # Buffers, not tensors made in `forward`: export copies a tensor made there at every call.
        for name, tensor in history_constants(MAX_HISTORY).items():
            self.register_buffer(name, tensor.clone())

    @classmethod
    def for_shard(cls, model: TBSM, shard: Shard, item_category: np.ndarray, layout: SliceLayout | None = None) -> UserProgram:
        return cls(model, slice_constants(model, shard, item_category, layout))

    def user_parts(self, user_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(user vector (1, D), bias share (1, Z)) of the state input."""
        emb, state = self.cfg.emb_dim, user_state.view(1, -1)
        return state[:, :emb], state[:, emb:]

    def event_dense(self, hist_timestamps, request_time) -> torch.Tensor:
        """The dense feature of history events: their age at the request, or their position."""
        if self.cfg.dense_feature == "position":
            return self.position_feature
        # Clamped after the cast (the same values: the cast is monotone), so that the delegate clamps.
        seconds = F.relu((request_time - hist_timestamps).to(torch.float32))
        return torch.log1p(seconds / SECONDS_PER_MINUTE) / TIME_FEATURE_SCALE

    def slots(self, item_rows: torch.Tensor) -> torch.Tensor:
        """The slots (`item_slot`) of local item rows: where their entries are in the per-item tables."""
        return self.item_slot[item_rows].to(torch.int64)

    def history_z(self, hist_slots, hist_categories, hist_behaviors, hist_timestamps, request_time,
                  user_state, dense: torch.Tensor | None = None) -> torch.Tensor:
        """Event-tower output of each history event, by the slots of its items (`slots`; events of
        any length: `dense`, one per event, lets a caller stack several histories; default `event_dense`)."""
        if dense is None:
            dense = self.event_dense(hist_timestamps, request_time)
        item_vec = self.item_table[hist_slots]
        if self.behavior_table is not None:
            item_vec = item_vec + self.behavior_table[hist_behaviors]
        x = self.bottom(dense.unsqueeze(-1))
        u = self.user_parts(user_state)[0]  # (1, D): broadcast in the products, no expanded copy
        cat_vec = self.category_table[hist_categories]
        # Products, then one linear with a ones row over the embedding axis: the 6 dot products
        # become a single delegated linear instead of 6 portable reductions (a (6 x 6D) block-sum
        # matrix did the same with 36x the weights: 2.3 KB of every program).
        products = torch.cat([x * u, x * item_vec, u * item_vec, x * cat_vec, u * cat_vec, item_vec * cat_vec], dim=-1)
        interactions = F.linear(products.view(-1, 6, self.cfg.emb_dim), self.ones_d).view(-1, 6)
        z = unit_rows(self.top(torch.cat([x, interactions], dim=-1)), self.ones_z)
        real = (hist_slots != PADDING_ROW).to(z.dtype).unsqueeze(-1)  # padding's slot is its row
        return z * real

    def forward(self, hist_items, hist_categories, hist_behaviors, hist_timestamps, request_time, candidates, user_state):
        hist_slots, candidate_slots = self.slots(hist_items), self.slots(candidates)
        history = self.history_z(hist_slots, hist_categories, hist_behaviors, hist_timestamps, request_time, user_state)
        logit = self.candidate_logits(history, self.candidate_w(candidate_slots, user_state))
        params = self.prior_parameters()
        constants = {name: getattr(self, name) for name in HISTORY_CONSTANTS}
        positions = live_positions(hist_slots, hist_timestamps, built_after_of(params, constants["halves"]),
                                   self.candidate_position, self.item_neighbors, self.neighbor_weights,
                                   self.count_decode, constants)
        return torch.sigmoid(logit + prior_of(positions, params)[candidate_slots].view(1, -1, 1)).reshape(-1)

    def prior_parameters(self) -> torch.Tensor:
        """`prior_params`, read through a gather so that it stays a stampable constant (a delegate
        would pack it into its blob)."""
        return self.prior_params[self.param_rows]

    def prior(self, positions: torch.Tensor) -> torch.Tensor:
        return prior_of(positions, self.prior_parameters())

    def build_time_positions(self) -> torch.Tensor:
        """The policy positions stamped at build time (what ranks before any on-device event), by slot."""
        return self.candidate_position.to(torch.int64)

    def candidate_w(self, candidate_slots: torch.Tensor, user_state: torch.Tensor) -> torch.Tensor:
        """Candidate-side event-tower output (1, N, Z) of N items, by slot (`slots`)."""
        u, bias_share = self.user_parts(user_state)
        # Candidates live in a (1, N, .) batch of one from here on: bmm needs it, and staying 3-D
        # avoids a squeeze/unsqueeze copy of every (N, .) intermediate between delegates.
        items = self.item_table[candidate_slots].unsqueeze(0)
        cats = self.category_table[self.candidate_category[candidate_slots].to(torch.int64)].unsqueeze(0)
        # u.item and u.cat as linears with a ones row (delegated, as in `history_z`; a sum over the
        # last axis ran on the portable kernels, two passes over N x D).
        features = torch.cat([self.candidate_features[candidate_slots].unsqueeze(0),
                              F.linear(items * u, self.ones_d), F.linear(cats * u, self.ones_d)], dim=-1)
        return unit_rows(self.candidate_rest(self.candidate_first(features) + bias_share), self.ones_z)

    def candidate_logits(self, history: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Model logits (B, N, 1) of candidates `w` (B, N, Z) after a history (T, Z), or B histories (B, T, Z)."""
        logits = [
            head_logits(head, history * getattr(self, visible), w) for head, visible in zip(self.heads, self.head_visibility)
        ]
        return logits[0] if self.combine is None else self.combine(torch.sigmoid(torch.cat(logits, dim=-1)))


def prior_tables(shard: Shard) -> dict[str, torch.Tensor]:
    """The prior's constants of a shard's exact layout, as `slice_constants` stores them, for eager
    scoring (`shard_prior`)."""
    return slice_constants_prior(shard, SliceLayout.exact(shard))


def shard_prior(tables: dict[str, torch.Tensor], hist_items: torch.Tensor, hist_timestamps: torch.Tensor) -> torch.Tensor:
    """What the program adds to every local item row's logit after a history of local rows (eager)."""
    params, slots = tables["prior_params"], tables["item_slot"].to(torch.int64)
    positions = live_positions(slots[hist_items], hist_timestamps, built_after_of(params), tables["candidate_position"],
                               tables["item_neighbors"], tables["neighbor_weights"], torch.from_numpy(COUNT_DECODE))
    return prior_of(positions, params)[slots]


def built_after_of(prior_params: torch.Tensor, halves: torch.Tensor | None = None) -> torch.Tensor:
    """`Shard.built_after` from `prior_params` (stored as two float32-exact halves): b * 0 + high *
    65536 + low, one multiply and sum (`halves`: `history_constants`' [0, 65536, 1])."""
    halves = history_constants(0)["halves"] if halves is None else halves
    return (prior_params.to(torch.int64) * halves).sum()


HISTORY_CONSTANTS = ("halves", "later", "seed_weight", "seed_key", "zero")


@functools.cache
def history_constants(t: int) -> dict[str, torch.Tensor]:
    """The constant tensors of `built_after_of` and `live_positions` for histories of t events.
    Cached (eager scoring asks for them per golden case, ~0.8 ms a bundle): read them, never write."""
    return {
        "halves": torch.tensor([0, 65536, 1]),
        "later": torch.from_numpy(np.triu(np.ones((t, t), dtype=bool), 1)),  # [i, j]: event j is more recent than i
        # `live_positions`' sort key unit (65536) included
        "seed_weight": torch.tensor([SEED_WEIGHT // (1 + age) * 65536 for age in range(t)], dtype=torch.int64),
        "seed_key": torch.tensor([(SEED_KEY + i) * 65536 for i in range(t)], dtype=torch.int64),  # the later event, the higher
        "zero": torch.tensor(0),
    }


def prior_of(positions: torch.Tensor, prior_params: torch.Tensor) -> torch.Tensor:
    """b * -log(1 + position) of every local item row (b = `prior_params[0]`)."""
    return -torch.log1p(positions.to(torch.float32)) * prior_params[:1]


def live_positions(hist_slots: torch.Tensor, hist_timestamps: torch.Tensor, built_after: torch.Tensor,
                   candidate_position: torch.Tensor, item_neighbors: torch.Tensor, neighbor_weights: torch.Tensor,
                   count_decode: torch.Tensor, constants: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Every item's position in the shard policy's order recomputed from the history's events after
    `built_after` (the build's last event; earlier ones are already in the build-time order), int64
    [item_rows] by slot (the history's items by slot too), in the policy's tiers (`sdk_builder.shard`):
    1. the distinct items of those events, latest first (seeds);
    2. items co-visited after them: score = sum over the seeds of the co-visit (decoded) count times
       SEED_WEIGHT // (1 + the seed's age), highest first, ties by build-time position (so the
       slots, which depend on earlier builds, never change a position);
    3. every other item in its build-time order (`candidate_position`).
    So fresh events move their co-visited items to the top of the prior, between bundle builds.
    Integer arithmetic only: the program and the eager reference give the same positions.

    Co-visit entries that are reserved rows (padding) must carry code 0 (`slice_constants_prior`
    makes them so). One sort key per item row, built by scatter-adds into an [item_rows] table:
    tiers 1 and 2 get positive keys, in their order, everything else a key <= 0; a top-k of the
    keys is then the new head of the order. Every op here is a value, and most an instruction, of
    every user's program (~50-70 bytes of flatbuffer each, and fixed time a call): hence no
    per-entry dedup or pairwise comparison of the T x k entries."""
    h, t = hist_slots, hist_slots.shape[0]
    c = history_constants(t) if constants is None else constants
    later = c["later"]
    fresh = (h >= RESERVED_ROWS) & (hist_timestamps > built_after)
    repeated = ((h.view(1, -1) == h.view(-1, 1)) & later).sum(1)  # later events of the same item
    seed = fresh > repeated  # a fresh event that is its item's latest
    age = (seed.view(1, -1) & later).sum(1)  # seeds more recent than this one
    weight = torch.where(seed, c["seed_weight"][age], c["zero"])  # times 65536, see below
    value = count_decode[neighbor_weights[h].to(torch.int64)] * weight.view(-1, 1)  # [t, k], int64
    # key = 65536 * score - build-time position: > 0 exactly for seeds and scored items (positions
    # are < 32768), ties by build-time position. The 65536 is in the constants.
    build_time = candidate_position.to(torch.int64)
    key = build_time.neg().index_put((item_neighbors[h].to(torch.int64),), value, accumulate=True)
    # History items are not co-visited items: they are seeds (keyed above every score, the latest
    # first: SEED_KEY + event index) or keep their build-time place (key 0).
    key = key.index_put((h,), c["zero"])
    key = key.index_put((h,), torch.where(seed, c["seed_key"], c["zero"]), accumulate=True)
    ordered, order = torch.topk(key, min(t * (item_neighbors.shape[1] + 1), key.shape[0]))
    moved = ordered > 0
    positions = build_time + moved.sum()
    return positions.scatter(0, order, torch.where(moved, torch.arange(order.shape[0]), positions[order]))


def unit_rows(z: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """F.normalize(z, dim=-1) in ops XNNPACK takes (mul, linear) plus one rsqrt: the exported
    norm (pow, sum, pow) runs on slow portable kernels, ~0.2 ms for 1000 rows."""
    squared_norm = F.linear(z * z, ones)
    return z * torch.rsqrt(squared_norm.clamp(min=1e-24))


def head_logits(head: TSLHead, history: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """TSLHead.forward for one shared history (T, Z) and N candidates (1, N, Z) -> logits (1, N, 1);
    or for B histories (B, T, Z), each with its own N candidates (B, N, Z) -> (B, N, 1).

    scores[n, t] = h_t . q(w_n); for def, q = A^T A w, so scores = w @ (H A^T A)^T: the history
    side is folded once per request and each candidate costs one (Z x T) product. With the MLP
    mechanism the attention's first layer is folded in as well (it is linear in the scores). bmm, not
    mm/linear: XNNPACK delegates a bmm, while a matmul with a weight computed at run time stays on
    the portable kernels (~50 us slower at 1000 candidates).
    """
    if head.cfg.tsl_inner == "def":
        # history @ A^T as a linear of the constant A: a matmul with A.t() ran on the portable kernels.
        folded = torch.matmul(F.linear(history, head.A), head.A)
    elif head.cfg.tsl_inner == "ind":
        folded = torch.matmul(history, head.A)
    else:
        folded = history
    if head.attention is None:
        weights = torch.bmm(w, _batch_transposed(folded))
    else:
        # The attention MLP's first layer is linear in the scores: fold it into the history side
        # too, so a candidate costs one (Z x hidden) product instead of (Z x T) + (T x hidden).
        mlp_layers, squash = head.attention
        first, *rest = mlp_layers
        # (W1 @ folded)^T as a linear of the constant W1 (a delegated op; W1 @ folded was a portable mm).
        hidden = torch.bmm(w, _batched(F.linear(folded.transpose(-1, -2), first.weight))) + first.bias
        for layer in rest:
            hidden = layer(hidden)
        weights = squash(hidden)
    context = torch.bmm(weights, _batched(history))
    return head.head(torch.cat([context, w], dim=-1))


def _batch_transposed(m: torch.Tensor) -> torch.Tensor:
    """(T, Z) -> (1, Z, T), the one-history ranking graph as before; (B, T, Z) -> (B, Z, T)."""
    return _batched(m.transpose(-1, -2))


def _batched(m: torch.Tensor) -> torch.Tensor:
    """A matrix as a batch of one for bmm (a view, which the delegate takes in, where an unsqueeze
    was a copy outside it); a batch as it is."""
    return m.view(1, *m.shape) if m.dim() == 2 else m


def state_size(cfg) -> int:
    return cfg.emb_dim + cfg.z_dim


def example_inputs(state: int, n_candidates: int = 8) -> tuple[torch.Tensor, ...]:
    """Example inputs of a program whose user state has `state` floats (`state_size`)."""
    h = MAX_HISTORY
    return (
        torch.zeros(h, dtype=torch.long), torch.zeros(h, dtype=torch.long), torch.zeros(h, dtype=torch.long),
        torch.zeros(h, dtype=torch.long), torch.zeros(1, dtype=torch.long),
        torch.full((n_candidates,), OOV_ROW, dtype=torch.long), torch.zeros(state, dtype=torch.float32),
    )


def program_dynamic_shapes() -> tuple:
    """The inputs' dynamic shapes for `torch.export`: only the candidates' count varies. A function,
    not a module constant: `torch.export.Dim` imports sympy (~0.5 s), which a build stamping a
    cached template never needs."""
    return (None, None, None, None, None, {0: torch.export.Dim("n_candidates", min=1, max=MAX_CANDIDATES)}, None)


def export_program(program: UserProgram) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(program.eval(), example_inputs(state_size(program.cfg)),
                                   dynamic_shapes=program_dynamic_shapes(), strict=False)
