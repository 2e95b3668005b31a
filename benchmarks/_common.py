"""Shared helpers for the benchmark scripts: run context, markdown tables, docs/benchmarks.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export_revision(rev: str, dest: Path) -> Path:
    """The repository's files at `rev` (tracked files only), for timing the code as it was."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest
DOC = REPO / "docs" / "benchmarks.md"


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True)
    except (OSError, subprocess.CalledProcessError):
        return "none"
    return done.stdout.strip() or "none"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load1() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def context_line(command: str, extra: str = "") -> str:
    import torch

    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [when, f"commit {git_commit()}", f"nproc {cpu_count()}", f"Python {platform.python_version()}",
             f"torch {torch.__version__}", f"load average before the run {load_average()}"]
    text = ", ".join(parts) + f" (`{command}`)"
    return text + (f"; {extra}" if extra else "")


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "-" * len(header)
    marks = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "-")]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def append_to_doc(section: str, entry: str) -> None:
    """Add `entry` at the end of `section` (a '## ' heading) of docs/benchmarks.md, creating it if needed.

    Re-reads the file just before writing so concurrent appends to other sections survive.
    """
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    lines = text.rstrip("\n").split("\n")
    if section not in lines:
        lines += ["", section]
    start = lines.index(section) + 1
    heading = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    end = heading
    while end > start and not lines[end - 1].strip():
        end -= 1
    lines[end:heading] = ["", *entry.split("\n"), *([""] if heading < len(lines) else [])]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines) + "\n")


ML_SMALL = REPO.parent / "shared" / "data" / "ml-latest-small" / "UserBehavior.csv"


def ml_small_run(out: Path) -> Path:
    """Train the default model (holdout protocol, time feature, 1 epoch, seed 0) on ml-latest-small
    in Taobao format into `out`; exit with a message when ../shared/data is absent."""
    import sys

    from model.tbsm import TBSMConfig
    from model.train import TrainConfig
    from sdk_builder.data.dataset import prepare
    from sdk_builder.data.events import read_taobao_csv
    from sdk_builder.runs import train_run

    if not ML_SMALL.exists():
        sys.exit(f"{ML_SMALL} is absent: pass --run or provide ../shared/data")
    events, _ = read_taobao_csv(ML_SMALL)
    data = prepare(events, protocol="holdout", seed=0)
    train_run(data, out, TBSMConfig(**data.table_sizes()), TrainConfig(epochs=1, seed=0))
    return out


def one_thread_run(run: Path | None, prefix: str):
    """One thread everywhere (torch and the ExecuTorch pool), then (tmp dir, checkpoint, data) of `run`,
    or of a fresh ml-latest-small run in the tmp dir when `run` is None."""
    import tempfile

    import torch
    from executorch.extension.pybindings import portable_lib

    from sdk_builder.data.dataset import PreparedData
    from sdk_builder.runs import DATA, load_checkpoint

    torch.set_num_threads(1)
    portable_lib._unsafe_reset_threadpool(1)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    run = run or ml_small_run(tmp / "run")
    return tmp, load_checkpoint(run), PreparedData.load(Path(run) / DATA)


def add_data_set_options(parser, synthetic_users: int) -> None:
    """--only, --data, --synthetic-users: the data sets of the quality benchmarks (`data_sets`)."""
    parser.add_argument("--only", choices=["ml-small", "synthetic"])
    parser.add_argument("--data", type=Path, default=ML_SMALL, help="A Taobao-format CSV (default: ../shared's ml-latest-small).")
    parser.add_argument("--synthetic-users", type=int, default=synthetic_users)


def data_sets(args) -> list:
    """(name, loader) of each data set `args` asks for (`add_data_set_options`, plus `--seed`):
    ml-latest-small when its file exists (else said on stderr), and synthetic data."""
    import sys

    from sdk_builder.data.events import read_taobao_csv
    from sdk_builder.data.synthetic import generate_taobao_events

    sets = []
    if args.only in (None, "ml-small"):
        if args.data.is_file():
            sets.append(("ml-small", lambda: read_taobao_csv(args.data)[0]))
        else:
            print(f"{args.data}: not found; skipping ml-latest-small", file=sys.stderr)
    if args.only in (None, "synthetic"):
        sets.append((f"synthetic-{args.synthetic_users}", lambda: generate_taobao_events(args.synthetic_users, seed=args.seed)))
    return sets
