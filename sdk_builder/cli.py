"""`tbsm-sdk`: prepare data, train, evaluate, build per-user ExecuTorch bundles, verify, rank."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

DEFAULT_SEED = 0


def _emit(as_json: bool, payload: dict, human: str) -> None:
    click.echo(json.dumps(payload, indent=1, default=float) if as_json else human)


def _fail(message: str) -> None:
    raise click.ClickException(message.splitlines()[0] if message else "failed")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _load_events(inputs: tuple[str, ...], fmt: str, columns: str | None, strict: bool, time_range: str | None,
                 synthetic_users: int, seed: int, quiet: bool):
    from sdk_builder.events import ColumnMapping, IngestError, parse_time_range, read_event_log
    from sdk_builder.synthetic import generate_taobao_events

    if not inputs:
        if not quiet:
            click.echo(f"no input given: generating synthetic Taobao-format data for {synthetic_users:,} users (seed {seed})", err=True)
        return generate_taobao_events(synthetic_users, seed=seed), None
    try:
        mapping = ColumnMapping.parse(columns) if columns else None
        window = parse_time_range(time_range) if time_range else None
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
        click.option("--time-range", help="Keep events in [START, END): dates 2017-11-25:2017-12-04 or Unix seconds."),
        click.option("--protocol", type=click.Choice(["holdout", "reference"]), default="holdout", show_default=True,
                     help="holdout: per-user leave-last-out; reference: TBSM's 70th-percentile user split."),
        click.option("--samples-per-user", type=int, help="Training positives per user (holdout 20, reference 10)."),
        click.option("--synthetic-users", type=int, default=2000, show_default=True,
                     help="With no INPUTS: users of the built-in synthetic Taobao-format data."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _prepare(inputs, fmt, columns, strict, time_range, protocol, samples_per_user, synthetic_users, seed, quiet):
    from sdk_builder.dataset import prepare

    events, report = _load_events(inputs, fmt, columns, strict, time_range, synthetic_users, seed, quiet)
    try:
        data = prepare(events, protocol=protocol, seed=seed, samples_per_user=samples_per_user)
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


@main.command("prepare")
@data_options
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Prepared dataset (.npz).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def prepare_cmd(inputs, fmt, columns, strict, time_range, protocol, samples_per_user, synthetic_users, seed, out, as_json):
    """Read event logs, remap ids and build train/validation/test samples.

    \b
    Example:
      tbsm-sdk prepare ../shared/data/ml-latest-small/UserBehavior.csv --protocol reference --out ml.npz
    """
    data = _prepare(inputs, fmt, columns, strict, time_range, protocol, samples_per_user, synthetic_users, seed, as_json)
    data.save(Path(out))
    _emit(as_json, {"out": out, **data.info}, f"wrote {out}: " + ", ".join(f"{k} {v:,}" for k, v in data.info["split_sizes"].items()) + " samples")


@main.command("train")
@data_options
@click.option("--data", "prepared", type=click.Path(exists=True, dir_okay=False), help="A dataset from `tbsm-sdk prepare` (instead of INPUTS).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory.")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True, help="Adagrad learning rate.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True)
@click.option("--eval-every", type=int, default=0, help="Validate every N steps (default: once per epoch).")
@click.option("--model-type", type=click.Choice(["tsl", "mha", "rnn"]), default="tsl", show_default=True)
@click.option("--tsl-inner", type=click.Choice(["def", "ind", "dot"]), default="def", show_default=True)
@click.option("--tsl-mechanism", type=click.Choice(["mlp", "mul"]), default="mlp", show_default=True)
@click.option("--tsl-num-heads", type=int, default=1, show_default=True)
@click.option("--tsl-seq", is_flag=True, help="Head j of k sees only the last round(20 j / k) events.")
@click.option("--dense-feature", type=click.Choice(["time", "position"]), default="time", show_default=True,
              help="time: log-scaled age of each event at request time; position: the reference's t/21.")
@click.option("--use-behavior", is_flag=True, help="Embed the behaviour (pv/buy/cart/fav) of history events.")
@click.option("--threads", type=int, help="torch intra-op threads.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last finished epoch.")
@click.option("--force", is_flag=True, help="Overwrite an existing checkpoint in --out.")
@click.option("--json", "as_json", is_flag=True)
def train_cmd(inputs, fmt, columns, strict, time_range, protocol, samples_per_user, synthetic_users, prepared, out,
              epochs, batch_size, lr, seed, eval_every, model_type, tsl_inner, tsl_mechanism, tsl_num_heads, tsl_seq,
              dense_feature, use_behavior, threads, resume, force, as_json):
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
    from sdk_builder.dataset import PreparedData
    from sdk_builder.training import RunError, train_run

    _set_threads(threads)
    if prepared:
        data = PreparedData.load(Path(prepared))
    else:
        data = _prepare(inputs, fmt, columns, strict, time_range, protocol, samples_per_user, synthetic_users, seed, as_json)
    try:
        model_cfg = TBSMConfig(**data.table_sizes(), history=data.info.get("history", 20), model_type=model_type,
                               tsl_inner=tsl_inner, tsl_mechanism=tsl_mechanism, tsl_num_heads=tsl_num_heads,
                               tsl_seq=tsl_seq, dense_feature=dense_feature, use_behavior=use_behavior)
    except ValueError as exc:
        _fail(str(exc))
    train_cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, eval_every=eval_every)
    bar = tqdm(total=0, unit="step", disable=as_json or not sys.stderr.isatty() and os.environ.get("CI") == "true",
               desc="train", leave=False)

    def progress(step: int, loss: float) -> None:
        bar.update(1)
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
    _emit(as_json, {k: v for k, v in metrics.items() if k != "history"}, human)


@main.command("evaluate")
@click.argument("run", type=click.Path(exists=True))
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "validation", "train"]))
@click.option("--json", "as_json", is_flag=True)
def evaluate_cmd(run, split, as_json):
    """AUC, accuracy and log-loss of a run's best checkpoint on a split of its data.

    \b
    Example:
      tbsm-sdk evaluate runs/ml --json
    """
    from sdk_builder.dataset import PreparedData
    from sdk_builder.training import DATA, RunError, evaluate_split, load_checkpoint

    try:
        ckpt = load_checkpoint(Path(run))
    except RunError as exc:
        _fail(str(exc))
    data_path = ckpt.path.parent / DATA
    if not data_path.exists():
        _fail(f"{data_path}: the run's prepared data is missing")
    data = PreparedData.load(data_path)
    if data.fingerprint() != ckpt.payload["data_fingerprint"]:
        _fail(f"{data_path}: does not match the checkpoint's data fingerprint")
    metrics = evaluate_split(ckpt.model, data, split)
    _emit(as_json, {"split": split, **metrics},
          f"{split}: AUC {metrics['auc']:.4f}  accuracy {metrics['accuracy']:.4f}  log-loss {metrics['log_loss']:.4f}  ({metrics['points']:,} points)")


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
    from sdk_builder.synthetic import generate_taobao_events, write_taobao_csv

    events = generate_taobao_events(users, n_items=items, n_categories=categories, seed=seed)
    write_taobao_csv(events, out)
    click.echo(f"wrote {len(events):,} events of {users:,} users to {out}")


if __name__ == "__main__":
    main()
