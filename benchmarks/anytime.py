"""Best verified loss against budget: currsearch against search with real training.

For each budget N (real-run equivalents, recording included) and seed, every currsearch
strategy runs the main job under ``--budget N`` (:func:`currsearch.pipeline.run_pipeline`;
``fut1-hvp-trust-region``: trust-region rounds alone, :func:`trust_region_point`),
and the two searches with real training (``random-search``, ``optuna-real``,
:mod:`currsearch.baselines`) spend N real runs. Searches whose first N runs are what a budget
of N would spend (the baselines, and ``guided-tpe``, whose refit schedule does not depend on
its budget: :mod:`currsearch.guided`; ``currsearch run --strategy guided-tpe --budget N``
keeps the best of its N runs) come from one search of ``max(budgets)`` per seed. The rounds of
``fut1-hvp-trust-region`` are kept in one directory per seed: a budget reads back the rounds a
smaller one ran (which its budget rule would have run the same way) and runs only the rest.

    python benchmarks/anytime.py [CONFIG] --budgets 64,128,256,512,1024 --seeds 0,1,2 --out runs/anytime

Writes ``OUT/anytime.json`` (every point), ``OUT/anytime.md`` (mean and std per point, the
compute multiplier, each strategy against ``optuna-real`` paired by seed) and
``OUT/anytime.png``. Resumable: every job keeps its own journal and store under ``OUT``, and
finished points are cached in ``OUT/points.json``, tied to the config by its fingerprint (a
resume or ``--no-run`` with another config is refused).

The **compute multiplier** at budget N is the budget random search needs to match
currsearch's mean result at N, interpolated (linearly in log N) on random search's mean
curve, divided by N; "> M" when random search never reaches it within its longest run M.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from pathlib import Path

from currsearch.baselines import BASELINES, real_search
from currsearch.cli import csv_list, progress_logging, resolve_config
from currsearch.errors import BudgetTooSmallError, CurrsearchError
from currsearch.guided import GuidedSettings, guided_search
from currsearch.manifest import atomic_write_bytes, read_config_cache
from currsearch.pipeline import PipelineSettings, RefineSettings, VerifySettings, run_pipeline
from currsearch.reports.common import markdown_table, pyplot, save_figure, write_result_files
from currsearch.search import SearchSettings
from currsearch.train import Trainer
from currsearch.trust_region import run_trust_region
from estimators import get_estimator

logger = logging.getLogger("currsearch.anytime")

#: key of ``OUT/points.json`` holding the config's trajectory fingerprint (:func:`_points`)
CONFIG_KEY = "config"

#: currsearch strategies: name -> (pipeline strategy, estimator, trust-region rounds); ``guided-tpe``
#: (:mod:`currsearch.guided`) spends the whole budget on real runs, TPE guided by refitted surrogates;
#: ``fut1-hvp-trust-region`` is trust-region rounds alone from the reference order
#: (``currsearch search --rounds R``, :func:`trust_region_point`), as many as their measured spend fits in the budget
STRATEGIES = {
    "fut1-hvp-trust-region": ("trust-region", "fut1-hvp", None),
    "calibrated-interactions": ("surrogate", "calibrated-interactions", 0),
    "calibrated-interactions+rounds": ("surrogate", "calibrated-interactions", 1),
    "additive+rounds": ("surrogate", "additive", 1),
    "transported": ("surrogate", "transported", 0),
    "linear-response": ("surrogate", "linear-response", 0),
    "precedence": ("surrogate", "precedence", 0),
    "hybrid": ("surrogate", "hybrid", 0),
    "guided-tpe": ("guided-tpe", "calibrated-interactions", 0),
    "guided-tpe+polish": ("guided-tpe", "calibrated-interactions", 0),
}
#: the guided strategies' fraction of the budget spent on suffix polish (:mod:`currsearch.polish`):
#: ``guided-tpe`` is the search without it (the tables of the first thirteen sessions),
#: ``guided-tpe+polish`` ``GuidedSettings``' default
POLISH = {"guided-tpe": 0.0, "guided-tpe+polish": GuidedSettings().polish}


def _points(path: Path, cfg) -> dict:
    """The points cached in ``path`` (``OUT/points.json``), tied to ``cfg`` by its trajectory
    fingerprint under the key ``config`` (:func:`~currsearch.manifest.read_config_cache`).

    Raises:
        ConfigError: the file holds points of another config (mixing them would compare one
            config's strategies with another's baselines), or is not a JSON object.
    """
    return read_config_cache(path, cfg, key=CONFIG_KEY)


def _save(path: Path, points: dict) -> None:
    atomic_write_bytes(path, json.dumps(points, indent=1, sort_keys=True).encode())


def run_strategy(cfg, name: str, budget: int, seed: int, out: Path, trials: int) -> dict:
    """One currsearch job under ``budget``; its best verified loss (nats/token) and ledger, or why it does not fit."""
    strategy, estimator, rounds = STRATEGIES[name]
    fits = strategy == "surrogate" and get_estimator(estimator).needs_runs
    fit_seed = {"seed": seed} if fits else {}  # the seed varies the fit's runs too
    s = PipelineSettings(out=out, budget=budget, strategy=strategy, refine=RefineSettings(rounds=rounds),
                         verify=VerifySettings(top_k=3),
                         search=SearchSettings(estimator=estimator, trials=trials, seed=seed, estimator_kwargs=fit_seed))
    try:
        res = run_pipeline(cfg, s, progress=False)
    except BudgetTooSmallError as err:  # the strategy does not fit this budget (other errors propagate)
        return {"fits": False, "why": str(err)}
    v = res.verification
    best = v.best("all")
    return {"fits": True, "best_loss": v.candidates[best].verified["all"], "best": best,
            "real_runs": res.ledger.real_runs, "run_equivalents": res.ledger.run_equivalents, "seconds": res.ledger.seconds}


def trust_region_point(cfg, budget: int, seed: int, out: Path) -> dict:
    """``fut1-hvp`` trust-region rounds alone, from the reference order, under ``budget``.

    The first round runs when its plan fits (``RefineSettings.round_run_equivalents``: its
    recorded run, its retrained orders, its ``fut1-hvp`` estimates; :class:`RefineSettings`'
    defaults: 51); each later one when the measured spend so far plus the costliest finished
    round fit (``TrustRegionSettings.budget``), and a round's search stops early when its
    estimates would leave too little of the budget for its retraining (a round so cut is
    finished again by a larger budget reading the shared directory). The spend is measured,
    not planned (:func:`~currsearch.trust_region.rounds_run_equivalents`: each round's seconds
    over its own unit, its recorded run's training steps, ``TrustRegionRound.unit_seconds``);
    ``run_equivalents`` shows any overshoot past the budget.
    """
    r = RefineSettings(rounds=1)
    if r.round_run_equivalents > budget:
        return {"fits": False, "why": f"one trust-region round is planned at {r.round_run_equivalents:.0f} run equivalents"}
    most = int(budget // (1 + r.top_k))  # a round is at least its recording and its retrained orders
    res = run_trust_region(cfg, out, r.trust_region("all", seed), rounds=most, budget=budget, progress=False)
    return {"fits": True, "best_loss": res.incumbent_loss, "best": "trust_region", "real_runs": res.verified_runs,
            "run_equivalents": res.run_equivalents, "rounds": len(res.rounds),
            "seconds": sum(sum(x.seconds.values()) for x in res.rounds)}


def collect(cfg, budgets: list[int], seeds: list[int], strategies: list[str], out: Path, trials: int) -> dict:
    """Run (or resume) every point; returns ``{"baselines": {name: {seed: [losses]}}, "currsearch": {strategy: {budget: {seed: point}}}}``."""
    path = out / "points.json"
    points = _points(path, cfg)
    trainer = Trainer.from_config(cfg)
    for name in BASELINES:
        for seed in seeds:
            key = f"baseline/{name}/{seed}"
            have = points.get(key, [])
            if len(have) < max(budgets):
                res = real_search(trainer, name, max(budgets), seed=seed, storage=str(out / "baselines" / f"{name}-{seed}.journal"))
                points[key] = res.losses
                _save(path, points)
            logger.info("%s seed %d: best %.4f after %d runs", name, seed, min(points[key]), len(points[key]))
    for strategy in strategies:
        if strategy == "guided-tpe":
            _guided_points(trainer, budgets, seeds, out, points, path)
            continue
        if STRATEGIES[strategy][0] == "guided-tpe":
            _polished_points(trainer, strategy, budgets, seeds, out, points, path)
            continue
        for budget in budgets:
            for seed in seeds:
                key = f"currsearch/{strategy}/{budget}/{seed}"
                if key not in points:
                    if STRATEGIES[strategy][0] == "trust-region":  # rounds shared by every budget (module docstring)
                        points[key] = trust_region_point(cfg, budget, seed, out / strategy / f"seed{seed}")
                    else:
                        points[key] = run_strategy(cfg, strategy, budget, seed, out / strategy / f"N{budget}" / f"seed{seed}", trials)
                    _save(path, points)
                p = points[key]
                logger.info("%s N=%d seed %d: %s", strategy, budget, seed,
                            f"{p['best_loss']:.4f} ({p['run_equivalents']:.1f} run eq.)" if p["fits"] else "does not fit")
    return points


def _guided_points(trainer: Trainer, budgets: list[int], seeds: list[int], out: Path, points: dict, path: Path) -> None:
    """``guided-tpe`` at every budget from one search of ``max(budgets)`` runs per seed (journal
    ``OUT/guided-tpe/seed<s>.journal``): the best of its first N runs, N real runs spent."""
    for seed in seeds:
        keys = {N: f"currsearch/guided-tpe/{N}/{seed}" for N in budgets}
        if all(k in points for k in keys.values()):
            continue
        res = guided_search(trainer, max(budgets), GuidedSettings(polish=POLISH["guided-tpe"]), seed=seed,
                            storage=str(out / "guided-tpe" / f"seed{seed}.journal"))
        durations = res.run_durations
        for N, key in keys.items():
            points[key] = {"fits": True, "best_loss": res.runs.best_after(N), "real_runs": N, "run_equivalents": float(N),
                           "seconds": sum(durations[:N])}
        _save(path, points)
        logger.info("guided-tpe seed %d: best %.4f after %d runs", seed, res.best_loss, res.n_runs)


def _polished_points(trainer: Trainer, strategy: str, budgets: list[int], seeds: list[int], out: Path, points: dict,
                     path: Path) -> None:
    """A guided strategy with suffix polish: one guided search per seed (journal
    ``OUT/guided-tpe/seed<s>.journal``, shared with ``guided-tpe``: the full runs do not depend
    on the polish) resumed budget by budget, smallest first (its full runs at N are the first
    ``GuidedSettings.full_runs(N)`` of the same search), and one polish per budget from the
    best of those runs (its own study in the journal)."""
    settings = GuidedSettings(polish=POLISH[strategy])
    for seed in seeds:
        for N in sorted(budgets):
            key = f"currsearch/{strategy}/{N}/{seed}"
            if key in points:
                continue
            res = guided_search(trainer, N, settings, seed=seed, storage=str(out / "guided-tpe" / f"seed{seed}.journal"))
            pol = res.polish
            points[key] = {"fits": True, "best_loss": res.best_loss, "best": res.best_source,
                           "real_runs": res.n_runs + (pol.state_runs if pol else 0),  # as the job's ledger: whole windows
                           "run_equivalents": res.run_equivalents,
                           "seconds": sum(res.run_durations) + (pol.seconds if pol else 0.0),
                           "polish": pol.record() if pol else None}
            _save(path, points)
            logger.info("%s N=%d seed %d: %.4f (%.1f run eq., best from %s)", strategy, N, seed, res.best_loss,
                        res.run_equivalents, res.best_source)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def multiplier(curve: list[float], target: float, budget: int) -> float | None:
    """Budget (interpolated linearly in log N) at which ``curve`` (mean best loss after k runs,
    k = 1..M) first reaches ``target``, divided by ``budget``; None when it never does."""
    for k in range(1, len(curve) + 1):
        if curve[k - 1] <= target:
            if k == 1:
                return 1 / budget
            lo, hi = curve[k - 2], curve[k - 1]  # lo > target >= hi
            frac = (lo - target) / (lo - hi) if lo > hi else 1.0
            return math.exp(math.log(k - 1) + frac * (math.log(k) - math.log(k - 1))) / budget
    return None


def summarize(points: dict, budgets: list[int], seeds: list[int], strategies: list[str]) -> dict:
    """Mean and std per (strategy or baseline, budget), each strategy's compute multiplier, and
    ``paired``: each strategy against ``optuna-real`` seed by seed, ``{strategy: {N: {"mean_diff",
    "ahead", "seeds"}}}`` with ``mean_diff`` the mean over seeds of (strategy's best - TPE's best
    of N runs), nats/token (negative: the strategy is lower), and ``ahead`` the seeds where it is
    strictly lower. Budgets a strategy does not fit on every seed are left out of its rows, and
    so are those missing from ``points`` on some seed (``not_run``: ``{strategy: [N, ...]}``)."""
    rows: dict = {}
    pairs: dict = {}
    not_run: dict = {}
    curves = {}
    for name in BASELINES:
        runs = [points[f"baseline/{name}/{s}"] for s in seeds]
        curves[name] = [statistics.fmean(min(r[:k]) for r in runs) for k in range(1, max(budgets) + 1)]
        rows[name] = {N: _mean_std([min(r[:N]) for r in runs]) for N in budgets}
    for st in strategies:
        rows[st], pairs[st] = {}, {}
        for N in budgets:
            ps = [points.get(f"currsearch/{st}/{N}/{s}") for s in seeds]
            if None in ps:
                not_run.setdefault(st, []).append(N)
            elif all(p["fits"] for p in ps):
                losses = [p["best_loss"] for p in ps]
                rows[st][N] = _mean_std(losses)
                diffs = [x - min(points[f"baseline/optuna-real/{s}"][:N]) for x, s in zip(losses, seeds)]
                pairs[st][N] = {"mean_diff": statistics.fmean(diffs), "ahead": sum(d < 0 for d in diffs), "seeds": len(diffs)}
    mult = {st: {N: multiplier(curves["random-search"], rows[st][N][0], N) for N in rows[st]} for st in strategies}
    return {"budgets": budgets, "seeds": seeds, "rows": rows, "multiplier": mult, "random_curve": curves["random-search"],
            "paired": pairs, "not_run": not_run}


def render(summary: dict) -> str:
    """``anytime.md``: mean ± std best verified loss per budget, the compute multiplier, and the
    paired differences against ``optuna-real`` (:func:`summarize`)."""
    budgets = summary["budgets"]
    rows = []
    for name, by_n in summary["rows"].items():
        missing = summary.get("not_run", {}).get(name, [])
        rows.append([name] + [f"{by_n[N][0]:.4f} ± {by_n[N][1]:.4f}" if N in by_n else "not run" if N in missing
                              else "does not fit" for N in budgets])
    mult = [[st] + [("n/a" if N not in m else f"> {len(summary['random_curve']) / N:.1f}" if m[N] is None else f"{m[N]:.2f}")
                    for N in budgets] for st, m in summary["multiplier"].items()]
    head = ["strategy"] + [f"N = {N}" for N in budgets]
    pair = [[st] + [(f"{by_n[N]['mean_diff']:+.4f} ({by_n[N]['ahead']} of {by_n[N]['seeds']})" if N in by_n else "n/a")
                    for N in budgets] for st, by_n in summary["paired"].items()]
    return ("# Best verified loss against budget\n\nMean ± std over seeds "
            f"{summary['seeds']} of the best verified final loss on `all` (nats/token; lower is better). N counts every "
            "real-run equivalent a strategy spends, recording and calibration included.\n\n"
            + "\n".join(markdown_table(head, rows))
            + "\n\n## Compute multiplier\n\nThe budget random search needs (mean curve, interpolated in log N) to match "
              "the strategy's mean at N, divided by N.\n\n" + "\n".join(markdown_table(head, mult))
            + "\n\n## Against optuna-real, paired by seed\n\nMean over seeds of (strategy's best - optuna-real's best "
              "at the same N), nats/token (negative: lower than TPE on real training), and in brackets the seeds "
              "where the strategy is lower.\n\n" + "\n".join(markdown_table(head, pair)) + "\n")


def plot(summary: dict, path: Path) -> Path:
    """``anytime.png``: mean best verified loss against budget (log x), with std bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(range(1, len(summary["random_curve"]) + 1), summary["random_curve"], color="0.7", lw=1,
            label="random-search (every N)")
    for name, by_n in summary["rows"].items():
        ns = [N for N in summary["budgets"] if N in by_n]
        if ns:
            ax.errorbar(ns, [by_n[N][0] for N in ns], yerr=[by_n[N][1] for N in ns], marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="budget N (real-run equivalents)", ylabel="best verified loss, all (nats/token)",
           title="best verified loss against budget")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="TOML or YAML config file (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--budgets", type=csv_list, default=["64", "128", "256", "512", "1024"])
    p.add_argument("--seeds", type=csv_list, default=["0", "1", "2"])
    p.add_argument("--strategies", type=csv_list, default=list(STRATEGIES))
    p.add_argument("--trials", type=int, default=128, help="surrogate trials per currsearch job (default: 128)")
    p.add_argument("--out", default="runs/anytime")
    p.add_argument("--no-run", action="store_true", help="only summarize the points already in OUT/points.json "
                   "(missing ones show as 'not run'), e.g. after stopping a long run")
    args = p.parse_args(argv)
    try:
        cfg = resolve_config(args.config, args.set)
        budgets, seeds = sorted(int(x) for x in args.budgets), [int(x) for x in args.seeds]
        unknown = [s for s in args.strategies if s not in STRATEGIES]
        if unknown:
            raise CurrsearchError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.no_run:
            points = _points(out / "points.json", cfg)
            short = [f"{b} seed {s}" for b in BASELINES for s in seeds if len(points.get(f"baseline/{b}/{s}", [])) < max(budgets)]
            if short:
                raise CurrsearchError(f"{out / 'points.json'} lacks {max(budgets)} baseline runs of {', '.join(short)}; "
                                      "run without --no-run first, or give smaller --budgets")
        else:
            with progress_logging(quiet=False):
                points = collect(cfg, budgets, seeds, args.strategies, out, args.trials)
    except CurrsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = summarize(points, budgets, seeds, args.strategies)
    write_result_files(out, "anytime", {"summary": summary, "points": points}, render(summary))
    plot(summary, out / "anytime.png")
    print(render(summary))
    print(f"wrote {out}/anytime.json, anytime.md, anytime.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
