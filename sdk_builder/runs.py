"""Training runs on disk: checkpoints, metrics.json, the training curve, evaluation.

A run directory holds:
- `checkpoint.pt`: the best-validation-AUC model, its optimizer state, the model and training
  configs, the id maps, the data fingerprint, versions and seeds;
- `last.pt`: the state after the latest finished epoch (what `--resume` continues from);
- `data.npz`: the prepared dataset the run was trained on (the bundle step needs its events);
- `metrics.json`, `training_curve.png`.
Every file is written to a temporary name and renamed, so a killed run never leaves half a file.
A new run (also `--force` over an old one) is trained in a directory beside `out` and swapped in
when complete, so a reader finds the old complete run or the new one, never a mix; only `--resume`
works in place (same data, checked by fingerprint, so every file stays consistent).
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from model.metrics import classification_report, roc_auc
from model.tbsm import RESERVED_ROWS, TBSM, TBSMConfig
from model.train import TBSMOptimizer, TrainConfig, TrainState, fit, predict
from sdk_builder.data.dataset import Batch, IdMap, NegativeSampler, PreparedData, SampleSet
from sdk_builder.evaluation import PRIMARY_METRIC, ValidationRanking
from sdk_builder.formats import BUILD_CACHE
from sdk_builder.util import atomic_write_bytes, exchange_paths, sha256_file

CHECKPOINT = "checkpoint.pt"
LAST = "last.pt"
DATA = "data.npz"
EVAL_BATCH = 4096
TRAIN_AUC_SAMPLE = 20_000
STALLED_AUC = 0.55  # a run whose best validation AUC stays below this learned nothing usable
FEW_TEST_POINTS = 100
# What a run directory holds that a new run replaces; anything else found in `out` is carried over.
# ondevice.* (from `evaluate --on-device`) describe the old model, so they go with it.
RUN_OUTPUTS = frozenset({CHECKPOINT, LAST, DATA, "metrics.json", "training_curve.png", "ondevice.json", "ondevice.png",
                         BUILD_CACHE})
# What LoadedCheckpoint and `evaluate` read, and what `--resume` reads on top.
CHECKPOINT_KEYS = ("model_state", "model_config", "id_maps", "item_category", "data_fingerprint")
RESUME_KEYS = CHECKPOINT_KEYS + ("optimizer_state", "train_config", "train_state", "torch_rng")


class RunError(RuntimeError):
    """A run directory or checkpoint that cannot be used; the message is one line."""


def versions() -> dict[str, str]:
    from importlib.metadata import version

    from sdk_builder import __version__

    return {
        "tbsm_sdk": __version__,
        "torch": str(torch.__version__),  # TorchVersion would not load weights-only
        "executorch": version("executorch"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def batches(data: PreparedData, samples: SampleSet, batch_size: int, history: int,
            order: np.ndarray | None = None, part: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
    """The samples in `order`, batch_size at a time; `part` (w, n): only batches k with k % n == w."""
    order = np.arange(len(samples)) if order is None else order
    worker, n = part
    for start in range(worker * batch_size, len(order), n * batch_size):
        yield data.collate(samples.take(order[start : start + batch_size]), history)


def evaluate_split(model: TBSM, data: PreparedData, split: str) -> dict[str, float]:
    samples = data.splits[split]
    labels, probs = predict(model, batches(data, samples, EVAL_BATCH, model.cfg.history))
    return classification_report(labels, probs)


def _checkpoint_payload(model, optimizer, model_cfg, train_cfg, data, state, run_seed) -> dict:
    return {
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "model_config": model_cfg.to_dict(),
        "train_config": asdict(train_cfg),
        "train_state": asdict(state),
        # Tensors, not numpy arrays: loading stays `weights_only` (a checkpoint can never run code).
        "id_maps": {"user_ids": torch.from_numpy(data.users.ids), "item_ids": torch.from_numpy(data.items.ids),
                    "category_ids": torch.from_numpy(data.categories.ids)},
        "item_category": torch.from_numpy(data.item_category),
        "data_fingerprint": data.fingerprint(),
        "data_info": data.info,
        "versions": versions(),
        "seed": run_seed,
    }


def train_run(
    data: PreparedData,
    out_dir: Path,
    model_cfg: TBSMConfig,
    train_cfg: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[int, float], None] = lambda step, loss: None,
    steps_callback: Callable[[int], None] = lambda total: None,
) -> dict:
    """Train on `data` into `out_dir`; returns the metrics dict also written to metrics.json."""
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINT).exists() and not (resume or force):
        raise RunError(f"{out_dir / CHECKPOINT} exists: pass --resume to continue it or --force to overwrite it")
    if resume and not (out_dir / LAST).exists():
        raise RunError(f"--resume: {out_dir / LAST} does not exist")
    for split in ("train", "validation"):
        if split not in data.splits or not len(data.splits[split]):
            raise RunError(f"the prepared data has no {split!r} samples (too few events per user?)")
    if out_dir.exists() and not (out_dir.is_dir() and os.access(out_dir, os.W_OK | os.X_OK)):
        raise RunError(f"{out_dir}: not a writable directory")
    if not 0.0 <= train_cfg.user_dropout < 1.0:
        raise RunError(f"user_dropout {train_cfg.user_dropout}: expected a fraction in [0, 1)")
    if train_cfg.user_dropout and model_cfg.num_users == len(data.users.ids):
        model_cfg = replace(model_cfg, num_users=model_cfg.num_users + 1)  # the unknown-user row
    work = out_dir if resume else _staging_dir(out_dir)
    try:
        work.mkdir(parents=True, exist_ok=True)
        metrics = _train_into(work, data, model_cfg, train_cfg, resume=resume, progress=progress,
                              steps_callback=steps_callback)
        if work != out_dir:
            _swap_in(work, out_dir)
    except OSError as exc:
        raise RunError(f"{exc.filename or out_dir}: cannot write the run ({exc.strerror or exc})") from None
    finally:
        if work != out_dir and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return metrics


def _staging_dir(out_dir: Path) -> Path:
    """A fresh directory beside `out_dir` for a new run (`out_dir` itself when its parent is not
    writable, e.g. `out_dir` is a mount point: then a killed --force run can leave a mix)."""
    parent = out_dir.parent
    for stale in parent.glob(f".{glob.escape(out_dir.name)}.train-*"):  # left by a killed run
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    work = parent / f".{out_dir.name}.train-{os.getpid()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    except OSError:
        return out_dir
    return work


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(new: Path, out_dir: Path) -> None:
    """Put the complete run `new` at `out_dir`; the old run there (if any) is removed after the swap,
    once files that are not run outputs (e.g. a user's notes) have been moved into the new run."""
    if not out_dir.exists():
        os.rename(new, out_dir)
        return
    exchange_paths(new, out_dir)  # now `new` holds the old run
    for entry in new.iterdir():
        if entry.name not in RUN_OUTPUTS and ".tmp" not in entry.name and not (out_dir / entry.name).exists():
            os.rename(entry, out_dir / entry.name)
    shutil.rmtree(new)


def unknown_user_row(model_cfg: TBSMConfig, train_cfg: TrainConfig | dict) -> int | None:
    """The user row trained for unknown users (`TrainConfig.user_dropout`), else None."""
    dropout = train_cfg.get("user_dropout", 0.0) if isinstance(train_cfg, dict) else train_cfg.user_dropout
    return model_cfg.num_users - 1 if dropout else None


def with_user_dropout(batches_in: Iterator[Batch], train_cfg: TrainConfig, model_cfg: TBSMConfig,
                      epoch: int, part: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
    """The batches with a seeded `user_dropout` fraction of samples moved to the unknown-user row
    (after collation: the history windows stay the user's own). Each Hogwild `part` draws its own."""
    rng = np.random.default_rng([train_cfg.seed, epoch, 13] + ([part[0]] if part[1] > 1 else []))
    row = unknown_user_row(model_cfg, train_cfg)
    for batch in batches_in:
        drop = torch.from_numpy(rng.random(len(batch.user_rows)) < train_cfg.user_dropout)
        yield replace(batch, user_rows=torch.where(drop, torch.full_like(batch.user_rows, row), batch.user_rows))


def _train_into(
    out_dir: Path,
    data: PreparedData,
    model_cfg: TBSMConfig,
    train_cfg: TrainConfig,
    *,
    resume: bool,
    progress: Callable[[int, float], None],
    steps_callback: Callable[[int], None],
) -> dict:
    ckpt_path, last_path = out_dir / CHECKPOINT, out_dir / LAST
    seed_everything(train_cfg.seed)
    model = TBSM(model_cfg)
    optimizer = TBSMOptimizer(model, train_cfg.lr, shared=train_cfg.workers > 1)
    state = TrainState()
    if resume:
        last = read_checkpoint(last_path, required=RESUME_KEYS)
        if last["data_fingerprint"] != data.fingerprint():
            raise RunError(f"--resume: {last_path} was trained on other data (fingerprint mismatch)")
        if last["model_config"] != model_cfg.to_dict():
            raise RunError(f"--resume: {last_path} has another model config")
        resumable = ("batch_size", "lr", "seed")  # epochs and eval_every may change on resume
        changed = [k for k in resumable if last["train_config"][k] != asdict(train_cfg)[k]]
        if changed:
            raise RunError(f"--resume: {last_path} was trained with another {', '.join(changed)}")
        try:
            model.load_state_dict(last["model_state"])
            optimizer.load_state_dict(last["optimizer_state"])
            state = TrainState(**last["train_state"])
            torch.set_rng_state(last["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise RunError(f"--resume: {last_path}: not a usable checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None
    data.save(out_dir / DATA)

    if train_cfg.select_by not in ("val_auc", "val_hr10"):
        raise RunError(f"select_by {train_cfg.select_by!r}: expected val_auc or val_hr10")
    ranking = ValidationRanking(data, seed=train_cfg.seed)
    if train_cfg.select_by == "val_hr10" and not len(ranking):
        raise RunError("select_by val_hr10: no validation user has a target to rank (too few events per user?)")
    negatives = data.info.get("negatives", {})
    log_q = None
    if negatives.get("sampler", "uniform") != "uniform":
        log_q = torch.from_numpy(NegativeSampler(negatives["sampler"], negatives.get("per_positive", 1)).log_q(data))
    train = data.splits["train"]
    rng_auc = np.random.default_rng(train_cfg.seed + 1)
    train_auc_subset = train.take(np.sort(rng_auc.choice(len(train), min(len(train), TRAIN_AUC_SAMPLE), replace=False)))
    steps_per_epoch = -(-len(train) // train_cfg.batch_size)
    steps_callback(steps_per_epoch * train_cfg.epochs)
    if not train_cfg.eval_every:
        # About ten validations per run: a curve worth plotting and a best checkpoint worth the name.
        train_cfg = replace(train_cfg, eval_every=max(1, steps_per_epoch * train_cfg.epochs // 10))

    def train_batches(epoch: int, part: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
        # The order depends on (seed, epoch) only, so a resumed run sees the same batches.
        order = np.random.default_rng([train_cfg.seed, epoch]).permutation(len(train))
        out = batches(data, train, train_cfg.batch_size, model_cfg.history, order, part)
        return with_user_dropout(out, train_cfg, model_cfg, epoch, part) if train_cfg.user_dropout else out

    def validate() -> dict:
        metrics = {f"val_{k}": v for k, v in evaluate_split(model, data, "validation").items()}
        labels, probs = predict(model, batches(data, train_auc_subset, EVAL_BATCH, model_cfg.history))
        metrics["train_auc"] = roc_auc(labels, probs)
        if train_cfg.select_by == "val_hr10":  # otherwise measured once, for the best checkpoint
            metrics.update(ranking(model))
        return metrics

    def on_best(st: TrainState, metrics: dict) -> None:
        atomic_torch_save(_checkpoint_payload(model, optimizer, model_cfg, train_cfg, data, st, train_cfg.seed), ckpt_path)

    def on_epoch_end(st: TrainState) -> None:
        payload = _checkpoint_payload(model, optimizer, model_cfg, train_cfg, data, st, train_cfg.seed)
        payload["torch_rng"] = torch.get_rng_state()
        atomic_torch_save(payload, last_path)

    started = time.perf_counter()
    step0 = state.step
    state = fit(model, optimizer, train_cfg, train_batches, steps_per_epoch, validate, on_best, on_epoch_end,
                state=state, progress=progress, log_q=log_q)
    elapsed = time.perf_counter() - started

    best = load_checkpoint(ckpt_path)
    best_record = next(h for h in state.history if h["step"] == state.best_step)
    ranking_validation = None
    if len(ranking):
        # What build's quality gate compares: the best checkpoint's shard rankings against popularity,
        # with the weight of the shard policy's prior the phone will rank with.
        ranking_validation = {"metric": PRIMARY_METRIC, "users": len(ranking), "popularity": ranking.baselines["popularity"],
                              **ranking.choose_blend(best.model)}
        best.payload["ranking_validation"] = ranking_validation
        atomic_torch_save(best.payload, ckpt_path)
    test = evaluate_split(best.model, data, "test") if "test" in data.splits else None
    metrics = {
        "best_step": state.best_step,
        "selected_by": train_cfg.select_by,
        "best_validation_auc": best_record["val_auc"],
        "ranking_validation": ranking_validation,
        "warnings": run_warnings(state.history, best_record, test),
        "history": state.history,
        "test": test,
        "train_seconds": elapsed,
        "samples_per_second": (state.step - step0) * train_cfg.batch_size / max(elapsed, 1e-9),
        "data": data.info,
        "model_config": model_cfg.to_dict(),
        "train_config": asdict(train_cfg),
        "versions": versions(),
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1, default=float) + "\n")
    plot_curve(state.history, out_dir / "training_curve.png")
    return metrics


def run_warnings(history: list[dict], best: dict, test: dict | None) -> list[str]:
    """Plain-language reasons not to trust a run (printed by `train`, listed in metrics.json)."""
    warnings = []
    if len(history) > 1 and best["step"] == history[0]["step"]:
        warnings.append(f"the best checkpoint is the first evaluation (step {best['step']}): later training only got worse")
    best_auc = max(h["val_auc"] for h in history)
    if not best_auc >= STALLED_AUC:
        warnings.append(f"stalled: validation AUC never reached {STALLED_AUC} (best {best_auc:.3f}); the model learned nothing usable")
    if test is not None and test["points"] < FEW_TEST_POINTS:
        warnings.append(f"only {test['points']} test points: the test AUC is too noisy to compare runs (want >= {FEW_TEST_POINTS})")
    return warnings


def plot_curve(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [h["train_loss"] for h in history], marker="o", label="train (mean since last eval)")
    ax_loss.plot(steps, [h["val_log_loss"] for h in history], marker="o", label="validation")
    ax_loss.set(xlabel="step", ylabel="log loss", title="Loss")
    ax_auc.plot(steps, [h["train_auc"] for h in history], marker="o", label="train")
    ax_auc.plot(steps, [h["val_auc"] for h in history], marker="o", label="validation")
    ax_auc.set(xlabel="step", ylabel="ROC AUC", title="AUC")
    for ax in (ax_loss, ax_auc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=90, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


class LoadedCheckpoint:
    def __init__(self, path: Path, payload: dict) -> None:
        self.path = path
        self.payload = payload
        self.config = TBSMConfig.from_dict(payload["model_config"])
        with torch.device("meta"):
            self.model = TBSM(self.config)
        # assign=True keeps the loaded (possibly memory-mapped) storage instead of copying it into
        # freshly allocated tables: build workers then share one page-cache copy of the embeddings.
        self.model.load_state_dict(payload["model_state"], assign=True)
        self.model.materialize_constants()
        self.model.eval()
        maps = payload["id_maps"]
        self.users = IdMap(np.asarray(maps["user_ids"]), 0)
        self.items = IdMap(np.asarray(maps["item_ids"]), RESERVED_ROWS)
        self.categories = IdMap(np.asarray(maps["category_ids"]), RESERVED_ROWS)
        self.item_category = np.asarray(payload["item_category"])
        self.sha256 = sha256_file(path)


def load_checkpoint(path: Path, *, mmap: bool = False) -> LoadedCheckpoint:
    """Load a run's best checkpoint; with `mmap` tensors stay memory-mapped from the file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise RunError(f"{path}: no such checkpoint (run `tbsm-sdk train` first)")
    payload = read_checkpoint(path, mmap=mmap)
    try:
        return LoadedCheckpoint(path, payload)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:  # e.g. tables of the wrong shape
        raise RunError(f"{path}: not a usable tbsm-sdk checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None


def read_checkpoint(path: Path, *, mmap: bool = False, required: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """A checkpoint's payload, loaded weights-only: tensors and plain Python values, never objects
    whose unpickling could run code (a crafted file is refused, not executed)."""
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except Exception as exc:  # a truncated, foreign or code-carrying file: one line, not a pickle trace
        raise RunError(f"{path}: not a readable tbsm-sdk checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(payload, dict) or "model_state" not in payload:
        raise RunError(f"{path}: not a tbsm-sdk checkpoint")
    missing = [k for k in required if k not in payload]
    if missing:
        raise RunError(f"{path}: not a complete tbsm-sdk checkpoint (no {', '.join(repr(k) for k in missing)})")
    return payload


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
