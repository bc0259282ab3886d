"""Does a surrogate fitted to a search's first n real runs rank its next runs? (``guided-tpe``'s early refits)

``guided-tpe`` (``currsearch/guided.py``) refits ``calibrated-interactions`` to the real runs of
its own search and enqueues the surrogate's best orders. This reads finished searches from
Optuna journals (``random-search``, ``optuna-real`` or ``guided-tpe``, e.g. the anytime
benchmark's), fits the surrogate to the first n runs of each, for every n in ``--n``, and
scores its Spearman rho against the true losses of the next ``--window`` runs, which it did not
see. No training: the losses are the journals'. Besides the full model, the low-capacity
position-only model (``estimators.calibrated.CalibratedPositions``).

    python benchmarks/guided_skill.py runs/anytime/*.journal --n 16,24,32,40,48,56 --out runs/skill.json

Prints and writes (``--out``, JSON) per model and n the mean rho over the searches and the
per-search values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import optuna
import torch
from scipy import stats

from currsearch.cli import csv_list, resolve_config
from currsearch.manifest import atomic_write_bytes
from currsearch.train import Trainer
from estimators.calibrated import CalibratedInteractions, CalibratedPositions


MODELS = {"calibrated-interactions": CalibratedInteractions, "position-only": CalibratedPositions}


def journal_runs(path) -> list[tuple[str, list[list[int]], list[float]]]:
    """``(study name, orders [n][T], objective losses [n])`` of every search in an Optuna journal (not the
    suffix polish studies of ``guided-tpe``), complete trials in order."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    out = []
    for s in optuna.get_all_study_summaries(storage):
        if "-polish-" in s.study_name:  # a guided search's suffix polish: moves around one order, not a search
            continue
        trials = [t for t in optuna.load_study(study_name=s.study_name, storage=storage).trials
                  if t.state == optuna.trial.TrialState.COMPLETE]
        out.append((s.study_name, [t.user_attrs["order"] for t in trials], [float(t.value) for t in trials]))
    return out


def skill(plan, searches, ns: list[int], window: int) -> dict:
    """``{model: {n: [rho per search]}}``: Spearman rho of the model fitted to runs ``[:n]``
    against the losses of runs ``[n:n + window]`` (searches shorter than ``n + window`` skipped)."""
    out = {m: {n: [] for n in ns} for m in MODELS}
    for _, orders, losses in searches:
        for m, cls in MODELS.items():
            for n in ns:
                if len(losses) < n + window:
                    continue
                est = cls.from_runs(plan, ["objective"], orders[:n], [[x] for x in losses[:n]])
                pred = est.estimate(torch.tensor(orders[n:n + window]))[:, 0].numpy()
                out[m][n].append(float(stats.spearmanr(pred, losses[n:n + window]).statistic))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("journals", nargs="+", help="Optuna journal files of finished real-training searches")
    p.add_argument("--config", help="TOML config the searches ran on (default: the built-in default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--n", type=csv_list, default=["16", "24", "32", "40", "48", "56"], help="runs the surrogate sees")
    p.add_argument("--window", type=int, default=16, help="next runs it ranks")
    p.add_argument("--out")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    plan = Trainer.from_config(resolve_config(args.config, args.set)).plan
    searches = [s for j in args.journals for s in journal_runs(j)]
    res = skill(plan, searches, [int(n) for n in args.n], args.window)
    for m, by_n in res.items():
        print(m + ": " + "; ".join(f"n = {n}: rho {np.mean(v):+.2f} ({len(v)} searches)" for n, v in by_n.items() if v))
    if args.out:
        atomic_write_bytes(Path(args.out), json.dumps({"journals": args.journals, "window": args.window, "rho": res,
                                                       "searches": [s[0] for s in searches]}, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
