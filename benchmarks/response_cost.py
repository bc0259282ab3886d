"""Recording overhead of the retraining-free estimators' terms, measured side by side.

Records CONFIG's store three times with one Trainer (its warm-up phase shared and untimed):
today's terms (``batch_losses, updates, grads, readouts``), plus ``response``, plus
``response`` and ``precedence``; prints the record seconds of each, the overhead of the new
terms as a fraction of today's recording (target of issue 13: <= 30%), and the planned run
equivalents (``currsearch.record.record_run_equivalents``) next to the measured ones. Stores are
deleted afterwards.

    OMP_NUM_THREADS=1 python benchmarks/response_cost.py [CONFIG] [--set KEY=VALUE] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from currsearch.cli import resolve_config
from currsearch.manifest import atomic_write_bytes
from currsearch.record import record, record_run_equivalents
from currsearch.train import Trainer

BASE = ["batch_losses", "updates", "grads", "readouts"]
ROWS = {"today": BASE, "+ response": BASE + ["response"], "+ response + precedence": BASE + ["response", "precedence"]}


def measure(cfg) -> dict:
    """Seconds of one reference run (best of 3) and of each recording; overheads and plans."""
    trainer = Trainer.from_config(cfg)
    trainer.window_start()
    ref = []
    for _ in range(3):
        t0 = time.perf_counter()
        trainer.train(torch.arange(trainer.T))
        ref.append(time.perf_counter() - t0)
    out = {"T": trainer.T, "P": trainer.model.num_params, "reference_seconds": min(ref), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, terms in ROWS.items():
            c = cfg.replace(record={"terms": terms, "anchor_stride": 1})
            store = record(c, Path(tmp) / name.replace(" ", ""), progress=False, check_budget=False, trainer=trainer)
            sec = store.manifest["record_seconds"]
            out["rows"][name] = {"terms": terms, "record_seconds": sec, "measured_run_equivalents": sec / min(ref),
                                 "planned_run_equivalents": record_run_equivalents(trainer, c), "bytes": store.nbytes()}
            shutil.rmtree(store.path)
    today = out["rows"]["today"]["record_seconds"]
    for r in out["rows"].values():
        r["overhead_vs_today"] = r["record_seconds"] / today - 1.0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    res = measure(resolve_config(args.config, args.set))
    print(f"T = {res['T']}, P = {res['P']:,}; one reference run {res['reference_seconds']:.2f} s")
    for name, r in res["rows"].items():
        print(f"{name:26s} record {r['record_seconds']:7.1f} s = {r['measured_run_equivalents']:6.1f} runs "
              f"(planned {r['planned_run_equivalents']:5.1f}); overhead vs today {100 * r['overhead_vs_today']:+5.1f}%; "
              f"{r['bytes'] / 2**20:.1f} MiB")
    if args.out:
        atomic_write_bytes(Path(args.out), json.dumps(res, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
