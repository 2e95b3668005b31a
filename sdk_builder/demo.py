"""Real demo bundles from a model trained on synthetic data (samples, docs and tests)."""

from __future__ import annotations

from pathlib import Path

from model.tbsm import TBSMConfig
from model.train import TrainConfig
from sdk_builder.bundle.build import BundleBuilder
from sdk_builder.data.dataset import PreparedData, prepare
from sdk_builder.data.synthetic import generate_taobao_events
from sdk_builder.recipes import DEFAULT_RECIPE
from sdk_builder.runs import DATA, load_checkpoint, train_run


def train_demo_run(run: Path, seed: int = 0, users: int = 300) -> Path:
    """Train a small model on synthetic data into the run directory `run`."""
    data = prepare(generate_taobao_events(users, n_items=3000, n_categories=40, seed=seed), seed=seed)
    train_run(data, Path(run), TBSMConfig(**data.table_sizes()), TrainConfig(epochs=1, seed=seed), force=True)
    return Path(run)


def build_demo_bundles(out_dir: Path, n_users: int = 3, recipe: str = DEFAULT_RECIPE, seed: int = 0,
                       run: Path | None = None) -> list[Path]:
    """`n_users` real bundles under `out_dir`/bundles, from `run` (trained into `out_dir`/run when None)."""
    out_dir = Path(out_dir)
    run = Path(run) if run is not None else train_demo_run(out_dir / "run", seed)
    ckpt = load_checkpoint(run)
    builder = BundleBuilder(ckpt, PreparedData.load(run / DATA), recipe=recipe, seed=seed)
    return [builder.build(int(u), out_dir / "bundles").path for u in ckpt.users.ids[:n_users]]
