"""Command-line interface: ``currsearch COMMAND [CONFIG] [options]``.

Every command takes an optional TOML/YAML config file (defaults run on the embedded
corpus) and ``--set section.key=value`` overrides. Errors on bad input print one clear
``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import Config, config_from_dict, load_config
from .errors import ConfigError, CurrsearchError


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_config(path: str | None, overrides: list[str]) -> Config:
    """Load ``path`` (or defaults) and apply ``section.key=value`` overrides (values parsed as JSON when they parse).

    Raises:
        ConfigError: a malformed override or an invalid resulting config.
    """
    d = load_config(path).to_dict()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) != 2:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. data.num_batches=16")
        section, name = parts
        if section not in d:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; sections are {sorted(d)}")
        d[section][name] = _parse_value(value)
    return config_from_dict(d, source=f"{path or 'defaults'} with --set overrides")


def csv_list(text: str) -> list[str]:
    """Parse a comma-separated option value (``"a, b,"`` -> ``["a", "b"]``); argparse ``type=``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML or YAML config file (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_train(args) -> int:
    from safetensors.torch import save_file

    from .orders import parse_order, save_order
    from .train import Trainer

    cfg = resolve_config(args.config, args.set)
    trainer = Trainer.from_config(cfg)
    order = parse_order(args.order, trainer.T)
    res = trainer.train(order, progress=not args.quiet)
    print(f"trained {trainer.model.num_params:,} parameters on T={trainer.T} batches in order {args.order!r} "
          f"({res.seconds:.2f} s for the window)")
    print(f"{'eval set':<12} {'loss (nats/token)':>18} {'perplexity':>11}")
    for name, loss in res.eval_dict().items():
        print(f"{name:<12} {loss:>18.4f} {res.perplexity()[name]:>11.2f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({**res.summary(), "config": cfg.to_dict()}, indent=1))
        save_order(out / "order.json", order)
        params = {k: v.detach().contiguous().clone() for k, v in trainer.model.unflatten(res.theta).items()}
        save_file(params, str(out / "model.safetensors"))
        print(f"wrote {out}/result.json, order.json, model.safetensors")
    return 0


def cmd_record(args) -> int:
    from .record import record

    cfg = resolve_config(args.config, args.set)
    store = record(cfg, args.out, progress=not args.quiet, check_budget=not args.no_budget)
    print(store.summary())
    return 0


def cmd_inspect(args) -> int:
    from .store import TrajectoryStore

    store = TrajectoryStore.open(args.store, verify=not args.no_verify, allow_incomplete=True)
    print(store.summary() if store.manifest["phase"] == "complete" else
          f"incomplete store {store.path} (phase {store.manifest['phase']}, "
          f"{len(store.manifest['checkpoints_done'])} checkpoints, {len(store.manifest['pairs_done'])} of "
          f"{len(store.anchors)} pair shards done); run `currsearch record` again to resume")
    return 0


def cmd_benchmark(args) -> int:
    from .fidelity_cli import main as fidelity_main

    return {"fidelity": fidelity_main}[args.name](args.args)


def cmd_analyze(args) -> int:
    from .analyze_cli import main as positions_main

    return {"positions": positions_main}[args.name](args.args)


def cmd_ablate(args) -> int:
    from .ablate_cli import main as ablate_main

    return ablate_main((["--help"] if args.help else []) + args.args)


def _search_opts(p: argparse.ArgumentParser, trials: str, estimator: str, batch: str) -> None:
    """Options shared by ``search`` and ``run``; defaults given as help text are resolved by the command."""
    p.add_argument("--estimator", default=None, help=f"surrogate estimator (default: {estimator})")
    p.add_argument("--space", default="random_keys", help="search space (default: random_keys)")
    p.add_argument("--sampler", default="tpe", help="tpe, cmaes, gp, nsga2 or random (default: tpe)")
    p.add_argument("--trials", type=int, default=None, help=f"trials in the study (default: {trials})")
    p.add_argument("--batch", type=int, default=None, help=f"trials scored per backend call (default: {batch})")
    p.add_argument("--objectives", type=csv_list, default=["all"], help="comma-separated eval sets to minimize (default: all)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")


def _defaults(args, estimator: str, trials: int, batch: int) -> tuple[str, int, int]:
    """``(estimator, trials, batch)`` of the command line, with these defaults where not given."""
    return (args.estimator or estimator, trials if args.trials is None else args.trials,
            batch if args.batch is None else args.batch)


def _top_json(res, k: int = 10) -> dict:
    return {
        "study": res.study.study_name,
        "n_trials": res.n_trials,
        "n_run": res.n_run,
        "seconds": res.seconds,
        "eval_names": res.eval_names,
        "objectives": res.objectives,
        "top": [{"order": o.tolist(), "estimates": dict(zip(res.eval_names, e.tolist())),
                 "source": res.sources[i] if i < len(res.sources) else ""}
                for i, (o, e) in enumerate(res.top(k))],
    }


def cmd_search(args) -> int:
    from .backends import RayBackend
    from .export import export_order
    from .search import run_search
    from .store import TrajectoryStore

    if args.rounds:
        return _trust_region(args)
    if not args.store:
        raise ConfigError("currsearch search needs --store DIR (a recorded store), or --rounds R for trust-region rounds that record their own")
    args.estimator, args.trials, args.batch = _defaults(args, "additive", 256, 32)
    store = TrajectoryStore.open(args.store)
    if args.config or args.set:
        store.check_config(resolve_config(args.config, args.set))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or str(out / "study.journal")
    backend = None
    if args.backend == "ray":
        backend = RayBackend(str(store.path), args.estimator, num_actors=args.actors, address=args.address)
    try:
        res = run_search(store, estimator_name=args.estimator, space=args.space, sampler=args.sampler,
                         n_trials=args.trials, batch_size=args.batch, storage=storage, backend=backend,
                         objectives=args.objectives, seed=args.seed, progress=not args.quiet)
    finally:
        if backend is not None:
            backend.close()
    (out / "search.json").write_text(json.dumps(_top_json(res), indent=1))
    export_order(out / "best_order.json", res.best_order, estimates=dict(zip(res.eval_names, res.estimates[0].tolist())))
    print(res.summary())
    print(f"study {res.study.study_name!r} in {storage}: {res.n_trials} trials ({res.n_run} run now); "
          f"wrote {out}/search.json, best_order.json")
    return 0


def _trust_region(args) -> int:
    from .reports.trust_region import write_trust_region_report
    from .trust_region import run_trust_region

    if args.store or args.backend != "serial" or len(args.objectives) != 1:
        raise ConfigError("--rounds records its own stores (OUT/round_R/store), scores serially and minimizes one "
                          "objective; drop --store/--backend, give one --objectives")
    from .orders import parse_order

    cfg = resolve_config(args.config, args.set)
    start = parse_order(args.start, cfg.data.num_batches)
    estimator, trials, batch = _defaults(args, "fut1-hvp", 32, 8)
    res = run_trust_region(cfg, args.out, rounds=args.rounds, start=start, estimator=estimator, radius=args.radius,
                           trials=trials, top_k=args.top_k, sampler=args.sampler, batch_size=batch,
                           objective=args.objectives[0], seed=args.seed, progress=not args.quiet)
    paths = write_trust_region_report(res, args.out)
    print(Path(paths[0]).read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_run(args) -> int:
    from estimators import get_estimator

    from .backends import SerialBackend
    from .record import record
    from .search import run_search
    from .reports.trust_region import write_trust_region_report
    from .reports.verify import write_report
    from .verify import baseline_orders, summarize, verify

    cfg = resolve_config(args.config, args.set)
    args.estimator, args.trials, args.batch = _defaults(args, "calibrated-interactions", 128, 32)
    if args.rounds < 0 or args.tr_trials < 3:
        raise ConfigError(f"--rounds must be >= 0 and --tr-trials >= 3 (got {args.rounds}, {args.tr_trials})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet = args.quiet
    store = record(cfg, out / "store", progress=not quiet)
    estimator = get_estimator(args.estimator).fit(store)  # fitted once: search and the baselines' estimates
    res = run_search(store, estimator_name=args.estimator, space=args.space, sampler=args.sampler,
                     n_trials=args.trials, batch_size=args.batch, storage=str(out / "study.journal"),
                     backend=SerialBackend(estimator), objectives=args.objectives, seed=args.seed, progress=not quiet)
    trainer = store.trainer()
    candidates = {f"search_{i + 1}": o for i, (o, _) in enumerate(res.top(args.top_k))}
    candidates.update(baseline_orders(trainer, n_random=args.random, seed=args.seed))
    est = estimator.estimate(_stack_orders(list(candidates.values())))
    estimates = dict(zip(candidates, est))
    if not quiet:
        print(f"verifying {len(candidates)} orders by real training")
    result = verify(trainer, candidates, estimates, progress=not quiet)
    result = result.with_search(_top_json(res, args.top_k))
    if args.rounds:
        from .trust_region import refine_verified

        if not quiet:
            print(f"trust-region rounds from the best verified order ({args.rounds} rounds, fut1-hvp)")
        result, tr_res = refine_verified(cfg, out / "trust_region", result, rounds=args.rounds, objective=args.objectives[0],
                                         progress=not quiet, trainer=trainer, estimator=estimator, trials=args.tr_trials,
                                         top_k=2, seed=args.seed)
        write_trust_region_report(tr_res, out / "trust_region")
    paths = write_report(out / "report", result, res.study)
    s = summarize(result)
    print(f"{'candidate':<20} {'kind':<10} {'estimated all':>14} {'verified all':>13}")
    for name, v in sorted(result.candidates.items(), key=lambda kv: kv[1].verified["all"]):
        e = v.estimated["all"] if v.estimated else float("nan")
        print(f"{name:<20} {v.kind:<10} {e:>14.4f} {v.verified['all']:>13.4f}")
    tr = result.trust_region
    if tr:
        print(f"trust region: {tr.rounds} rounds from {tr.start} ({tr.start_loss:.4f}) to {tr.final_loss:.4f} "
              f"(gain {tr.gain:.4f} nats/token, {tr.verified_runs} real training runs)")
    if s.best_searched:
        print(f"best searched {s.best_searched} ({s.best_searched_loss:.4f}) "
              f"{'beats' if s.beats_random_median else 'does not beat'} the random median "
              f"({s.random_median_loss:.4f}) and {'beats' if s.beats_all_heuristics else 'does not beat'} "
              "every heuristic")
    print(f"report: {paths[1]}")
    return 0


def _stack_orders(orders):
    import torch

    return torch.stack([torch.as_tensor(o) for o in orders])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="currsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the model on one order of the plan's batches")
    _add_common(p)
    p.add_argument("--order", default="reference", help="'reference', 'random:SEED' or a JSON file (default: reference)")
    p.add_argument("--out", help="directory for result.json, order.json and model.safetensors")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("record", help="record the reference trajectory store (resumes an interrupted one)")
    _add_common(p)
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--no-budget", action="store_true", help="record even if an estimate exceeds record.max_*")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("inspect", help="print a summary of a trajectory store")
    p.add_argument("store", help="store directory")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of every file")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("benchmark", help="run a benchmark against real retraining (fidelity)", add_help=False)
    p.add_argument("name", choices=["fidelity"], help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (see --help after the name)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("analyze", help="analyses checked against real retraining (positions: memorization vs position)",
                       add_help=False)
    p.add_argument("name", choices=["positions"], help="which analysis")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the analysis's own options (see --help after the name)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("ablate", help="data ablations: partition models, merged estimates, validation, subset search", add_help=False)
    p.add_argument("-h", "--help", action="store_true", help="show the ablate actions")
    p.add_argument("args", nargs=argparse.REMAINDER, help="train | estimate | validate | search and their options (see --help)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("search", help="search orders on a recorded store with a surrogate (resumes the study)")
    _add_common(p)
    p.add_argument("--store", help="recorded store directory (not with --rounds)")
    p.add_argument("--out", required=True, help="directory for search.json, best_order.json (and study.journal)")
    _search_opts(p, "256; 32 per round with --rounds", "additive; fut1-hvp with --rounds", "32; 8 with --rounds")
    p.add_argument("--storage", help="Optuna storage: a .journal path or URL (default: OUT/study.journal)")
    p.add_argument("--backend", choices=["serial", "ray"], default="serial", help="where orders are scored")
    p.add_argument("--actors", type=int, default=2, help="Ray actors (default: 2)")
    p.add_argument("--address", help="Ray cluster address (default: start a local one)")
    p.add_argument("--rounds", type=int, default=0,
                   help="trust-region rounds: search within --radius transpositions of the incumbent, verify the "
                        "--top-k best by real training, re-record at the new incumbent (resumes; default: 0, one-shot)")
    p.add_argument("--radius", type=int, default=4, help="initial trust-region radius in transpositions (default: 4)")
    p.add_argument("--top-k", type=int, default=2, help="orders retrained per round with --rounds (default: 2)")
    p.add_argument("--start", default="reference", help="first incumbent with --rounds: 'reference', 'random:SEED' or a "
                   "JSON order file, e.g. a best_order.json of `currsearch run` (default: reference)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("run", help="record, search, verify the best orders by real training and write a report")
    _add_common(p)
    p.add_argument("--out", default="runs/main", help="output directory (default: runs/main)")
    _search_opts(p, "128", "calibrated-interactions, fitted to 1024 real runs (the trust-region rounds use fut1-hvp)", "32")
    p.add_argument("--top-k", type=int, default=3, help="searched orders to verify (default: 3)")
    p.add_argument("--random", type=int, default=5, help="random baseline orders (default: 5)")
    p.add_argument("--rounds", type=int, default=2, help="trust-region rounds (fut1-hvp) from the best verified order "
                   "(default: 2; 0 skips them)")
    p.add_argument("--tr-trials", type=int, default=16, help="orders estimated per trust-region round (default: 16)")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``currsearch`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CurrsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
