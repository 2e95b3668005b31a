"""Training: Adagrad (sparse rows for the id tables, dense for the rest) and a plain loop.

The loop knows nothing about files: batches come from a callable, evaluation and checkpointing
are callbacks. That keeps it usable from the CLI, the benchmark and the tests alike.
"""

from __future__ import annotations

import mmap
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from model.tbsm import PADDING_ROW, TBSM

# Tables at least this large get memory the kernel may back with 2 MB pages (see `_huge_page_zeros`).
HUGE_PAGE_MIN_BYTES = 64 << 20
PREFETCH_DEPTH = 2


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
    # Fraction of training samples whose user row is the "unknown user" row instead (the last row
    # of the user table, one more than the data's users): a row trained for users the model never
    # saw, which a cold-start bundle can ship (sdk_builder/bundle/coldstart.py). 0: no such row.
    user_dropout: float = 0.0


@dataclass
class DedupedBatch:
    """A batch plus, per id table it reads, its unique rows and the inverse index (`dedup`).

    `event_index` (2, B, T): the item, then category, inverse offset to index the concatenation of
    the tables' unique rows (user, item, category), as `TBSM.forward_rows` takes them; None with a
    behaviour table (that model trains through the per-table path)."""

    batch: BatchLike
    rows: list[tuple[np.ndarray, np.ndarray]]
    event_index: torch.Tensor | None = None

    @property
    def labels(self) -> torch.Tensor:
        return self.batch.labels

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.batch.inputs()


_scratch = threading.local()


def unique_inverse(rows: np.ndarray, table_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(rows, return_inverse=True)` (inverse shaped as `rows`), for rows < table_rows.

    np.unique sorts all B*T rows; this sorts only the distinct ones, finding them through a
    per-thread scratch array with a slot per table row (only the slots a batch touches are ever
    written, so a 4M-row table costs no more than a small one).
    """
    flat = rows.reshape(-1)
    scratch = getattr(_scratch, "slots", None)
    if scratch is None or len(scratch) < table_rows:
        scratch = _scratch.slots = np.empty(table_rows, np.int64)
    positions = np.arange(len(flat))
    scratch[flat] = positions  # one position per distinct row survives (whichever was written last)
    unique = np.sort(flat[scratch[flat] == positions])
    scratch[unique] = np.arange(len(unique))
    return unique, scratch[flat].reshape(rows.shape)


def id_tables(model: TBSM) -> list[torch.nn.Embedding]:
    """The tower's id tables in the order of a batch's lookups: user, item, category (and behaviour)."""
    tower = model.tower
    return [tower.user_emb, tower.item_emb, tower.cat_emb] + ([tower.behavior_emb] if tower.behavior_emb is not None else [])


def dedup(model: TBSM, batch: BatchLike) -> DedupedBatch:
    """The unique user, item, category (and behaviour) rows and inverse indices: pure numpy, so it
    can run on a prefetch thread while the previous batch trains."""
    user_rows, item_rows, cat_rows, behaviors, _ = batch.inputs()
    lookups = [user_rows, item_rows, cat_rows, behaviors]
    rows = [unique_inverse(r.numpy(), t.num_embeddings) for t, r in zip(id_tables(model), lookups)]
    event_index = None
    if model.tower.behavior_emb is None:
        n_users, n_items = len(rows[0][0]), len(rows[1][0])
        event_index = torch.from_numpy(np.stack([rows[1][1] + n_users, rows[2][1] + (n_users + n_items)]))
    return DedupedBatch(batch, rows, event_index)


def prefetched(items: Iterable, depth: int = PREFETCH_DEPTH) -> Iterator:
    """`items`, produced on a background thread up to `depth` ahead, in the same order.

    For collate and de-duplication (numpy, mostly outside the GIL) of batch k+1 while batch k
    trains; the batches are the same as without prefetching, so training stays deterministic.
    """
    done = object()
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(done)
        except BaseException as error:  # re-raised on the consumer's thread
            out.put(error)

    worker = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def _huge_page_zeros(like: torch.Tensor) -> torch.Tensor | None:
    """Zeros shaped like `like`, in anonymous memory advised for transparent huge pages; None for
    tables under HUGE_PAGE_MIN_BYTES or where that is unsupported (ordinary memory then).

    A step reads and writes a few thousand random rows of tables up to 266 MB: with 4 KB pages
    nearly every row is a TLB miss; with 2 MB pages the gathers and write-backs took 1.3-1.9x less
    time (5,000 random rows of the 4.2M-row item table and its Adagrad sums, 1 thread).
    """
    nbytes = like.numel() * like.element_size()
    if nbytes < HUGE_PAGE_MIN_BYTES or like.device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        return None
    return torch.frombuffer(buffer, dtype=like.dtype).view(like.shape)  # the tensor keeps `buffer` alive


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
            moved = _huge_page_zeros(t)
            if moved is not None:
                t.data = moved.copy_(t.detach())
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
        self.table_sum = [z if (z := _huge_page_zeros(t)) is not None else torch.zeros_like(t) for t in self.tables]

    def gather(self, table_index: int, unique: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(unique rows as a tensor, leaf of their vectors)."""
        unique_t = torch.from_numpy(unique)
        return unique_t, self.tables[table_index].index_select(0, unique_t).requires_grad_()

    def gather_rows(self, rows: list[tuple[int, np.ndarray]]) -> tuple[torch.Tensor, list]:
        """One leaf (R, D) holding the given unique rows of each table, in order, and the spans
        (table index, unique rows, slice of the leaf) `step_rows` writes back."""
        spans, offset = [], 0
        for table_index, unique in rows:
            spans.append((table_index, torch.from_numpy(unique), slice(offset, offset + len(unique))))
            offset += len(unique)
        leaf = torch.empty(offset, self.tables[0].shape[1])
        for table_index, unique_t, span in spans:
            torch.index_select(self.tables[table_index], 0, unique_t, out=leaf[span])
        return leaf.requires_grad_(), spans

    def zero_grad(self) -> None:
        self.flat_grad.zero_()

    @torch.no_grad()
    def step(self, touched: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """The step after per-table leaves (`gather`): (table index, unique rows, leaf) each."""
        self._dense_step()
        for table_index, unique, leaf in touched:
            self._row_step(leaf, [(table_index, unique, slice(None))])

    @torch.no_grad()
    def step_rows(self, leaf: torch.Tensor, spans: list) -> None:
        """`step` for a `gather_rows` leaf: the same per-element formula, on all tables' rows at once."""
        self._dense_step()
        self._row_step(leaf, spans)

    def _row_step(self, leaf: torch.Tensor, spans: list) -> None:
        """Adagrad on the rows of `leaf`, written back to the tables (and their sums) of `spans`."""
        grad = leaf.grad
        if grad is None:
            return
        state = torch.empty_like(leaf)
        for table_index, unique, span in spans:
            torch.index_select(self.table_sum[table_index], 0, unique, out=state[span])
        state.addcmul_(grad, grad)
        for table_index, unique, span in spans:
            self.table_sum[table_index].index_copy_(0, unique, state[span])
        rows = leaf.detach().addcdiv_(grad, state.sqrt_().add_(self.eps), value=-self.lr)
        for table_index, unique, span in spans:
            self.tables[table_index].index_copy_(0, unique, rows[span])

    def _dense_step(self) -> None:
        self.dense_sum.addcmul_(self.flat_grad, self.flat_grad)
        self.flat.addcdiv_(self.flat_grad, self.dense_sum.sqrt().add_(self.eps), value=-self.lr)

    def state_dict(self) -> dict:
        return {"dense_sum": self.dense_sum, "table_sum": self.table_sum, "lr": self.lr, "eps": self.eps}

    def load_state_dict(self, state: dict) -> None:
        self.dense_sum.copy_(state["dense_sum"])
        for mine, saved in zip(self.table_sum, state["table_sum"]):
            mine.copy_(saved)


def train_step(model: TBSM, optimizer: TBSMOptimizer, batch: BatchLike | DedupedBatch,
               log_q: torch.Tensor | None = None, fused: bool = True) -> float:
    """One Adagrad step on the batch's binary cross-entropy.

    `batch` may come de-duplicated already (`dedup`, e.g. on a prefetch thread). `fused`: the
    event tower's hand-written backward on the batch's unique rows (`TBSM.forward_rows`, one leaf
    for all tables); False runs plain autograd on per-table leaves.

    `log_q` (one value per item row): log-probability that the negative sampler draws the item.
    Subtracting it from every candidate's logit (the "logQ correction") makes the model learn the
    user's preference over all items, popularity included, whatever the sampler; without it,
    popularity-sampled negatives would teach the model to ignore popularity.
    """
    if not isinstance(batch, DedupedBatch):
        batch = dedup(model, batch)
    _, item_rows, _, behaviors, timestamps = batch.inputs()
    table_index = [next(i for i, t in enumerate(optimizer.tables) if t is table.weight) for table in id_tables(model)]
    optimizer.zero_grad()
    real_event = item_rows != PADDING_ROW
    fast = fused and batch.event_index is not None
    if fast:
        leaf, spans = optimizer.gather_rows([(i, unique) for i, (unique, _) in zip(table_index, batch.rows)])
        logits = model.forward_rows(leaf, torch.from_numpy(batch.rows[0][1]), batch.event_index, timestamps,
                                    real_event)
    else:
        touched, vectors = [], []
        for index, (unique, inverse) in zip(table_index, batch.rows):
            unique_t, table_leaf = optimizer.gather(index, unique)
            touched.append((index, unique_t, table_leaf))
            vectors.append(table_leaf[torch.from_numpy(inverse)])
        logits = model.forward_vectors(*vectors[:3], behaviors, timestamps, real_event,
                                       behavior_vec=vectors[3] if len(vectors) > 3 else None, fused=fused)
    if log_q is not None:
        logits = logits - log_q[item_rows[:, -1]]
    loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
    loss.backward()
    if fast:
        optimizer.step_rows(leaf, spans)
    else:
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
    prefetch: bool | None = None,
) -> TrainState:
    """Train for cfg.epochs from state.epoch; validate every cfg.eval_every steps and at epoch end.

    `train_batches(epoch)` must yield the epoch's batches in a deterministic order. `validate`
    returns a metrics dict with the `cfg.select_by` key; `on_best` is called when it improves.
    `prefetch` (default: when torch has more than one thread) prepares the next batch on a
    background thread that takes one of torch's threads: intra-op threads do not speed up ops on
    tensors this small, a pipeline does. The result is the same either way.
    """
    threads = torch.get_num_threads()
    if prefetch is None:
        prefetch = threads > 1
    if prefetch and threads > 1:
        torch.set_num_threads(threads - 1)
    try:
        return _fit_epochs(model, optimizer, cfg, train_batches, steps_per_epoch, validate, on_best, on_epoch_end,
                           state, progress, log_q, prefetch)
    finally:
        torch.set_num_threads(threads)


def _fit_epochs(model, optimizer, cfg, train_batches, steps_per_epoch, validate, on_best, on_epoch_end, state,
                progress, log_q, prefetch) -> TrainState:
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
        batches: Iterable = (dedup(model, b) for b in train_batches(state.epoch))
        if prefetch:
            batches = prefetched(batches)
        for batch in batches:
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
