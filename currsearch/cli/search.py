"""``currsearch search``: search orders on a recorded store with a surrogate (resumable Optuna
study), or, with ``--rounds``, trust-region rounds that record their own stores."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backends import RayBackend
from ..errors import ConfigError
from ..export import export_order
from ..orders import parse_order
from ..reports.common import write_json
from ..reports.trust_region import render_trust_region_markdown, write_trust_region_report
from ..search import SearchSettings, check_objectives, check_study_before_fit, run_search
from ..store import TrajectoryStore
from ..study import make_storage
from ..trust_region import TrustRegionSettings, run_trust_region
from .common import add_config_options, csv_list, given, resolve_config

SEARCH_OPTIONS = ("estimator", "space", "sampler", "trials", "batch", "objectives", "seed")


def add_search_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``search`` and ``run``; unset ones take the settings model's defaults."""
    p.add_argument("--estimator", help="surrogate estimator (default: additive; run: calibrated-interactions; "
                                       "--rounds: fut1-hvp)")
    p.add_argument("--space", help="search space (default: random_keys)")
    p.add_argument("--sampler", help="tpe, cmaes, gp, nsga2 or random (default: tpe)")
    p.add_argument("--trials", type=int, help="trials in the study (default: 128; 32 per round with --rounds)")
    p.add_argument("--batch", type=int, help="trials scored per backend call (default: 32; 8 with --rounds)")
    p.add_argument("--objectives", type=csv_list, help="comma-separated eval sets to minimize (default: all)")
    p.add_argument("--seed", type=int, help="sampler seed (default: 0)")


def _backend(args, store: TrajectoryStore, s: SearchSettings):
    if args.backend == "ray":
        return RayBackend(store, s.estimator, s.estimator_kwargs, num_actors=args.actors, address=args.address)
    return None  # run_search fits its own serial backend


def cmd_search(args) -> int:
    """One-shot surrogate search on ``--store``; writes ``search.json`` and ``best_order.json``."""
    if args.rounds:
        return cmd_trust_region(args)
    if args.budget is not None:
        raise ConfigError("--budget caps trust-region rounds; give --rounds R, or drop --budget (a one-shot search "
                          "on --store trains nothing)")
    if not args.store:
        raise ConfigError("currsearch search needs --store DIR (a recorded store), or --rounds R for trust-region "
                          "rounds that record their own")
    out = Path(args.out)
    s = SearchSettings(**given(args, *SEARCH_OPTIONS), storage=args.storage or str(out.resolve() / "study.journal"))
    store = TrajectoryStore.open(args.store)
    if args.config or args.set:
        store.check_config(resolve_config(args.config, args.set, store.config()))  # --set alone: on the store's config
    if args.storage:
        make_storage(args.storage)  # a bad URL fails here, before anything is written
    check_objectives(s.objectives, store.eval_names)  # before the backend starts Ray and fits
    check_study_before_fit(s, s.estimator, fix="use another --out (or --storage) or the same options")
    backend = _backend(args, store, s)
    try:  # run_search validates everything before its journal creates OUT
        res = run_search(store, s, backend=backend, progress=not args.quiet)
    finally:
        if backend is not None:
            backend.close()
    write_json(out / "search.json", res.top_record())
    export_order(out / "best_order.json", res.best_order, estimates=dict(zip(res.eval_names, res.estimates[0].tolist())))
    print(res.summary())
    print(f"study {res.study.study_name!r} in {s.storage}: {res.n_trials} trials ({res.n_run} run now); "
          f"wrote {out}/search.json, best_order.json")
    return 0


def cmd_trust_region(args) -> int:
    """Trust-region rounds (``search --rounds R``); writes ``trust_region.{json,md}`` and a plot."""
    if args.store or args.backend != "serial" or (args.objectives and len(args.objectives) != 1) or args.storage:
        raise ConfigError("--rounds records its own stores (OUT/round_R/store), keeps its own journals, scores serially "
                          "and minimizes one objective; drop --store/--storage/--backend, give one --objectives")
    opts = given(args, "estimator", "sampler", "trials", "seed", "radius", "top_k", "budget")
    opts.update(given(args, "batch") and {"batch_size": args.batch})
    opts.update(args.objectives and {"objective": args.objectives[0]} or {})
    s = TrustRegionSettings(rounds=args.rounds, **opts)
    cfg = resolve_config(args.config, args.set)
    start = parse_order(args.start, cfg.data.num_batches)
    res = run_trust_region(cfg, args.out, s, start=start, progress=not args.quiet)
    paths = write_trust_region_report(res, args.out)
    print(render_trust_region_markdown(res))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``search``."""
    p = sub.add_parser("search", help="search orders on a recorded store with a surrogate (resumes the study)")
    add_config_options(p)
    p.add_argument("--store", help="recorded store directory (not with --rounds)")
    p.add_argument("--out", required=True, help="directory for search.json, best_order.json (and study.journal)")
    add_search_options(p)
    p.add_argument("--storage", help="Optuna storage: a .journal path or URL (default: OUT/study.journal)")
    p.add_argument("--backend", choices=["serial", "ray"], default="serial", help="where orders are scored")
    p.add_argument("--actors", type=int, default=2, help="Ray actors (default: 2)")
    p.add_argument("--address", help="Ray cluster address (default: start a local one)")
    p.add_argument("--rounds", type=int, default=0,
                   help="trust-region rounds: search within --radius transpositions of the incumbent, verify the "
                        "--top-k best by real training, re-record at the new incumbent (resumes; default: 0, one-shot)")
    p.add_argument("--radius", type=int, help="initial trust-region radius in transpositions (default: 4)")
    p.add_argument("--top-k", type=int, help="orders retrained per round with --rounds (default: 2)")
    p.add_argument("--budget", type=float, help="with --rounds: real-run equivalents the rounds may spend, measured "
                   "by their time; a round after the first starts only if the spend so far plus the costliest "
                   "round fit, and a round's search stops early when its estimates would leave too little for "
                   "its retraining (default: no cap)")
    p.add_argument("--start", default="reference", help="first incumbent with --rounds: 'reference', 'random:SEED' or a "
                   "JSON order file, e.g. a best_order.json of `currsearch run` (default: reference)")
    p.set_defaults(func=cmd_search)
