"""Bundle numbers: parity, latency, size, shard coverage and build time.

Trains a model on ml-latest-small (holdout protocol, time feature, 1 epoch) unless --run is given,
builds bundles for --users users and measures, all in one run:
- parity: `.pte` in the ExecuTorch runtime vs the eager full model over >= 1000 real histories
  (sliding windows of each user's events, plus short, empty and all-OOV ones);
- latency: one thread, history of 20, 1 / 100 / 1000 candidates, runtime vs eager in the same run;
- size: model.pte and whole bundle for a 1000-item shard;
- coverage: leave-last-10-out, our shard policy vs the 1000 globally most popular items;
- build time of one bundle from the checkpoint.
Prints a markdown table and appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import one_thread_run  # noqa: E402
from benchmarks.report import append_report  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    for _ in range(max(5, repeats // 10)):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples) * 1e6), float(np.percentile(samples, 99) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="A trained run directory (default: train on ml-latest-small).")
    parser.add_argument("--users", type=int, default=10, help="Bundles to build for the parity check.")
    parser.add_argument("--histories-per-user", type=int, default=100)
    parser.add_argument("--recipe", default="xnnpack")
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args()
    tmp, ckpt, data = one_thread_run(args.run, "tbsm-bundle-bench-")

    from sdk_builder.bundle.build import BundleBuilder
    from sdk_builder.client import Bundle, encode
    from sdk_builder.formats import Event, EventHistory
    from sdk_builder.shard import ShardPolicy, coverage
    builder = BundleBuilder(ckpt, data, ShardPolicy(), recipe=args.recipe, allow_weak_model=True)
    rng = np.random.default_rng(0)
    users = rng.choice(ckpt.users.ids, min(args.users, len(ckpt.users.ids)), replace=False)

    # Build time: one bundle the way `tbsm-sdk build --user-shard ID` does it (a full export),
    # and the per-bundle time once a template exists (what batch builds pay).
    single = BundleBuilder(ckpt, data, ShardPolicy(), recipe=args.recipe, stamping=False, allow_weak_model=True)
    t0 = time.perf_counter()
    single.build(int(users[0]), tmp / "single")
    single_seconds = time.perf_counter() - t0
    build_seconds, results = [], []
    for u in users:
        r = builder.build(int(u), tmp / "bundles")
        build_seconds.append(r.seconds)
        results.append(r)

    # Parity over real histories.
    worst, n_hist, kinds = 0.0, 0, {"window": 0, "short": 0, "empty": 0, "all_oov": 0}
    names = {1: "pv", 2: "buy", 3: "cart", 4: "fav"}
    for r in results:
        bundle = Bundle(r.path)
        shard, _ = builder.shard_for(builder.user_row(r.user_id))
        sl = data.user_events(builder.user_row(r.user_id))
        item_ids = ckpt.items.global_id(data.item_rows[sl])
        cat_ids = ckpt.categories.global_id(data.cat_rows[sl])
        stamps, behaviors = data.timestamps[sl], data.behaviors[sl]
        shard_ids = np.asarray(bundle.manifest.items.ids)
        for k in range(args.histories_per_user):
            kind = ("empty", "all_oov", "short")[k] if k < 3 else "window"
            end = int(rng.integers(1, len(item_ids) + 1))
            start = {"empty": end, "short": max(0, end - 3)}.get(kind, max(0, end - 20))
            events = [Event(item_id=int(item_ids[i]) if kind != "all_oov" else 10**12 + i, category_id=int(cat_ids[i]),
                            behavior=names[int(behaviors[i])], timestamp=int(stamps[i])) for i in range(start, end)]
            history = EventHistory(user_id=r.user_id, events=events)
            candidates = [int(x) for x in rng.choice(shard_ids, 50)] + [10**12 + 7]
            request_time = int(stamps[end - 1]) + 60
            got = bundle.score(history, request_time, candidates)
            want = builder.eager_scores(shard, history, request_time, candidates)
            worst = max(worst, float(np.abs(got - want).max()))
            n_hist += 1
            kinds[kind] += 1

    # Latency of one bundle: runtime vs eager full model vs eager sliced program, same requests.
    r0 = results[0]
    bundle = Bundle(r0.path)
    shard, _ = builder.shard_for(builder.user_row(r0.user_id))
    sl = data.user_events(builder.user_row(r0.user_id))
    events = [Event(item_id=int(i), category_id=int(c), behavior="pv", timestamp=int(t)) for i, c, t in
              zip(ckpt.items.global_id(data.item_rows[sl][-20:]), ckpt.categories.global_id(data.cat_rows[sl][-20:]),
                  data.timestamps[sl][-20:])]
    history = EventHistory(user_id=r0.user_id, events=events)
    request_time = events[-1].timestamp + 60
    from sdk_builder.program import UserProgram

    sliced = UserProgram.for_shard(builder.model, shard, ckpt.item_category).eval()
    latency = {}
    for n in (1, 100, 1000):
        candidates = [int(x) for x in rng.choice(bundle.manifest.items.ids, n)]
        request = encode(bundle.manifest, history, request_time, candidates)
        tensors = request.tensors()
        runtime = timed(lambda: bundle.method.execute(tensors), args.repeats)
        with torch.no_grad():
            eager_sliced = timed(lambda: sliced(*tensors), args.repeats)
            eager_full = timed(lambda: builder.eager_scores(shard, history, request_time, candidates), max(50, args.repeats // 5))
        latency[n] = (runtime, eager_sliced, eager_full)

    cov = coverage(data, ShardPolicy())

    rows = [
        ("parity: max abs diff, runtime vs eager full model", f"{worst:.2e} over {n_hist} histories "
         f"({kinds['window']} windows, {kinds['short']} short, {kinds['empty']} empty, {kinds['all_oov']} all-OOV) of {len(results)} users",
         "<= 1e-5", worst <= 1e-5),
    ]
    for n, (rt, es, ef) in latency.items():
        target = {1: 30.0, 1000: 150.0}.get(n)
        rows.append((f"latency {n} candidates, median / p99 (us)",
                     f"runtime {rt[0]:.0f} / {rt[1]:.0f}; eager sliced {es[0]:.0f} / {es[1]:.0f}; eager full model {ef[0]:.0f} / {ef[1]:.0f}",
                     f"<= {target:.0f} us median" if target else "-", None if target is None else rt[0] <= target))
    sizes = [(r.bytes_program, r.bytes_total) for r in results]
    pte, total = max(s[0] for s in sizes), max(s[1] for s in sizes)
    rows.append(("bundle size, 1000-item shard (largest of the users)", f"model.pte {pte:,} B, total {total:,} B", "<= 160,000 B", total <= 160_000))
    rows.append(("shard coverage, leave-last-10-out", f"ours {cov['policy_coverage']:.3f} vs 1000 most popular {cov['popular_coverage']:.3f} "
                 f"= {cov['ratio']:.2f}x ({cov['held_out_events']} events, {cov['users']} users)", ">= 1.3x", cov["ratio"] >= 1.3))
    rows.append(("build time of one bundle from the checkpoint (s)", f"{single_seconds:.1f} with a full export (recipe {args.recipe}); "
                 f"{np.median(build_seconds) * 1e3:.1f} ms median per bundle once the program template exists", "-", None))

    table = ["| measure | value | target | met |", "|---|---|---|---|"]
    for name, value, target, met in rows:
        table.append(f"| {name} | {value} | {target} | {'-' if met is None else ('yes' if met else 'NO')} |")
    text = "\n".join(table)
    print(text)
    append_report("Bundles (issue 3)", f"data: {'ml-latest-small' if args.run is None else args.run}, recipe {args.recipe}, 1 thread", text)


if __name__ == "__main__":
    main()
