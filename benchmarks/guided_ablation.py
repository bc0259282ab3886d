"""What does ``guided-tpe`` owe its surrogate at small budgets? Variants against TPE, paired by seed.

At a budget of N real runs (default 64) and for each seed, every variant below searches with
real training; the table gives each one's best loss after N runs and its difference from
``optuna-real`` (plain TPE) on the same seed:

- ``optuna-real``: TPE on real training (the baseline, :mod:`currsearch.baselines`);
- ``guided-tpe``: the default :class:`~currsearch.guided.GuidedSettings` without the suffix polish
  (every variant here spends all N runs on full runs: ``polish = 0``; the polish is measured
  by ``benchmarks/anytime.py``'s ``guided-tpe+polish``);
- ``enqueue-6``: 6 surrogate orders per refit instead of 4 (more exploitation);
- ``refit-every-4``: refits every 4 runs, 2 orders each (the same share, refitted twice as often);
- ``group-model``: a low-capacity surrogate at every refit: ridge on each domain's count in
  4 window segments and its last position (``interaction_features``' histogram and last
  columns; 5 G features), descended from the best real orders;
- ``random-swaps``: no surrogate: 2 random transpositions of each of the ``enqueue`` best real
  orders (what local perturbation alone gives, without a model to rank it).

Choose settings on seeds that the anytime benchmark's tables do not report (this file's
results are development draws); report on fresh ones.

    python benchmarks/guided_ablation.py [CONFIG] --seeds 100,101 --budget 64 --out runs/guided_ablation

Training is bit-reproducible on CPU (``tests/test_train.py``), so an order trained by an
earlier variant on the same seed is read from an in-process cache of its eval losses instead
of retrained (the first 16 trials of every variant are TPE's): the losses are those a fresh
run gets, the wall times are not measured. CPU only (``train.device=cpu``; on a GPU a rerun
is not bit-identical). Writes ``OUT/guided_ablation.json`` (the config fingerprint and every
run's loss, in trial order) and ``OUT/guided_ablation.md``; resumable per (variant, seed), and
a rerun with another config on the same ``OUT`` is refused.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from currsearch.baselines import real_search
from currsearch.cli import csv_list, resolve_config
from currsearch.errors import ConfigError
from currsearch.guided import GuidedSettings, best_new_orders, guided_search, propose
from currsearch.manifest import read_config_cache
from currsearch.reports.common import fmt, markdown_table, write_result_files
from currsearch.train import Trainer
from estimators.calibrated import CalibratedInteractions, interaction_features

logger = logging.getLogger("currsearch.guided_ablation")


class GroupModel(CalibratedInteractions):
    """Ridge on per-domain features only: counts in 4 window segments and last position (5 G columns)."""

    CACHE_NAME = "group"

    def _features(self, orders: torch.Tensor) -> torch.Tensor:
        T, G = orders.shape[1], self.n_groups
        f = interaction_features(orders, self.groups, G, segments=4)
        return torch.cat([f[:, :4 * G], f[:, -3 * T - G:-3 * T]], 1)


def group_model(plan, objective, orders, losses, exclude, s):
    """:func:`~currsearch.guided.propose` with :class:`GroupModel` (descents from the best real
    orders only): at most ``s.enqueue`` orders, each a list of T batch indices."""
    est = GroupModel.from_runs(plan, [objective], orders, [[x] for x in losses])
    best = sorted(range(len(losses)), key=lambda i: (losses[i], i))[:s.starts]
    return best_new_orders(est, objective, [est.swap_descent(orders[i], objective, s.max_swaps) for i in best],
                           exclude, s.enqueue)


def random_swaps(plan, objective, orders, losses, exclude, s, swaps: int = 2):
    """No surrogate: ``swaps`` random transpositions of each of the ``s.enqueue`` best real orders
    (seeded by the number of runs, so deterministic): at most ``s.enqueue`` orders of T batch indices."""
    rng = random.Random(len(orders))
    out = []
    for i in sorted(range(len(losses)), key=lambda i: (losses[i], i))[:s.enqueue]:
        o = list(orders[i])
        for _ in range(swaps):
            a, b = rng.sample(range(len(o)), 2)
            o[a], o[b] = o[b], o[a]
        if tuple(o) not in exclude:
            out.append(o)
    return out


#: variant -> (GuidedSettings overrides, proposer); None: plain TPE
VARIANTS = {
    "optuna-real": None,
    "guided-tpe": ({}, propose),
    "enqueue-6": ({"enqueue": 6}, propose),
    "refit-every-4": ({"refit_every": 4, "enqueue": 2}, propose),
    "group-model": ({}, group_model),
    "random-swaps": ({}, random_swaps),
}


def cache_training(trainer: Trainer) -> dict:
    """Cache ``trainer.train(order)`` per order in this process (exact: CPU training is
    bit-reproducible); keeps only the eval losses. Returns the cache (clear it between seeds)."""
    cache, train = {}, trainer.train

    def cached(order, *args, **kwargs):
        key = tuple(int(x) for x in order)
        if key not in cache:
            cache[key] = SimpleNamespace(eval_losses=train(order, *args, **kwargs).eval_losses)
        return cache[key]

    trainer.train = cached
    return cache


def run_variant(trainer: Trainer, name: str, budget: int, seed: int) -> list[float]:
    """Objective losses (nats/token) of the ``budget`` real runs of variant ``name`` on ``seed``, in trial order."""
    if VARIANTS[name] is None:
        return real_search(trainer, "optuna-real", budget, seed=seed, progress=False).losses
    overrides, proposer = VARIANTS[name]
    return guided_search(trainer, budget, GuidedSettings(**{"polish": 0.0, **overrides}), seed=seed, progress=False,
                         proposer=proposer).runs.losses


def summarize(runs: dict, variants: list[str], seeds: list[int], budget: int) -> dict:
    """Per variant: mean and std of the best loss after ``budget`` runs, and the paired difference from TPE."""
    best = {v: [min(runs[f"{v}/{s}"][:budget]) for s in seeds] for v in variants}
    out = {}
    for v in variants:
        d = [b - t for b, t in zip(best[v], best["optuna-real"])]
        out[v] = {"mean": statistics.mean(best[v]), "std": statistics.stdev(best[v]) if len(seeds) > 1 else 0.0,
                  "vs_tpe": statistics.mean(d), "vs_tpe_se": statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0,
                  "ahead": sum(x < 0 for x in d)}
    return out


#: the columns of :func:`paired_cells`
PAIRED_HEADERS = ["variant", "best loss", "- TPE, paired", "seeds ahead"]


def paired_cells(variant: str, p: dict, n_seeds: int) -> list[str]:
    """One table row of :func:`summarize`'s entry ``p`` for ``variant`` (columns :data:`PAIRED_HEADERS`)."""
    return [f"`{variant}`", f"{fmt(p['mean'])} ± {fmt(p['std'])}", f"{p['vs_tpe']:+.4f} ± {p['vs_tpe_se']:.4f}",
            f"{p['ahead']} of {n_seeds}"]


def render(summary: dict, seeds: list[int], budget: int) -> str:
    """The markdown report of :func:`summarize`'s result."""
    rows = [paired_cells(v, p, len(seeds)) for v, p in summary.items()]
    return "\n".join([f"# guided-tpe ablation at N = {budget}", "",
                      f"Best loss on the objective after {budget} real runs (nats/token), mean ± std over seeds {seeds}; "
                      "paired difference from `optuna-real` on the same seed (mean ± standard error) and the seeds "
                      "where the variant is lower.", "",
                      *markdown_table(PAIRED_HEADERS, rows), ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="TOML or YAML config file (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--seeds", type=csv_list, default=["100", "101", "102"])
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--variants", type=csv_list, default=list(VARIANTS))
    p.add_argument("--out", default="runs/guided_ablation")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or "optuna-real" not in args.variants:
        p.error(f"--variants: choose from {', '.join(VARIANTS)}, optuna-real included (unknown: {unknown})")
    seeds, out = [int(s) for s in args.seeds], Path(args.out)
    cfg = resolve_config(args.config, args.set)
    if cfg.train.device != "cpu":
        p.error("the ablation caches training results, exact only on CPU: use --set train.device=cpu")
    try:
        stored = read_config_cache(out / "guided_ablation.json", cfg, {"runs": {}})
    except ConfigError as err:
        p.error(str(err))
    fingerprint, runs = stored["config"], stored.setdefault("runs", {})
    trainer = Trainer.from_config(cfg)
    cache = cache_training(trainer)
    for seed in seeds:
        cache.clear()  # orders repeat within a seed (TPE's first trials), not across seeds
        for v in args.variants:
            key = f"{v}/{seed}"
            if len(runs.get(key, [])) < args.budget:
                runs[key] = run_variant(trainer, v, args.budget, seed)
                write_result_files(out, "guided_ablation", {"config": fingerprint, "runs": runs}, "")
            logger.info("%s seed %d: best %.4f after %d runs", v, seed, min(runs[key][:args.budget]), args.budget)
    summary = summarize(runs, args.variants, seeds, args.budget)
    write_result_files(out, "guided_ablation", {"config": fingerprint, "budget": args.budget, "seeds": seeds,
                                                "runs": runs, "summary": summary}, render(summary, seeds, args.budget))
    print(render(summary, seeds, args.budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
