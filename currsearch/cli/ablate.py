"""``currsearch ablate``: data ablations by modular training and parameter averaging (Na et al. 2024, arXiv 2410.15661).

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
from pathlib import Path

from ..ablate import MergeEstimator, run_subset_search, subset_label, train_partitions, validate_subsets
from ..reports.ablate import write_search_report, write_validation_report
from .common import add_config_options, print_table, resolve_config


def _train(args) -> int:
    cfg = resolve_config(args.config, args.set)
    models = train_partitions(cfg, args.out, split=args.split, epochs=args.epochs, progress=not args.quiet)
    print(models.summary())
    return 0


def _estimate(args) -> int:
    est = MergeEstimator(args.models)
    w = est.weights(args.subsets)
    losses = est.estimate(w)
    print("merged eval loss, nats/token (perplexity = exp):")
    print_table(["subset"] + list(est.eval_names), [[subset_label(row, est.names)] + l.tolist() for row, l in zip(w, losses)])
    return 0


def _validate(args) -> int:
    out = args.out or str(Path(args.models) / "validate")
    res = validate_subsets(args.models, max_subsets=args.max_subsets, seed=args.seed, progress=not args.quiet)
    write_validation_report(res, out)
    print(f"{len(res.subsets)} subsets ({'all' if res.exhaustive else 'sample'}), merged vs real perplexity:")
    rows = [[name, m.all.spearman, m.all.pearson_ppl, m.multi.spearman, m.multi.pearson_ppl] for name, m in res.metrics.items()]
    print_table(["eval set", "rho", "r(ppl)", "rho|S|>=2", "r|S|>=2"], [[r[0]] + [_num(x) for x in r[1:]] for r in rows])
    c = res.cost
    print(f"estimate {c.estimate_seconds_per_subset:.3g} s/subset, real training {c.real_seconds_per_subset:.3g} s/subset")
    print(f"wrote {out}/validation.json, validation.md, validation_scatter.png")
    return 0


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _search(args) -> int:
    out = args.out or str(Path(args.models) / "search")
    res, study = run_subset_search(args.models, out, n_trials=args.trials, sampler=args.sampler, weights=args.weights,
                                   objective=args.objective, top_k=args.top_k, seed=args.seed, batch_size=args.batch,
                                   storage=args.storage, progress=not args.quiet)
    write_search_report(res, out, study)
    s, obj, sr = res.summary, res.summary.objective, res.search
    print(f"study {sr.study!r}: {sr.n_trials} trials ({sr.n_run} run now), {sr.distinct} distinct candidates")
    rows = sorted(res.candidates.items(), key=lambda kv: kv[1].verified[obj])
    print_table(["candidate", "subset", f"merged {obj}", f"real {obj}"],
                [[n, v.label, v.estimated[obj], v.verified[obj]] for n, v in rows])
    if s.best_searched:
        print(f"best searched {s.best_searched_label!r} ({s.best_searched_loss:.4f}) "
              f"{'is' if s.best_is_full else 'beats' if s.beats_full else 'does not beat'} the full set "
              f"({s.full_loss:.4f}) and {'beats' if s.beats_best_single else 'does not beat'} the best single "
              f"partition {s.best_single!r} ({s.best_single_loss:.4f})")
    print(f"wrote {out}/search.json, search.md")
    return 0


def register(sub0: argparse._SubParsersAction) -> None:
    """Add ``ablate train | estimate | validate | search``."""
    p = sub0.add_parser("ablate", help="data ablations: partition models, merged estimates, validation, subset search")
    sub = p.add_subparsers(dest="action", required=True)

    t = sub.add_parser("train", help="train one model per data partition from the shared base (resumable)")
    add_config_options(t)
    t.add_argument("--out", default="runs/ablate", help="models directory (default: runs/ablate)")
    t.add_argument("--split", type=int, default=1, help="split every domain into K partitions (default: 1)")
    t.add_argument("--epochs", type=int, default=1, help="passes over the largest partition per model (default: 1)")

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
    t.set_defaults(func=_train)
    e.set_defaults(func=_estimate)
    v.set_defaults(func=_validate)
    s.set_defaults(func=_search)
