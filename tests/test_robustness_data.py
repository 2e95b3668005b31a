"""Bad input and accidents on the data side of the CLI (issue 11): every case ends in one error line
and a non-zero exit, never a traceback; an interrupted `train --force` keeps the old run usable."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sdk_builder.cli import main
from sdk_builder.runs import CHECKPOINT, DATA, LAST

REPO = Path(__file__).resolve().parents[1]
T0 = 1511570000


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    """Non-zero exit, no traceback, and exactly one `Error:` line holding every fragment."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert errors[0].isprintable(), errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def run_copy(trained_run, tmp_path_factory):
    """Copies of the session's trained run, to damage one way each."""
    root = tmp_path_factory.mktemp("damaged")

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(trained_run, target)
        return target

    return copy


def test_ingestion_errors_are_one_line(tmp_path):
    header = tmp_path / "hdr.csv"
    header.write_text(f"uid,iid,cid,beh,ts\n1,10,100,pv,{T0}\n")
    typo = "user=uidx,item=iid,category=cid,behavior=beh,timestamp=ts"
    assert_one_line_error(cli("prepare", header, "--columns", typo, "--out", tmp_path / "p.npz"),
                          "hdr.csv:1: header has no column 'uidx'")
    negative = tmp_path / "neg.csv"
    negative.write_text(f"1,10,100,pv,{T0}\n-2,11,100,pv,{T0}\n")
    assert_one_line_error(cli("prepare", negative, "--strict", "--out", tmp_path / "p.npz"),
                          "neg.csv:2: field 'user_id': '-2' is negative")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_one_line_error(cli("prepare", binary, "--out", tmp_path / "p.npz"), "bin.csv:1: binary data")
    broken_gz = tmp_path / "cut.csv.gz"
    broken_gz.write_bytes(gzip.compress(f"1,10,100,pv,{T0}\n".encode() * 500)[:60])
    assert_one_line_error(cli("prepare", broken_gz, "--out", tmp_path / "p.npz"), "cut.csv.gz: cannot read")
    assert_one_line_error(cli("prepare", negative, "--time-range", "2017-11-25:2017-12-04", "--tz", "Mars/Olympus",
                              "--out", tmp_path / "p.npz"), "time zone 'Mars/Olympus'")
    assert not (tmp_path / "p.npz").exists()


def test_tz_is_documented_in_help():
    for command in ("prepare", "train"):
        text = cli(command, "--help").output
        assert "--tz" in text and "IANA time zone" in text and "[default: UTC]" in text


def test_gzip_input_prepares_the_same_dataset(tmp_path):
    from sdk_builder.data.dataset import PreparedData
    from sdk_builder.data.synthetic import generate_taobao_events, write_taobao_csv

    plain = tmp_path / "events.csv"
    write_taobao_csv(generate_taobao_events(60, seed=2), plain)
    packed = tmp_path / "events.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for source, out in ((plain, "plain.npz"), (packed, "packed.npz")):
        result = cli("prepare", source, "--out", tmp_path / out)
        assert result.exit_code == 0, result.output
    fingerprints = {PreparedData.load(tmp_path / name).fingerprint() for name in ("plain.npz", "packed.npz")}
    assert len(fingerprints) == 1


def test_resume_from_a_damaged_last_checkpoint(run_copy):
    run = run_copy("resume")
    whole = (run / LAST).read_bytes()
    (run / LAST).write_bytes(whole[: len(whole) // 3])
    result = cli("train", "--data", run / DATA, "--out", run, "--resume", "--threads", "1")
    assert_one_line_error(result, f"{run / LAST}: not a readable tbsm-sdk checkpoint")
    payload = torch.load(run / CHECKPOINT, weights_only=True)  # complete, but not what --resume needs
    torch.save(payload, run / LAST)
    result = cli("train", "--data", run / DATA, "--out", run, "--resume", "--threads", "1")
    assert_one_line_error(result, f"{run / LAST}: not a complete tbsm-sdk checkpoint (no ", "'torch_rng'")


def test_evaluate_a_truncated_dataset(run_copy):
    run = run_copy("truncated-data")
    whole = (run / DATA).read_bytes()
    (run / DATA).write_bytes(whole[: len(whole) // 2])
    assert_one_line_error(cli("evaluate", run), f"{run / DATA}: not a readable tbsm-sdk dataset")
    assert_one_line_error(cli("train", "--data", run / DATA, "--out", run.parent / "other"),
                          f"{run / DATA}: not a readable tbsm-sdk dataset")


def test_evaluate_a_checkpoint_without_model_config(run_copy):
    run = run_copy("no-config")
    payload = torch.load(run / CHECKPOINT, weights_only=True)
    del payload["model_config"]
    torch.save(payload, run / CHECKPOINT)
    assert_one_line_error(cli("evaluate", run), f"{run / CHECKPOINT}: not a complete tbsm-sdk checkpoint (no 'model_config')")
    payload = torch.load(run / LAST, weights_only=True)
    payload["model_state"] = {k: v[:1] for k, v in payload["model_state"].items()}  # tables of the wrong shape
    torch.save(payload, run / CHECKPOINT)
    assert_one_line_error(cli("evaluate", run), f"{run / CHECKPOINT}: not a usable tbsm-sdk checkpoint (RuntimeError")


@pytest.mark.parametrize("users", ["9999999999999999999", "123456789012345678901", "\u00b2", "-1"])
def test_build_refuses_user_ids_that_are_not_int64(trained_run, tmp_path, users):
    out = tmp_path / "bundles"
    assert_one_line_error(cli("build", trained_run, "--user-shard", users, "--out", out),
                          f"user id {users!r} is not a non-negative 64-bit integer")
    listed = tmp_path / "users.txt"
    listed.write_text(f"# cohort\n12\n\n{users}\n")
    assert_one_line_error(cli("build", trained_run, "--users", listed, "--out", out),
                          f"users.txt:4: {users!r} is not a non-negative 64-bit integer user id")
    assert not out.exists()


def test_build_refuses_a_binary_users_file(trained_run, tmp_path):
    listed = tmp_path / "users.bin"
    listed.write_bytes(b"12\n\x7fELF\x02\x01\x01\x00\xff\xfe\x00\n")
    assert_one_line_error(cli("build", trained_run, "--users", listed, "--out", tmp_path / "b"),
                          "users.bin:2: not UTF-8 text")


def test_out_that_cannot_be_written(trained_run, tmp_path):
    """A file where a directory should be: the same OSError path as a read-only mount, and it bites
    as root too (chmod does not)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_one_line_error(cli("prepare", "--synthetic-users", "50", "--out", blocker / "p.npz"),
                          f"{blocker / 'p.npz'}: cannot write")
    assert_one_line_error(cli("train", "--data", trained_run / DATA, "--out", blocker / "run"), "cannot write the run")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_out_on_a_read_only_directory(trained_run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_one_line_error(cli("prepare", "--synthetic-users", "50", "--out", locked / "p.npz"),
                              f"{locked / 'p.npz'}: cannot write (Permission denied)")
        assert_one_line_error(cli("train", "--data", trained_run / DATA, "--out", locked / "run"),
                              "cannot write the run (Permission denied)")
        assert_one_line_error(cli("train", "--data", trained_run / DATA, "--out", locked, "--force"),
                              f"{locked}: not a writable directory")
        assert sorted(os.listdir(locked)) == []
    finally:
        locked.chmod(0o755)


_KILLED_FORCE_TRAIN = """
import os, signal, sys
from model.tbsm import TBSMConfig
from model.train import TrainConfig
from sdk_builder.data.dataset import prepare
from sdk_builder.data.synthetic import generate_taobao_events
from sdk_builder.runs import train_run

def kill_at_step_two(step, loss):
    if step >= 2:
        os.kill(os.getpid(), signal.SIGKILL)

data = prepare(generate_taobao_events(50, seed=9), seed=9)  # other data: a mixed run would not load
train_run(data, sys.argv[1], TBSMConfig(**data.table_sizes()), TrainConfig(epochs=1, seed=9), force=True,
          progress=kill_at_step_two)
"""


def test_killed_force_training_keeps_the_old_run(run_copy):
    """`train --force` used to replace data.npz first: after kill -9 the old run no longer loaded."""
    run = run_copy("force")
    before = cli("evaluate", run, "--json")
    assert before.exit_code == 0, before.output
    files = {name: (run / name).read_bytes() for name in os.listdir(run) if (run / name).is_file()}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILLED_FORCE_TRAIN, str(run)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed mid-training, as by kill -9
    after = cli("evaluate", run, "--json")
    assert after.exit_code == 0 and after.stdout == before.stdout, after.output
    assert {name: (run / name).read_bytes() for name in os.listdir(run) if (run / name).is_file()} == files
    leftovers = [p for p in run.parent.iterdir() if p.name.startswith(f".{run.name}.train-")]
    assert len(leftovers) == 1 and (leftovers[0] / DATA).exists()  # the new run was being written beside the old
    from sdk_builder.runs import _staging_dir

    staging = _staging_dir(run)  # the next run clears what the killed one left
    assert not leftovers[0].exists()
    shutil.rmtree(staging)


def test_a_new_run_swaps_in_whole_and_keeps_foreign_files(tmp_path):
    from sdk_builder.runs import RUN_OUTPUTS, _swap_in, exchange_paths

    old, new = tmp_path / "run", tmp_path / ".run.train-1"
    for directory, tag in ((old, b"old"), (new, b"new")):
        directory.mkdir()
        for name in RUN_OUTPUTS - {"ondevice.json", "ondevice.png"}:
            (directory / name).write_bytes(tag)
    (old / "ondevice.json").write_bytes(b"old")  # describes the old model: goes with it
    (old / "notes.txt").write_bytes(b"mine")
    (old / "bundles").mkdir()
    (old / ".checkpoint.pt.tmp-99").write_bytes(b"half")
    _swap_in(new, old)
    assert not new.exists()
    assert sorted(os.listdir(old)) == sorted((RUN_OUTPUTS - {"ondevice.json", "ondevice.png"}) | {"notes.txt", "bundles"})
    assert all((old / name).read_bytes() == b"new" for name in RUN_OUTPUTS if (old / name).is_file())
    # exchange_paths swaps two directories in one step: both names exist throughout.
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir(), (a / "x").write_text("a"), (b / "x").write_text("b")
    exchange_paths(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
