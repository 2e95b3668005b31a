"""`tbsm-sdk`: prepare data, train, evaluate, build per-user ExecuTorch bundles, verify, rank."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path

import click

from sdk_builder.formats import BUNDLE_FILES, INT64_MAX, parse_int64_text
from sdk_builder.recipes import DEFAULT_ACCURACY_BUDGET, DEFAULT_RECIPE, ON_BUDGET_EXCEEDED, RECIPE_NAMES, get_recipe

DEFAULT_SEED = 0


def _quiet_third_party() -> None:
    """Silence third-party messages we understand and a user cannot act on; our own warnings
    (and any other library's) still show.
    - torch deprecated `isinstance(treespec, LeafSpec)`; ExecuTorch's exporter still pickles
      treespecs that way (copyreg.py), once per exported graph: ~9-18 FutureWarnings per build.
    - torchao, imported by the exporter, tries its CUDA-only kernels (_C_mxfp8, _C_cutlass_90a)
      and logs "Failed to load ... .so" on a machine without CUDA: nothing is missing for us.
    - torchao registers an Enum with torch's pytree, which torch logs as deprecated (W... _pytree.py).
    The XNNPACK cpuinfo lines are C++ writes to fd 2, handled where programs load (sdk_builder/runtime.py)."""
    leaf_spec = "`isinstance(treespec, LeafSpec)` is deprecated"
    warnings.filterwarnings("ignore", message=re.escape(leaf_spec), category=FutureWarning)
    # `build --jobs N` workers are spawned: they read warning filters from the environment, where
    # the message is a prefix without commas (the variable is split on them).
    inherited = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [inherited, "ignore:`isinstance(treespec:FutureWarning"]))
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def _int64(text: str, what: str) -> int:
    """A non-negative decimal integer that fits the program's int64 inputs."""
    value = parse_int64_text(text.strip())
    if value is None:
        _fail(f"{what}: {text.strip()[:40]!r} is not an integer in 0..{INT64_MAX}")
    return value


def _json_safe(value):
    """NaN/inf are not JSON: report them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _emit(as_json: bool, payload: dict, human: str) -> None:
    click.echo(json.dumps(_json_safe(payload), indent=1, default=float) if as_json else human)


def _fail(message: str) -> None:
    raise click.ClickException(message.splitlines()[0] if message else "failed")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _load_events(inputs: tuple[str, ...], fmt: str, columns: str | None, strict: bool, time_range: str | None,
                 tz: str, synthetic_users: int, seed: int, quiet: bool):
    from sdk_builder.data.events import ColumnMapping, IngestError, parse_time_range, read_event_log
    from sdk_builder.data.synthetic import generate_taobao_events

    if not inputs:
        if not quiet:
            click.echo(f"no input given: generating synthetic Taobao-format data for {synthetic_users:,} users (seed {seed})", err=True)
        return generate_taobao_events(synthetic_users, seed=seed), None
    try:
        mapping = ColumnMapping.parse(columns) if columns else None
        window = parse_time_range(time_range, tz) if time_range else None
        events, report = read_event_log(list(inputs), fmt=fmt, columns=mapping, strict=strict, time_range=window)
    except (IngestError, ValueError) as exc:
        _fail(str(exc))
    if not quiet:
        click.echo(report.summary(), err=True)
    return events, report


def data_options(f):
    options = [
        click.argument("inputs", nargs=-1, type=click.Path(dir_okay=False)),
        click.option("--format", "fmt", type=click.Choice(["auto", "taobao", "csv", "parquet"]), default="auto",
                     show_default=True, help="Input format; auto detects Parquet and CSV with a header."),
        click.option("--columns", help="Column mapping for generic logs, e.g. user=uid,item=iid,category=cat,behavior=,timestamp=ts"),
        click.option("--strict", is_flag=True, help="Stop at the first bad row (file:line:field) instead of counting it."),
        click.option("--time-range", help="Keep events in [START, END): dates 2017-11-25:2017-12-04 (midnight in --tz) "
                                          "or Unix seconds 1511568000:1512345600."),
        click.option("--tz", default="UTC", show_default=True,
                     help="IANA time zone of --time-range dates, e.g. Asia/Shanghai (Taobao's own days are UTC+8)."),
        click.option("--protocol", type=click.Choice(["holdout", "reference"]), default="holdout", show_default=True,
                     help="holdout: per-user leave-last-out; reference: TBSM's 70th-percentile user split."),
        click.option("--samples-per-user", type=int, help="Training positives per user (holdout 20, reference 10)."),
        click.option("--synthetic-users", type=int, default=2000, show_default=True,
                     help="With no INPUTS: users of the built-in synthetic Taobao-format data."),
        click.option("--holdout-last", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Hold each user's last K events out of everything (for `evaluate --on-device`)."),
        click.option("--negatives", type=click.Choice(["uniform", "popularity"]), default="uniform", show_default=True,
                     help="Training negatives: uniform (the reference's) or half popularity-proportional with the "
                          "logQ correction (closer to a shard's items; see docs/quality.md)."),
        click.option("--negatives-per-positive", type=click.IntRange(min=1), default=2, show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _prepare(inputs, fmt, columns, strict, time_range, tz, protocol, samples_per_user, synthetic_users, holdout_last,
             negatives, negatives_per_positive, seed, quiet):
    from sdk_builder.data.dataset import NegativeSampler, prepare

    events, report = _load_events(inputs, fmt, columns, strict, time_range, tz, synthetic_users, seed, quiet)
    try:
        data = prepare(events, protocol=protocol, seed=seed, samples_per_user=samples_per_user, holdout_last=holdout_last,
                       sampler=NegativeSampler(negatives, negatives_per_positive))
    except ValueError as exc:
        _fail(str(exc))
    data.info["source"] = list(inputs) or f"synthetic:{synthetic_users}"
    if report is not None:
        data.info["ingest"] = report.model_dump()
    return data


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tbsm-sdk")
def main() -> None:
    """Train TBSM, cut per-user slices and ship them as ExecuTorch bundles.

    \b
    Example, end to end on built-in synthetic data:
      tbsm-sdk train --out runs/demo
      tbsm-sdk build runs/demo --user-shard 0 --out bundles
      tbsm-sdk verify bundles/<user>
    """
    _quiet_third_party()


@main.command("prepare")
@data_options
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Prepared dataset (.npz).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def prepare_cmd(inputs, fmt, columns, strict, time_range, tz, protocol, samples_per_user, synthetic_users, holdout_last,
                negatives, negatives_per_positive, seed, out, as_json):
    """Read event logs, remap ids and build train/validation/test samples.

    \b
    Example:
      tbsm-sdk prepare ../shared/data/ml-latest-small/UserBehavior.csv --protocol reference --out ml.npz
    """
    data = _prepare(inputs, fmt, columns, strict, time_range, tz, protocol, samples_per_user, synthetic_users, holdout_last,
                    negatives, negatives_per_positive, seed, as_json)
    try:
        data.save(Path(out))
    except OSError as exc:
        _fail(f"{out}: cannot write ({exc.strerror or exc})")
    _emit(as_json, {"out": out, **data.info}, f"wrote {out}: " + ", ".join(f"{k} {v:,}" for k, v in data.info["split_sizes"].items()) + " samples")


@main.command("train")
@data_options
@click.option("--data", "prepared", type=click.Path(exists=True, dir_okay=False), help="A dataset from `tbsm-sdk prepare` (instead of INPUTS).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory.")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=0.2, show_default=True,
              help="Adagrad learning rate (the reference's is 0.05; with --init normal 0.2 learns more in one epoch).")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True)
@click.option("--eval-every", type=int, default=0, help="Validate every N steps (default: about 10 times per run, and at every epoch end).")
@click.option("--model-type", type=click.Choice(["tsl", "mha", "rnn"]), default="tsl", show_default=True)
@click.option("--tsl-inner", type=click.Choice(["def", "ind", "dot"]), default="def", show_default=True)
@click.option("--tsl-mechanism", type=click.Choice(["mlp", "mul"]), default="mlp", show_default=True)
@click.option("--tsl-num-heads", type=int, default=1, show_default=True)
@click.option("--tsl-seq", is_flag=True, help="Head j of k sees only the last round(20 j / k) events.")
@click.option("--dense-feature", type=click.Choice(["time", "position"]), default="time", show_default=True,
              help="time: log-scaled age of each event at request time; position: the reference's t/21.")
@click.option("--use-behavior", is_flag=True, help="Embed the behaviour (pv/buy/cart/fav) of history events.")
@click.option("--init", type=click.Choice(["normal", "reference"]), default="normal", show_default=True,
              help="normal: item/category rows N(0, 0.01), zero user rows and MLP biases; reference: the "
                   "reference's uniform +-sqrt(1/rows) and random biases (stalls some seeds).")
@click.option("--select-by", type=click.Choice(["val_hr10", "val_auc"]), default="val_hr10", show_default=True,
              help="Best checkpoint by the on-device-style validation ranking (HR@10 of each user's shard) or by AUC.")
@click.option("--threads", type=int, help="torch intra-op threads.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Training processes sharing the model (Hogwild, one thread each): 2 train 1.8x the samples/s "
                   "of one on 2 cores, at a small cost in model quality (docs/benchmarks.md), and not "
                   "bit-reproducibly. The first 100 steps and all validation run in one process.")
@click.option("--user-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Fraction of training samples on an extra 'unknown user' row (build --new-user --population unknown).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--force", is_flag=True, help="Overwrite an existing checkpoint in --out.")
@click.option("--json", "as_json", is_flag=True)
def train_cmd(inputs, fmt, columns, strict, time_range, tz, protocol, samples_per_user, synthetic_users, holdout_last,
              negatives, negatives_per_positive, prepared, out, epochs, batch_size, lr, seed, eval_every, model_type,
              tsl_inner, tsl_mechanism, tsl_num_heads, tsl_seq, dense_feature, use_behavior, init, select_by,
              threads, resume, force, as_json, user_dropout=0.0, workers=1):
    """Train TBSM (Adagrad, best-validation-AUC checkpoint) into a run directory.

    \b
    Examples:
      tbsm-sdk train --out runs/synthetic                       # built-in synthetic data
      tbsm-sdk train ../shared/data/ml-latest-small/UserBehavior.csv --protocol reference \\
          --dense-feature position --out runs/ml --seed 1
      tbsm-sdk train --data ml.npz --out runs/ml --epochs 3 --resume
    """
    from tqdm import tqdm

    from model.tbsm import TBSMConfig
    from model.train import TrainConfig
    from sdk_builder.data.dataset import DatasetError, PreparedData
    from sdk_builder.runs import RunError, train_run

    _set_threads(threads)
    if prepared:
        try:
            data = PreparedData.load(Path(prepared))
        except DatasetError as exc:
            _fail(str(exc))
    else:
        data = _prepare(inputs, fmt, columns, strict, time_range, tz, protocol, samples_per_user, synthetic_users, holdout_last,
                        negatives, negatives_per_positive, seed, as_json)
    try:
        model_cfg = TBSMConfig(**data.table_sizes(), history=data.info.get("history", 20), model_type=model_type,
                               tsl_inner=tsl_inner, tsl_mechanism=tsl_mechanism, tsl_num_heads=tsl_num_heads,
                               tsl_seq=tsl_seq, dense_feature=dense_feature, use_behavior=use_behavior,
                               init=init)
    except ValueError as exc:
        _fail(str(exc))
    train_cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, eval_every=eval_every, select_by=select_by,
                            user_dropout=user_dropout, workers=workers)
    bar = tqdm(total=0, unit="step", disable=as_json or not sys.stderr.isatty(), desc="train", leave=False)

    def progress(step: int, loss: float) -> None:
        bar.update(step - bar.n)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.4f}")

    def set_total(total: int) -> None:
        bar.total = total
        bar.refresh()

    try:
        metrics = train_run(data, Path(out), model_cfg, train_cfg, resume=resume, force=force, progress=progress,
                            steps_callback=set_total)
    except RunError as exc:
        _fail(str(exc))
    finally:
        bar.close()
    test = metrics["test"] or {}
    human = (f"trained {metrics['history'][-1]['step'] if metrics['history'] else 0} steps at "
             f"{metrics['samples_per_second']:,.0f} samples/s; best validation AUC {metrics['best_validation_auc']:.4f} "
             f"(step {metrics['best_step']}); test AUC {test.get('auc', float('nan')):.4f} on {test.get('points', 0):,} points\n"
             f"checkpoint: {Path(out) / 'checkpoint.pt'}; curve: {Path(out) / 'training_curve.png'}")
    ranking = metrics["ranking_validation"]
    if ranking:
        human += (f"\non-device-style validation (shard ranking, {ranking['users']:,} users): HR@10 {ranking['blended']:.4f} "
                  f"(model alone {ranking['model_alone']:.4f}, policy order {ranking['policy_order']:.4f}, prior weight "
                  f"{ranking['blend_weight']:g}) vs popularity {ranking['popularity']:.4f}")
    for warning in metrics["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    _emit(as_json, {k: v for k, v in metrics.items() if k != "history"}, human)


@main.command("evaluate")
@click.argument("run", type=click.Path(exists=True))
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "validation", "train"]))
@click.option("--on-device", is_flag=True,
              help="Rank each test user's shard with the user's real bundle in ExecuTorch, against popularity, the "
                   "shard's own order and the full model; targets are the events held out by --holdout-last.")
@click.option("--max-users", type=click.IntRange(min=1), help="--on-device: a seeded sample of at most N test users.")
@click.option("--no-bundles", is_flag=True, help="--on-device: leave out the bundle rows (d, e) (eager rows only).")
@click.option("--report-dir", type=click.Path(file_okay=False),
              help="--on-device: where ondevice.json and ondevice.png go (default: the run directory).")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def evaluate_cmd(run, split, on_device, max_users, no_bundles, report_dir, seed, as_json):
    """AUC, accuracy and log-loss of a run's best checkpoint on a split of its data; or, with
    --on-device, the ranking quality of its bundles on each user's held-out events.

    \b
    Examples:
      tbsm-sdk evaluate runs/ml --json
      tbsm-sdk train ../shared/data/ml-latest-small/UserBehavior.csv --holdout-last 10 --out runs/ml10
      tbsm-sdk evaluate runs/ml10 --on-device --max-users 1000
    """
    from sdk_builder.runs import evaluate_split

    ckpt, data = _open_run(run)
    if on_device:
        _evaluate_on_device(ckpt, data, Path(report_dir or ckpt.path.parent), max_users, not no_bundles, seed, as_json)
        return
    metrics = evaluate_split(ckpt.model, data, split)
    _emit(as_json, {"split": split, **metrics},
          f"{split}: AUC {metrics['auc']:.4f}  accuracy {metrics['accuracy']:.4f}  log-loss {metrics['log_loss']:.4f}  ({metrics['points']:,} points)")


def _evaluate_on_device(ckpt, data, report_dir: Path, max_users, with_bundles: bool, seed: int, as_json: bool) -> None:
    from tqdm import tqdm

    from sdk_builder.evaluation import evaluate_on_device, format_table, plot_report, prior_weight, ratios
    from sdk_builder.ondevice import BundleRanker

    if data.future is None:
        _fail(f"{ckpt.path.parent}: the run holds out no events; train it with --holdout-last K (e.g. 10)")
    bar = tqdm(unit="bundle", desc="on-device", disable=as_json or not with_bundles, leave=False)
    ranker = BundleRanker(ckpt, data, seed=seed, progress=bar.update) if with_bundles else None
    try:
        report = evaluate_on_device(ckpt.model, data, max_users=max_users, seed=seed, bundle_ranker=ranker,
                                    blend_weight=prior_weight(ckpt.payload))
    finally:
        bar.close()
    payload = {"run": str(ckpt.path.parent), "holdout_last": data.info.get("holdout_last"), **report.summary(),
               "ratios_hr@10": ratios(report),
               "int8_fallbacks": ranker.fallbacks.get("int8") if ranker else None}
    report_dir.mkdir(parents=True, exist_ok=True)
    from sdk_builder.runs import atomic_write_text

    atomic_write_text(report_dir / "ondevice.json", json.dumps(_json_safe(payload), indent=1) + "\n")
    plot_report(report, report_dir / "ondevice.png")
    human = (f"{report.users:,} users ({report.skipped_no_target:,} without a new held-out item skipped), "
             f"{report.targets:,} held-out items; shard coverage {report.shard_coverage:.3f}\n{format_table(report)}\n"
             + ", ".join(f"{k} {v:.3f}" for k, v in payload["ratios_hr@10"].items())
             + f"\nwrote {report_dir / 'ondevice.json'} and {report_dir / 'ondevice.png'}")
    _emit(as_json, payload, human)


def _open_run(run: str):
    from sdk_builder.data.dataset import DatasetError, PreparedData
    from sdk_builder.runs import DATA, RunError, load_checkpoint

    try:
        ckpt = load_checkpoint(Path(run))
    except RunError as exc:
        _fail(str(exc))
    data_path = ckpt.path.parent / DATA
    if not data_path.exists():
        _fail(f"{data_path}: the run's prepared data is missing")
    try:
        data = PreparedData.load(data_path)
    except DatasetError as exc:
        _fail(str(exc))
    if data.fingerprint() != ckpt.payload["data_fingerprint"]:
        _fail(f"{data_path}: does not match the checkpoint's data fingerprint")
    return ckpt, data


@main.command("build")
@click.argument("run", type=click.Path(exists=True))
@click.option("--user-shard", "users", multiple=True, metavar="USER_ID", help="Global user id to build a bundle for (repeatable).")
@click.option("--users", "users_file", type=click.Path(exists=True, dir_okay=False), help="File with one user id per line.")
@click.option("--all", "all_users", is_flag=True, help="Every user of the checkpoint.")
@click.option("--new-user", is_flag=True, help="Also (or only) the cold-start bundle, OUT/cold_start/: for users without "
                                              "a bundle of their own (a population user vector, popular and diverse items).")
@click.option("--population", type=click.Choice(["mean", "zero", "unknown"]), default="mean", show_default=True,
              help="--new-user: the user vector: the mean trained row, the zero row, or the row a run trained with "
                   "user-id dropout has for unknown users (docs/quality.md, \"Cold start\").")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Output root: bundles go to OUT/<h>/<h>/<user_id>/, listed in OUT/bundles.jsonl.")
@click.option("--recipe", type=click.Choice(RECIPE_NAMES), default=DEFAULT_RECIPE, show_default=True,
              help="xnnpack: fp32 (exact); fp16: fp16 per-user tables and MLP weights (about 50 KB smaller), "
                   "int8: per-row int8 item table; both lossy ones + XNNPACK, checked against --accuracy-budget.")
@click.option("--accuracy-budget", type=click.FloatRange(min=0), default=DEFAULT_ACCURACY_BUDGET, show_default=True,
              help="fp16/int8: max |score drift| vs the fp32 model on the user's golden histories.")
@click.option("--on-budget-exceeded", type=click.Choice(ON_BUDGET_EXCEEDED), default="fail", show_default=True,
              help="fp16/int8: refuse the bundle, or build it fp32 (recorded in the manifest).")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Items per bundle.")
@click.option("--category-capacity", type=int, default=256, show_default=True, help="Max categories per bundle.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True, help="Seed of the golden-vector choice.")
@click.option("--jobs", type=int, default=1, show_default=True, help="Worker processes (or Ray CPUs for a local Ray).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--ray-address", help="Ray cluster address (default: start a local Ray).")
@click.option("--skip-unknown", is_flag=True, help="Build the known users even if some ids are unknown.")
@click.option("--fsync", is_flag=True, help="fsync every file (survives power loss; slower).")
@click.option("--allow-weak-model", is_flag=True,
              help="Build even when the run's ranking does not beat popularity on its on-device validation "
                   "(recorded in the manifest's quality.passed).")
@click.option("--sign-key", "sign_key", type=click.Path(exists=True, dir_okay=False),
              help="HMAC key file (>= 32 random bytes): write each bundle's manifest.json.hmac, which the app checks "
                   "with the same key (docs/bundle-format.md).")
@click.option("--events", "newer_events", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Newer event log(s) (any format `prepare` reads, e.g. the next day's): shards and golden histories "
                   "include their events after each user's last one; the checkpoint is unchanged (repeatable).")
@click.option("--refresh", is_flag=True,
              help="Add refresh.pte: the on-device training program that refreshes the user state from the phone's "
                   "own recent events (manifest.refresh, docs/bundle-format.md).")
@click.option("--delta-from", "delta_from", type=click.Path(exists=True, file_okay=False),
              help="One user: the bundle this build replaces; also write <bundle dir>.patch beside the new bundle "
                   "(old + patch = new, byte for byte; docs/bundle-format.md, Patches).")
@click.option("--delta-from-dir", "delta_from_dir", type=click.Path(exists=True, file_okay=False),
              help="An earlier build's --out: write a .patch beside each new bundle whose user has a bundle there.")
@click.option("--shard-slack", type=click.FloatRange(min=0),
              help="With --delta-from(-dir): the old shard's items compete as if ranked (1 + slack) times higher in "
                   "the shard policy's order (fewer new rows, smaller patches; default sdk_builder.shard.DEFAULT_SLACK); "
                   "0 selects the shard afresh.")
@click.option("--json", "as_json", is_flag=True)
def build_cmd(run, users, users_file, all_users, out, recipe, shard_size, category_capacity, seed, jobs, backend,
              ray_address, skip_unknown, fsync, as_json, accuracy_budget=DEFAULT_ACCURACY_BUDGET, on_budget_exceeded="fail",
              allow_weak_model=False, sign_key=None, refresh=False, newer_events=(), delta_from=None, delta_from_dir=None,
              new_user=False, population="mean", shard_slack=None):
    """Cut per-user slices of a trained run and compile them to ExecuTorch bundles.

    One program is exported per run and stamped with each user's constants (checked against a
    full export of a few users first). The export is cached in RUN/build-cache/ (keyed by the
    checkpoint, recipe, layout, code and versions; checked before each reuse), so later builds of the
    same run skip it. Reruns skip bundles that are already up to date.

    \b
    Examples:
      tbsm-sdk build runs/demo --user-shard 1234 --out bundles
      tbsm-sdk build runs/demo --users cohort.txt --jobs 2 --out bundles --json
      tbsm-sdk build runs/demo --all --backend ray --ray-address auto --out bundles
      tbsm-sdk build runs/demo --new-user --out bundles
      tbsm-sdk build runs/demo --all --events day2.csv --out bundles-day2
      tbsm-sdk build runs/demo --user-shard 1234 --events day2.csv --out bundles-day2 --delta-from bundles/<h>/<h>/1234
    """
    from tqdm import tqdm

    from sdk_builder.bundle.store import parse_user_id, read_sign_key, sign_bundle
    from sdk_builder.formats import BundleError

    # Argument errors first: the builder's modules import torch and the exporter (seconds).
    if shard_size < 1 or jobs < 1 or category_capacity < 1:
        _fail("--shard-size, --jobs and --category-capacity must be at least 1")
    if shard_slack is not None and not (delta_from or delta_from_dir):
        _fail("--shard-slack needs the old bundles: pass --delta-from or --delta-from-dir")
    if not (users or users_file or all_users or new_user):
        _fail("no users: pass --user-shard ID, --users FILE, --all or --new-user")
    try:
        key = read_sign_key(Path(sign_key)) if sign_key else None
        requested = [parse_user_id(u) for u in users]
    except BundleError as exc:
        _fail(str(exc))
    if users and not skip_unknown:
        _fail_on_cached_unknown_ids(Path(run), users)
    from sdk_builder.bundle.many import BuildSpec, all_user_ids, build_many, read_user_file

    try:
        if users_file:
            requested += read_user_file(Path(users_file))
        if all_users:
            requested += all_user_ids(Path(run))
    except BundleError as exc:
        _fail(str(exc))
    if not requested and not new_user:
        _fail("no users: pass --user-shard ID, --users FILE, --all or --new-user")
    if delta_from and (len(set(requested)) != 1 or delta_from_dir):
        _fail("--delta-from takes one user's old bundle; for many users pass --delta-from-dir OLD_OUT")
    from sdk_builder.bundle.store import bundle_path

    if (delta_from and Path(delta_from).resolve() == bundle_path(Path(out), requested[0]).resolve()) or (
            delta_from_dir and Path(delta_from_dir).resolve() == Path(out).resolve()):
        _fail("the old bundles must live outside --out: the build replaces the bundles in --out")
    spec = BuildSpec(run=str(run), out=str(out), recipe=recipe, shard_size=shard_size, seed=seed,
                     category_capacity=category_capacity, durable=fsync,
                     accuracy_budget=accuracy_budget, on_budget_exceeded=on_budget_exceeded,
                     allow_weak_model=allow_weak_model, refresh=refresh, events=tuple(newer_events),
                     delta_from=str(delta_from or ""), delta_from_dir=str(delta_from_dir or ""),
                     **({"shard_slack": shard_slack} if shard_slack is not None else {}))
    bar = tqdm(total=len(requested) + new_user, unit="bundle", desc="build", disable=as_json, leave=False)
    try:
        summary = build_many(spec, requested, jobs=jobs, backend=backend, ray_address=ray_address,
                             skip_unknown=skip_unknown, new_user=new_user, population=population,
                             progress=bar.update)
        if key is not None:  # also the bundles skipped as up to date: signing is idempotent, the key may be new
            for row in summary.rows:
                sign_bundle(Path(row["path"]), key, durable=fsync)  # rows hold the bundle's path under --out
        if delta_from or delta_from_dir:  # after signing: the signature is a file of the new bundle too
            _write_patches(summary.rows, Path(delta_from) if delta_from else None,
                           Path(delta_from_dir) if delta_from_dir else None, fsync)
    except BundleError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{out}: {exc.strerror or exc}")
    finally:
        bar.close()
    payload = {"summary": {k: v for k, v in summary.__dict__.items() if k != "rows"}, "bundles": summary.rows}
    template = ("the run's cached template (checked)" if summary.template_cache == "hit"
                else f"a {summary.template_seconds:.1f} s export")
    speed = f"{summary.bundles_per_second:,.1f} bundles/s after {template}; {summary.seconds:.1f} s in all"
    human = (f"{summary.built:,} built, {summary.skipped_current:,} already up to date, {len(summary.unknown):,} unknown "
             f"skipped; {speed}; index {summary.index}")
    if summary.newer_events:
        n = summary.newer_events
        human = (f"newer events: {n['added']:,} of {n['read']:,} added ({n['unknown_item']:,} on unknown items, "
                 f"{n['unknown_category']:,} on unknown categories); {n.get('not_newer', 0):,} not after the user's last "
                 f"known event and {n['unknown_user']:,} of users without a row skipped\n" + human)
    if len(summary.rows) <= 10:
        human = "\n".join(f"{r['path']}: {r['bytes']:,} B" + (f", patch {r['patch_bytes']:,} B" if "patch" in r else "")
                          for r in summary.rows) + "\n" + human
    if delta_from_dir:
        patched = [r for r in summary.rows if "patch" in r]
        human += f"\n{len(patched):,} patch(es) from {delta_from_dir}; {len(summary.rows) - len(patched):,} user(s) had no old bundle"
    if get_recipe(recipe).lossy:  # measured drift vs budget of each bundle (up to 10 bundles) and every fp32 fallback
        fallbacks = [r for r in summary.rows if r.get("recipe", recipe) != recipe]
        shown = [r for r in summary.rows if r.get("note")] if len(summary.rows) <= 10 else fallbacks
        lines = [f"{r['path']}: recipe {r['recipe']}: {r['note']}" for r in shown[:10]]
        lines += [f"... {len(shown) - 10:,} more"] * (len(shown) > 10) + [f"{len(fallbacks):,} fp32 fallback(s)"] * bool(fallbacks)
        human = "\n".join(lines + [human])
    _emit(as_json, payload, human)


def _write_patches(rows: list[dict], old_bundle: Path | None, old_root: Path | None, durable: bool) -> None:
    """A `<bundle>.patch` beside each new bundle that has an old one; recorded in its row."""
    from sdk_builder.bundle.delta import write_patch
    from sdk_builder.bundle.store import bundle_path

    for row in rows:
        old = old_bundle or bundle_path(old_root, row["user_id"])
        if old_bundle is None and not old.is_dir():
            continue
        written = write_patch(old, Path(row["path"]), durable=durable)  # rows hold the bundle's full path
        row["patch"], row["patch_bytes"] = str(written), written.stat().st_size


def _fail_on_cached_unknown_ids(run: Path, users: tuple[str, ...]) -> None:
    """Unknown --user-shard ids, reported before torch is imported, from the user id map an earlier
    build cached beside the checkpoint. Without a current map, or with ids that are not plain int64
    integers, the full path decides (and reports those)."""
    from sdk_builder.bundle.store import cached_unknown_user_ids, parse_user_id, unknown_users_message
    from sdk_builder.formats import BundleError

    try:
        requested = [parse_user_id(u) for u in users]
    except BundleError:
        return
    unknown = cached_unknown_user_ids(run / "checkpoint.pt" if run.is_dir() else run, requested)
    if unknown:
        _fail(unknown_users_message(unknown))


@main.command("verify")
@click.argument("bundles", nargs=-1, type=click.Path(file_okay=False))
@click.option("--index", "index", type=click.Path(dir_okay=False),
              help="A bundles.jsonl: verify every bundle it lists, each manifest against the sha256 recorded at build time.")
@click.option("--key", "key_file", type=click.Path(dir_okay=False),
              help="HMAC key (the file given to `build --sign-key`): check each bundle's manifest.json.hmac.")
@click.option("--patch", "patch_file", type=click.Path(dir_okay=False),
              help="With one bundle NEW and --old OLD: also check that OLD + this patch is NEW, byte for byte.")
@click.option("--old", "old_bundle", type=click.Path(file_okay=False), help="The bundle --patch applies to.")
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(bundles, index, key_file, as_json, patch_file=None, old_bundle=None):
    """Check bundles: hashes, manifest, schema, and golden vectors replayed in the ExecuTorch runtime.

    BUNDLES are bundle directories or bundles directories (searched for bundles). One line per
    bundle; the exit status is non-zero if any fails.

    \b
    Examples:
      tbsm-sdk verify bundles/ab/cd/1234
      tbsm-sdk verify --index bundles/bundles.jsonl --key app.key --json
      tbsm-sdk verify bundles-v2/ab/cd/1234 --patch bundles-v2/ab/cd/1234.patch --old bundles/ab/cd/1234
    """
    import time

    from sdk_builder.bundle.store import read_sign_key
    from sdk_builder.bundle.verify import Expected, find_bundles, read_index, verify_many
    from sdk_builder.formats import BundleError
    from sdk_builder.runtime import runtime_only_process

    runtime_only_process()

    if not bundles and not index:
        _fail("nothing to verify: pass bundle directories, a bundles directory or --index bundles.jsonl")
    if (patch_file is None) != (old_bundle is None) or (patch_file and (len(bundles) != 1 or index)):
        _fail("--patch P --old OLD go together, with exactly one bundle NEW (old + patch = new)")
    start = time.perf_counter()
    try:
        key = read_sign_key(Path(key_file)) if key_file else None
        targets = []
        for root in bundles:
            found = find_bundles(Path(root))
            targets += [(p, Expected(key=key)) for p in found] or [(Path(root), Expected(key=key))]
        if index:
            targets += [(p, Expected(e.manifest_sha256, e.user_id, key, e.index, e.cold_start)) for p, e in read_index(Path(index))]
    except BundleError as exc:
        _fail(str(exc))
    if not targets:
        _fail(f"{index}: lists no bundles")
    reports = []
    for report in verify_many(targets):
        if patch_file and report["ok"]:
            report = _check_patch(report, Path(bundles[0]), Path(patch_file), Path(old_bundle))
        reports.append(report)
        if not as_json:
            click.echo(f"OK {report['bundle']}: {report['cases']} golden cases, max abs diff {report['max_abs_diff']:.1e}, "
                       f"{report['items']} items, {sum(report['bytes'].values()):,} bytes"
                       + (f"; = {old_bundle} + {report['patch']['patch_bytes']:,} B patch" if "patch" in report else "")
                       if report["ok"] else f"FAILED {report['error']}", err=not report["ok"])
    failed = sum(not r["ok"] for r in reports)
    summary = {"bundles": len(reports), "ok": len(reports) - failed, "failed": failed,
               "seconds": round(time.perf_counter() - start, 3)}
    if as_json:
        _emit(True, {"summary": summary, "bundles": reports}, "")
    elif len(reports) > 1:
        click.echo(f"{summary['ok']:,} of {len(reports):,} bundles OK, {failed:,} failed ({summary['seconds']:.1f} s)")
    if failed:
        sys.exit(1)


def _check_patch(report: dict, new: Path, patch: Path, old: Path) -> dict:
    from sdk_builder.bundle.delta import check_patch
    from sdk_builder.formats import BundleError

    try:
        return {**report, "patch": check_patch(new, patch, old)}
    except BundleError as exc:
        return {"bundle": report["bundle"], "ok": False, "error": str(exc).splitlines()[0]}
    except OSError as exc:
        return {"bundle": report["bundle"], "ok": False, "error": f"{exc.filename or patch}: {exc.strerror or exc}"}


@main.command("inspect")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(bundle, as_json):
    """What takes the bytes of a bundle: each constant tensor, delegate blob and JSON part.

    \b
    Example:
      tbsm-sdk inspect bundles/ab/cd/1234 --json
    """
    from sdk_builder.formats import BundleError
    from sdk_builder.bundle.inspect import format_report, inspect_bundle

    try:
        report = inspect_bundle(Path(bundle))
    except (BundleError, OSError) as exc:
        _fail(str(exc))
    _emit(as_json, report, format_report(report))


@main.command("rank")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--events", "events_file", type=click.Path(dir_okay=False), required=True,
              help="On-device history JSON (see the bundle's events.schema.json).")
@click.option("--candidates", required=True, help="Comma-separated global item ids, or @FILE with one id per line.")
@click.option("--request-time", help="Unix seconds of the request (default: now).")
@click.option("--top", default="0", help="Print only the best N (0: all).")
@click.option("--state", "state_file", type=click.Path(dir_okay=False),
              help="A refreshed user state of this bundle (`tbsm-sdk refresh`) instead of the shipped one.")
@click.option("--json", "as_json", is_flag=True)
def rank_cmd(bundle, events_file, candidates, request_time, top, as_json, state_file=None):
    """Rank candidates for the bundle's user exactly as the phone does.

    \b
    Example:
      tbsm-sdk rank bundles/1234 --events history.json --candidates 11,42,97 --json
    """
    import time

    from sdk_builder.client import Bundle, parse_history
    from sdk_builder.formats import BundleError
    from sdk_builder.runtime import runtime_only_process

    runtime_only_process()

    top = _int64(top, "--top")
    request_time = _int64(request_time, "--request-time") if request_time is not None else int(time.time())
    try:
        text = Path(events_file).read_bytes()
    except OSError as exc:
        _fail(f"{events_file}: {exc.strerror}")
    try:
        if candidates.startswith("@"):
            try:
                lines = Path(candidates[1:]).read_bytes().decode().splitlines()
            except UnicodeDecodeError:
                raise BundleError(f"{candidates[1:]}: not a text file of item ids") from None
            raw = [line.strip() for line in lines if line.strip()]
        else:
            raw = [c.strip() for c in candidates.split(",") if c.strip()]
        ids = [_int64(c, "candidates") for c in raw]
        history = parse_history(text, events_file)
        opened = Bundle(Path(bundle))
        state = opened.read_state(Path(state_file)) if state_file else None
        scores = opened.score(history, request_time, ids, state)
    except (BundleError, OSError) as exc:
        _fail(str(exc))
    known = set(opened.manifest.items.ids)
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], i))
    if top:
        order = order[:top]
    ranked = [{"item_id": ids[i], "score": float(scores[i]), "in_shard": ids[i] in known} for i in order]
    _emit(as_json, {"user_id": history.user_id, "ranked": ranked},
          "\n".join(f"{r['item_id']}\t{r['score']:.6f}{'' if r['in_shard'] else '  (not in shard: scored as unknown)'}" for r in ranked))


@main.command("refresh")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--events", "events_file", type=click.Path(dir_okay=False), required=True,
              help="JSON {\"user_id\", \"events\": [...]}: the on-device events, oldest first (any number; the "
                   "program takes the last manifest.refresh.events).")
@click.option("--state", "state_file", type=click.Path(dir_okay=False), help="Start from this refreshed state (default: the shipped one).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Where to write the refreshed state (JSON).")
def refresh_cmd(bundle, events_file, state_file, out):
    """Refresh the user state of a bundle built with --refresh from recent events, as the phone does.

    \b
    Example:
      tbsm-sdk refresh bundles/1234 --events recent.json --out state.json
      tbsm-sdk rank bundles/1234 --events history.json --candidates 11,42 --state state.json
    """
    from pydantic import BaseModel, ValidationError

    from sdk_builder.client import Bundle
    from sdk_builder.formats import BundleError, Event, NonNegativeInt, validation_message
    from sdk_builder.runtime import runtime_only_process
    from sdk_builder.util import atomic_write_bytes

    runtime_only_process()

    class RecentEvents(BaseModel):
        user_id: NonNegativeInt
        events: list[Event]

    try:
        try:
            recent = RecentEvents.model_validate_json(Path(events_file).read_bytes())
        except ValidationError as exc:
            raise BundleError(validation_message(events_file, exc)) from None
        opened = Bundle(Path(bundle))
        if recent.user_id != opened.manifest.user_id:
            raise BundleError(f"{events_file}: events of user {recent.user_id}, this bundle is for user {opened.manifest.user_id}")
        state = opened.read_state(Path(state_file)) if state_file else None
        refreshed = opened.refresh(state, recent.events)
        atomic_write_bytes(Path(out), opened.state_json(refreshed).encode())
    except (BundleError, OSError) as exc:
        _fail(str(exc))
    _emit(False, {}, f"{out}: refreshed state ({len(refreshed)} numbers)")


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@click.option("--users", type=int, default=2000, show_default=True, help="Synthetic users.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True)
def demo_cmd(out, users, seed):
    """End to end on built-in synthetic data: train, build one bundle, verify it in ExecuTorch.

    \b
    Example:
      tbsm-sdk demo --out runs/demo
    """
    ctx = click.get_current_context()
    run_dir = Path(out) / "run"
    click.echo(f"[1/3] training on synthetic Taobao-format data ({users:,} users) -> {run_dir}")
    ctx.invoke(train_cmd, inputs=(), fmt="auto", columns=None, strict=False, time_range=None, protocol="holdout",
               samples_per_user=None, synthetic_users=users, holdout_last=0, negatives="uniform",
               negatives_per_positive=2, prepared=None, out=str(run_dir), epochs=1, batch_size=256,
               lr=0.2, seed=seed, eval_every=0, model_type="tsl", tsl_inner="def", tsl_mechanism="mlp",
               tsl_num_heads=1, tsl_seq=False, dense_feature="time", use_behavior=False, init="normal",
               select_by="val_hr10", threads=None, resume=False, force=True, as_json=False)
    from sdk_builder.runs import load_checkpoint

    user_id = int(load_checkpoint(run_dir).users.ids[0])
    click.echo(f"[2/3] building the bundle of user {user_id}")
    ctx.invoke(build_cmd, run=str(run_dir), users=(str(user_id),), users_file=None, all_users=False,
               out=str(Path(out) / "bundles"), recipe=DEFAULT_RECIPE, shard_size=1000, category_capacity=256, seed=seed,
               jobs=1, backend="local", ray_address=None, skip_unknown=False, fsync=False, as_json=False)
    from sdk_builder.bundle.store import bundle_path

    click.echo("[3/3] verifying it in the ExecuTorch runtime")
    ctx.invoke(verify_cmd, bundles=(str(bundle_path(Path(out) / "bundles", user_id)),), index=None, key_file=None,
               as_json=False)


TEMPLATES = Path(__file__).resolve().parents[1] / "mobile_templates"
# Where each template expects a bundle: the sample app's assets / the Swift tests' resources.
BUNDLE_DESTINATION = {"android": Path("sample/src/main/assets/tbsm"), "ios": Path("Tests/TbsmSDKTests/Resources/tbsm")}


@main.command("init-mobile")
@click.argument("platform", type=click.Choice(sorted(BUNDLE_DESTINATION)))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), help="A bundle to ship in the project (verified first).")
@click.option("--force", is_flag=True, help="Write into a non-empty DEST.")
def init_mobile_cmd(platform, dest, bundle, force):
    """Scaffold an Android (Kotlin) or iOS (Swift) project from the templates.

    \b
    Examples:
      tbsm-sdk init-mobile android MyApp --bundle bundles/3f/a2/1234
      tbsm-sdk init-mobile ios MyKit
    """
    import shutil

    from sdk_builder.bundle.verify import verify_bundle
    from sdk_builder.formats import BundleError

    source = TEMPLATES / platform
    if not source.is_dir():
        _fail(f"{source}: the {platform} template is missing (use a source checkout of tbsm-sdk)")
    dest_path = Path(dest)
    if dest_path.exists() and any(dest_path.iterdir()) and not force:
        _fail(f"{dest_path} is not empty (pass --force to write into it)")
    if bundle:
        try:
            verify_bundle(Path(bundle))
        except BundleError as exc:
            _fail(str(exc))
    shutil.copytree(source, dest_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("build", ".gradle", "*.class"))
    if bundle:
        target = dest_path / BUNDLE_DESTINATION[platform]
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in BUNDLE_FILES:
            shutil.copy2(Path(bundle) / name, target / name)
    click.echo(f"created the {platform} project in {dest_path}" + (f" with the bundle in {BUNDLE_DESTINATION[platform]}" if bundle else "")
               + f"; next: docs/{platform}.md")


@main.command("synth")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--users", type=int, default=2000, show_default=True)
@click.option("--items", type=int, default=20_000, show_default=True)
@click.option("--categories", type=int, default=200, show_default=True)
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True)
def synth_cmd(out, users, items, categories, seed):
    """Write synthetic Taobao-format UserBehavior CSV (drifting user interests).

    \b
    Example:
      tbsm-sdk synth data/UserBehavior.csv --users 20000
    """
    from sdk_builder.data.synthetic import generate_taobao_events, write_taobao_csv

    events = generate_taobao_events(users, n_items=items, n_categories=categories, seed=seed)
    write_taobao_csv(events, out)
    click.echo(f"wrote {len(events):,} events of {users:,} users to {out}")


if __name__ == "__main__":
    main()
