"""Training: Adagrad (sparse rows for the id tables, dense for the rest) and a plain loop.

The loop knows nothing about files: batches come from a callable, evaluation and checkpointing
are callbacks. That keeps it usable from the CLI, the benchmark and the tests alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from model.tbsm import PADDING_ROW, TBSM


class BatchLike(Protocol):
    labels: torch.Tensor

    def inputs(self) -> tuple[torch.Tensor, ...]: ...


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 256
    lr: float = 0.2  # the reference's 0.05 stalls some one-epoch runs (docs/quality.md)
    seed: int = 0
    eval_every: int = 0  # steps between validations; 0 = once per epoch
    select_by: str = "val_hr10"  # the validation metric that picks the best checkpoint (higher is better)


class TBSMOptimizer:
    """Adagrad (torch's formula: sum += g^2; p -= lr * g / (sqrt(sum) + eps)) in two parts.

    - id tables: only the rows a batch touched. The batch's unique rows are gathered into a small
      leaf tensor, the model runs on that, and the update writes those rows back. A dense update
      of a 4M-row table would cost ~100 ms a step; this costs a few hundred microseconds.
    - everything else (~3.6K parameters in ~20 tensors): one flat buffer, so the update is four
      vector ops instead of four per tensor.
    """

    def __init__(self, model: TBSM, lr: float, eps: float = 1e-10) -> None:
        self.lr, self.eps = lr, eps
        self.tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        table_ids = {id(t) for t in self.tables}
        for t in self.tables:
            t.requires_grad_(False)  # rows are trained through the gathered leaves, never in place
        self.dense = [p for p in model.parameters() if id(p) not in table_ids]
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.dense])
        self.flat_grad = torch.zeros_like(self.flat)
        offset = 0
        for p in self.dense:
            n = p.numel()
            p.data = self.flat[offset : offset + n].view_as(p)
            p.grad = self.flat_grad[offset : offset + n].view_as(p)
            offset += n
        self.dense_sum = torch.zeros_like(self.flat)
        self.table_sum = [torch.zeros_like(t) for t in self.tables]

    def gather(self, table_index: int, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unique rows, leaf of their vectors, inverse index with the shape of `rows`)."""
        unique, inverse = np.unique(rows, return_inverse=True)
        unique_t = torch.from_numpy(unique)
        leaf = self.tables[table_index].index_select(0, unique_t).requires_grad_()
        return unique_t, leaf, torch.from_numpy(inverse.reshape(rows.shape))

    def zero_grad(self) -> None:
        self.flat_grad.zero_()

    @torch.no_grad()
    def step(self, touched: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        self.dense_sum.addcmul_(self.flat_grad, self.flat_grad)
        self.flat.addcdiv_(self.flat_grad, self.dense_sum.sqrt().add_(self.eps), value=-self.lr)
        for table_index, unique, leaf in touched:
            if leaf.grad is None:
                continue
            grad = leaf.grad
            state = self.table_sum[table_index].index_select(0, unique).addcmul_(grad, grad)
            self.table_sum[table_index].index_copy_(0, unique, state)
            rows = leaf.detach().addcdiv_(grad, state.sqrt_().add_(self.eps), value=-self.lr)
            self.tables[table_index].index_copy_(0, unique, rows)

    def state_dict(self) -> dict:
        return {"dense_sum": self.dense_sum, "table_sum": self.table_sum, "lr": self.lr, "eps": self.eps}

    def load_state_dict(self, state: dict) -> None:
        self.dense_sum.copy_(state["dense_sum"])
        for mine, saved in zip(self.table_sum, state["table_sum"]):
            mine.copy_(saved)


def train_step(model: TBSM, optimizer: TBSMOptimizer, batch: BatchLike, log_q: torch.Tensor | None = None) -> float:
    """One Adagrad step on the batch's binary cross-entropy.

    `log_q` (one value per item row): log-probability that the negative sampler draws the item.
    Subtracting it from every candidate's logit (the "logQ correction") makes the model learn the
    user's preference over all items, popularity included, whatever the sampler; without it,
    popularity-sampled negatives would teach the model to ignore popularity.
    """
    user_rows, item_rows, cat_rows, behaviors, timestamps = batch.inputs()
    tower = model.tower
    lookups = [(tower.user_emb, user_rows), (tower.item_emb, item_rows), (tower.cat_emb, cat_rows)]
    if tower.behavior_emb is not None:
        lookups.append((tower.behavior_emb, behaviors))
    touched, vectors = [], []
    for table, rows in lookups:
        index = next(i for i, t in enumerate(optimizer.tables) if t is table.weight)
        unique, leaf, inverse = optimizer.gather(index, rows.numpy())
        touched.append((index, unique, leaf))
        vectors.append(leaf[inverse])
    optimizer.zero_grad()
    logits = model.forward_vectors(*vectors[:3], behaviors, timestamps, item_rows != PADDING_ROW,
                                   behavior_vec=vectors[3] if len(vectors) > 3 else None)
    if log_q is not None:
        logits = logits - log_q[item_rows[:, -1]]
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
    loss.backward()
    optimizer.step(touched)
    return loss.item()


@torch.no_grad()
def predict(model: TBSM, batches: Iterator[BatchLike]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) over all batches, in order."""
    was_training = model.training
    model.eval()
    labels, probs = [], []
    for batch in batches:
        probs.append(torch.sigmoid(model(*batch.inputs())).numpy())
        labels.append(batch.labels.numpy())
    model.train(was_training)
    if not labels:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(labels), np.concatenate(probs)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    best_metric: float = float("-inf")
    best_step: int = -1
    history: list[dict] = field(default_factory=list)


def fit(
    model: TBSM,
    optimizer: TBSMOptimizer,
    cfg: TrainConfig,
    train_batches: Callable[[int], Iterator[BatchLike]],
    steps_per_epoch: int,
    validate: Callable[[], dict],
    on_best: Callable[[TrainState, dict], None],
    on_epoch_end: Callable[[TrainState], None] = lambda s: None,
    state: TrainState | None = None,
    progress: Callable[[int, float], None] = lambda step, loss: None,
    log_q: torch.Tensor | None = None,
) -> TrainState:
    """Train for cfg.epochs from state.epoch; validate every cfg.eval_every steps and at epoch end.

    `train_batches(epoch)` must yield the epoch's batches in a deterministic order. `validate`
    returns a metrics dict with the `cfg.select_by` key; `on_best` is called when it improves.
    """
    state = state or TrainState()
    model.train()
    recent_losses: list[float] = []

    def evaluate() -> None:
        metrics = validate()
        record = {"step": state.step, "epoch": state.epoch, "train_loss": float(np.mean(recent_losses)) if recent_losses else None,
                  **metrics}
        state.history.append(record)
        recent_losses.clear()
        if metrics[cfg.select_by] > state.best_metric:
            state.best_metric, state.best_step = metrics[cfg.select_by], state.step
            on_best(state, metrics)

    while state.epoch < cfg.epochs:
        for batch in train_batches(state.epoch):
            loss = train_step(model, optimizer, batch, log_q)
            recent_losses.append(loss)
            state.step += 1
            progress(state.step, loss)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step % steps_per_epoch != 0:
                evaluate()
        evaluate()
        state.epoch += 1
        on_epoch_end(state)
    return state
