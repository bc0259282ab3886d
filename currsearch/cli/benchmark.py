"""``currsearch benchmark fidelity``: estimated vs true final eval loss on held-out orders, retrained for real.

    currsearch benchmark fidelity [CONFIG] --estimators reference,additive --out runs/fidelity \\
        --n-random 30 --n-near 5 --settings fresh,warm [--set section.key=value ...]

(or ``python benchmarks/fidelity.py ...``). Writes per setting ``OUT/<setting>/fidelity.{json,md}``
and plots, and a combined ``OUT/fidelity.md`` (see :mod:`currsearch.fidelity`).
"""

from __future__ import annotations

import argparse

from ..fidelity import run_fidelity_settings
from ..reports.fidelity import write_settings_report
from .common import add_config_options, csv_list, resolve_config


def cmd_fidelity(args) -> int:
    """Run the fidelity benchmark for every optimizer-state setting."""
    cfg = resolve_config(args.config, args.set)
    results = run_fidelity_settings(cfg, args.estimators, args.out, settings=args.settings, store_dir=args.store_dir,
                                    n_random=args.n_random, n_near=args.n_near, seed=args.seed, progress=not args.quiet)
    write_settings_report(results, args.out)
    print(f"wrote {args.out}/fidelity.md")
    return 0


def add_fidelity_options(p: argparse.ArgumentParser) -> None:
    """Options of the fidelity benchmark (shared with ``benchmarks/fidelity.py``)."""
    add_config_options(p)
    p.add_argument("--estimators", type=csv_list, default=["reference", "additive"], help="comma-separated estimator names")
    p.add_argument("--out", default="runs/fidelity", help="output directory (default: runs/fidelity)")
    p.add_argument("--n-random", type=int, default=30, help="random held-out orders (default: 30)")
    p.add_argument("--n-near", type=int, default=5, help="orders per number of transpositions near the reference (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out orders (default: 0)")
    p.add_argument("--settings", type=csv_list, default=["fresh", "warm"], help="optimizer-state settings: fresh, warm (default: both)")
    p.add_argument("--store-dir", help="trajectory stores directory (default: OUT/<setting>/store)")
    p.set_defaults(func=cmd_fidelity)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``benchmark fidelity``."""
    p = sub.add_parser("benchmark", help="run a benchmark against real retraining (fidelity)")
    bsub = p.add_subparsers(dest="name", required=True)
    add_fidelity_options(bsub.add_parser("fidelity", help=__doc__.splitlines()[0]))
