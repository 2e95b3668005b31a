"""What Hogwild training (`train --workers 2`) costs in model quality: the same data, seed and
settings trained by 1 and by 2 processes, each model judged as `train` judges it (validation and
test AUC, the on-device-style shard ranking's HR@10), with the run's wall time.

    python benchmarks/hogwild.py [--only ml-small|synthetic] [--synthetic-users 2000] [--seed 0] [--lr 0.2 0.05]

ml-latest-small's 1-epoch run (~50 steps) is shorter than the warm-up HOGWILD_WARMUP_STEPS, which
trains in one process's order: its two rows must be equal.

Speed is `benchmarks/train_throughput.py`'s job (this run's times include validation, which one
process does alone); this table is about what the second process's concurrent updates change.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_data_set_options, append_to_doc, context_line, data_sets, markdown_table  # noqa: E402

from model.train import TrainConfig  # noqa: E402

SECTION = "## Hogwild training: quality of 1 vs 2 processes (issue 12)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_set_options(parser, synthetic_users=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, nargs="+", default=[TrainConfig.lr],
                        help="Adagrad learning rates to compare at (the 2-process cost depends on it)")
    args = parser.parse_args()

    import torch

    from model.tbsm import TBSMConfig
    from sdk_builder.data.dataset import prepare
    from sdk_builder.runs import train_run

    torch.set_num_threads(1)
    ctx = context_line("benchmarks/hogwild.py " + " ".join(sys.argv[1:]))
    rows = []
    with tempfile.TemporaryDirectory(prefix="hogwild-") as tmp:
        for name, load in data_sets(args):
            data = prepare(load(), protocol="holdout", seed=args.seed)
            for lr, workers in itertools.product(args.lr, (1, 2)):
                started = time.perf_counter()
                m = train_run(data, Path(tmp) / f"{name}-{lr}-{workers}", TBSMConfig(**data.table_sizes()),
                              TrainConfig(epochs=1, seed=args.seed, lr=lr, workers=workers))
                wall = time.perf_counter() - started
                ranking = m["ranking_validation"] or {}
                rows.append([name, f"{lr:g}", str(workers), f"{m['best_validation_auc']:.4f}", f"{m['test']['auc']:.4f}",
                             f"{ranking.get('model_alone', float('nan')):.4f}", f"{ranking.get('blended', float('nan')):.4f}",
                             f"{ranking.get('popularity', float('nan')):.4f}", f"{m['train_seconds']:.1f}", f"{wall:.1f}"])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    table = markdown_table(["data", "lr", "processes", "best val AUC", "test AUC", "HR@10 model alone", "HR@10 blended",
                            "HR@10 popularity", "train s", "run s"], rows, align="-rrrrrrrrr")
    note = ("1 epoch, default settings but the learning rate (holdout protocol, time feature, checkpoint by validation HR@10); "
            "HR@10 of the best checkpoint ranking each validation user's shard (`train`'s ranking validation)")
    print(table)
    append_to_doc(SECTION, f"{ctx}. {note}.\n\n{table}")


if __name__ == "__main__":
    main()
