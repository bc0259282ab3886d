"""Fidelity of the retraining-free estimators across regimes, with the term-by-term ablation.

For each optimizer-state setting of CONFIG: record one store with the ``response`` and
``precedence`` terms (and, with ``--ablation``, the read-outs of every adjoint variant below),
retrain the held-out orders of the fidelity benchmark (``currsearch.fidelity.heldout_orders``,
disjoint from the hybrid's fit runs by construction; true losses cached in OUT), and score the
estimators with the fidelity benchmark's metrics. Adds the rho of the domain-block and
non-block orders, the order spread (random-order std, structured range) and the regime's
nonlinearity index (``currsearch.fidelity.nonlinearity_index``).

    python benchmarks/response_fidelity.py [CONFIG] --settings fresh,warm --seed 2 [--ablation] \
        [--estimators reference,additive,transported,linear-response,precedence,hybrid,fut1-hvp] \
        [--fit-runs 32] --out runs/response

Writes ``OUT/<setting>/fidelity.json`` (the fidelity benchmark's result dict plus ``extra``) and
``OUT/summary.md`` (rho all / random / near / block / non-block on the ``all`` eval set, AbsDiff,
per-order speed-up with the recording amortized over 1,000 orders and the fit runs included).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from currsearch.adjoint import FULL_RESPONSE, RECORDED_VARIANTS, Variant
from currsearch.cli import csv_list, progress_logging, resolve_config
from currsearch.errors import CurrsearchError
from currsearch.fidelity import SETTINGS, SUBSETS, fidelity_metrics, group_of, run_fidelity
from currsearch.manifest import atomic_write_bytes
from currsearch.reports.common import markdown_table
from estimators.base import available, get_estimator
from estimators.response import ResponseCost

logger = logging.getLogger("currsearch.response_fidelity")

#: the ablation, one term at a time (``Variant`` read-outs; with the recorded ones): none (= additive),
#: + momentum (``transport``), + second moment (``transport_v`` = transported), curvature alone (the
#: earlier "adjoint"), curvature + momentum (``response`` = linear-response), all three (``response_v``)
ABLATION = (
    Variant("plain", curvature=False, momentum=False, second_moment=False),
    Variant("curvature_only", momentum=False, second_moment=False),
    FULL_RESPONSE,
)
TERMS = ["batch_losses", "updates", "grads", "readouts", "response", "precedence"]


def subset_rho(result: dict, name: str, eval_set: str = "all") -> dict:
    """Spearman rho and AbsDiff of one estimator on the subsets all / random / near / block / non-block."""
    j = result["eval_names"].index(eval_set)
    est = torch.tensor(result["estimators"][name]["estimates"])[:, j]
    true = torch.tensor(result["true_losses"])[:, j]
    kinds = [o["kind"] for o in result["orders"]]
    masks = {"all": [True] * len(kinds), "random": [k == "random" for k in kinds],
             "near": [group_of(k) in SUBSETS["near"] for k in kinds],
             "block": [k == "domain-block" for k in kinds], "non-block": [k != "domain-block" for k in kinds]}
    out = {}
    for s, m in masks.items():
        m = torch.tensor(m)
        met = fidelity_metrics(est[m], true[m])
        out[s] = met["spearman"]
        if s == "all":
            out["absdiff"] = met["absdiff"]
    return out


def spread(result: dict, eval_set: str = "all") -> dict:
    """Random-order std and structured-order range of the true losses (nats/token)."""
    j = result["eval_names"].index(eval_set)
    true = torch.tensor(result["true_losses"])[:, j]
    kinds = [o["kind"] for o in result["orders"]]
    rnd = true[torch.tensor([k == "random" for k in kinds])]
    st = true[torch.tensor([k in ("domain-block", "easy-to-hard", "hard-to-easy") for k in kinds])]
    return {"random_std": float(rnd.std()) if len(rnd) > 1 else float("nan"),
            "structured_range": [float(st.min()), float(st.max())] if len(st) else None,
            "all_range": [float(true.min()), float(true.max())]}


def run_setting(cfg, setting: str, names: list[str], seed: int, ablation: bool, out: Path, n_random: int = 30,
                n_near: int = 5, fit_runs: int | None = None) -> dict:
    """One optimizer-state setting through :func:`currsearch.fidelity.run_fidelity` (record with
    :data:`TERMS`, retrain with the true losses cached in ``OUT/true_seed<seed>.json``, score);
    the result dict with ``extra`` (subset rho, order spread), also in ``OUT/fidelity.json``.
    ``fit_runs``: real runs of every estimator fitted to runs (default: each one's own default)."""
    cfg = cfg.replace(train={"carry_optimizer_state": SETTINGS[setting]}, record={"terms": TERMS, "anchor_stride": 1})
    extra = {f"R:{v.name}": ResponseCost(variant=v.name) for v in ABLATION} if ablation else {}
    if fit_runs is not None:
        extra |= {n: get_estimator(n, n_runs=fit_runs) for n in names if get_estimator(n).needs_runs}
        names = [n for n in names if n not in extra]
    res = run_fidelity(cfg, names, out, n_random=n_random, n_near=n_near, seed=seed, store_dir=out / "store",
                       extra_estimators=extra, response_variants=RECORDED_VARIANTS + (ABLATION if ablation else ()),
                       check_budget=False, true_loss_cache=out / f"true_seed{seed}.json")
    res["extra"] = {"rho": {n: subset_rho(res, n) for n in res["estimators"]}, "spread": spread(res), "setting": setting,
                    "seed": seed}
    atomic_write_bytes(out / "fidelity.json", json.dumps(res, indent=1, default=float).encode())
    return res


def recording_seconds(res: dict, name: str) -> float:
    """Seconds of the recording estimator ``name`` needs: none for ``reference``; the reference
    run alone for a registered estimator that reads no recorded term (``calibrated-interactions``
    needs only the store's Trainer and reference order, ``fut1-hvp`` its checkpoints); else the
    whole recording of ``res`` (the terms were recorded together)."""
    if name == "reference":
        return 0.0
    if name in available() and not type(get_estimator(name)).required_terms:
        return res["store"]["reference_seconds"]
    return res["store"]["record_seconds"]


def amortized_speedup(res: dict, name: str, orders: int = 1000) -> float:
    """Retrain seconds per order / (estimate seconds per order + (recording + fit) / ``orders``).

    The fit costs its real runs at the retraining time per order (``fit_runs``), not its measured
    seconds, which are near 0 when the runs come from a calibration cache."""
    c = res["estimators"][name]["cost"]
    retrain = res["retrain_seconds_per_order"]
    rec = recording_seconds(res, name)
    fit = res["fit_runs"].get(name, 0) * retrain
    return retrain / (c["estimate_seconds_per_order"] + (rec + fit) / orders)


def render(results: dict) -> str:
    """Markdown summary of every setting (rendered from the result dicts)."""
    lines = []
    for setting, res in results.items():
        sp, nl = res["extra"]["spread"], res["store"]["nonlinearity"]
        lines += [f"## {setting} (seed {res['extra']['seed']})", "",
                  f"True `all` loss range {sp['all_range'][0]:.4f}-{sp['all_range'][1]:.4f} nats/token, random-order std "
                  f"{sp['random_std']:.4f}; nonlinearity index {nl['index']:.3f} (curvature drift {nl['curvature_drift']:.3f}, "
                  f"Adam step count at the window start {nl['adam_step0']}); recording {res['store']['record_seconds']:.1f} s "
                  f"= {res['store']['record_seconds'] / res['store']['reference_seconds']:.1f} reference runs.", ""]
        head = ["estimator", "rho all", "random", "near", "block", "non-block", "AbsDiff", "speed-up (1,000 orders)"]
        rows = []
        for name, r in res["extra"]["rho"].items():
            rows.append([name] + [f"{r[k]:.2f}" if r[k] == r[k] else "-" for k in ("all", "random", "near", "block", "non-block")]
                        + [f"{r['absdiff']:.4f}", f"{amortized_speedup(res, name):,.0f}x"])
        lines += markdown_table(head, rows) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", help="TOML config (default: the built-in default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--settings", type=csv_list, default=["fresh", "warm"])
    p.add_argument("--seed", type=int, default=2, help="held-out draw (0 and 1 were used for development)")
    p.add_argument("--estimators", type=csv_list,
                   default=["reference", "additive", "transported", "linear-response", "precedence", "hybrid"])
    p.add_argument("--ablation", action="store_true", help="also record and score the adjoint variants of ABLATION")
    p.add_argument("--n-random", type=int, default=30, help="random held-out orders (default: 30)")
    p.add_argument("--n-near", type=int, default=5, help="held-out orders per number of transpositions (default: 5)")
    p.add_argument("--fit-runs", type=int, help="real runs of the estimators fitted to runs (default: their own)")
    p.add_argument("--out", default="runs/response")
    args = p.parse_args(argv)
    try:
        cfg = resolve_config(args.config, args.set)
        out = Path(args.out)
        with progress_logging(True):
            results = {s: run_setting(cfg, s, args.estimators, args.seed, args.ablation, out / s, args.n_random, args.n_near,
                                     args.fit_runs)
                       for s in args.settings}
    except CurrsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = render(results)
    atomic_write_bytes(out / "summary.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
