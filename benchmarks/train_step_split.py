"""Where one training step's time goes: CPU ms per step by phase (bench config, 1 thread, the
data of `train_throughput.py`), the phases of `model.train.train_step` timed in turn over 300 steps.

    python benchmarks/train_step_split.py [--batch 256] [--shared]

`--shared`: the tables in the shared memory of Hogwild training (`train --workers 2`). Prints a
markdown table (not appended to docs/benchmarks.md: a diagnostic, not a target).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, torch.nn.functional as F
torch.set_num_threads(1)
import train_throughput as tt
from model.tbsm import TBSM, taobao_bench_config, PADDING_ROW
from model.train import TBSMOptimizer, dedup, id_tables
data, train, order, user_map_t, _ = tt._load_data()
torch.manual_seed(0)
model = TBSM(taobao_bench_config(dense_feature="position"))
opt = TBSMOptimizer(model, tt.LR, shared="--shared" in sys.argv)
B = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else tt.BATCH
clock = time.process_time
acc = {}
def add(k, t): acc[k] = acc.get(k, 0.0) + t
N, W = 300, 20
tables = [next(i for i, t in enumerate(opt.tables) if t is table.weight) for table in id_tables(model)]
for s in range(N + W):
    t0 = clock()
    b = data.collate(train.take(order[s*B:(s+1)*B]), tt.HISTORY); b.user_rows = user_map_t[b.user_rows]
    t1 = clock()
    d = dedup(model, b)
    t2 = clock()
    _, item_rows, _, _, timestamps = d.inputs()
    opt.zero_grad()
    leaf, spans = opt.gather_rows([(i, u) for i, (u, _) in zip(tables, d.rows)])
    t3 = clock()
    dense = model.dense_features(timestamps, timestamps[:, -1])
    z = model.tower.forward_rows(dense, leaf, torch.from_numpy(d.rows[0][1]), d.event_index)
    t4 = clock()
    logits = model.attend(z[:, :-1], z[:, -1], (item_rows != PADDING_ROW)[:, :-1])
    loss = F.binary_cross_entropy_with_logits(logits, d.labels)
    t5 = clock()
    loss.backward()
    t6 = clock()
    opt.step_rows(leaf, spans)
    t7 = clock()
    if s >= W:
        for k, a, c in (("collate", t0, t1), ("dedup", t1, t2), ("gather rows", t2, t3), ("tower forward", t3, t4),
                        ("head forward + loss", t4, t5), ("backward (tower + head)", t5, t6), ("optimizer", t6, t7)):
            add(k, c - a)
total = sum(acc.values())
print("| phase | CPU ms per step | share |\n|---|---:|---:|")
for k, v in acc.items():
    print(f"| {k} | {v / N * 1e3:.2f} | {v / total:.0%} |")
print(f"| total | {total / N * 1e3:.2f} | |")
