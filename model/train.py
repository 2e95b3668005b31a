"""Training: Adagrad (sparse rows for the id tables, dense for the rest) and a plain loop.

The loop knows nothing about files: batches come from a callable, evaluation and checkpointing
are callbacks. That keeps it usable from the CLI, the benchmark and the tests alike.
"""

from __future__ import annotations

import mmap
import multiprocessing
import queue
import threading
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from model.tbsm import PADDING_ROW, TBSM

# Tables at least this large get memory the kernel may back with 2 MB pages (see `_table_zeros`).
HUGE_PAGE_MIN_BYTES = 64 << 20
PREFETCH_DEPTH = 2
HOGWILD_WARMUP_STEPS = 100  # steps a Hogwild run trains in one process's order first (`_hogwild_epoch`)


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
    # Training processes (Hogwild, `HogwildPeer`): 2 train 1.82x the samples per second of one
    # (benchmarks/train_throughput.py), but each computes its gradients before the other's last
    # update lands, which cost 0.013 validation AUC at lr 0.2 and 0.003 at lr 0.05 on synthetic
    # data (benchmarks/hogwild.py); and the order of the two processes' updates varies from run
    # to run, so only workers=1 trains bit-reproducibly.
    workers: int = 1


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


def _table_zeros(like: torch.Tensor, shared: bool) -> torch.Tensor | None:
    """Zeros shaped like `like` in anonymous memory, or None where ordinary memory will do.

    - `shared`: memory a forked Hogwild worker (`HogwildPeer`) writes too (every tensor the
      optimizer updates). Where shared memory cannot be mapped, training with workers fails loudly.
    - otherwise, for tables of at least HUGE_PAGE_MIN_BYTES: private memory advised for transparent
      huge pages. A step reads and writes a few thousand random rows of tables up to 266 MB: with
      4 KB pages nearly every row is a TLB miss; with 2 MB pages the gathers and write-backs took
      1.3-1.9x less time (5,000 random rows of the 4.2M-row item table and its Adagrad sums, 1 thread).
      Shared memory gets huge pages only where the kernel's shmem setting allows it (not on these
      machines: `/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `never`), so it is populated
      when mapped instead: faulting in each 4 KB page at its first write took the optimizer from
      1.3 to 2.3 CPU ms a step (bench config); populated, 1.5 ms.
    """
    nbytes = like.numel() * like.element_size()
    big = nbytes >= HUGE_PAGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE")
    if not shared and (not big or like.device.type != "cpu"):
        return None
    try:
        kind = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0) if shared else mmap.MAP_PRIVATE
        buffer = mmap.mmap(-1, max(nbytes, 1), flags=kind | mmap.MAP_ANONYMOUS)
        if big:
            buffer.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        if shared:
            raise
        return None
    # the tensor keeps `buffer` alive
    return torch.frombuffer(buffer, dtype=like.dtype, count=like.numel()).view(like.shape)


def _zeros_like(like: torch.Tensor, shared: bool) -> torch.Tensor:
    """`_table_zeros`, or ordinary zeros where it returns None."""
    zeros = _table_zeros(like, shared)
    return torch.zeros_like(like) if zeros is None else zeros


class TBSMOptimizer:
    """Adagrad (torch's formula: sum += g^2; p -= lr * g / (sqrt(sum) + eps)) in two parts.

    - id tables: only the rows a batch touched. The batch's unique rows are gathered into a small
      leaf tensor, the model runs on that, and the update writes those rows back. A dense update
      of a 4M-row table would cost ~100 ms a step; this costs a few hundred microseconds.
    - everything else (~3.6K parameters in ~20 tensors): one flat buffer, so the update is four
      vector ops instead of four per tensor.

    `shared`: every tensor the update writes (tables, dense parameters, Adagrad sums) lives in
    shared memory, for Hogwild workers (`HogwildPeer`); the gradients stay each process's own.
    """

    def __init__(self, model: TBSM, lr: float, eps: float = 1e-10, shared: bool = False) -> None:
        self.lr, self.eps, self.shared = lr, eps, shared
        self.tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        table_ids = {id(t) for t in self.tables}
        for t in self.tables:
            t.requires_grad_(False)  # rows are trained through the gathered leaves, never in place
            moved = _table_zeros(t, shared)
            if moved is not None:
                t.data = moved.copy_(t.detach())
        self.dense = [p for p in model.parameters() if id(p) not in table_ids]
        self.flat = torch.cat([p.detach().reshape(-1) for p in self.dense])
        if shared:
            self.flat = _table_zeros(self.flat, shared).copy_(self.flat)
        self.flat_grad = torch.zeros_like(self.flat)
        offset = 0
        for p in self.dense:
            n = p.numel()
            p.data = self.flat[offset : offset + n].view_as(p)
            p.grad = self.flat_grad[offset : offset + n].view_as(p)
            offset += n
        self.dense_sum = _zeros_like(self.flat, shared)
        self.table_sum = [_zeros_like(t, shared) for t in self.tables]

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
        """Adagrad on the rows of `leaf`, added to the tables (and their sums) of `spans`.

        Added, not written back: a Hogwild peer may have updated a row since `leaf` was gathered,
        and writing back leaf + step would undo that update (on the demo data every step reads
        nearly all 200 category rows, so such collisions are the rule there, not the exception)."""
        grad = leaf.grad
        if grad is None:
            return
        state = torch.empty_like(leaf)
        for table_index, unique, span in spans:
            torch.index_select(self.table_sum[table_index], 0, unique, out=state[span])
        squared = grad * grad
        state.add_(squared)
        for table_index, unique, span in spans:
            self.table_sum[table_index].index_add_(0, unique, squared[span])
        step = grad.mul(-self.lr).div_(state.sqrt_().add_(self.eps))  # addcdiv's order: (value * g) / denom
        for table_index, unique, span in spans:
            self.tables[table_index].index_add_(0, unique, step[span])

    def _dense_step(self) -> None:
        self.dense_sum.addcmul_(self.flat_grad, self.flat_grad)
        self.flat.addcdiv_(self.flat_grad, self.dense_sum.sqrt().add_(self.eps), value=-self.lr)

    def state_dict(self) -> dict:
        return {"dense_sum": self.dense_sum, "table_sum": self.table_sum, "lr": self.lr, "eps": self.eps}

    def load_state_dict(self, state: dict) -> None:
        self.dense_sum.copy_(state["dense_sum"])
        for mine, saved in zip(self.table_sum, state["table_sum"]):
            mine.copy_(saved)


class HogwildPeer:
    """A forked process that trains on its own batches in the memory of a shared `TBSMOptimizer`
    (Hogwild: no locks; the two processes' updates of a row seldom meet, as a step touches a few
    thousand of millions of rows, and the ~3.6K dense parameters tolerate the occasional lost update).

    The peer waits between runs (`start(steps)` ... `finish()`), so the caller can validate and
    checkpoint a model nobody is writing. Its gradients and torch threads are its own (one thread).
    """

    def __init__(self, model: TBSM, optimizer: TBSMOptimizer, batches: Iterable[BatchLike],
                 log_q: torch.Tensor | None = None) -> None:
        if not optimizer.shared:
            raise ValueError("Hogwild training needs TBSMOptimizer(..., shared=True)")
        context = multiprocessing.get_context("fork")  # the child must inherit the shared mappings
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=self._serve, args=(child_conn, model, optimizer, batches, log_q),
                                        daemon=True)
        self._process.start()
        child_conn.close()

    @staticmethod
    def _serve(conn, model, optimizer, batches, log_q) -> None:
        torch.set_num_threads(1)
        stream = iter(batches)
        while (steps := conn.recv()) is not None:
            try:
                conn.send([train_step(model, optimizer, batch, log_q) for batch in islice(stream, steps)])
            except Exception as exc:  # noqa: BLE001 - reported by the parent's finish()
                conn.send(f"{type(exc).__name__}: {exc}")
                return

    def start(self, steps: int) -> None:
        """Train on the next `steps` batches (fewer where the batches run out) in the background."""
        self._conn.send(steps)

    def finish(self) -> list[float]:
        """Wait for the run `start` began; its losses."""
        try:
            losses = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"Hogwild training process died (exit code {self._process.exitcode})") from None
        if isinstance(losses, str):
            raise RuntimeError(f"Hogwild training process failed: {losses}")
        return losses

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()


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
    train_batches: Callable[..., Iterator[BatchLike]],
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

    `cfg.workers` = n > 1 (Hogwild; the optimizer must be `shared`): batch k of an epoch trains in
    process k % n, `train_batches(epoch, part=(w, n))` yielding process w's batches in order; the
    others are `HogwildPeer`s forked per epoch, all on one torch thread each. Validation and
    checkpoints wait until every process has reached the step.
    """
    threads = torch.get_num_threads()
    if cfg.workers > 1:
        prefetch = False
        torch.set_num_threads(1)
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

    def evaluate_mid_epoch() -> None:
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step % steps_per_epoch != 0:
            evaluate()

    while state.epoch < cfg.epochs:
        if cfg.workers > 1:
            _hogwild_epoch(model, optimizer, cfg, train_batches, steps_per_epoch, state, recent_losses, progress,
                           log_q, evaluate_mid_epoch)
        else:
            batches: Iterable = (dedup(model, b) for b in train_batches(state.epoch))
            if prefetch:
                batches = prefetched(batches)
            for batch in batches:
                loss = train_step(model, optimizer, batch, log_q)
                recent_losses.append(loss)
                state.step += 1
                progress(state.step, loss)
                evaluate_mid_epoch()
        evaluate()
        state.epoch += 1
        on_epoch_end(state)
    return state


def _hogwild_epoch(model, optimizer, cfg, train_batches, steps_per_epoch, state, recent_losses, progress, log_q,
                   evaluate_mid_epoch) -> None:
    """One epoch on cfg.workers processes, in runs that end at each mid-epoch validation step.

    The run's first HOGWILD_WARMUP_STEPS batches train one after another, in batch order (what
    one process does): Adagrad's first steps move every dense parameter by ~lr, and n processes
    taking them at once from the same start blew the loss up (0.90 -> 2.7 over the first 46 steps
    of the demo) and left the Adagrad sums inflated for the rest of the run (validation AUC 0.91
    instead of 0.97)."""
    n = cfg.workers
    mine = iter(train_batches(state.epoch, part=(0, n)))
    peers = [HogwildPeer(model, optimizer, train_batches(state.epoch, part=(w, n)), log_q) for w in range(1, n)]
    epoch_start = state.step - state.step % steps_per_epoch
    try:
        done = state.step - epoch_start
        while done < steps_per_epoch:
            end = steps_per_epoch
            if cfg.eval_every:
                end = min(end, (state.step // cfg.eval_every + 1) * cfg.eval_every - epoch_start)
            serial = state.step < HOGWILD_WARMUP_STEPS
            if serial:  # one batch at a time, by whichever process owns it
                end = min(end, done + 1)

            def batches_of(worker: int) -> int:  # batches k in [done, end) with k % n == worker
                return len(range(done + (worker - done) % n, end, n))

            if not serial:
                for worker, peer in enumerate(peers, 1):
                    peer.start(batches_of(worker))
            for i, batch in enumerate(islice(mine, batches_of(0))):
                loss = train_step(model, optimizer, batch, log_q)
                recent_losses.append(loss)
                progress(min(epoch_start + done + n * (i + 1), epoch_start + end), loss)
            for worker, peer in enumerate(peers, 1):
                if serial:
                    peer.start(batches_of(worker))
                recent_losses.extend(peer.finish())
            done = end
            state.step = epoch_start + done
            evaluate_mid_epoch()
    finally:
        for peer in peers:
            peer.close()
