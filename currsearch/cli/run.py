"""``currsearch run``: the main job (record, search, verify, refine) and its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..guided import GuidedSettings
from ..pipeline import PipelineResult, PipelineSettings, RefineSettings, VerifySettings, run_pipeline
from ..reports.run import comparison, write_run_report
from ..search import SearchSettings
from ..verify import summarize
from .common import add_config_options, csv_list, given, print_table, resolve_config
from .search import SEARCH_OPTIONS, add_search_options


#: options only one strategy uses (argparse dests): the other would ignore them
SURROGATE_ONLY = ("estimator", "space", "sampler", "trials", "batch", "fit_runs", "random", "tr_trials")
GUIDED_ONLY = ("first_batch", "refit_every", "enqueue", "polish")


def _check_strategy_options(args) -> None:
    """Refuse options the chosen ``--strategy`` does not use.

    Raises:
        ConfigError: naming them and the strategy that uses them.
    """
    guided = args.strategy == "guided-tpe"
    unused = [f"--{k.replace('_', '-')}" for k in (SURROGATE_ONLY if guided else GUIDED_ONLY) if getattr(args, k, None) is not None]
    if unused:
        raise ConfigError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by the "
                          f"{'guided-tpe' if guided else 'surrogate'} strategy; drop "
                          f"{'it' if len(unused) == 1 else 'them'} or use --strategy {'surrogate' if guided else 'guided-tpe'}")


def settings_from_args(args) -> PipelineSettings:
    """The :class:`PipelineSettings` of the command line (unset options keep the models' defaults).

    Raises:
        ConfigError: an invalid value, naming the setting, or an option the chosen strategy
            does not use (it would be ignored silently).
    """
    _check_strategy_options(args)
    fit = {"estimator_kwargs": {"n_runs": args.fit_runs}} if args.fit_runs is not None else {}
    search = SearchSettings(**{"estimator": "calibrated-interactions", **given(args, *SEARCH_OPTIONS), **fit})
    verify = VerifySettings(**given(args, "top_k", "random"))
    refine = RefineSettings(**given(args, "rounds") | ({"trials": args.tr_trials} if args.tr_trials is not None else {}))
    budget = {"budget": None} if args.no_budget else given(args, "budget")
    guided = GuidedSettings(**given(args, "first_batch", "refit_every", "enqueue", "polish"))
    return PipelineSettings(out=Path(args.out), search=search, verify=verify, refine=refine, guided=guided, **budget,
                            **given(args, "baselines", "strategy"))


def _print_summary(res: PipelineResult, paths: list[Path]) -> None:
    v = res.verification
    rows = sorted(v.candidates.items(), key=lambda kv: kv[1].verified["all"])
    print_table(["candidate", "kind", "estimated all", "verified all"],
                [[n, c.kind, c.estimated["all"] if c.estimated else float("nan"), c.verified["all"]] for n, c in rows])
    tr = v.trust_region
    if tr:
        print(f"trust region: {tr.rounds} rounds from {tr.start} ({tr.start_loss:.4f}) to {tr.final_loss:.4f} "
              f"(gain {tr.gain:.4f} nats/token, {tr.verified_runs} real training runs)")
    s = summarize(v)
    if s.best_searched and s.random_median:
        print(f"best searched {s.best_searched} ({s.best_searched_loss:.4f}) "
              f"{'beats' if s.beats_random_median else 'does not beat'} the random median ({s.random_median_loss:.4f}) "
              f"and {'beats' if s.beats_all_heuristics else 'does not beat'} every heuristic")
    if res.guided is not None:
        g = res.guided
        print(f"guided-tpe: {g.n_runs} real runs, {g.refits} refits, {g.n_surrogate} surrogate orders trained; "
              f"best {g.best_loss:.4f} from {g.best_source}")
        if g.polish is not None:
            print(f"suffix polish: {len(g.polish.losses)} resumed runs, {g.polish.improvements} improvements, "
                  f"{g.polish.run_equivalents:.1f} run equivalents")
    led = res.ledger
    print(f"compute: {led.real_runs} real runs, {led.run_equivalents:.1f} run equivalents, {led.seconds:.0f} s "
          f"({', '.join(f'{e.phase} {e.run_equivalents:.1f}' for e in led.entries)})")
    if res.baselines:
        c = comparison(res)
        print(f"equal compute ({c['runs']} real runs each, best on {c['eval_set']}): currsearch {c['currsearch'][1]:.4f}; "
              + "; ".join(f"{n} {x:.4f} ({'beaten' if c['beats'][n] else 'not beaten'})" for n, x in c["baselines"].items()))
    print(f"report: {paths[1]}")


def cmd_run(args) -> int:
    """Run the main job and write ``OUT/report`` (and ``OUT/trust_region``'s report)."""
    settings = settings_from_args(args)
    cfg = resolve_config(args.config, args.set)
    res = run_pipeline(cfg, settings, progress=not args.quiet)
    paths = write_run_report(res, settings.out / "report")
    _print_summary(res, paths)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run``."""
    p = sub.add_parser("run", help="record, search, verify the best orders by real training and write a report")
    add_config_options(p)
    p.add_argument("--out", default="runs/main", help="output directory (default: runs/main)")
    add_search_options(p)
    p.add_argument("--top-k", type=int, help="searched orders to verify (default: 3)")
    p.add_argument("--random", type=int, help="random baseline orders (default: 5)")
    p.add_argument("--rounds", type=int, help="trust-region rounds (fut1-hvp) from the best verified order "
                   "(default: 0 under a budget, 2 with --no-budget; their estimates count by time: under a "
                   "budget a round after the first starts only if the measured spend leaves room for the costliest "
                   "round so far, and a round's search stops early when its estimates would leave too little of "
                   "the budget for its retraining)")
    p.add_argument("--tr-trials", type=int, help="orders estimated per trust-region round (default: 16)")
    p.add_argument("--fit-runs", type=int, help="with --no-budget: real runs that fit a calibrated estimator "
                   "(default: the estimator's own, 1024 for calibrated-interactions); under a budget the fit gets "
                   "what the budget leaves")
    cap = p.add_mutually_exclusive_group()
    cap.add_argument("--budget", type=int, help="cap on the real-run equivalents the whole job spends (recording, "
                   "fit, verification, rounds); the phases are sized to it (default: 256)")
    cap.add_argument("--no-budget", action="store_true", help="no cap: the phases take their own settings "
                   "(1024 fit runs for calibrated-interactions unless --fit-runs), and the reference, random and "
                   "heuristic orders are verified too")
    p.add_argument("--strategy", choices=["surrogate", "guided-tpe"], help="surrogate: record, fit the surrogate, "
                   "search it, verify (default); guided-tpe: TPE with real training, with orders proposed by a surrogate "
                   "refitted to the runs, then the suffix polish of the best run (--polish); every run real, no recording, "
                   "no verification")
    p.add_argument("--first-batch", type=int, help="guided-tpe: plain TPE trials before the first refit (default: 16)")
    p.add_argument("--refit-every", type=int, help="guided-tpe: real trials between refits (default: 8)")
    p.add_argument("--enqueue", type=int, help="guided-tpe: surrogate orders trained after each refit (default: 4)")
    p.add_argument("--polish", type=float, help="guided-tpe: fraction of the budget spent on suffix polish of the best run, "
                   f"late transpositions trained from its state at a late step (default: {GuidedSettings().polish}; 0: none)")
    p.add_argument("--baselines", type=csv_list, help="searches with real training run at the same budget for "
                   "comparison: random-search, optuna-real (default: none)")
    p.set_defaults(func=cmd_run)
