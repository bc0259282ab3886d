"""Verify candidate orders by real training and write the search report.

:func:`verify` retrains every candidate order from the same window start and records its
true final eval losses (nats/token); :func:`baseline_orders` gives the orders to compare
against (reference, random orders, heuristic curricula); :func:`write_report` writes
``report.json``, ``report.md``, plots and ``best_order.json``.

Candidate kinds (from the name unless given): ``searched`` (``search_*``), ``reference``,
``random`` (``random_*``; the report compares with their median by verified ``all`` loss)
and ``heuristic`` (anything else).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .orders import random_order, reference_order, validate_orders
from .reports import fmt, pyplot, save_figure


def kind_of(name: str) -> str:
    """Candidate kind from its name: searched, reference, random or heuristic."""
    if name.startswith("search"):
        return "searched"
    if name == "reference":
        return "reference"
    if name.startswith("random"):
        return "random"
    return "heuristic"


def baseline_orders(trainer, n_random: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Baselines: ``reference``, ``random_0..n_random-1`` (seeds ``seed + i``) and the
    heuristic curricula of :func:`search_spaces.heuristic_orders` (int64 ``[T]`` each)."""
    from search_spaces import BatchInfo, heuristic_orders

    T = trainer.T
    out = {"reference": reference_order(T)}
    for i in range(n_random):
        out[f"random_{i}"] = random_order(T, seed + i)
    for name, order in heuristic_orders(BatchInfo.from_plan(trainer.plan)).items():
        if name != "reference":
            out[name] = order
    return out


def verify(trainer, candidates: dict, estimates: dict | None = None, kinds: dict | None = None,
           progress: bool = False) -> dict:
    """Retrain every candidate order for real.

    Args:
        trainer: a :class:`~currsearch.train.Trainer`.
        candidates: ``{name: order int64 [T]}``.
        estimates: optional ``{name: float [E]}`` estimated final losses (nats/token).
        kinds: optional ``{name: kind}``; default :func:`kind_of`.
        progress: print one line per candidate.

    Returns:
        ``{"eval_names", "domains" (per batch), "T", "candidates": {name: {"kind", "order",
        "verified": {eval set: nats/token}, "estimated": {...} or None, "seconds"}}}``.
        Identical orders are trained once (training is deterministic).

    Raises:
        OrderError: a candidate is not a permutation of ``0..T-1``.
    """
    names = list(trainer.plan.eval_names)
    done: dict[tuple, tuple[list[float], float]] = {}
    out = {"eval_names": names, "domains": list(trainer.plan.domains), "T": trainer.T, "candidates": {}}
    for name, order in candidates.items():
        order = validate_orders(order, trainer.T)
        key = tuple(order.tolist())
        if key not in done:
            t0 = time.perf_counter()
            res = trainer.train(order)
            done[key] = (res.eval_losses.tolist(), time.perf_counter() - t0)
        losses, secs = done[key]
        est = None
        if estimates is not None and name in estimates and estimates[name] is not None:
            est = dict(zip(names, (float(x) for x in torch.as_tensor(estimates[name]).flatten())))
        out["candidates"][name] = {
            "kind": (kinds or {}).get(name, kind_of(name)),
            "order": list(key),
            "verified": dict(zip(names, losses)),
            "estimated": est,
            "seconds": secs,
        }
        if progress:
            print(f"verified {name}: all = {losses[-1]:.4f} nats/token ({secs:.2f} s)", flush=True)
    return out


def summarize(result: dict, eval_set: str = "all") -> dict:
    """Best verified searched order vs the random median and every heuristic (``eval_set`` loss).

    Returns ``{"eval_set", "best_searched", "best_searched_loss", "random_median",
    "random_median_loss", "heuristics": {name: loss}, "beats_random_median",
    "beats_all_heuristics", "beats_reference"}`` (missing parts are None)."""
    c = result["candidates"]
    loss = {n: v["verified"][eval_set] for n, v in c.items()}
    searched = [n for n in c if c[n]["kind"] == "searched"]
    randoms = sorted((n for n in c if c[n]["kind"] == "random"), key=lambda n: (loss[n], n))
    heur = {n: loss[n] for n in c if c[n]["kind"] == "heuristic"}
    best = min(searched, key=lambda n: (loss[n], n)) if searched else None
    med = randoms[(len(randoms) - 1) // 2] if randoms else None
    b = loss[best] if best else None
    ref = loss.get("reference")
    return {
        "eval_set": eval_set,
        "best_searched": best,
        "best_searched_loss": b,
        "random_median": med,
        "random_median_loss": loss[med] if med else None,
        "heuristics": heur,
        "reference_loss": ref,
        "beats_random_median": (b < loss[med]) if best and med else None,
        "beats_all_heuristics": all(b < v for v in heur.values()) if best else None,
        "beats_reference": (b < ref) if best and ref is not None else None,
    }


def _fmt(x) -> str:
    return fmt(x, ".4f")


def render_markdown(result: dict, summary: dict) -> str:
    names = result["eval_names"]
    doms = [n for n in names if n != "all"]
    lines = [
        "| candidate | kind | estimated all | verified all | " + " | ".join(f"verified {d}" for d in doms) + " | seconds |",
        "|---|---|---|---|" + "---|" * len(doms) + "---|",
    ]
    med = summary["random_median"]
    for name, v in sorted(result["candidates"].items(), key=lambda kv: kv[1]["verified"]["all"]):
        est = v["estimated"]["all"] if v["estimated"] else None
        label = f"{name} (random median)" if name == med else name
        lines.append(f"| {label} | {v['kind']} | {_fmt(est)} | {_fmt(v['verified']['all'])} | "
                     + " | ".join(_fmt(v["verified"][d]) for d in doms) + f" | {v['seconds']:.2f} |")
    s = summary
    if s["best_searched"] is None:
        verdict = "No searched order was verified."
    else:
        hb = ", ".join(f"{n} {_fmt(x)}" for n, x in s["heuristics"].items()) or "none"
        verdict = (
            f"Best verified searched order `{s['best_searched']}`: {_fmt(s['best_searched_loss'])} nats/token on "
            f"`{s['eval_set']}`. It {'beats' if s['beats_random_median'] else 'does not beat'} the random median "
            f"(`{s['random_median']}`, {_fmt(s['random_median_loss'])}) and "
            f"{'beats' if s['beats_all_heuristics'] else 'does not beat'} every heuristic ({hb}); "
            f"reference {_fmt(s['reference_loss'])}."
        )
    tr = result.get("trust_region")
    if tr:
        verdict += (
            f"\n\n`search_trust_region`: {tr['rounds']} trust-region rounds ({tr['estimator']}) started from the best "
            f"verified candidate `{tr['start']}` ({_fmt(tr['start_loss'])}) and reached {_fmt(tr['final_loss'])} "
            f"on `{tr['objective']}` (gain {_fmt(tr['gain'])} nats/token, {tr['verified_runs']} real training runs"
            + ("; no round found a better order, so it is the start order itself" if tr["gain"] <= 0 else "") + ").\n"
        )
    return ("# Search and verification report\n\nLosses are final eval losses in nats/token (lower is better); "
            "'estimated' comes from the surrogate, 'verified' from real retraining.\n\n"
            + "\n".join(lines) + "\n\n" + verdict + "\n")


def write_report(out_dir, result: dict, study=None) -> list[Path]:
    """Write ``report.json``, ``report.md``, ``optimization_history.png`` (when ``study`` is
    given), ``estimated_vs_verified.png``, ``best_order_domains.png`` and ``best_order.json``
    (the best verified searched order, else the best verified candidate) into ``out_dir``."""
    import optuna

    from .export import export_order

    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    c = result["candidates"]
    best = summary["best_searched"] or min(c, key=lambda n: c[n]["verified"]["all"])
    (out / "report.json").write_text(json.dumps({**result, "summary": summary, "best": best}, indent=1))
    (out / "report.md").write_text(render_markdown(result, summary))
    paths = [out / "report.json", out / "report.md"]

    if study is not None:
        trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        xs = [t.number for t in trials]
        ys = [t.values[0] for t in trials]
        run = [min(ys[: i + 1]) for i in range(len(ys))]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter(xs, ys, s=8, alpha=0.5, label="trial")
        ax.step(xs, run, where="post", color="C1", label="best so far")
        ax.set(xlabel="trial number", ylabel="estimated objective (nats/token)", title="optimization history")
        ax.legend(fontsize=7)
        paths.append(save_figure(fig, out / "optimization_history.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    for kind in dict.fromkeys(v["kind"] for v in c.values()):
        pts = [(v["verified"]["all"], v["estimated"]["all"]) for v in c.values() if v["kind"] == kind and v["estimated"]]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=kind, s=20)
    ax.set(xlabel="verified final loss, all (nats/token)", ylabel="estimated (nats/token)",
           title="estimated vs verified")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "estimated_vs_verified.png"))

    order = c[best]["order"]
    domains = result["domains"]
    names = sorted(set(domains))
    row = [[names.index(domains[l]) for l in order]]
    fig, ax = plt.subplots(figsize=(max(6, len(order) * 0.25), 1.8))
    cmap = plt.get_cmap("tab10", max(len(names), 1))
    ax.imshow(row, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5)
    ax.set_yticks([])
    ax.set(xlabel="step t", title=f"{best}: domain of the batch at each step")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=cmap(i), label=n) for i, n in enumerate(names)], fontsize=7,
              loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=len(names))
    paths.append(save_figure(fig, out / "best_order_domains.png"))

    paths.append(export_order(out / "best_order.json", torch.tensor(order), name=best,
                              verified=c[best]["verified"], estimated=c[best]["estimated"]))
    return paths
