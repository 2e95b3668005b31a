"""Per-user programs: slice the model for one user and a shard of items, export to ExecuTorch.

`UserProgram` holds exactly one user row, the shard's item rows, their category rows and what can
be computed from those alone: the candidate-side event-tower output `w` of every shard item (a
candidate's dense feature is a constant: age 0, or position 20/21). At request time only the 20
history events go through the event tower; each candidate costs a lookup, one attention pass and
the head.

Recipes, one function per step: `slice_model` -> `export_program` -> `lower(recipe)` -> bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.tbsm import OOV_ROW, PADDING_ROW, RESERVED_ROWS, TBSM, TSLHead
from sdk_builder.formats import MAX_CANDIDATES, MAX_HISTORY, ProgramSpec, TensorSpec

RECIPES = ("xnnpack", "portable")
INPUT_NAMES = ("hist_items", "hist_categories", "hist_behaviors", "hist_timestamps", "request_time", "candidates")


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
        ],
        outputs=[TensorSpec(name="scores", dtype="float32", shape=["n_candidates"], description="click probability of each candidate")],
    )


@dataclass(frozen=True)
class Shard:
    """Full-model rows kept in a per-user slice. Local row of items[i] is i + RESERVED_ROWS."""

    user_row: int
    item_rows: np.ndarray  # full-table rows, in local order
    category_rows: np.ndarray  # full-table rows, in local order


class UserProgram(nn.Module):
    """The on-device program for one user. Inputs are local rows, see `program_spec`."""

    def __init__(self, model: TBSM, shard: Shard, item_category: np.ndarray) -> None:
        """`item_category[full item row]` is the item's full category row."""
        super().__init__()
        cfg = model.cfg
        if cfg.model_type != "tsl":
            raise ValueError(f"model type {cfg.model_type!r} cannot be exported yet: only 'tsl' models")
        self.cfg = cfg
        tower = model.tower
        with torch.no_grad():
            reserved_items = torch.arange(RESERVED_ROWS)
            item_full = torch.cat([reserved_items, torch.as_tensor(shard.item_rows, dtype=torch.long)])
            cat_full = torch.cat([reserved_items, torch.as_tensor(shard.category_rows, dtype=torch.long)])
            self.register_buffer("user_vec", tower.user_emb.weight[shard.user_row].clone())
            self.register_buffer("item_table", tower.item_emb.weight[item_full].clone())
            self.register_buffer("category_table", tower.cat_emb.weight[cat_full].clone())
            # Category of every local item row, as a local category row (OOV when not in the shard).
            full_to_local_cat = {int(c): i + RESERVED_ROWS for i, c in enumerate(shard.category_rows)}
            item_cat_full = np.asarray(item_category)[item_full.numpy()]
            local_cat = [full_to_local_cat.get(int(c), OOV_ROW) for c in item_cat_full]
            local_cat[PADDING_ROW] = PADDING_ROW
            local_cat[OOV_ROW] = OOV_ROW
            local_cat = torch.tensor(local_cat, dtype=torch.long)
            self.behavior_table = (
                nn.Parameter(tower.behavior_emb.weight.detach().clone(), requires_grad=False)
                if tower.behavior_emb is not None else None
            )
            self.register_buffer("candidate_features", self._candidate_features(model, local_cat))
            self.candidate_top = self._candidate_top(model)
        self.bottom = tower.bottom
        self.top = tower.top
        self.heads = model.heads
        self.combine = model.combine
        self.register_buffer("head_visibility", model.head_visibility.clone())
        self.register_buffer("position_feature", model.position_feature[:-1].clone())
        self.register_buffer("block_sum", torch.block_diag(*[torch.ones(1, cfg.emb_dim)] * 6))
        self.register_buffer("ones_z", torch.ones(1, cfg.z_dim))

    def _candidate_x(self, model: TBSM) -> torch.Tensor:
        dense = model.position_feature[-1:] if self.cfg.dense_feature == "position" else torch.zeros(1)
        return model.tower.bottom(dense.unsqueeze(-1))[0]

    def _candidate_features(self, model: TBSM, local_cat: torch.Tensor) -> torch.Tensor:
        """The 5 interactions of every shard item as a candidate that involve the item.

        A candidate's dense feature is a constant, so x, x.u and all pairwise dots with the item
        and its category are per-item constants: 5 floats per item instead of the embedding.
        """
        x, u = self._candidate_x(model), self.user_vec
        item, cat = self.item_table, self.category_table[local_cat]
        return torch.stack([item @ x, item @ u, cat @ x, cat @ u, (item * cat).sum(-1)], dim=-1)

    def _candidate_top(self, model: TBSM) -> nn.Sequential:
        """The top MLP with its first layer folded over the candidate's constant inputs."""
        x, u = self._candidate_x(model), self.user_vec
        first = model.tower.top[0]
        emb = self.cfg.emb_dim
        folded = nn.Linear(5, first.out_features)
        # Input order of the first layer: [x (emb), x.u, x.item, u.item, x.cat, u.cat, item.cat].
        w = first.weight
        folded.weight.copy_(w[:, [emb + 1, emb + 2, emb + 3, emb + 4, emb + 5]])
        folded.bias.copy_(first.bias + w[:, :emb] @ x + w[:, emb] * (x @ u))
        return nn.Sequential(folded, *list(model.tower.top)[1:])

    def history_z(self, hist_items, hist_categories, hist_behaviors, hist_timestamps, request_time) -> torch.Tensor:
        if self.cfg.dense_feature == "position":
            dense = self.position_feature
        else:
            seconds = (request_time - hist_timestamps).clamp(min=0).to(torch.float32)
            dense = torch.log1p(seconds / 60.0) / 10.0
        item_vec = self.item_table[hist_items]
        if self.behavior_table is not None:
            item_vec = item_vec + self.behavior_table[hist_behaviors]
        x = self.bottom(dense.unsqueeze(-1))
        u = self.user_vec.unsqueeze(0).expand_as(x)
        cat_vec = self.category_table[hist_categories]
        # Products, then one constant block-sum matrix: the 6 dot products become a single
        # delegated linear instead of 6 portable reductions.
        products = torch.cat([x * u, x * item_vec, u * item_vec, x * cat_vec, u * cat_vec, item_vec * cat_vec], dim=-1)
        interactions = F.linear(products, self.block_sum)
        z = unit_rows(self.top(torch.cat([x, interactions], dim=-1)), self.ones_z)
        real = (hist_items != PADDING_ROW).to(z.dtype).unsqueeze(-1)
        return z * real

    def forward(self, hist_items, hist_categories, hist_behaviors, hist_timestamps, request_time, candidates):
        history = self.history_z(hist_items, hist_categories, hist_behaviors, hist_timestamps, request_time)
        w = unit_rows(self.candidate_top(self.candidate_features[candidates]), self.ones_z)
        logits = [
            head_logits(head, history * visible.unsqueeze(-1), w)
            for head, visible in zip(self.heads, self.head_visibility)
        ]
        if self.combine is None:
            return torch.sigmoid(logits[0])
        return torch.sigmoid(self.combine(torch.sigmoid(torch.stack(logits, dim=-1))).squeeze(-1))


def unit_rows(z: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """F.normalize(z, dim=-1) in ops XNNPACK takes (mul, linear) plus one rsqrt: the exported
    norm (pow, sum, pow) runs on slow portable kernels, ~0.2 ms for 1000 rows."""
    squared_norm = F.linear(z * z, ones)
    return z * torch.rsqrt(squared_norm.clamp(min=1e-24))


def head_logits(head: TSLHead, history: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """TSLHead.forward for one shared history (T, Z) and N candidates (N, Z), as matrix products.

    scores[n, t] = h_t . q(w_n); for def, q = A^T A w, so scores = w @ (H A^T A)^T: the history
    side is folded once per request and each candidate costs one (Z x T) product.
    """
    if head.cfg.tsl_inner == "def":
        folded = torch.matmul(torch.matmul(history, head.A.t()), head.A)
    elif head.cfg.tsl_inner == "ind":
        folded = torch.matmul(history, head.A)
    else:
        folded = history
    scores = F.linear(w, folded)
    weights = head.attention(scores) if head.attention is not None else scores
    context = F.linear(weights, history.t())
    return head.head(torch.cat([context, w], dim=-1)).squeeze(-1)


def example_inputs(n_candidates: int = 8) -> tuple[torch.Tensor, ...]:
    h = MAX_HISTORY
    return (
        torch.zeros(h, dtype=torch.long), torch.zeros(h, dtype=torch.long), torch.zeros(h, dtype=torch.long),
        torch.zeros(h, dtype=torch.long), torch.zeros(1, dtype=torch.long),
        torch.full((n_candidates,), OOV_ROW, dtype=torch.long),
    )


def export_program(program: UserProgram) -> torch.export.ExportedProgram:
    n = torch.export.Dim("n_candidates", min=1, max=MAX_CANDIDATES)
    shapes = (None, None, None, None, None, {0: n})
    with torch.no_grad():
        return torch.export.export(program.eval(), example_inputs(), dynamic_shapes=shapes, strict=False)


def lower(exported: torch.export.ExportedProgram, recipe: str):
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")
    if recipe == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    else:
        # Keep aten.linear whole so the runtime uses its optimized kernel instead of portable addmm.
        config = EdgeCompileConfig(preserve_ops=[torch.ops.aten.linear.default],
                                   _core_aten_ops_exception_list=[torch.ops.aten.linear.default])
        edge = to_edge_transform_and_lower(exported, compile_config=config)
    return edge.to_executorch(ExecutorchBackendConfig(extract_delegate_segments=False))


def compile_program(model: TBSM, shard: Shard, item_category: np.ndarray, recipe: str = "xnnpack") -> bytes:
    return bytes(lower(export_program(UserProgram(model, shard, item_category)), recipe).buffer)


def load_runtime_method(pte: bytes | str):
    """Load a program in the ExecuTorch runtime (not eager), with the quantized kernels registered."""
    import executorch.kernels.quantized  # noqa: F401  (registers quantized_decomposed kernels)
    from executorch.runtime import Runtime

    return Runtime.get().load_program(pte).load_method("forward")
