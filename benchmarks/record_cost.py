"""Record cost: recording time / one reference training run, and store bytes / formula.

For T in {16, 32, 64} on the default config, with anchor_stride 1 and s (default 4): each
row trains the reference order with the Trainer (timed: the window plus its final
evaluation, the warm-up phase excluded and shared) and records the store in the same
process (timed the same way, from the store manifest), then prints both and their ratio.

Targets (issue 3): record time <= (T + 2) reference runs with stride 1; stride s divides
the pair work by about s (ratio_stride1 / ratio_stride_s >= s / 2); store size within 5% of
the formula. Exit status 1 when a target is missed.

    python benchmarks/record_cost.py [--T 16,32,64] [--stride 4] [--out runs/record_cost]
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
from currsearch.record import record
from currsearch.train import Trainer


def measure(cfg, workdir: Path) -> dict:
    """One row: the best of 3 timed reference runs (window + final evaluation, seconds) and the
    recording of ``cfg``'s store with the same Trainer (its warm-up phase shared and untimed),
    with the store's bytes against the formula. The store is deleted afterwards."""
    trainer = Trainer.from_config(cfg)
    trainer.window_start()
    T = trainer.T
    ref = []
    for _ in range(3):
        t0 = time.perf_counter()
        trainer.train(torch.arange(T))
        ref.append(time.perf_counter() - t0)
    ref_s = min(ref)
    out = workdir / f"T{T}_s{cfg.record.anchor_stride}"
    shutil.rmtree(out, ignore_errors=True)
    store = record(cfg, out, progress=False, check_budget=False, trainer=trainer)
    rec_s = store.manifest["record_seconds"]
    row = {
        "T": T, "anchor_stride": cfg.record.anchor_stride, "anchors": len(store.anchors), "P": store.P,
        "reference_seconds": ref_s, "record_seconds": rec_s, "record_over_reference": rec_s / ref_s,
        "target_runs": T + 2, "store_bytes": store.nbytes(), "formula_bytes": store.manifest["formula_bytes"],
    }
    row["bytes_over_formula"] = row["store_bytes"] / row["formula_bytes"]
    shutil.rmtree(out, ignore_errors=True)
    return row


def main(argv=None) -> int:
    """Measure every (T, stride) row, check the targets (module docstring), write OUT/record_cost.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--T", default="16,32,64")
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--out", default="runs/record_cost")
    args = ap.parse_args(argv)
    base = resolve_config(args.config, args.set)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for T in [int(x) for x in args.T.split(",")]:
            for s in (1, args.stride):
                rows.append(measure(base.replace(data={"num_batches": T}, record={"anchor_stride": s}), Path(tmp)))
                r = rows[-1]
                print(f"T={r['T']:>3} stride={r['anchor_stride']} anchors={r['anchors']:>3}: reference {r['reference_seconds']:.3f} s, "
                      f"record {r['record_seconds']:.2f} s = {r['record_over_reference']:.1f} x reference "
                      f"(target <= {r['target_runs']} with stride 1); store {r['store_bytes']:,} B = "
                      f"{r['bytes_over_formula']:.4f} x formula", flush=True)
    failures = []
    for r in rows:
        if abs(r["bytes_over_formula"] - 1) > 0.05:
            failures.append(f"T={r['T']} s={r['anchor_stride']}: store/formula {r['bytes_over_formula']:.3f}")
        if r["anchor_stride"] == 1 and r["record_over_reference"] > r["target_runs"]:
            failures.append(f"T={r['T']}: record {r['record_over_reference']:.1f} x reference > T + 2 = {r['target_runs']}")
    for T in sorted({r["T"] for r in rows}):
        one = next(r for r in rows if r["T"] == T and r["anchor_stride"] == 1)
        many = next((r for r in rows if r["T"] == T and r["anchor_stride"] == args.stride), None)
        if many and args.stride > 1:
            gain = one["record_seconds"] / many["record_seconds"]
            print(f"T={T:>3}: stride {args.stride} records {gain:.2f} x faster than stride 1")
            if gain < args.stride / 2:
                failures.append(f"T={T}: stride {args.stride} speed-up {gain:.2f} < {args.stride / 2}")
    atomic_write_bytes(Path(args.out) / "record_cost.json", json.dumps({"rows": rows, "failures": failures}, indent=1).encode())
    print("\n".join(["FAIL: " + f for f in failures]) if failures else "all record-cost targets met")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
