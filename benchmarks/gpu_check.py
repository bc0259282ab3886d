"""The measuring half of ``benchmarks/gpu_check.sh`` (run that script, not this file, on a GPU machine).

    python benchmarks/gpu_check.py fidelity [CONFIG] --set train.device=cuda --json OUT/fidelity_run.json \\
        --out OUT/fidelity [the options of ``currsearch benchmark fidelity``]
    python benchmarks/gpu_check.py summary OUT --device cuda --tests-rc RC --tests-seconds S ...

``fidelity`` runs ``currsearch benchmark fidelity`` (the same options and reports, one
optimizer-state setting after the other) and, after every setting, writes ``--json``: per setting
the wall seconds, the peak GPU memory (``torch.cuda.max_memory_allocated`` and
``max_memory_reserved``, bytes, reset before each setting; null off CUDA), the peak resident
memory of the process (bytes), the retraining seconds per order, the store's size and record
seconds, the spread of the true final losses (std over the random orders, range over the
structured orders, nats/token on the ``all`` eval set) and per estimator its cost and fidelity
(Spearman, mean |estimate - true| on ``all``). A run cut short by ``timeout`` keeps the finished
settings. ``summary`` merges that file, the pytest junit XML and the parts' exit codes into
``OUT/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from currsearch.cli.benchmark import add_fidelity_options
from currsearch.cli.common import resolve_config
from currsearch.fidelity import SUBSETS, run_fidelity_settings
from currsearch.reports.common import write_json
from currsearch.reports.fidelity import write_settings_report


def summarize(result: dict) -> dict:
    """The numbers of one setting's fidelity result (:func:`currsearch.fidelity.run_fidelity`) that
    the GPU check reports: costs, store, spread of the true losses and fidelity on ``all``."""
    col = result["eval_names"].index("all")
    true = [row[col] for row in result["true_losses"]]
    kinds = [o["kind"] for o in result["orders"]]
    rand = [t for t, k in zip(true, kinds) if k == "random"]
    struct = [t for t, k in zip(true, kinds) if k in SUBSETS["structured"]]
    return {
        "n_orders": len(true),
        "retrain_seconds_per_order": result["retrain_seconds_per_order"],
        "store": {k: result["store"].get(k) for k in ("bytes", "record_seconds", "reference_seconds")},
        "true_loss_all": {"random_std": statistics.stdev(rand) if len(rand) > 1 else None,
                          "structured_range": max(struct) - min(struct) if struct else None},
        "estimators": {name: {**e["cost"], "spearman_all": e["metrics"]["all"]["all"]["spearman"],
                              "absdiff_all": e["metrics"]["all"]["all"]["absdiff"]}
                       for name, e in result["estimators"].items()},
    }


def run_fidelity_check(args) -> int:
    """``fidelity``: the benchmark, one setting at a time, with its JSON written after each."""
    cfg = resolve_config(args.config, args.set)
    cfg.train.check_device()
    dev = torch.device(cfg.train.device)
    cuda = dev.type == "cuda"
    report = {"config": args.config or "defaults", "overrides": list(args.set or []), "device": cfg.train.device,
              "gpu": torch.cuda.get_device_name(dev) if cuda else None, "estimators": args.estimators, "settings": {}}
    results = {}
    for setting in args.settings:
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        results.update(run_fidelity_settings(cfg, args.estimators, args.out, settings=[setting], store_dir=args.store_dir,
                                             n_random=args.n_random, n_near=args.n_near, seed=args.seed,
                                             progress=not args.quiet))
        if cuda:
            torch.cuda.synchronize(dev)
        report["settings"][setting] = {
            "wall_seconds": time.perf_counter() - t0,
            "peak_gpu_memory_allocated_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
            "peak_gpu_memory_reserved_bytes": torch.cuda.max_memory_reserved(dev) if cuda else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            **summarize(results[setting]),
        }
        write_json(args.json, report)
    write_settings_report(results, args.out)
    return 0


def _junit_counts(path: Path) -> dict | None:
    """``{tests, failures, errors, skipped, seconds}`` of a pytest junit XML file, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {**counts, "seconds": float(suite.get("time", "nan")), "failed": failed}


def write_summary(args) -> int:
    """``summary``: ``OUT/gpu_check.json`` from the parts' exit codes, times and outputs."""
    out = Path(args.out)
    bench = out / "fidelity_run.json"
    report = {
        "device": args.device, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "total_seconds": args.tests_seconds + args.bench_seconds,
        "tests": {"rc": args.tests_rc, "timed_out": args.tests_rc in (124, 137), "wall_seconds": args.tests_seconds,
                  "limit_seconds": args.tests_limit, "junit": _junit_counts(out / "tests.xml")},
        "fidelity": {"rc": args.bench_rc, "timed_out": args.bench_rc in (124, 137), "wall_seconds": args.bench_seconds,
                     "limit_seconds": args.bench_limit,
                     "run": json.loads(bench.read_text()) if bench.is_file() else None},
    }
    write_json(out / "gpu_check.json", report)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fidelity", help="the fidelity benchmark with times and peak memory per setting")
    add_fidelity_options(f)
    f.add_argument("--json", required=True, help="JSON file written after every setting")
    f.set_defaults(func=run_fidelity_check)
    s = sub.add_parser("summary", help="merge the parts into OUT/gpu_check.json")
    s.add_argument("out")
    s.add_argument("--device", required=True)
    for part in ("tests", "bench"):
        s.add_argument(f"--{part}-rc", type=int, required=True)
        s.add_argument(f"--{part}-seconds", type=float, required=True)
        s.add_argument(f"--{part}-limit", type=float, required=True)
    s.set_defaults(func=write_summary)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
