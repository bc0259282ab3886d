"""Position analysis: memorization and generalization versus sample position, checked by retraining.

    currsearch analyze positions [CONFIG] [--store DIR] --out runs/positions --estimator fut1-hvp \
        --batches 0,5,9 --positions all|0,4,8 --verify 20 --seed 0 [--set section.key=value ...]

Uses the store in ``--store`` (default ``OUT/store``), recording it first when it does not
exist (resumes an interrupted one). Writes ``OUT/positions.json``, ``positions.md``,
``heatmap_memorization.png``, ``heatmap_generalization.png`` and ``curves.png`` (see
:mod:`currsearch.positions`; arXiv 2505.22042, its memorization/generalization application).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import csv_list


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``currsearch analyze positions`` options (see the module docstring)."""
    p = argparse.ArgumentParser(prog="currsearch analyze positions", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="TOML or YAML config file (default: the store's config, else built-in defaults)")
    p.add_argument("--store", help="trajectory store directory; recorded there if absent (default: OUT/store)")
    p.add_argument("--out", default="runs/positions", help="output directory (default: runs/positions)")
    p.add_argument("--estimator", default="fut1-hvp", help="estimator with per-batch losses (default: fut1-hvp)")
    p.add_argument("--batches", type=csv_list, help="comma-separated batch ids to move (default: 2 per domain)")
    p.add_argument("--positions", default=None,
                   help="'all' or comma-separated positions (default: 6 evenly spaced, including 0 and T-1)")
    p.add_argument("--verify", type=int, default=20, help="cells retrained for real, reference included (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the verified sample (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def _ints(values: list[str], option: str) -> list[int]:
    from .errors import ConfigError

    try:
        return [int(x) for x in values]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers (e.g. {option} 0,5,9), got {','.join(values)!r}") from None


def open_or_record(store_dir: Path, config: str | None, overrides: list[str], progress: bool):
    """The store in ``store_dir``: opened with its own config when it exists and no config or
    override is given; otherwise recorded (or resumed, or checked against) for the given config.

    Raises:
        StoreError: ``store_dir`` holds a store of another config, or a corrupt one.
        ConfigError, BudgetError: as :func:`~currsearch.record.record`.
    """
    from .cli import resolve_config
    from .record import record
    from .store import TrajectoryStore

    if (store_dir / "manifest.json").is_file() and not (config or overrides):
        store = TrajectoryStore.open(store_dir, verify=False, allow_incomplete=True)
        if store.manifest.get("phase") == "complete":
            return TrajectoryStore.open(store_dir)  # used as it is (analyze_positions checks its reference order)
        cfg = store.config()
    else:
        cfg = resolve_config(config, overrides)
    return record(cfg, store_dir, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """Run the position analysis; returns the exit status (2 with one ``error:`` line on bad input)."""
    from .errors import ConfigError, CurrsearchError
    from .positions import analyze_positions, default_positions
    from .reports.positions import write_position_report

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    progress = not args.quiet
    try:
        if args.verify < 0:
            raise ConfigError(f"--verify must be >= 0, got {args.verify}")
        batches = _ints(args.batches, "--batches") if args.batches is not None else None
        positions = None
        if args.positions is not None and args.positions != "all":
            positions = _ints(csv_list(args.positions), "--positions")
        store = open_or_record(Path(args.store) if args.store else out / "store", args.config, args.set, progress)
        if args.positions == "all":
            positions = list(range(store.T))
        elif positions is None:
            positions = default_positions(store.T)
        result = analyze_positions(store, args.estimator, batch_ids=batches, positions=positions,
                                   n_verify=args.verify, seed=args.seed, progress=progress)
    except CurrsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_position_report(result, out)
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
    print(f"wrote {out}/positions.md, positions.json, heatmap_memorization.png, heatmap_generalization.png, curves.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
