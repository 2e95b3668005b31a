"""On-device refresh of the user state: an ExecuTorch training program beside the ranking program.

`refresh.pte` computes, from the phone's own last W = max_history + window events, a loss and its
gradient with respect to the user state (`RefreshProgram`); the client takes `steps` SGD steps on
the state with it and clips the drift from the shipped state (`client.Bundle.refresh`, the loop of
docs/bundle-format.md). Only the state moves: every other weight is the ranking program's.

The loss, for each of the last `window` events that is a shard item (padding and unknown items are
masked out): BCE of the event's item as a positive (history = the max_history events before it,
request time = its timestamp), and of `negatives` shard items as negatives. The negatives are
picked in the graph from the user's `negative_pool` (a stamped constant: slots spread evenly
over the shard, `sdk_builder.program.slice_constants`) at offsets that depend on the positive's slot, so the program needs no client logic
and a given history always gives the same examples. Logits are the ranking program's model logit plus
the shard prior of the build-time policy order (the ranking program re-ranks that order from the
history, which does not depend on the state), so the gradient is that of the phone's ranking function.

The program is a joint forward/backward graph (`torch.export.experimental._export_forward_backward`):
the state enters as `user_state + delta` with `delta` a zero parameter, so d loss / d delta is
d loss / d user_state. Its `forward` returns (loss, gradient, delta): outputs 0 and 1 are the
contract; ExecuTorch appends the parameter itself as output 2 (what `TrainingModule` reads through
the program's `__et_training_*` methods). Lowered to portable kernels and stamped per user like
`model.pte` (`stamp.ProgramTemplate`, fp32 constants whatever the ranking recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.tbsm import OOV_ROW, RESERVED_ROWS, TBSM
from sdk_builder.formats import MAX_HISTORY, RefreshRecord
from sdk_builder.program import USER_CONSTANTS, Shard, SliceLayout, UserProgram, slice_constants, state_size
from sdk_builder.stamp import SENTINEL_SEED, ProgramTemplate, StampingError, offset_once, sentinel_constants

REFRESH_FILE = "refresh.pte"
NEGATIVE_POOL = 64  # shard rows a refresh program draws its negatives from
REFRESH_CONSTANTS = (*USER_CONSTANTS, "negative_pool")
# Stored as the ranking program's fp32 recipes store them, whatever the bundle's recipe.
REFRESH_RECIPE = "portable"


@dataclass(frozen=True)
class RefreshConfig:
    window: int = 10  # positives: the last `window` events
    every_events: int = 5  # the client refreshes when its history has grown by this many events
    steps: int = 5  # SGD steps of one refresh
    # The loss moves slowly with the state (it reaches the logit through dot products with unit-scale
    # rows), so the step is large; max_drift bounds where it can go (user rows have norm ~1).
    learning_rate: float = 10.0
    max_drift: float = 1.0  # max L2 distance of a refreshed state from the shipped one
    negatives: int = 8  # negatives per positive, from the user's shard

    def __post_init__(self) -> None:
        if not (1 <= self.window and 1 <= self.every_events and 1 <= self.steps and 1 <= self.negatives <= NEGATIVE_POOL
                and self.learning_rate > 0 and self.max_drift > 0):
            raise ValueError(f"invalid refresh config {self}")

    @property
    def events(self) -> int:
        """W: how many events the program takes."""
        return MAX_HISTORY + self.window

    def record(self) -> RefreshRecord:
        return RefreshRecord(file=REFRESH_FILE, window=self.window, every_events=self.every_events, steps=self.steps,
                             learning_rate=self.learning_rate, max_drift=self.max_drift, negatives=self.negatives,
                             events=self.events)


def negative_pool(shard: Shard) -> torch.Tensor:
    """NEGATIVE_POOL slots spread evenly over the user's shard (int64; slots are a permutation of its local rows)."""
    n = len(shard.item_rows)
    if n == 0:
        return torch.full((NEGATIVE_POOL,), OOV_ROW, dtype=torch.long)
    return torch.from_numpy(RESERVED_ROWS + (np.arange(NEGATIVE_POOL, dtype=np.int64) * n) // NEGATIVE_POOL)


def refresh_constants(model: TBSM, shard: Shard, item_category: np.ndarray, layout: SliceLayout,
                      ranking_constants: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The per-user constants of a refresh program (the ranking program's fp32 ones + the negative pool)."""
    constants = ranking_constants if ranking_constants is not None else slice_constants(model, shard, item_category, layout)
    return {**{name: constants[name] for name in USER_CONSTANTS}, "negative_pool": negative_pool(shard)}


class RefreshProgram(nn.Module):
    """(user_state, events_items, events_categories, events_behaviors, events_timestamps) -> loss."""

    def __init__(self, model: TBSM, constants: dict[str, torch.Tensor], config: RefreshConfig) -> None:
        super().__init__()
        self.config = config
        self.ranker = UserProgram(model, constants)
        for p in self.ranker.parameters():
            p.requires_grad_(False)
        self.register_buffer("negative_pool", constants["negative_pool"].detach().clone())
        self.delta = nn.Parameter(torch.zeros(state_size(model.cfg)))
        h, window = MAX_HISTORY, config.window
        # Row k: the events before positive k (event h + k of the W inputs).
        self.register_buffer("history_index", torch.arange(window).unsqueeze(1) + torch.arange(h).unsqueeze(0))
        self.register_buffer("negative_offsets", torch.arange(config.negatives) * (NEGATIVE_POOL // config.negatives))

    def forward(self, user_state, events_items, events_categories, events_behaviors, events_timestamps):
        ranker, h, window = self.ranker, MAX_HISTORY, self.config.window
        state = user_state + self.delta
        idx = self.history_index
        request_time = events_timestamps[h:].unsqueeze(1)
        dense = ranker.event_dense(events_timestamps[idx], request_time).expand(window, h)
        events_slots = ranker.slots(events_items)
        history = ranker.history_z(events_slots[idx].reshape(-1), events_categories[idx].reshape(-1),
                                   events_behaviors[idx].reshape(-1), events_timestamps[idx].reshape(-1),
                                   request_time, state, dense=dense.reshape(-1)).view(window, h, -1)
        positives = events_slots[h:].unsqueeze(1)
        negatives = self.negative_pool[(positives + self.negative_offsets) % NEGATIVE_POOL]
        candidates = torch.cat([positives, negatives], dim=1)
        w = ranker.candidate_w(candidates.reshape(-1), state).view(window, candidates.shape[1], -1)
        # The build-time order's prior, not the one re-ranked from each positive's own history: that
        # would put the positive itself among its history's co-visits, and the prior does not
        # depend on the state anyway (it only sets where on the sigmoid each logit sits).
        logits = ranker.candidate_logits(history, w).squeeze(-1) + ranker.prior(ranker.build_time_positions())[candidates]
        real = (positives[:, 0] >= RESERVED_ROWS).to(logits.dtype)  # padding and unknown items are no positives
        distinct = (negatives != positives).to(logits.dtype)
        per_event = F.softplus(-logits[:, 0]) + (F.softplus(logits[:, 1:]) * distinct).sum(1) / self.config.negatives
        return ((per_event * real).sum() / real.sum().clamp(min=1.0)).reshape(1)


def refresh_example_inputs(model: TBSM, config: RefreshConfig) -> tuple[torch.Tensor, ...]:
    w = config.events
    return (torch.zeros(state_size(model.cfg)), *(torch.zeros(w, dtype=torch.long) for _ in range(4)))


def compile_refresh(model: TBSM, constants: dict[str, torch.Tensor], config: RefreshConfig) -> bytes:
    """Export the joint forward/backward graph of one user's `RefreshProgram` and lower it (portable)."""
    from executorch.exir import ExecutorchBackendConfig, to_edge
    from torch.export.experimental import _export_forward_backward

    program = RefreshProgram(model, constants, config)
    exported = torch.export.export(program, refresh_example_inputs(model, config), strict=False)
    joint = _export_forward_backward(exported)
    return bytes(to_edge(joint).to_executorch(ExecutorchBackendConfig(extract_delegate_segments=False)).buffer)


def refresh_sentinels(constants: dict[str, torch.Tensor], layout: SliceLayout) -> dict[str, torch.Tensor]:
    """The sentinel pattern of each constant: `stamp.sentinel_constants`' for the ranking ones, random
    valid rows for the pool."""
    sentinels = sentinel_constants({name: constants[name] for name in USER_CONSTANTS})
    rng = np.random.default_rng([SENTINEL_SEED, 1])
    sentinels["negative_pool"] = torch.from_numpy(rng.integers(RESERVED_ROWS, layout.item_rows, tuple(constants["negative_pool"].shape)))
    return sentinels


def build_refresh_template(model: TBSM, layout: SliceLayout, example: Shard, item_category: np.ndarray,
                           config: RefreshConfig) -> ProgramTemplate:
    """Export the refresh program once with sentinel constants and find where each is stored."""
    constants = refresh_constants(model, example, item_category, layout)
    shapes = {name: tuple(t.shape) for name, t in constants.items()}
    sentinels = refresh_sentinels(constants, layout)
    program = compile_refresh(model, sentinels, config)
    offsets, dtypes = {}, {}
    for name, tensor in sentinels.items():
        array = tensor.contiguous().numpy()
        offsets[name] = offset_once(program, array.tobytes(), name, "refresh")
        dtypes[name] = str(array.dtype)
    return ProgramTemplate(program, offsets, shapes, dtypes, layout, REFRESH_RECIPE)


def check_refresh_stamping(template: ProgramTemplate, model: TBSM, constants: dict[str, torch.Tensor],
                           config: RefreshConfig, inputs: list[torch.Tensor]) -> float:
    """Stamped vs fully exported refresh program of one user, in the runtime: must agree exactly."""
    from sdk_builder.runtime import load_runtime_method

    stamped = load_runtime_method(template.stamp(constants)).execute(inputs)
    exported = load_runtime_method(compile_refresh(model, constants, config)).execute(inputs)
    worst = max(float((a - b).abs().max()) for a, b in zip(stamped[:2], exported[:2]))
    if worst > 0.0:
        raise StampingError(f"stamped refresh programs differ from fully exported ones by {worst:.2e}; refusing to stamp")
    return worst


def eager_gradient(model: TBSM, constants: dict[str, torch.Tensor], config: RefreshConfig,
                   inputs: list[torch.Tensor]) -> tuple[float, np.ndarray]:
    """(loss, d loss / d user_state) of the eager program by autograd: the reference of the runtime's."""
    program = RefreshProgram(model, constants, config)
    state = inputs[0].detach().clone().requires_grad_(True)
    loss = program(state, *inputs[1:])
    (grad,) = torch.autograd.grad(loss.sum(), state)
    return float(loss.detach()[0]), grad.numpy()
