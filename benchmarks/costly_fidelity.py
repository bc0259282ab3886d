"""Fidelity of an estimator that costs more than retraining, on a subset of held-out orders.

``benchmarks/response_fidelity.py`` scores every estimator on every held-out order. An
estimator whose estimate of one order costs more than retraining it (``fut1-hvp`` on the medium
regime: about 4 retrains per order) is scored here instead, on the orders of chosen kinds from
that benchmark's ``fidelity.json`` (same store, same held-out draw, same true losses), one order
at a time, saved after each (an interrupted run resumes)::

    python benchmarks/costly_fidelity.py examples/medium.toml --result runs/medium_fid/fresh \
        --estimator fut1-hvp --kinds near,random --out runs/medium_fid/fresh/fut1-hvp.json

Writes ``OUT`` (JSON): the orders' names and kinds, true and estimated losses (nats/token, per
eval set), seconds per estimate and per retrain (measured in ``fidelity.json``'s run),
Spearman rho per subset (``all`` kinds chosen, each kind) on the ``all`` eval set, and the rho of
``fidelity.json``'s estimators on the same orders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from currsearch.cli import csv_list, resolve_config
from currsearch.errors import ConfigError, CurrsearchError
from currsearch.fidelity import SUBSETS, fidelity_metrics, group_of
from currsearch.manifest import atomic_write_bytes
from currsearch.store import TrajectoryStore
from currsearch.train import Trainer
from estimators.base import get_estimator


def subset_of(kind: str, subsets: list[str]) -> str | None:
    """The first of ``subsets`` (names of :data:`currsearch.fidelity.SUBSETS`) that holds a
    held-out order of ``kind`` (``near`` holds the reference and the ``near-k`` orders), or None."""
    return next((s for s in subsets if SUBSETS[s] is None or group_of(kind) in SUBSETS[s]), None)


def score_subset(cfg, result_dir, estimator: str, kinds: list[str], out, progress: bool = True) -> dict:
    """Estimate the held-out orders of ``kinds`` in ``result_dir/fidelity.json`` with ``estimator``.

    Args:
        cfg: the config the store of ``fidelity.json`` was recorded with.
        result_dir: a ``response_fidelity.py`` setting directory (``fidelity.json``; the store
            path is read from it).
        estimator: a registered estimator name.
        kinds: subsets of held-out orders to score (names of ``currsearch.fidelity.SUBSETS``:
            ``near``, ``random``, ``structured``; :func:`subset_of`), scored subset by subset in this order.
        out: JSON path, rewritten atomically after every order; an existing file for the same
            estimator and orders resumes.

    Returns:
        The dict written to ``out``.

    Raises:
        ConfigError: no ``fidelity.json`` in ``result_dir``, an unknown subset, or no order of the given subsets.
        StoreError: the store does not match ``cfg``.
    """
    path = Path(result_dir) / "fidelity.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run benchmarks/response_fidelity.py with --out {Path(result_dir).parent} "
                          "for this setting first (its store, held-out orders and true losses are scored here)")
    res = json.loads(path.read_text())
    unknown = [k for k in kinds if k not in SUBSETS]
    if unknown:
        raise ConfigError(f"unknown subsets {unknown}: choose from {sorted(SUBSETS)}")
    group = [subset_of(o["kind"], kinds) for o in res["orders"]]
    picked = sorted((i for i, g in enumerate(group) if g is not None), key=lambda i: (kinds.index(group[i]), i))
    if not picked:
        raise ConfigError(f"no held-out order of subsets {kinds} in {result_dir}; kinds there: "
                          f"{sorted({o['kind'] for o in res['orders']})}")
    e_all = res["eval_names"].index("all")
    out = Path(out)
    done = json.loads(out.read_text()) if out.is_file() else {}
    if done.get("estimator") != estimator or done.get("picked") != picked:
        done = {"estimator": estimator, "picked": picked, "estimates": [], "seconds": []}
    trainer = Trainer.from_config(cfg)
    est = get_estimator(estimator).fit(TrajectoryStore.open(res["store"]["path"], trainer=trainer))
    for i in tqdm(picked[len(done["estimates"]):], desc=f"{estimator} estimates", unit="order", disable=not progress):
        t0 = time.perf_counter()
        done["estimates"].append(est.estimate(torch.tensor([res["orders"][i]["order"]]))[0].tolist())
        done["seconds"].append(time.perf_counter() - t0)
        atomic_write_bytes(out, json.dumps(done).encode())
    true = torch.tensor([res["true_losses"][i][e_all] for i in picked])
    estimate = torch.tensor([x[e_all] for x in done["estimates"]])
    groups = [group[i] for i in picked]
    rho = {"all": fidelity_metrics(estimate, true)["spearman"]}
    for g in dict.fromkeys(groups):
        m = torch.tensor([x == g for x in groups])
        rho[g] = fidelity_metrics(estimate[m], true[m])["spearman"]
    others = {n: fidelity_metrics(torch.tensor([e["estimates"][i][e_all] for i in picked]), true)["spearman"]
              for n, e in res["estimators"].items()}  # the estimators of fidelity.json on the same orders
    per_order = sum(done["seconds"]) / len(done["seconds"])
    done |= {"names": [res["orders"][i]["name"] for i in picked], "kinds": groups, "true": true.tolist(),
             "spearman": rho, "others_spearman_all": others, "seconds_per_estimate": per_order,
             "retrain_seconds_per_order": res["retrain_seconds_per_order"],
             "estimate_over_retrain": per_order / res["retrain_seconds_per_order"]}
    atomic_write_bytes(out, json.dumps(done, indent=1).encode())
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="TOML config of the store (default: the built-in default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--result", required=True, help="a response_fidelity.py setting directory (holds fidelity.json)")
    p.add_argument("--estimator", default="fut1-hvp")
    p.add_argument("--kinds", type=csv_list, default=["near", "random"])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        r = score_subset(resolve_config(args.config, args.set), args.result, args.estimator, args.kinds, args.out)
    except CurrsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.estimator}: Spearman rho on `all` {json.dumps({k: round(v, 2) for k, v in r['spearman'].items()})}; "
          f"{r['seconds_per_estimate']:.1f} s per estimate = {r['estimate_over_retrain']:.1f} retrains")
    return 0


if __name__ == "__main__":
    sys.exit(main())
