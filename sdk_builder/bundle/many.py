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

import dataclasses

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sdk_builder.bundle.build import BuildResult, BundleBuilder
from sdk_builder.bundle.golden import GOLDEN_TOLERANCE
from sdk_builder.bundle.store import check_output, parse_user_id, unknown_users_message, user_ids_path, write_index
from sdk_builder.data.dataset import PreparedData
from sdk_builder.formats import BUILD_CACHE, BundleError
from sdk_builder.recipes import DEFAULT_ACCURACY_BUDGET, DEFAULT_RECIPE
from sdk_builder.runs import DATA, load_checkpoint
from sdk_builder.shard import DEFAULT_SLACK, ShardPolicy
from sdk_builder.program import SliceLayout
from sdk_builder.stamp import ProgramTemplate, StampingError, check_sentinels
from sdk_builder.util import atomic_write_bytes, sha256_bytes

CHUNK = 64
GUARD_USERS = 3
# Under the run directory: exported templates (one per checkpoint, recipe, layout, code and
# versions) and the user id map `tbsm-sdk build` checks requested ids against before importing torch.
# Files whose code shapes a template's bytes: a change in any of them makes a cached template stale.
_TEMPLATE_CODE = ("model/tbsm.py", "sdk_builder/program.py", "sdk_builder/stamp.py", "sdk_builder/recipes/__init__.py",
                  "sdk_builder/recipes/base.py", "sdk_builder/recipes/fp32.py", "sdk_builder/recipes/int8.py",
                  "sdk_builder/recipes/fp16.py", "sdk_builder/recipes/fp16_weights.py")


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
    events: tuple[str, ...] = ()  # newer event logs: shards and golden histories include them (`extend_events`)
    refresh: bool = False  # add the on-device refresh program (sdk_builder/refresh.py, default RefreshConfig)
    # The users' previous bundles (`--delta-from` one bundle, `--delta-from-dir` an earlier --out):
    # their items compete for the new shard as if ranked (1 + shard_slack) times higher (sdk_builder/shard.py).
    delta_from: str = ""
    delta_from_dir: str = ""
    shard_slack: float = DEFAULT_SLACK


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
    template_cache: str = ""  # "hit": the run's cached template (replayed against eager first), "written", or ""
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    index: str = ""
    jobs: int = 1
    backend: str = "local"
    rows: list[dict] = field(default_factory=list)
    newer_events: dict[str, int] = field(default_factory=dict)  # `extend_events`' counts, with BuildSpec.events


def make_builder(spec: BuildSpec, template: ProgramTemplate | None = None,
                 refresh_template: ProgramTemplate | None = None) -> BundleBuilder:
    from sdk_builder.bundle.delta import PreviousBundles
    from sdk_builder.refresh import RefreshConfig

    ckpt = load_checkpoint(Path(spec.run), mmap=True)
    data = PreparedData.load(ckpt.path.parent / DATA)
    if spec.events:
        data = with_newer_events(data, spec.events)[0]
    builder = BundleBuilder(ckpt, data, ShardPolicy(shard_size=spec.shard_size), recipe=spec.recipe, seed=spec.seed,
                            category_capacity=spec.category_capacity, durable=spec.durable,
                            accuracy_budget=spec.accuracy_budget, on_budget_exceeded=spec.on_budget_exceeded,
                            allow_weak_model=spec.allow_weak_model, refresh=RefreshConfig() if spec.refresh else None,
                            previous=PreviousBundles(Path(spec.delta_from) if spec.delta_from else None,
                                                     Path(spec.delta_from_dir) if spec.delta_from_dir else None)
                            if spec.delta_from or spec.delta_from_dir else None, shard_slack=spec.shard_slack)
    builder.template, builder.refresh_template = template, refresh_template
    return builder


def with_newer_events(data: PreparedData, paths: tuple[str, ...]) -> tuple[PreparedData, dict[str, int]]:
    """`data` extended with the events of newer logs (any format `prepare` reads); BundleError on bad input."""
    from sdk_builder.data.dataset import extend_events
    from sdk_builder.data.events import IngestError, read_event_log

    try:
        events, _ = read_event_log(list(paths))
    except (IngestError, ValueError) as exc:
        raise BundleError(str(exc)) from None
    return extend_events(data, events)


def template_key(builder: BundleBuilder) -> str:
    """Everything a template's bytes depend on: checkpoint, recipe, layout, versions and the code."""
    root = Path(__file__).resolve().parents[2]
    code = {name: sha256_bytes((root / name).read_bytes()) for name in _TEMPLATE_CODE if (root / name).exists()}
    material = {"checkpoint": builder.ckpt.sha256, "recipe": builder.recipe, "versions": builder.versions,
                "layout": list(dataclasses.astuple(builder.layout)), "code": code}
    return sha256_bytes(json.dumps(material, sort_keys=True).encode())


def save_template(run_dir: Path, key: str, template: ProgramTemplate) -> None:
    """The program, then its description naming the program's hash: a reader that finds both
    consistent has a whole template (each file is written atomically)."""
    cache = run_dir / BUILD_CACHE
    cache.mkdir(exist_ok=True)
    atomic_write_bytes(cache / f"template-{key}.pte", template.program)
    meta = {"key": key, "program_sha256": sha256_bytes(template.program), "offsets": template.offsets,
            "shapes": template.shapes, "dtypes": template.dtypes, "recipe": template.recipe,
            "layout": list(dataclasses.astuple(template.layout))}
    atomic_write_bytes(cache / f"template-{key}.json", json.dumps(meta, sort_keys=True).encode())


def load_template(run_dir: Path, key: str) -> ProgramTemplate | None:
    """The cached template of `key`, or None when absent, partial or inconsistent (it is then rebuilt)."""
    cache = run_dir / BUILD_CACHE
    try:
        meta = json.loads((cache / f"template-{key}.json").read_text())
        program = (cache / f"template-{key}.pte").read_bytes()
        if meta["key"] != key or meta["program_sha256"] != sha256_bytes(program):
            return None
        shapes = {name: tuple(int(d) for d in shape) for name, shape in meta["shapes"].items()}
        offsets = {name: int(offset) for name, offset in meta["offsets"].items()}
        if set(offsets) != set(shapes) or any(not 0 <= o < len(program) for o in offsets.values()):
            return None
        return ProgramTemplate(program, offsets, shapes, dict(meta["dtypes"]), SliceLayout(*meta["layout"]),
                               str(meta["recipe"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_user_ids(builder: BundleBuilder) -> None:
    path = user_ids_path(builder.ckpt.path)
    if path.exists():
        return
    import io

    path.parent.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(builder.ckpt.users.ids, dtype=np.int64), allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


def template_replays(builder: BundleBuilder, template: ProgramTemplate, user_id: int) -> bool:
    """A cached template must hold its sentinel pattern where it says (exact), and stamped for
    `user_id` replay that user's golden cases like the eager model: a stale or damaged cache is
    caught here (and every bundle is replayed again when built)."""
    from sdk_builder.bundle.golden import replay_encoded
    from sdk_builder.formats import GoldenSet
    from sdk_builder.runtime import load_runtime_method

    shard, _ = builder.shard_for(builder.user_row(user_id))
    [(_, cases, requests)] = builder.scored_golden([(user_id, shard)])
    try:
        constants = builder.constants_for(shard)
        check_sentinels(template, constants)
        method = load_runtime_method(template.stamp(constants))
        worst = replay_encoded(GoldenSet.model_construct(tolerance=GOLDEN_TOLERANCE, cases=cases), requests, method)
    except (StampingError, RuntimeError, ValueError):
        return False
    return worst <= GOLDEN_TOLERANCE


def prepare_template(builder: BundleBuilder, known: list[int], summary: BatchSummary) -> None:
    """The run's cached template when it replays, else a fresh export checked by the guard (and cached)."""
    t0 = time.perf_counter()
    run_dir = builder.ckpt.path.parent
    key = template_key(builder)
    cached = load_template(run_dir, key)
    if cached is not None and template_replays(builder, cached, known[0]):
        builder.template, summary.template_cache = cached, "hit"
    else:
        summary.guard_max_abs_diff = builder.prepare_stamping(min(GUARD_USERS, len(known)))
        try:
            save_template(run_dir, key, builder.template)
            summary.template_cache = "written"
        except OSError:  # a read-only run directory: the build goes on, the next one exports again
            summary.template_cache = ""
    summary.template_seconds = time.perf_counter() - t0


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


def _init_worker(spec: BuildSpec, template: ProgramTemplate, refresh_template: ProgramTemplate | None = None) -> None:
    global _WORKER, _WORKER_SPEC
    _WORKER, _WORKER_SPEC = make_builder(spec, template, refresh_template), spec


def _ray_build_chunk(chunk: list[int], spec: BuildSpec, template: ProgramTemplate,
                     refresh_template: ProgramTemplate | None = None) -> list[dict]:
    """A Ray task; the builder is made once per worker process and reused by its later tasks."""
    if _WORKER_SPEC != spec:
        _init_worker(spec, template, refresh_template)
    return _build_chunk(chunk, spec.out)


def _build_chunk(users: list[int], out: str) -> list[dict]:
    return [_result_row(r, Path(out)) for r in _WORKER.build_many(users, Path(out), skip_current=True)]


def _result_row(r: BuildResult, out: Path) -> dict:
    return {"user_id": r.user_id, **({"kind": "cold_start"} if r.user_id is None else {}), "path": str(r.path.relative_to(out)), "manifest_sha256": r.manifest_sha256,
            "bytes": r.bytes_total, "skipped": r.skipped,
            "max_golden_diff": None if np.isnan(r.max_golden_diff) else r.max_golden_diff,
            **({"recipe": r.recipe, "note": r.note} if r.note else {})}  # int8 builds: drift vs budget, fallback


def _chunks(users: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(users), size):
        yield users[i : i + size]


def build_many(spec: BuildSpec, users: list[int], *, jobs: int = 1, backend: str = "local",
               ray_address: str | None = None, skip_unknown: bool = False, new_user: bool = False,
               population: str = "mean", progress: Callable[[int], None] = lambda n: None) -> BatchSummary:
    """Bundles of the known `users`, and with `new_user` the cold-start bundle (OUT/cold_start)
    with the `population` user vector (sdk_builder/bundle/coldstart.py)."""
    started = time.perf_counter()
    out = Path(spec.out)
    builder = make_builder(spec)
    known, unknown = resolve_users(builder, users)
    try:
        save_user_ids(builder)
    except OSError:  # read-only run directory: unknown ids are then found after the imports, as here
        pass
    summary = BatchSummary(requested=len(users), unknown=unknown, jobs=jobs, backend=backend,
                           newer_events=dict(builder.data.info.get("extended_with", {})))
    if unknown and not skip_unknown:
        raise BundleError(unknown_users_message(unknown))
    check_output(out, len(known) + new_user, 200_000)
    watch = CheckpointWatch(builder.ckpt.path)

    if known or new_user:
        prepare_template(builder, known or [int(builder.ckpt.users.ids[0])], summary)
        if builder.refresh is not None:  # exported per build (not cached yet), before any worker starts
            started_refresh = time.perf_counter()
            builder.prepare_refresh()
            summary.template_seconds += time.perf_counter() - started_refresh
    watch.check()

    rows: list[dict] = []
    if new_user:
        from sdk_builder.bundle.coldstart import build_cold_start

        rows.append(_result_row(build_cold_start(builder, out, population=population, skip_current=True), out))
        progress(1)
    if backend == "ray":
        rows = _run_ray(spec, builder.template, known, jobs, ray_address, watch, progress, builder.refresh_template)
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
        with ctx.Pool(jobs, initializer=_init_worker, initargs=(spec, builder.template, builder.refresh_template)) as pool:
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
             watch: CheckpointWatch, progress: Callable[[int], None],
             refresh_template: ProgramTemplate | None = None) -> list[dict]:
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=max(jobs, 1), include_dashboard=False, log_to_driver=False)
    template_ref = ray.put(template)  # shipped once, shared by every task through the object store

    build_chunk = ray.remote(_ray_build_chunk)
    refresh_ref = ray.put(refresh_template)
    pending = [build_chunk.remote(c, spec, template_ref, refresh_ref) for c in _chunks(users, CHUNK)]
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
