"""Fidelity benchmark: estimated vs true final eval loss on held-out orders, retrained for real.

    currsearch benchmark fidelity [CONFIG] --estimators reference,additive --out runs/fidelity \
        --n-random 30 --n-near 5 --settings fresh,warm [--set section.key=value ...]

(or ``python benchmarks/fidelity.py ...``). Writes per setting ``OUT/<setting>/fidelity.{json,md}``
and plots, and a combined ``OUT/fidelity.md`` (see :mod:`currsearch.fidelity`).
"""

from __future__ import annotations

import argparse
import sys

from .cli import csv_list


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="currsearch benchmark fidelity", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="TOML or YAML config file (default: built-in defaults)")
    p.add_argument("--estimators", type=csv_list, default=["reference", "additive"], help="comma-separated estimator names")
    p.add_argument("--out", default="runs/fidelity", help="output directory (default: runs/fidelity)")
    p.add_argument("--n-random", type=int, default=30, help="random held-out orders (default: 30)")
    p.add_argument("--n-near", type=int, default=5, help="orders per number of transpositions near the reference (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out orders (default: 0)")
    p.add_argument("--settings", type=csv_list, default=["fresh", "warm"], help="optimizer-state settings: fresh, warm (default: both)")
    p.add_argument("--store-dir", help="trajectory stores directory (default: OUT/<setting>/store)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (2 with one ``error:`` line on bad input)."""
    from .cli import resolve_config
    from .errors import CurrsearchError
    from .fidelity import run_fidelity_settings
    from .reports.fidelity import write_settings_report

    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args.config, args.set)
        results = run_fidelity_settings(cfg, args.estimators, args.out, settings=args.settings, store_dir=args.store_dir,
                                        n_random=args.n_random, n_near=args.n_near, seed=args.seed, progress=not args.quiet)
    except CurrsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_settings_report(results, args.out)
    print(f"wrote {args.out}/fidelity.md")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
