"""``currsearch analyze positions``: memorization and generalization versus sample position, checked by retraining.

    currsearch analyze positions [CONFIG] [--store DIR] --out runs/positions --estimator fut1-hvp \\
        --batches 0,5,9 --positions all|0,4,8 --verify 20 --seed 0 [--set section.key=value ...]

Uses the store in ``--store`` (default ``OUT/store``), recording it first when it does not
exist (resumes an interrupted one). Writes ``OUT/positions.json``, ``positions.md``,
``heatmap_memorization.png``, ``heatmap_generalization.png`` and ``curves.png`` (see
:mod:`currsearch.positions`; arXiv 2505.22042, its memorization/generalization application).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..positions import PositionResult, analyze_positions, default_positions
from ..record import record
from ..reports.positions import write_position_report
from ..store import TrajectoryStore
from .common import add_config_options, csv_list, resolve_config


def _ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    values = csv_list(text)
    try:
        return [int(x) for x in values]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers (e.g. {option} 0,5,9), got {text!r}") from None


def open_or_record(store_dir: Path, config: str | None, overrides: list[str], progress: bool) -> TrajectoryStore:
    """The store in ``store_dir``: opened with its own config when it exists and no config or
    override is given; otherwise recorded (or resumed, or checked against) for the given config
    (``--set`` overrides apply to the store's config when it exists and no config file is given,
    else to the config file or the defaults).

    Raises:
        StoreError: ``store_dir`` holds a store of another config, or a corrupt one.
        ConfigError, BudgetError: as :func:`~currsearch.record.record`.
    """
    base = None
    if (store_dir / "manifest.json").is_file() and not config:
        store = TrajectoryStore.open(store_dir, verify=False, allow_incomplete=True)
        if store.manifest.get("phase") == "complete" and not overrides:
            return TrajectoryStore.open(store_dir)  # used as it is (analyze_positions checks its reference order)
        base = store.config()
    return record(resolve_config(config, overrides, base), store_dir, progress=progress)


def cmd_positions(args) -> int:
    """Estimate the position grid, verify a sample by real training, write and summarize the report."""
    if args.verify < 0:
        raise ConfigError(f"--verify must be >= 0, got {args.verify}")
    batches = _ints(args.batches, "--batches")
    positions = None if args.positions == "all" else _ints(args.positions, "--positions")
    out = Path(args.out)
    store = open_or_record(Path(args.store) if args.store else out / "store", args.config, args.set, not args.quiet)
    if args.positions == "all":
        positions = list(range(store.T))
    result = analyze_positions(store, args.estimator, batch_ids=batches, positions=positions or default_positions(store.T),
                               n_verify=args.verify, seed=args.seed, progress=not args.quiet)
    paths = write_position_report(result, out)
    _print_summary(result)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _print_summary(result: PositionResult) -> None:
    s, m = result.summary, result.validation["metrics"]
    print(f"{result.n_cells} cells ({len(result.batch_ids)} batches x {len(result.positions)} positions), "
          f"estimated with {result.estimator} in {result.seconds['estimate']:.1f} s; "
          f"{result.validation['n_cells']} cells verified by {result.validation['n_trainings']} training runs")
    print(f"recency (last - first) {s['recency']['mean']:+.4f}, forgetting {s['forgetting']['mean_per_position']:+.3g} "
          f"per position earlier, own-domain eval {s['interference']['own_domain']:+.4f} vs other domains "
          f"{s['interference']['other_domains']:+.4f} (nats/token)")
    for q in ("memorization", "generalization_all", "generalization_domain"):
        print(f"  {q:<22} rho {m[q]['spearman']:.3f}, rho of changes {m[q]['spearman_change']:.3f}, "
              f"fraction of the position effect explained {m[q]['fraction_explained']:.3f}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``analyze positions``."""
    p = sub.add_parser("analyze", help="analyses checked against real retraining (positions: memorization vs position)")
    asub = p.add_subparsers(dest="name", required=True)
    p = asub.add_parser("positions", help=__doc__.splitlines()[0])
    add_config_options(p, "TOML or YAML config file (default: the store's config, else built-in defaults)")
    p.add_argument("--store", help="trajectory store directory; recorded there if absent (default: OUT/store)")
    p.add_argument("--out", default="runs/positions", help="output directory (default: runs/positions)")
    p.add_argument("--estimator", default="fut1-hvp", help="estimator with per-batch losses (default: fut1-hvp)")
    p.add_argument("--batches", help="comma-separated batch ids to move (default: 2 per domain)")
    p.add_argument("--positions", default=None,
                   help="'all' or comma-separated positions (default: 6 evenly spaced, including 0 and T-1)")
    p.add_argument("--verify", type=int, default=20, help="cells retrained for real, reference included (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the verified sample (default: 0)")
    p.set_defaults(func=cmd_positions)
