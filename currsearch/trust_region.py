"""Trust-region search: estimate only near a recorded run, verify, re-record, repeat.

A Taylor expansion around one trajectory is accurate only near it (docs/estimators.md;
../shared/DESIGN.md Sec. 3, lesson 5), so each round searches a neighbourhood of the current
incumbent order and moves only on real-training evidence:

1. record the trajectory along the incumbent (``record(..., reference_order=incumbent)``;
   with ``record.terms`` cut to what the estimator needs: ``fut1-hvp`` needs only the
   checkpoints, i.e. one training run). That run is also the incumbent's verified loss.
2. search orders within ``radius`` transpositions of the incumbent (search space ``local``)
   with the estimator fitted on that store (Optuna, a journal per round: a killed round
   resumes);
3. retrain the ``top_k`` best estimated orders for real; the best of them becomes the new
   incumbent if it beats the incumbent's verified loss;
4. update the radius like a classical trust region: with ``rho = actual / predicted``
   improvement of the best estimated order, the radius doubles when ``rho >= 0.5``, halves
   when no verified candidate improved, and stays otherwise.

``trust_region.json`` (rewritten atomically after every round) makes a rerun skip finished
rounds. :func:`write_trust_region_report` writes markdown and a PNG of verified loss per round.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import Config
from .errors import ConfigError
from .manifest import TRAJECTORY_SECTIONS, atomic_write_bytes, config_diff
from .reports import pyplot, save_figure


def _record_cfg(cfg: Config, estimator_cls) -> Config:
    """``cfg`` with ``record.terms`` cut to the estimator's required terms (cheapest store)."""
    return cfg.replace(record={"terms": tuple(estimator_cls.required_terms)})


def _next_radius(radius: int, rho: float | None, improved: bool, lo: int, hi: int) -> int:
    if not improved:
        return max(lo, radius // 2)
    if rho is not None and rho >= 0.5:
        return min(hi, radius * 2)
    return radius


def run_trust_region(cfg: Config, out_dir, rounds: int = 3, estimator: str = "fut1-hvp", radius: int = 4,
                     trials: int = 32, top_k: int = 2, sampler: str = "tpe", batch_size: int = 8,
                     objective: str = "all", seed: int = 0, min_radius: int = 1, max_radius: int | None = None,
                     start=None, progress: bool = True, trainer=None, estimator_kwargs: dict | None = None) -> dict:
    """Run (or resume) ``rounds`` trust-region rounds (see module docstring).

    Args:
        cfg: experiment config (its ``record`` section gives anchor stride and projection;
            ``record.terms`` is replaced by the estimator's required terms).
        out_dir: directory; round r writes ``round_{r}/store`` and ``round_{r}/study.journal``.
        rounds: number of rounds R >= 1.
        estimator: registered estimator name (default ``fut1-hvp``, the one accurate near
            the recorded run).
        radius: initial trust-region radius, in transpositions (>= 1).
        trials: estimated orders per round (Optuna trials, the incumbent included).
        top_k: searched orders retrained for real per round.
        sampler, batch_size, seed: as :func:`currsearch.search.run_search` (round r uses
            ``seed + r``).
        objective: the eval set whose final loss (nats/token) is minimized.
        min_radius, max_radius: radius bounds (default max: T - 1).
        start: the first incumbent, int64 ``[T]`` (default ``0..T-1``).
        progress: print one line per round and show the recorder's and search's progress bars.
        estimator_kwargs: keyword arguments of the estimator (e.g. ``{"chunk": 4}``).
        trainer: a :class:`~currsearch.train.Trainer` with ``cfg``'s training settings, whose
            cached warm-up phase is reused (default: built once).

    Returns:
        ``{"rounds": [per-round dict], "incumbent": order list, "incumbent_loss": float,
        "start_loss": float, "objective", "estimator", "verified_runs": int, "seconds"}``; per
        round: radius, incumbent and its verified loss, the estimated and verified losses of
        the retrained candidates, predicted and actual improvement (nats/token), rho (None
        when no improvement was predicted),
        whether the incumbent moved, and the seconds spent recording, searching, verifying.

    Raises:
        ConfigError: ``rounds``, ``radius``, ``top_k`` or ``trials`` out of range, an unknown
            estimator or objective, or ``out_dir`` holding a run with other settings.
    """
    from estimators import get_estimator

    from .backends import SerialBackend
    from .orders import validate_orders
    from .record import record
    from .search import run_search
    from .train import Trainer

    if rounds < 1 or radius < 1 or top_k < 1 or trials < top_k + 1 or min_radius < 1:
        raise ConfigError(f"trust region needs rounds >= 1, radius >= 1, min_radius >= 1, top_k >= 1 and trials > top_k "
                          f"(got rounds={rounds}, radius={radius}, min_radius={min_radius}, top_k={top_k}, trials={trials})")
    est_cls = type(get_estimator(estimator, **(estimator_kwargs or {})))
    rcfg = _record_cfg(cfg, est_cls)
    if trainer is None or config_diff(trainer.cfg.to_dict(), rcfg.to_dict()):
        trainer = Trainer.from_config(rcfg)
    T = trainer.T
    if objective not in trainer.plan.eval_names:
        raise ConfigError(f"unknown objective eval set {objective!r}; the plan has {list(trainer.plan.eval_names)}")
    max_radius = T - 1 if max_radius is None else max_radius
    radius = min(radius, max_radius)
    incumbent = validate_orders(torch.arange(T) if start is None else start, T).view(-1)
    rec = rcfg.record
    settings = {"estimator": estimator, "estimator_kwargs": estimator_kwargs or {}, "objective": objective, "trials": trials,
                "top_k": top_k, "sampler": sampler, "batch_size": batch_size, "seed": seed, "start": incumbent.tolist(),
                "min_radius": min_radius, "max_radius": max_radius,
                "config": rcfg.fingerprint(*TRAJECTORY_SECTIONS),
                "record": [rec.anchor_stride, rec.projection, rec.projection_dim, rec.projection_seed]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "trust_region.json"
    state = {"settings": settings, "rounds": []}
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("settings") != settings:
            raise ConfigError(f"{str(state_path)!r} holds a trust-region run with other settings; use another --out or the same settings")
    obj = trainer.plan.eval_names.index(objective)
    for done in state["rounds"]:  # resume: continue from the last finished round
        incumbent, radius = torch.tensor(done["next_incumbent"]), done["next_radius"]
    t_all = time.perf_counter()
    for r in range(len(state["rounds"]), rounds):
        rdir = out / f"round_{r}"
        t0 = time.perf_counter()
        store = record(rcfg, rdir / "store", progress=progress, trainer=trainer, reference_order=incumbent)
        inc_loss = float(store.final()["eval_loss"][obj])
        t1 = time.perf_counter()
        est = get_estimator(estimator, **(estimator_kwargs or {})).fit(store)
        res = run_search(store, space="local", space_options={"center": incumbent.tolist(), "moves": radius},
                         sampler=sampler, n_trials=trials, batch_size=batch_size, storage=str(rdir / "study.journal"),
                         backend=SerialBackend(est), objectives=[objective], seed=seed + r, enqueue_heuristics=True,
                         enqueue_assignment=False, progress=progress)
        inc_est = float(est.estimate(incumbent)[obj])
        cands = [(o, e) for o, e in res.top(len(res.orders)) if not torch.equal(o, incumbent)][:top_k]
        t2 = time.perf_counter()
        verified = [float(trainer.train(o).eval_losses[obj]) for o, _ in cands]
        t3 = time.perf_counter()
        if not cands:  # the whole neighbourhood searched was the incumbent
            best_i, predicted, actual = None, 0.0, 0.0
        else:
            best_i = min(range(len(cands)), key=lambda i: verified[i])
            predicted = inc_est - float(cands[0][1][obj])
            actual = inc_loss - verified[0]
        improved = best_i is not None and verified[best_i] < inc_loss
        rho = actual / predicted if predicted > 0 else None  # undefined when no gain was predicted
        nxt = cands[best_i][0] if improved else incumbent
        new_radius = _next_radius(radius, rho, improved, min_radius, max_radius)
        state["rounds"].append({
            "round": r, "radius": radius, "incumbent": incumbent.tolist(), "incumbent_loss": inc_loss,
            "incumbent_estimate": inc_est,
            "candidates": [{"order": o.tolist(), "estimated": float(e[obj]), "verified": v} for (o, e), v in zip(cands, verified)],
            "predicted_improvement": predicted, "actual_improvement": actual, "rho": rho, "improved": improved,
            "next_incumbent": nxt.tolist(), "next_radius": new_radius,
            "next_incumbent_loss": verified[best_i] if improved else inc_loss,
            "seconds": {"record": t1 - t0, "search": t2 - t1, "verify": t3 - t2},
        })
        atomic_write_bytes(state_path, json.dumps(state, indent=1).encode())
        if progress:
            print(f"round {r}: radius {radius}, incumbent {inc_loss:.4f}, best candidate "
                  f"{min(verified) if verified else float('nan'):.4f} (predicted gain {predicted:+.4f}, actual {actual:+.4f}) "
                  f"-> {'moved' if improved else 'stayed'}, radius {new_radius}")
        incumbent, radius = nxt, new_radius
    rs = state["rounds"][:rounds]
    return {
        "rounds": rs, "objective": objective, "estimator": estimator,
        "start_loss": rs[0]["incumbent_loss"], "incumbent": rs[-1]["next_incumbent"],
        "incumbent_loss": rs[-1]["next_incumbent_loss"],
        "verified_runs": sum(1 + len(x["candidates"]) for x in rs),  # the recorded run + the retrained candidates
        "seconds": time.perf_counter() - t_all,
    }


def refine_verified(cfg: Config, out_dir, result: dict, rounds: int = 2, objective: str = "all", progress: bool = True,
                    trainer=None, estimator=None, **options) -> dict:
    """Trust-region rounds started from the best order of a verification ``result``.

    The start is the candidate of ``result`` (:func:`currsearch.verify.verify`) with the lowest
    verified ``objective`` loss, whatever its kind. The final incumbent is retrained once more
    with :func:`~currsearch.verify.verify` (all eval sets) and added to ``result["candidates"]``
    as ``search_trust_region`` (kind ``searched``); ``result["trust_region"]`` gets the start,
    the gain (nats/token, >= 0: every move was verified) and the rounds.

    Args:
        cfg, out_dir, rounds, objective, progress: as :func:`run_trust_region` (``out_dir``
            holds the rounds).
        trainer: the Trainer that verifies the final incumbent (default: built from ``cfg``).
        estimator: a fitted estimator whose estimate of the final incumbent is reported next
            to the other candidates' (default: none).
        options: further :func:`run_trust_region` keyword arguments (trials, top_k, radius, ...).

    Returns:
        ``result``, updated in place.
    """
    from .verify import verify

    c = result["candidates"]
    start_name = min(c, key=lambda n: c[n]["verified"][objective])
    res = run_trust_region(cfg, out_dir, rounds=rounds, objective=objective, start=torch.tensor(c[start_name]["order"]),
                           progress=progress, trainer=trainer, **options)
    write_trust_region_report(res, out_dir)
    if trainer is None:
        from .train import Trainer

        trainer = Trainer.from_config(cfg)
    order = torch.tensor(res["incumbent"])
    est = {"search_trust_region": estimator.estimate(order)} if estimator is not None else None
    final = verify(trainer, {"search_trust_region": order}, est, kinds={"search_trust_region": "searched"})
    c["search_trust_region"] = final["candidates"]["search_trust_region"]
    result["trust_region"] = {"start": start_name, "start_loss": res["start_loss"], "final_loss": res["incumbent_loss"],
                              "gain": res["start_loss"] - res["incumbent_loss"], "rounds": len(res["rounds"]),
                              "verified_runs": res["verified_runs"], "estimator": res["estimator"], "objective": objective}
    return result


def write_trust_region_report(result: dict, out_dir) -> list[Path]:
    """Write ``trust_region.md``, ``trust_region_rounds.png`` (verified loss per round) and
    ``best_order.json`` (the final incumbent) into ``out_dir``; returns the paths."""
    from .export import export_order

    plt = pyplot()
    out = Path(out_dir)
    rs = result["rounds"]
    lines = [f"# Trust-region search ({result['estimator']}, objective `{result['objective']}`)", "",
             f"Start loss {result['start_loss']:.4f}, final incumbent {result['incumbent_loss']:.4f} nats/token "
             f"({result['incumbent_loss'] - result['start_loss']:+.4f}) after {len(rs)} rounds and "
             f"{result['verified_runs']} real training runs.", "",
             "| round | radius | incumbent (verified) | best candidate (verified) | predicted gain | actual gain | rho | moved |",
             "|---|---|---|---|---|---|---|---|"]
    for x in rs:
        best = min((c["verified"] for c in x["candidates"]), default=float("nan"))
        lines.append(f"| {x['round']} | {x['radius']} | {x['incumbent_loss']:.4f} | {best:.4f} | "
                     f"{x['predicted_improvement']:+.4f} | {x['actual_improvement']:+.4f} | "
                     f"{'n/a' if x['rho'] is None else format(x['rho'], '.2f')} | {x['improved']} |")
    (out / "trust_region.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [x["round"] for x in rs]
    ax.plot(xs, [x["incumbent_loss"] for x in rs], "o-", label="incumbent (recorded run)")
    for x in rs:
        ax.scatter([x["round"]] * len(x["candidates"]), [c["verified"] for c in x["candidates"]], color="C1", s=14,
                   label="retrained candidates" if x is rs[0] else None)
    ax.set(xlabel="round", ylabel=f"verified final loss, {result['objective']} (nats/token)", title="trust-region rounds")
    ax.legend(fontsize=7)
    png = save_figure(fig, out / "trust_region_rounds.png")
    best = export_order(out / "best_order.json", torch.tensor(result["incumbent"]), name="trust_region_incumbent",
                        verified={result["objective"]: result["incumbent_loss"]})
    return [out / "trust_region.md", png, best]
