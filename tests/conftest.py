from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ML_SMALL = SHARED_DATA / "ml-latest-small" / "UserBehavior.csv"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: OpenMP threads only add overhead (and spin badly on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A small model trained on synthetic data, shared by the bundle tests."""
    from model.tbsm import TBSMConfig
    from model.train import TrainConfig
    from sdk_builder.data.dataset import prepare
    from sdk_builder.data.synthetic import generate_taobao_events
    from sdk_builder.runs import train_run

    out = tmp_path_factory.mktemp("run")
    data = prepare(generate_taobao_events(300, n_items=3000, n_categories=40, seed=3), seed=3)
    cfg = TBSMConfig(**data.table_sizes())
    train_run(data, out, cfg, TrainConfig(epochs=1, seed=3))
    return out


@pytest.fixture(scope="session")
def builder(trained_run):
    from sdk_builder.bundle.build import BundleBuilder
    from sdk_builder.data.dataset import PreparedData
    from sdk_builder.shard import ShardPolicy
    from sdk_builder.runs import DATA, load_checkpoint

    from sdk_builder.bundle.many import save_template, template_key

    ckpt = load_checkpoint(trained_run)
    builder = BundleBuilder(ckpt, PreparedData.load(trained_run / DATA), ShardPolicy(shard_size=300), recipe="portable")
    # Exported once per session and cached in the run, as `tbsm-sdk build` does: the CLI builds of the
    # same recipe and layout (--recipe portable --shard-size 300) stamp it instead of exporting again.
    builder.prepare_stamping()
    save_template(trained_run, template_key(builder), builder.template)
    return builder


@pytest.fixture(scope="session")
def built_bundle(builder, tmp_path_factory) -> Path:
    user_id = int(builder.ckpt.users.ids[7])
    return builder.build(user_id, tmp_path_factory.mktemp("bundles")).path


@pytest.fixture(scope="session")
def client_bundles(trained_run, builder, built_bundle, tmp_path_factory) -> list[Path]:
    """Real bundles for the client tests (C++, Kotlin, the template contract): three users with the
    xnnpack recipe (stamped, as `tbsm-sdk build` makes them for many users: `demo.build_demo_bundles`),
    one portable (`built_bundle`) and one int8 (the quantized kernels)."""
    from sdk_builder.bundle.build import BundleBuilder
    from sdk_builder.demo import build_demo_bundles

    out = tmp_path_factory.mktemp("client-bundles")
    xnnpack = build_demo_bundles(out / "xnnpack", n_users=3, recipe="xnnpack", run=trained_run)
    int8 = BundleBuilder(builder.ckpt, builder.data, builder.policy, recipe="int8", stamping=False)
    result = int8.build(int(builder.ckpt.users.ids[0]), out / "int8")
    assert result.recipe == "int8", result.note
    return [*xnnpack, Path(built_bundle), result.path]


@pytest.fixture(scope="session")
def refresh_client_bundle(builder, tmp_path_factory) -> Path:
    """A bundle built with an on-device refresh program (`build --refresh`: refresh.pte, manifest.refresh,
    golden refresh_cases) for the client tests; the session's portable builder, its user 7."""
    from sdk_builder.bundle.build import BundleBuilder
    from sdk_builder.refresh import RefreshConfig

    refreshing = BundleBuilder(builder.ckpt, builder.data, builder.policy, recipe="portable", refresh=RefreshConfig())
    return refreshing.build(int(builder.ckpt.users.ids[7]), tmp_path_factory.mktemp("refresh-bundles")).path
