"""Measure a benchmark regime: parameters, T, unigram baselines and window-start losses per eval
set, seconds per real run against the default config (measured side by side), random-order
mean/std and the structured-order range of the final loss (:func:`currsearch.regime.measure_regime`).

Single-threaded numbers, as in issue 14 (the script sets one torch thread; set the BLAS
variables too)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/regime.py examples/medium.toml --orders 10 \\
        --out docs/results/medium_regime.json

Writes the result as JSON (``--out``) and its markdown next to it (``.md``); prints the markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from currsearch.cli import resolve_config
from currsearch.manifest import atomic_write_bytes
from currsearch.regime import measure_regime
from currsearch.reports.common import write_json
from currsearch.reports.regime import render_markdown


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", help="TOML or YAML config (default: the defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--orders", type=int, default=10, help="random orders trained for real (default 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", default="runs/regime.json", help="JSON result file (markdown beside it, .md)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure_regime(resolve_config(args.config, args.set), n_random=args.orders, seed=args.seed,
                            progress=not args.quiet)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    md = render_markdown(result)
    atomic_write_bytes(out.with_suffix(".md"), md.encode())
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
