"""End to end through the CLI: train, determinism, --force/--resume, evaluate, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sdk_builder.cli import main

USERS = "300"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def restore_torch_state():
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def train(out: Path, *extra: str, ok: bool = True):
    result = cli("train", "--synthetic-users", USERS, "--threads", "1", "--out", str(out), *extra)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model_state"]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train(root / "a", "--seed", "0")
    train(root / "b", "--seed", "0")
    train(root / "c", "--seed", "1")
    return root


def test_train_writes_run_files(runs):
    run = runs / "a"
    for name in ("checkpoint.pt", "last.pt", "data.npz", "metrics.json", "training_curve.png"):
        assert (run / name).is_file(), name
        assert (run / name).stat().st_size > 0
    assert (run / "training_curve.png").read_bytes()[:8] == PNG_MAGIC
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
    m = metrics(run)
    assert m["test"]["points"] > 0 and {"auc", "accuracy", "log_loss"} <= m["test"].keys()
    # About ten validations per run by default; the last one is at the end of the epoch.
    assert 2 <= len(m["history"]) <= 12 and m["history"][-1]["epoch"] == 0
    assert [h["step"] for h in m["history"]] == sorted({h["step"] for h in m["history"]})
    assert m["data"]["source"] == f"synthetic:{USERS}"


def test_synthetic_data_is_learnable(runs):
    m = metrics(runs / "a")
    assert m["best_validation_auc"] > 0.7, m["best_validation_auc"]
    assert m["test"]["auc"] > 0.7, m["test"]


def test_same_seed_is_reproducible(runs):
    a, b = metrics(runs / "a"), metrics(runs / "b")
    assert a["test"] == b["test"]
    assert a["best_validation_auc"] == b["best_validation_auc"]
    assert [{k: v for k, v in h.items()} for h in a["history"]] == b["history"]
    assert same_weights(weights(runs / "a"), weights(runs / "b"))
    assert (runs / "a" / "data.npz").read_bytes() == (runs / "b" / "data.npz").read_bytes()


def test_a_hogwild_run_shorter_than_its_warm_up_trains_as_one_process(runs, tmp_path):
    """Run `a` is shorter than HOGWILD_WARMUP_STEPS: with --workers 2 its batches still alternate
    between two processes, one at a time and in order, which must give run `a`'s model exactly."""
    from model.train import HOGWILD_WARMUP_STEPS

    assert metrics(runs / "a")["history"][-1]["step"] < HOGWILD_WARMUP_STEPS
    train(tmp_path / "hogwild", "--seed", "0", "--workers", "2")
    assert metrics(tmp_path / "hogwild")["train_config"]["workers"] == 2
    assert metrics(tmp_path / "hogwild")["history"] == metrics(runs / "a")["history"]
    assert same_weights(weights(tmp_path / "hogwild"), weights(runs / "a"))


def test_different_seed_differs(runs):
    a, c = metrics(runs / "a"), metrics(runs / "c")
    assert a["test"]["auc"] != c["test"]["auc"]
    assert not same_weights(weights(runs / "a"), weights(runs / "c"))


def test_training_seed_alone_changes_the_model(tmp_path):
    data = tmp_path / "data.npz"
    result = cli("prepare", "--synthetic-users", USERS, "--out", str(data))
    assert result.exit_code == 0, result.output
    for seed in ("0", "0", "1"):
        r = cli("train", "--data", str(data), "--threads", "1", "--seed", seed, "--out", str(tmp_path / f"s{seed}"), "--force")
        assert r.exit_code == 0, r.output
    w0, w1 = weights(tmp_path / "s0"), weights(tmp_path / "s1")
    assert not same_weights(w0, w1)


def test_existing_run_needs_force(runs):
    run = runs / "a"
    before = (run / "checkpoint.pt").read_bytes()
    result = train(run, ok=False)
    assert result.exit_code != 0
    errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if "Error" in line]
    assert len(errors) == 1 and "--force" in errors[0], result.stderr
    assert "Traceback" not in result.output
    assert (run / "checkpoint.pt").read_bytes() == before  # nothing was overwritten
    result = train(run, "--force", "--seed", "0")
    assert result.exit_code == 0
    assert metrics(run)["test"] == metrics(runs / "b")["test"]


def test_resume_continues(tmp_path):
    run, straight = tmp_path / "r", tmp_path / "straight"
    once_per_epoch = ("--eval-every", "1000000")  # validations at epoch ends only: comparable histories
    train(run, "--epochs", "1", *once_per_epoch)
    one = metrics(run)
    last1 = torch.load(run / "last.pt", weights_only=True)["train_state"]
    result = train(run, "--epochs", "2", "--resume", *once_per_epoch)
    assert result.exit_code == 0
    two = metrics(run)
    last2 = torch.load(run / "last.pt", weights_only=True)["train_state"]
    assert last2["step"] == 2 * last1["step"] and last2["epoch"] == 2
    assert len(two["history"]) == 2 and two["history"][0] == one["history"][0]
    assert two["history"][1]["step"] > two["history"][0]["step"]
    # resuming gives the same model as training two epochs without a break
    train(straight, "--epochs", "2", *once_per_epoch)
    assert metrics(straight)["history"] == two["history"]
    end_resumed = torch.load(run / "last.pt", weights_only=True)["model_state"]
    end_straight = torch.load(straight / "last.pt", weights_only=True)["model_state"]
    assert same_weights(end_resumed, end_straight)


def test_resume_without_previous_run_fails(tmp_path):
    result = train(tmp_path / "none", "--resume", ok=False)
    assert result.exit_code != 0 and "last.pt" in result.output


def test_evaluate_json(runs):
    result = cli("evaluate", str(runs / "a"), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert {"auc", "accuracy", "log_loss"} <= payload.keys()
    assert payload["auc"] == pytest.approx(metrics(runs / "a")["test"]["auc"], abs=1e-12)
    assert 0.0 <= payload["accuracy"] <= 1.0 and payload["log_loss"] > 0


def test_bad_input_with_strict_reports_file_and_line(tmp_path):
    bad = tmp_path / "events.csv"
    bad.write_text("1,2,3,pv,1511568000\n1,3,3,pv,1511568001\nx7,2,3,pv,1511568002\n")
    result = cli("train", str(bad), "--strict", "--out", str(tmp_path / "run"))
    assert result.exit_code != 0
    assert f"{bad}:3" in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_crafted_checkpoint_cannot_run_code(tmp_path):
    """Checkpoints travel between machines: loading one is weights-only, so a pickle that would run
    a command is refused with one line and the command never runs."""
    import os

    from sdk_builder.runs import RunError, load_checkpoint

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"model_state": {}, "extra": Payload()}, tmp_path / "checkpoint.pt")
    with pytest.raises(RunError, match="not a readable tbsm-sdk checkpoint") as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)
    assert not marker.exists()
