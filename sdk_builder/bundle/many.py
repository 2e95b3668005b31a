"""Bundles for many users (`tbsm-sdk build`): one template per checkpoint, users split over processes or a Ray cluster.

- Workers share the embedding tables: the checkpoint is memory-mapped (`torch.load(mmap=True)`),
  so N processes hold one page-cache copy of the tables instead of N private ones.
- Idempotent and resumable: each bundle is written atomically and carries a `build_key`; a rerun
  skips bundles whose key matches. `bundles.jsonl` (user, path, manifest sha256, checkpoint hash)
  is merged and rewritten atomically at the end of every run.
- Safety: the output must be writable and have room before anything is built; a checkpoint that
  changes while the build runs stops it.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sdk_builder.bundle.build import BuildResult, BundleBuilder
from sdk_builder.bundle.store import check_output, parse_user_id, write_index
from sdk_builder.data.dataset import PreparedData
from sdk_builder.formats import BundleError
from sdk_builder.recipes import DEFAULT_ACCURACY_BUDGET, DEFAULT_RECIPE
from sdk_builder.runs import DATA, load_checkpoint
from sdk_builder.shard import ShardPolicy
from sdk_builder.stamp import ProgramTemplate

CHUNK = 64
GUARD_USERS = 3


@dataclass(frozen=True)
class BuildSpec:
    """Everything a worker needs to rebuild the same builder (picklable, small)."""

    run: str
    out: str
    recipe: str = DEFAULT_RECIPE
    shard_size: int = 1000
    seed: int = 0
    category_capacity: int = 256
    durable: bool = False
    accuracy_budget: float = DEFAULT_ACCURACY_BUDGET  # lossy recipes only (sdk_builder/bundle/budget.py)
    on_budget_exceeded: str = "fail"  # lossy recipes only: "fail" or "fp32"
    allow_weak_model: bool = False  # build even when the model does not beat popularity on validation


@dataclass
class BatchSummary:
    requested: int
    built: int = 0
    skipped_current: int = 0
    unknown: list[int] = field(default_factory=list)
    seconds: float = 0.0
    bundles_per_second: float = 0.0
    guard_max_abs_diff: float = 0.0
    template_seconds: float = 0.0
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    index: str = ""
    jobs: int = 1
    backend: str = "local"
    rows: list[dict] = field(default_factory=list)


def make_builder(spec: BuildSpec, template: ProgramTemplate | None = None) -> BundleBuilder:
    ckpt = load_checkpoint(Path(spec.run), mmap=True)
    data = PreparedData.load(ckpt.path.parent / DATA)
    builder = BundleBuilder(ckpt, data, ShardPolicy(shard_size=spec.shard_size), recipe=spec.recipe, seed=spec.seed,
                            category_capacity=spec.category_capacity, durable=spec.durable,
                            accuracy_budget=spec.accuracy_budget, on_budget_exceeded=spec.on_budget_exceeded,
                            allow_weak_model=spec.allow_weak_model)
    builder.template = template
    return builder


def resolve_users(builder: BundleBuilder, requested: list[int]) -> tuple[list[int], list[int]]:
    """(known, unknown) user ids, in the requested order, duplicates removed."""
    ids = np.asarray(list(dict.fromkeys(requested)), dtype=np.int64)
    known_mask = builder.ckpt.users.lookup(ids, unknown=-1) >= 0
    return ids[known_mask].tolist(), ids[~known_mask].tolist()


class CheckpointWatch:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.stamp = self._stat()

    def _stat(self) -> tuple[int, int]:
        st = self.path.stat()
        return st.st_size, st.st_mtime_ns

    def check(self) -> None:
        if self._stat() != self.stamp:
            raise BundleError(f"{self.path} changed while bundles were being built; the bundles written so far "
                              "are from the previous checkpoint: rerun the build")


# -- workers -------------------------------------------------------------------------------------
_WORKER: BundleBuilder | None = None
_WORKER_SPEC: BuildSpec | None = None


def _init_worker(spec: BuildSpec, template: ProgramTemplate) -> None:
    global _WORKER, _WORKER_SPEC
    _WORKER, _WORKER_SPEC = make_builder(spec, template), spec


def _ray_build_chunk(chunk: list[int], spec: BuildSpec, template: ProgramTemplate) -> list[dict]:
    """A Ray task; the builder is made once per worker process and reused by its later tasks."""
    if _WORKER_SPEC != spec:
        _init_worker(spec, template)
    return _build_chunk(chunk, spec.out)


def _build_chunk(users: list[int], out: str) -> list[dict]:
    return [_result_row(r, Path(out)) for r in _WORKER.build_many(users, Path(out), skip_current=True)]


def _result_row(r: BuildResult, out: Path) -> dict:
    return {"user_id": r.user_id, "path": str(r.path.relative_to(out)), "manifest_sha256": r.manifest_sha256,
            "bytes": r.bytes_total, "skipped": r.skipped,
            "max_golden_diff": None if np.isnan(r.max_golden_diff) else r.max_golden_diff,
            **({"recipe": r.recipe, "note": r.note} if r.note else {})}  # int8 builds: drift vs budget, fallback


def _chunks(users: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(users), size):
        yield users[i : i + size]


def build_many(spec: BuildSpec, users: list[int], *, jobs: int = 1, backend: str = "local",
               ray_address: str | None = None, skip_unknown: bool = False,
               progress: Callable[[int], None] = lambda n: None) -> BatchSummary:
    started = time.perf_counter()
    out = Path(spec.out)
    builder = make_builder(spec)
    known, unknown = resolve_users(builder, users)
    summary = BatchSummary(requested=len(users), unknown=unknown, jobs=jobs, backend=backend)
    if unknown and not skip_unknown:
        shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
        raise BundleError(f"{len(unknown)} unknown user id(s): {shown} (pass --skip-unknown to build the others)")
    check_output(out, len(known), 200_000)
    watch = CheckpointWatch(builder.ckpt.path)

    if len(known) > GUARD_USERS:
        t0 = time.perf_counter()
        summary.guard_max_abs_diff = builder.prepare_stamping(GUARD_USERS)
        summary.template_seconds = time.perf_counter() - t0
    else:
        # A full export per user is cheaper than a template plus its guard exports.
        builder.stamping = False
    watch.check()

    rows: list[dict] = []
    if backend == "ray":
        rows = _run_ray(spec, builder.template, known, jobs, ray_address, watch, progress)
    elif jobs <= 1:
        for chunk in _chunks(known, CHUNK):
            rows.extend(_result_row(r, out) for r in builder.build_many(chunk, out, skip_current=True))
            watch.check()
            progress(len(chunk))
    else:
        import multiprocessing as mp

        # spawn, not fork: a fork after torch's and ExecuTorch's thread pools started deadlocks.
        # Each worker maps the same checkpoint file, so the tables are in memory once.
        ctx = mp.get_context("spawn")
        with ctx.Pool(jobs, initializer=_init_worker, initargs=(spec, builder.template)) as pool:
            for chunk_rows in pool.imap(_chunked_call, [(c, spec.out) for c in _chunks(known, CHUNK)]):
                rows.extend(chunk_rows)
                watch.check()
                progress(len(chunk_rows))

    summary.rows = [{**r, "path": str(out / r["path"])} for r in rows]
    summary.built = sum(not r["skipped"] for r in rows)
    summary.skipped_current = sum(r["skipped"] for r in rows)
    summary.index = str(write_index(out, rows, builder.ckpt.sha256))
    summary.seconds = time.perf_counter() - started
    built_seconds = summary.seconds - summary.template_seconds
    summary.bundles_per_second = len(rows) / built_seconds if built_seconds > 0 else 0.0
    summary.peak_rss_mb = {
        "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    return summary


def _chunked_call(args: tuple[list[int], str]) -> list[dict]:
    return _build_chunk(*args)


def _run_ray(spec: BuildSpec, template: ProgramTemplate, users: list[int], jobs: int, address: str | None,
             watch: CheckpointWatch, progress: Callable[[int], None]) -> list[dict]:
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(jobs, 1), include_dashboard=False, log_to_driver=False)
    template_ref = ray.put(template)  # shipped once, shared by every task through the object store

    build_chunk = ray.remote(_ray_build_chunk)
    pending = [build_chunk.remote(c, spec, template_ref) for c in _chunks(users, CHUNK)]
    rows: list[dict] = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        chunk_rows = ray.get(done[0])
        rows.extend(chunk_rows)
        watch.check()
        progress(len(chunk_rows))
    return rows


def all_user_ids(run: Path) -> list[int]:
    return [int(u) for u in load_checkpoint(run, mmap=True).users.ids]


def read_user_file(path: Path) -> list[int]:
    """One user id per line; blank lines and # comments are skipped. Errors are one line: file:line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({exc.strerror or exc})") from None
    ids = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BundleError(f"{path}:{lineno}: not UTF-8 text (a binary file?)") from None
        if not text or text.startswith("#"):
            continue
        try:
            ids.append(parse_user_id(text))
        except BundleError:
            raise BundleError(f"{path}:{lineno}: {text[:40]!r} is not a non-negative 64-bit integer user id") from None
    return ids


__all__ = ["BuildSpec", "BatchSummary", "build_many", "read_user_file", "all_user_ids"]
