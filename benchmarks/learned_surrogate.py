"""The ``calibrated`` estimator's model vs the number N of real training runs it is fitted on.

How many real runs would a plain learned model of the order need to rank orders as well as the
trajectory estimators? Features of an order: each batch's normalized position (T values) and
its position quartile (one-hot, 4 T values); model: ridge regression (alpha by 5-fold cross-
validation) of the final ``all`` eval loss, fitted on N seeded random orders retrained for
real, scored on the held-out orders of the fidelity benchmark (same seed, drawn outside the N
training orders as the fidelity benchmark draws them outside calibration orders; retrained here). The
model is additive over positions, so its exact optimum over permutations is a linear
assignment problem, like ``additive``'s. This is the model of ``estimators/calibrated.py``
(``position_features``, ``fit_ridge``), measured here for several N at once.

    python benchmarks/learned_surrogate.py [CONFIG] [--set k=v] [--n 50,100,200,300] [--out runs/learned_surrogate]

Prints Spearman rho (all / random / near held-out orders) per N and writes
OUT/learned_surrogate.json. It reports measurements; it has no target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from currsearch.cli import csv_list, resolve_config
from currsearch.fidelity import HeldoutOrder, check_disjoint, fidelity_metrics, heldout_orders, retrain_orders
from currsearch.manifest import atomic_write_bytes
from currsearch.train import Trainer
from estimators.calibrated import fit_ridge, position_features


def main(argv=None) -> int:
    """Retrain the held-out and training orders, fit the ridge model per N, print and write
    OUT/learned_surrogate.json (module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--n", type=csv_list, default=["50", "100", "200", "300"], help="training-run counts N")
    ap.add_argument("--out", default="runs/learned_surrogate")
    args = ap.parse_args(argv)
    cfg = resolve_config(args.config, args.set)
    ns = [int(x) for x in args.n]
    trainer = Trainer.from_config(cfg)
    T = trainer.T
    diff = torch.tensor([m["unigram_nll"] for m in trainer.plan.metadata], dtype=torch.float64)
    g = torch.Generator().manual_seed(12345)
    train = [HeldoutOrder(f"train-{i}", "random", torch.randperm(T, generator=g), 0) for i in range(max(ns))]
    fit_orders = [h.order.tolist() for h in train]
    held = heldout_orders(T, trainer.plan.domains, diff, seed=0, exclude=fit_orders)
    check_disjoint(held, fit_orders)
    e = list(trainer.plan.eval_names).index("all")
    true, retrain_s = retrain_orders(trainer, held, progress=False)
    y_train, _ = retrain_orders(trainer, train, progress=True)
    X_held = position_features(torch.stack([h.order for h in held])).numpy()
    X_train = position_features(torch.stack([h.order for h in train])).numpy()
    groups = [h.group for h in held]
    report = {"T": T, "retrain_seconds_per_order": retrain_s, "features": X_train.shape[1], "rows": {}}
    for n in ns:
        w, b = fit_ridge(X_train[:n], y_train[:n, e].numpy())
        t0 = time.perf_counter()
        pred = torch.as_tensor(X_held @ w + b)
        est_s = (time.perf_counter() - t0) / len(held)
        row = {}
        for grp in ("all", "random", "near"):
            idx = [i for i, x in enumerate(groups) if grp == "all" or x == grp]
            row[grp] = fidelity_metrics(pred[idx], true[idx, e])["spearman"]
        row["speedup"] = retrain_s / est_s
        report["rows"][n] = row
        print(f"N = {n:>4} real runs: rho all {row['all']:.2f} / random {row['random']:.2f} / near {row['near']:.2f}; "
              f"estimate {row['speedup']:.0f}x faster than retraining per order", flush=True)
    out = Path(args.out)
    atomic_write_bytes(out / "learned_surrogate.json", json.dumps(report, indent=1).encode())
    print(f"wrote {out / 'learned_surrogate.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
