"""Ablation: can fut1-hvp's curvature term live in a low-dimensional subspace?

A cheap estimator would precompute ``H(theta_t, B_l) U`` (k HVPs per checkpoint and batch)
instead of one HVP per order and step. That is only worth building if the deviations
``delta_t = gamma_t - theta_t`` of unseen orders lie (mostly) in a subspace U learned from a
few probe orders. This script measures it, against real retraining:

1. record the reference store (fut1-hvp needs only the checkpoints) and retrain the held-out
   orders of the fidelity benchmark (reference, ``--n-random`` random, near-reference);
2. run exact fut1-hvp on ``--probes`` random probe orders (other seeds), collect every
   delta_t, and take U = the top-k left singular vectors;
3. score the held-out orders with exact fut1-hvp and with the HVP applied to the projected
   deviation ``U U^T delta_t`` (k in ``--ks``), reporting Spearman rho (eval set "all")
   over all / random / near orders, and the fraction of ||delta_t||^2 of the held-out orders
   that U captures.

    python benchmarks/ablation_lowrank.py [CONFIG] --set data.num_batches=16 --out runs/ablation_lowrank

Writes OUT/ablation_lowrank.json. It reports measurements; it has no target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from currsearch.cli import resolve_config
from currsearch.fidelity import fidelity_metrics, heldout_orders, retrain_orders
from currsearch.manifest import atomic_write_bytes
from currsearch.record import record
from estimators import get_estimator


def rollout(est, orders: torch.Tensor, basis: torch.Tensor | None = None, collect: list | None = None) -> torch.Tensor:
    """Exact fut1-hvp for int64 ``[n, T]`` orders, with the HVP applied to ``basis basis^T delta``
    when ``basis`` (float ``[P, k]``, orthonormal) is given; appends every delta_t ``[n, P]`` to
    ``collect``. Returns the final losses float64 ``[n, E]``."""

    def deviation_map(t, delta):
        if collect is not None:
            collect.append(delta.clone())
        return delta if basis is None else (delta @ basis) @ basis.T

    return torch.stack([est.trainer.evaluate(g) for g in est.final_parameters(orders, deviation_map=deviation_map)])


def main(argv=None) -> int:
    """Steps 1-3 of the module docstring; writes OUT/ablation_lowrank.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default="runs/ablation_lowrank")
    ap.add_argument("--n-random", type=int, default=20)
    ap.add_argument("--n-near", type=int, default=3)
    ap.add_argument("--probes", type=int, default=8, help="random probe orders that span U")
    ap.add_argument("--ks", default="4,16,64", help="subspace dimensions")
    args = ap.parse_args(argv)
    cfg = resolve_config(args.config, args.set).replace(record={"terms": ()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = record(cfg, out / "store", progress=False)
    trainer = store.trainer()
    T = trainer.T
    diff = torch.tensor([m["unigram_nll"] for m in trainer.plan.metadata], dtype=torch.float64)
    held = heldout_orders(T, trainer.plan.domains, diff, n_random=args.n_random, n_near=args.n_near, seed=0)
    orders = torch.stack([h.order for h in held])
    groups = [h.group for h in held]
    true, retrain_s = retrain_orders(trainer, held, progress=False)
    est = get_estimator("fut1-hvp").fit(store)
    i_all = list(store.eval_names).index("all")

    def metrics(pred):
        rows = {}
        for g in ("all", "random", "near"):
            idx = [i for i, x in enumerate(groups) if g == "all" or x == g]
            rows[g] = fidelity_metrics(pred[idx, i_all], true[idx, i_all])["spearman"]
        return rows

    report = {"T": T, "P": trainer.model.num_params, "n_orders": len(held), "retrain_seconds_per_order": retrain_s, "variants": {}}
    deltas: list = []
    t0 = time.perf_counter()
    exact = rollout(est, orders, collect=deltas)
    report["variants"]["exact"] = {**metrics(exact), "seconds_per_order": (time.perf_counter() - t0) / len(held)}
    print(f"exact fut1-hvp: {report['variants']['exact']}", flush=True)
    held_d = torch.cat(deltas)  # [T * n, P]
    probes = torch.stack([torch.randperm(T, generator=torch.Generator().manual_seed(1000 + i)) for i in range(args.probes)])
    pd: list = []
    rollout(est, probes, collect=pd)
    U, S, _ = torch.linalg.svd(torch.cat(pd).double().T, full_matrices=False)  # [P, r]
    for k in [int(x) for x in args.ks.split(",")]:
        basis = U[:, :k].to(held_d.dtype)
        captured = float(((held_d @ basis) ** 2).sum() / (held_d**2).sum())
        t0 = time.perf_counter()
        pred = rollout(est, orders, basis=basis)
        row = {**metrics(pred), "captured_energy": captured, "seconds_per_order": (time.perf_counter() - t0) / len(held)}
        report["variants"][f"lowrank_k{k}"] = row
        print(f"low-rank k={k}: {row}", flush=True)
    atomic_write_bytes(out / "ablation_lowrank.json", json.dumps(report, indent=1).encode())
    print(f"wrote {out / 'ablation_lowrank.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
