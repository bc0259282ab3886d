"""Choose ``guided-tpe``'s suffix polish: fractions of the budget and anchor steps against TPE, paired by seed.

For each seed, at a budget of N run equivalents (default 64): ``optuna-real`` (TPE on real
training), ``guided-tpe`` without polish (N full runs), and for every variant ``(fraction,
anchors)`` the same guided search's first ``N - floor(fraction N)`` full runs followed by
:func:`currsearch.polish.suffix_polish` from their best run within the rest of N
(:mod:`currsearch.polish`; its moves are counted by the steps they train plus their
evaluation). The table gives each variant's best loss, its difference from TPE on the same
seed and the seeds where it is lower.

Choose on development seeds that the anytime benchmark's tables do not report; report on
fresh ones (``benchmarks/anytime.py --strategies guided-tpe+polish``).

    python benchmarks/polish_dev.py [CONFIG] --seeds 210,211 --budget 64 --out runs/polish_dev

Writes ``OUT/polish_dev.json`` (the config fingerprint, every variant's best loss and spend per
seed) and ``OUT/polish_dev.md``; resumable per seed, and a rerun with another config on the
same ``OUT`` is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from currsearch.baselines import real_search
from currsearch.cli import csv_list, resolve_config
from currsearch.errors import ConfigError
from currsearch.guided import GuidedSettings, guided_search
from currsearch.manifest import read_config_cache
from currsearch.polish import PolishSettings, suffix_polish
from currsearch.reports.common import markdown_table, write_result_files
from currsearch.train import Trainer

from guided_ablation import PAIRED_HEADERS, paired_cells, summarize

logger = logging.getLogger("currsearch.polish_dev")

#: variant -> (fraction of the budget polished, anchors as fractions of the window): the second round's
VARIANTS = {"f25_50-75": (0.25, (0.5, 0.75)), "f375_50-75": (0.375, (0.5, 0.75)), "f50_50-75": (0.5, (0.5, 0.75)),
            "f375_25-50-75": (0.375, (0.25, 0.5, 0.75))}


def seed_row(trainer: Trainer, seed: int, budget: int, variants: dict) -> dict:
    """``{name: {"best": nats/token, "spent": run equivalents}}`` for TPE, guided-tpe and every polish variant on ``seed``."""
    tpe = real_search(trainer, "optuna-real", budget, seed=seed, progress=False)
    guided = guided_search(trainer, budget, GuidedSettings(polish=0.0), seed=seed, progress=False)
    row = {"optuna-real": {"best": tpe.best_loss, "spent": float(budget)},
           "guided-tpe": {"best": guided.best_loss, "spent": float(budget)}}
    for name, (fraction, anchors) in variants.items():
        n_full = GuidedSettings(polish=fraction).full_runs(budget)  # the guided job's split of the budget
        first = dataclasses.replace(guided.runs, orders=guided.runs.orders[:n_full], losses=guided.runs.losses[:n_full])
        pol = suffix_polish(trainer, first.best_order, first.best_loss, budget - n_full, PolishSettings(starts=anchors),
                            seed=seed, progress=False)
        row[name] = {"best": pol.best_loss, "spent": n_full + pol.run_equivalents}
    return row


def render(summary: dict, seeds: list[int], budget: int, spent: dict) -> str:
    """The markdown report: per variant the best loss, its paired difference from TPE and its largest spend."""
    rows = [paired_cells(v, p, len(seeds)) + [f"{spent[v]:.2f}"] for v, p in summary.items()]
    return "\n".join([f"# Suffix polish at N = {budget}", "",
                      f"Best loss on `all` within {budget} run equivalents (nats/token), mean ± std over seeds {seeds}; "
                      "paired difference from `optuna-real` on the same seed (mean ± standard error), the seeds where "
                      "the variant is lower, and its largest spend.", "",
                      *markdown_table([*PAIRED_HEADERS, "max run eq."], rows), ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="TOML or YAML config file (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--seeds", type=csv_list, default=["210", "211"])
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--out", default="runs/polish_dev")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    seeds, out = [int(s) for s in args.seeds], Path(args.out)
    cfg = resolve_config(args.config, args.set)
    try:
        stored = read_config_cache(out / "polish_dev.json", cfg, {"rows": {}})
    except ConfigError as err:
        p.error(str(err))
    rows = stored.setdefault("rows", {})
    trainer = Trainer.from_config(cfg)
    for seed in seeds:
        if str(seed) not in rows:
            rows[str(seed)] = seed_row(trainer, seed, args.budget, VARIANTS)
            write_result_files(out, "polish_dev", {**stored, "budget": args.budget}, "")
        logger.info("seed %d: %s", seed, {k: round(v["best"], 4) for k, v in rows[str(seed)].items()})
    names = list(rows[str(seeds[0])])
    best = {f"{v}/{s}": [rows[str(s)][v]["best"]] for v in names for s in seeds}
    summary = summarize(best, names, seeds, 1)
    spent = {v: max(rows[str(s)][v]["spent"] for s in seeds) for v in names}
    md = render(summary, seeds, args.budget, spent)
    write_result_files(out, "polish_dev", {**stored, "budget": args.budget, "seeds": seeds, "summary": summary}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
