"""Data ablations by modular training and parameter averaging (Na et al. 2024, arXiv 2410.15661).

    currsearch ablate train [CONFIG] --out runs/ablate [--split K] [--epochs E] [--set section.key=value ...]
    currsearch ablate estimate --models runs/ablate "bible+python" "devil" "*"
    currsearch ablate validate --models runs/ablate [--out runs/ablate/validate] [--max-subsets 16]
    currsearch ablate search --models runs/ablate [--out runs/ablate/search] --trials 64 --sampler tpe [--weights] --top-k 3

``train`` trains one model per partition from the shared base (resumes an interrupted run);
``estimate`` prints merged eval losses of named subsets; ``validate`` compares merged and real
union models (Spearman rho, Pearson r, scatter plot); ``search`` runs an Optuna study over
subsets (and weights) and verifies the best by real training. See :mod:`currsearch.ablate`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``currsearch ablate`` actions (train, estimate, validate, search) and their options."""
    p = argparse.ArgumentParser(prog="currsearch ablate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)

    t = sub.add_parser("train", help="train one model per data partition from the shared base (resumable)")
    t.add_argument("config", nargs="?", help="TOML or YAML config file (default: built-in defaults)")
    t.add_argument("--out", default="runs/ablate", help="models directory (default: runs/ablate)")
    t.add_argument("--split", type=int, default=1, help="split every domain into K partitions (default: 1)")
    t.add_argument("--epochs", type=int, default=1, help="passes over the largest partition per model (default: 1)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("estimate", help="merged eval loss of subsets given by name (e.g. 'bible+python', 'bible:3+python:1', '*')")
    e.add_argument("subsets", nargs="+", help="subsets: partition names joined by '+', optional ':weight'")
    e.add_argument("--models", default="runs/ablate", help="models directory (default: runs/ablate)")

    v = sub.add_parser("validate", help="merged vs real union models: Spearman rho and Pearson r per eval set")
    v.add_argument("--models", default="runs/ablate", help="models directory (default: runs/ablate)")
    v.add_argument("--out", help="report directory (default: MODELS/validate)")
    v.add_argument("--max-subsets", type=int, default=16, help="all subsets up to this many, else a sample of this size (default: 16)")
    v.add_argument("--seed", type=int, default=0, help="seed of the subset sample (default: 0)")
    v.add_argument("--quiet", action="store_true", help="no progress bars")

    s = sub.add_parser("search", help="Optuna search over subsets (and mixture weights), best ones verified by real training")
    s.add_argument("--models", default="runs/ablate", help="models directory (default: runs/ablate)")
    s.add_argument("--out", help="report directory and study journal (default: MODELS/search)")
    s.add_argument("--trials", type=int, default=64, help="total trials in the study (default: 64)")
    s.add_argument("--sampler", default="tpe", help="tpe, cmaes, gp, nsga2 or random (default: tpe)")
    s.add_argument("--weights", action="store_true", help="search mixture weights too (weighted parameter averages)")
    s.add_argument("--objective", default="all", help="eval set whose merged loss is minimized (default: all)")
    s.add_argument("--top-k", type=int, default=3, help="searched subsets verified by real training (default: 3)")
    s.add_argument("--batch", type=int, default=8, help="trials asked and scored together (default: 8)")
    s.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    s.add_argument("--storage", help="Optuna storage: a .journal path or URL (default: OUT/study.journal)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _train(args) -> int:
    from .ablate import train_partitions
    from .cli import resolve_config

    cfg = resolve_config(args.config, args.set)
    models = train_partitions(cfg, args.out, split=args.split, epochs=args.epochs, progress=not args.quiet)
    print(models.summary())
    return 0


def _estimate(args) -> int:
    from .ablate import MergeEstimator, subset_label

    est = MergeEstimator(args.models)
    w = est.weights(args.subsets)
    losses = est.estimate(w)
    print(f"{'subset':<32} " + " ".join(f"{n:>9}" for n in est.eval_names) + "   (merged eval loss, nats/token; ppl = exp)")
    for row, l in zip(w, losses):
        print(f"{subset_label(row, est.names):<32} " + " ".join(f"{x:>9.4f}" for x in l.tolist()))
    return 0


def _validate(args) -> int:
    from .ablate import validate_subsets
    from .reports.ablate import write_validation_report

    out = args.out or str(Path(args.models) / "validate")
    res = validate_subsets(args.models, max_subsets=args.max_subsets, seed=args.seed, progress=not args.quiet)
    write_validation_report(res, out)
    print(f"{len(res['subsets'])} subsets ({'all' if res['exhaustive'] else 'sample'}), merged vs real perplexity:")
    print(f"{'eval set':<10} {'rho':>7} {'r(ppl)':>7} {'rho|S|>=2':>10} {'r|S|>=2':>8}")
    fmt = lambda x: "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"  # noqa: E731
    for name, m in res["metrics"].items():
        a, b = m["all"], m["size>=2"]
        print(f"{name:<10} {fmt(a['spearman']):>7} {fmt(a['pearson_ppl']):>7} {fmt(b['spearman']):>10} {fmt(b['pearson_ppl']):>8}")
    c = res["cost"]
    print(f"estimate {c['estimate_seconds_per_subset']:.3g} s/subset, real training {c['real_seconds_per_subset']:.3g} s/subset")
    print(f"wrote {out}/validation.json, validation.md, validation_scatter.png")
    return 0


def _search(args) -> int:
    from .ablate import run_subset_search
    from .reports.ablate import write_search_report

    out = args.out or str(Path(args.models) / "search")
    res, study = run_subset_search(args.models, out, n_trials=args.trials, sampler=args.sampler, weights=args.weights,
                                   objective=args.objective, top_k=args.top_k, seed=args.seed, batch_size=args.batch,
                                   storage=args.storage, progress=not args.quiet)
    write_search_report(res, out, study)
    s, obj = res["summary"], res["summary"]["objective"]
    print(f"study {res['search']['study']!r}: {res['search']['n_trials']} trials ({res['search']['n_run']} run now), "
          f"{res['search']['distinct']} distinct candidates")
    w = max([6] + [len(v["label"]) for v in res["candidates"].values()])
    print(f"{'candidate':<16} {'subset':<{w}} {'merged ' + obj:>12} {'real ' + obj:>12}")
    for name, v in sorted(res["candidates"].items(), key=lambda kv: kv[1]["verified"][obj]):
        print(f"{name:<16} {v['label']:<{w}} {v['estimated'][obj]:>12.4f} {v['verified'][obj]:>12.4f}")
    if s["best_searched"]:
        print(f"best searched {s['best_searched_label']!r} ({s['best_searched_loss']:.4f}) "
              f"{'is' if s['best_is_full'] else 'beats' if s['beats_full'] else 'does not beat'} the full set ({s['full_loss']:.4f}) and "
              f"{'beats' if s['beats_best_single'] else 'does not beat'} the best single partition "
              f"{s['best_single']!r} ({s['best_single_loss']:.4f})")
    print(f"wrote {out}/search.json, search.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run an ``ablate`` action; returns the exit status (2 with one ``error:`` line on bad input)."""
    from .errors import CurrsearchError

    args = build_parser().parse_args(argv)
    try:
        return {"train": _train, "estimate": _estimate, "validate": _validate, "search": _search}[args.action](args)
    except CurrsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
