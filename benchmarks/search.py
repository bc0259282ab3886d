"""Search benchmark: backend throughput (serial vs Ray) and samplers at equal budget.

1. Records (or reuses) the store of the config in OUT/store.
2. Throughput: scores the same N seeded random orders with SerialBackend (torch threads = 2)
   and RayBackend with 1 and 2 actors (1 CPU and 1 torch thread each); only ``.score`` is
   timed, after a warm-up call on a small chunk (actor start-up and fitting excluded).
   All three must give identical scores. Target (issue 5): Ray with 2 actors >= 1.7 x serial.
3. Samplers at equal budget: every sampler runs ``run_search`` with the same
   :class:`~currsearch.search.SearchSettings` but the sampler (space random_keys, the chosen
   estimator, the same number of trials, seed 0); its best estimated order is verified by real
   training together with the baselines (reference, 5 random orders, heuristics). Target: the
   verified loss of that order beats the random median and every heuristic. A sampler that
   raises (e.g. a missing package) is reported and skipped.
4. Single-shot vs trust-region rounds at equal real-training budget, both with
   ``--tr-estimator`` (default fut1-hvp) and both starting from the best verified baseline of
   step 3: R rounds (``--rounds``, ``--tr-trials`` estimated orders and ``--tr-top-k``
   retrained orders per round, each round re-recording at its incumbent: 1 training run) vs
   one round with the pooled budget (R x trials estimated, R x top-k + R - 1 retrained, so
   both use R x (1 + top-k) real training runs). Target: the trust-region incumbent's
   verified loss beats the random median and every heuristic.
5. Writes OUT/search_bench.json; exit status 1 when a target is missed.

    python benchmarks/search.py [CONFIG] [--set k=v] [--out runs/search_bench] [--orders 4096]
        [--trials 64] [--samplers tpe,cmaes,gp,random] [--estimator additive] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import ray
import torch

from currsearch.backends import RayBackend, SerialBackend
from currsearch.cli import csv_list, resolve_config
from currsearch.manifest import atomic_write_bytes
from currsearch.record import record
from currsearch.results import to_json
from currsearch.search import SearchSettings, run_search
from currsearch.trust_region import TrustRegionSettings, run_trust_region
from currsearch.verify import VerificationResult, baseline_orders, summarize, verify
from estimators import get_estimator

SPEEDUP_TARGET = 1.7
CORES = 2  # the comparison is at equal cores: serial = 2 torch threads, Ray = 2 actors x 1 thread


def random_orders(n: int, T: int, seed: int) -> torch.Tensor:
    """int64 [n, T]: n seeded uniformly random permutations of 0..T-1."""
    g = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(n, T, generator=g), dim=1)


def timed_score(backend, orders: torch.Tensor, warm: torch.Tensor, repeats: int) -> tuple[torch.Tensor, float]:
    """Scores of ``orders`` and the best wall time of ``repeats`` ``.score`` calls (after a warm-up)."""
    backend.score(warm)
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = backend.score(orders)
        best = min(best, time.perf_counter() - t0)
    return out, best


def throughput(store, estimator: str, n: int, chunk: int, repeats: int, seed: int) -> dict:
    """Step 2 (module docstring): orders/s of the serial backend and of Ray with 1 and 2 actors
    on the same ``n`` random orders, and whether their scores (float64 ``[n, E]``) are identical.
    The torch thread count in effect before is restored on return (the later steps keep it)."""
    threads = torch.get_num_threads()
    orders = random_orders(n, store.T, seed)
    warm = orders[: min(chunk, n)]
    rows, scores = {}, {}

    # Serial: one process, torch intra-op parallelism with CORES threads.
    torch.set_num_threads(CORES)
    serial = SerialBackend(get_estimator(estimator).fit(store), chunk=chunk)
    scores["serial"], secs = timed_score(serial, orders, warm, repeats)
    rows["serial"] = {"seconds": secs, "orders_per_second": n / secs, "threads": CORES}

    # Ray: k actors, each reserving 1 CPU and running 1 torch thread (num_cpus_per_actor=1).
    for k in (1, 2):
        b = RayBackend(str(store.path), estimator, num_actors=k, chunk=chunk, num_cpus_per_actor=1)
        try:
            scores[f"ray{k}"], secs = timed_score(b, orders, warm, repeats)
        finally:
            b.close()
        rows[f"ray{k}"] = {"seconds": secs, "orders_per_second": n / secs, "actors": k, "threads_per_actor": 1}
    if ray.is_initialized():
        ray.shutdown()
    torch.set_num_threads(threads)

    identical = all(torch.equal(scores["serial"], scores[k]) for k in ("ray1", "ray2"))
    max_diff = max(float((scores["serial"] - scores[k]).abs().max()) for k in ("ray1", "ray2"))
    return {
        "orders": n, "T": store.T, "chunk": chunk, "repeats": repeats, "rows": rows,
        "ray2_over_serial": rows["ray2"]["orders_per_second"] / rows["serial"]["orders_per_second"],
        "ray2_over_ray1": rows["ray2"]["orders_per_second"] / rows["ray1"]["orders_per_second"],
        "identical_scores": identical, "max_abs_diff": max_diff, "target": SPEEDUP_TARGET,
    }


def report_throughput(store, args, report: dict, failures: list[str]) -> None:
    """Step 2: measure, print and check the throughput (equal cores: serial uses 2 torch threads,
    each Ray actor 1 CPU / 1 thread); sets ``report["throughput"]``."""
    tp = throughput(store, args.estimator, args.orders, args.chunk, args.repeats, args.seed)
    report["throughput"] = tp
    for name, r in tp["rows"].items():
        print(f"throughput {name:<6}: {r['orders_per_second']:>10.1f} orders/s ({tp['orders']} orders in {r['seconds']:.3f} s)")
    print(f"ray2/serial = {tp['ray2_over_serial']:.2f} x, ray2/ray1 = {tp['ray2_over_ray1']:.2f} x; scores identical across "
          f"backends: {tp['identical_scores']} (max |diff| {tp['max_abs_diff']:.3g})")
    ok = tp["ray2_over_serial"] >= SPEEDUP_TARGET
    print(f"{'PASS' if ok else 'FAIL'}: Ray 2 actors vs serial {tp['ray2_over_serial']:.2f} x (target >= {SPEEDUP_TARGET} x, "
          f"{tp['orders']} orders, equal cores)", flush=True)
    if not ok:
        failures.append(f"throughput: ray2/serial {tp['ray2_over_serial']:.2f} < {SPEEDUP_TARGET}")
    if not tp["identical_scores"]:
        failures.append(f"throughput: backends disagree (max |diff| {tp['max_abs_diff']:.3g})")


def search_samplers(store, args, report: dict, failures: list[str]) -> dict[str, dict]:
    """Step 3, search: one :func:`run_search` per sampler at equal settings; returns
    ``{sampler: {"order", "estimates", "est_all", "source", "seconds", "n_trials"}}`` of those
    that ran (an error is reported in ``report["samplers"]`` and ``failures``)."""
    base = SearchSettings(estimator=args.estimator, space="random_keys", trials=args.trials, batch=args.batch,
                          storage=None, seed=args.seed, enqueue_heuristics=not args.no_enqueue,
                          enqueue_assignment=not args.no_enqueue)
    searched: dict[str, dict] = {}
    report["samplers"] = {}
    for s in args.samplers:
        try:
            res = run_search(store, SearchSettings(**{**base.model_dump(), "sampler": s}), progress=False)
        except Exception as err:  # noqa: BLE001 - report and go on with the next sampler
            msg = f"{type(err).__name__}: {err}"
            print(f"sampler {s}: ERROR {msg}", flush=True)
            report["samplers"][s] = {"error": msg}
            failures.append(f"sampler {s}: error {msg}")
            continue
        i_all = res.eval_names.index("all")
        searched[s] = {"order": res.best_order, "estimates": res.estimates[0], "est_all": float(res.estimates[0, i_all]),
                       "source": res.sources[0] if res.sources else "", "seconds": res.seconds, "n_trials": res.n_trials}
        print(f"sampler {s}: {res.n_trials} trials in {res.seconds:.1f} s, best estimated all = "
              f"{searched[s]['est_all']:.4f} [{searched[s]['source'] or 'sampled'}]", flush=True)
    return searched


def verify_samplers(store, args, searched: dict[str, dict], report: dict, failures: list[str]) -> VerificationResult:
    """Step 3, verification: retrain every sampler's best order with the baselines, then compare
    each sampler's order alone with the baselines (:func:`summarize`); sets ``report["verify"]``
    and ``report["samplers"][s]``."""
    trainer = store.trainer()
    cands = {f"search_{s}": v["order"] for s, v in searched.items()}
    cands.update(baseline_orders(trainer, n_random=args.random, seed=args.seed))
    est = get_estimator(args.estimator).fit(store).estimate(torch.stack([torch.as_tensor(o) for o in cands.values()]))
    t0 = time.perf_counter()
    result = verify(trainer, cands, dict(zip(cands, est)))
    print(f"verified {len(cands)} orders by real training in {time.perf_counter() - t0:.1f} s", flush=True)
    report["verify"] = to_json(result)
    for s, v in searched.items():
        name = f"search_{s}"
        sub = dataclasses.replace(result, candidates={n: c for n, c in result.candidates.items()
                                                      if n == name or not n.startswith("search_")})
        sm = summarize(sub)
        best_h = min(sm.heuristics.items(), key=lambda kv: kv[1]) if sm.heuristics else (None, None)
        ok = bool(sm.beats_random_median) and bool(sm.beats_all_heuristics)
        report["samplers"][s] = {"best_estimated": v["est_all"], "source": v["source"], "n_trials": v["n_trials"],
                                 "search_seconds": v["seconds"], "order": v["order"].tolist(),
                                 "verified": sm.best_searched_loss, "summary": to_json(sm),
                                 "best_heuristic": best_h[0], "best_heuristic_loss": best_h[1], "pass": ok}
        print(f"sampler {s:<7}: best estimated {v['est_all']:.4f}, verified {sm.best_searched_loss:.4f}; "
              f"random median {sm.random_median_loss:.4f}, best heuristic {best_h[0]} {best_h[1]:.4f}, "
              f"reference {sm.reference_loss:.4f} -> {'PASS' if ok else 'FAIL'}", flush=True)
        if not ok:
            failures.append(f"sampler {s}: verified {sm.best_searched_loss:.4f} does not beat the random median "
                            f"({sm.random_median_loss:.4f}) and every heuristic (best {best_h[1]:.4f})")
    return result


def trust_region_vs_single_shot(cfg, out: Path, args, verified: VerificationResult, report: dict, failures: list[str]) -> None:
    """Step 4 (module docstring): R trust-region rounds vs one pooled round, equal real-training budget."""
    base = {n: c for n, c in verified.candidates.items() if not n.startswith("search_")}
    start_name = min(base, key=lambda n: base[n].verified["all"])
    start = torch.tensor(base[start_name].order)
    R, k = args.rounds, args.tr_top_k
    common = dict(estimator=args.tr_estimator, radius=args.tr_radius, seed=args.seed, batch_size=8)
    rows = {}
    for name, kw in (("trust_region", dict(rounds=R, trials=args.tr_trials, top_k=k)),
                     ("single_shot", dict(rounds=1, trials=R * args.tr_trials, top_k=R * k + R - 1))):
        t0 = time.perf_counter()
        res = run_trust_region(cfg, out / name, TrustRegionSettings(**kw, **common), start=start, progress=False)
        rows[name] = {"final_loss": res.incumbent_loss, "start_loss": res.start_loss, "verified_runs": res.verified_runs,
                      "seconds": time.perf_counter() - t0, "rounds": to_json(res.rounds), "order": res.incumbent}
        print(f"{name:<12}: {kw['rounds']} round(s), {res.verified_runs} real training runs, "
              f"{rows[name]['seconds']:.0f} s: {res.start_loss:.4f} -> {res.incumbent_loss:.4f} nats/token", flush=True)
    sm = summarize(verified)
    best_h = min(sm.heuristics.values()) if sm.heuristics else float("inf")
    tr_loss = rows["trust_region"]["final_loss"]
    ok = tr_loss < sm.random_median_loss and tr_loss < best_h
    rows.update(start=start_name, random_median=sm.random_median_loss, best_heuristic=best_h, pass_=ok)
    report["trust_region"] = rows
    print(f"{'PASS' if ok else 'FAIL'}: trust-region incumbent {tr_loss:.4f} vs random median {sm.random_median_loss:.4f} "
          f"and best heuristic {best_h:.4f} (started from {start_name}); single shot at equal budget "
          f"{rows['single_shot']['final_loss']:.4f}", flush=True)
    if not ok:
        failures.append(f"trust region: incumbent {tr_loss:.4f} does not beat the random median and every heuristic")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default="runs/search_bench")
    ap.add_argument("--orders", type=int, default=4096, help="random orders scored per backend")
    ap.add_argument("--chunk", type=int, default=256, help="orders per estimate call (same for all backends)")
    ap.add_argument("--repeats", type=int, default=3, help="timed .score calls per backend (best kept)")
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="trials scored per backend call in the search")
    ap.add_argument("--samplers", type=csv_list, default=["tpe", "cmaes", "gp", "random"])
    ap.add_argument("--estimator", default="additive")
    ap.add_argument("--random", type=int, default=5, help="random baseline orders to verify")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-enqueue", action="store_true",
                    help="do not seed the studies with heuristics and the estimator's exact optimum (by default run_search "
                         "does; with the additive estimator every sampler then starts from the same assignment optimum)")
    ap.add_argument("--rounds", type=int, default=3, help="trust-region rounds (0: skip step 4)")
    ap.add_argument("--tr-estimator", default="fut1-hvp", help="estimator of step 4")
    ap.add_argument("--tr-trials", type=int, default=16, help="estimated orders per trust-region round")
    ap.add_argument("--tr-top-k", type=int, default=2, help="orders retrained per trust-region round")
    ap.add_argument("--tr-radius", type=int, default=4, help="initial radius (transpositions)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Run steps 1-5 (module docstring); exit status 1 when a target is missed."""
    args = parse_args(argv)
    cfg = resolve_config(args.config, args.set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    report: dict = {"config": cfg.to_dict(), "estimator": args.estimator, "args": vars(args)}

    t0 = time.perf_counter()  # 1. store
    store = record(cfg, out / "store", progress=False)
    print(f"store {store.path}: T={store.T}, P={store.P:,}, eval sets {list(store.eval_names)} "
          f"(ready in {time.perf_counter() - t0:.1f} s)", flush=True)
    report_throughput(store, args, report, failures)  # 2.
    searched = search_samplers(store, args, report, failures)  # 3.
    if searched:
        result = verify_samplers(store, args, searched, report, failures)
        if args.rounds:  # 4.
            trust_region_vs_single_shot(cfg, out, args, result, report, failures)
    report["failures"] = failures
    atomic_write_bytes(out / "search_bench.json", json.dumps(to_json(report), indent=1).encode())
    print(f"wrote {out / 'search_bench.json'}")
    print("\n".join(["FAIL: " + f for f in failures]) if failures else "all search targets met")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
