"""Memorization and generalization versus sample position (arXiv 2505.22042, second application).

For chosen window batches B_i and positions j, the order "B_i moved to position j" keeps every
other batch in its relative reference order (:func:`position_orders`; j = i gives the
reference order ``0..T-1``, so i is batch i's reference position). One estimator call
(``estimate_with_batch_losses``) scores every cell (i, j)::

    M(i, j)     estimated final loss on B_i itself                (memorization)
    G_all(i, j) estimated final eval loss on "all"                (generalization)
    G_dom(i, j) estimated final eval loss on B_i's domain         (generalization, own domain)

all in nats/token. A *change* is taken against the same batch at its reference position,
``dM(i, j) = M(i, j) - M(i, i)`` (likewise for G): the position effect.

Validation retrains for real (``Trainer.train``) the reference order, which gives the true
reference cell (i, i) of every chosen batch, plus a random sample of ``n_verify - 1`` moved
cells (seeded), and reports per quantity:

* ``spearman``: Spearman rho between estimated and true losses over all sampled cells;
* ``spearman_change``: rho between estimated and true changes over the moved cells;
* ``fraction_explained``: ``1 - sum((dX_est - dX_true)^2) / sum(dX_true^2)`` over the moved
  cells, i.e. the fraction of the true squared position effect the estimate explains. 1 is
  perfect; 0 is the null model "position does not matter" (the ``reference`` estimator);
  negative is worse than that null model;
* ``absdiff`` (mean |est - true|), ``max_abs_err``, the RMS of the true and estimated changes,
  and the pooled slope of the change on the displacement ``j - i`` (least squares through
  the origin, nats/token per position), true and estimated.

The summary (:func:`summarize_positions`, estimated over the whole grid) gives recency (M at
the last grid position minus M at the first), forgetting (minus the least-squares slope of M
over position: how much the own-batch loss rises per position moved earlier) and domain
interference (the last-minus-first change of the eval loss on B_i's own domain and, averaged,
on the other domains). :func:`write_position_report` writes ``positions.json``,
``positions.md``, heatmaps and loss-vs-position curves.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, OrderError
from .reports import fmt, pyplot, save_figure, write_result_files

SOURCE = ("arXiv 2505.22042 (Taylor-expanded training dynamics of sample orders), application to "
          "memorization and generalization versus sample position")
QUANTITIES = ("memorization", "generalization_all", "generalization_domain")
_LABELS = {"memorization": "loss on B_i (memorization)", "generalization_all": "eval loss, all",
           "generalization_domain": "eval loss, B_i's domain"}


# ---------------------------------------------------------------------------- orders
def _int_list(values, what: str) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not float(v).is_integer():
            raise OrderError(f"{what} must be integers, got {v!r}")
        out.append(int(v))
    return out


def position_orders(T: int, batch_ids, positions) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Orders that move batch i to position j, the other batches keeping their reference order.

    Args:
        T: number of window batches.
        batch_ids: batch indices i (each in ``0..T-1``, distinct).
        positions: positions j (each in ``0..T-1``, distinct).

    Returns:
        ``(orders, cells)``: int64 ``[n, T]`` with ``n = len(batch_ids) * len(positions)``, row
        c the order of ``cells[c] = (i, j)`` (batch-major: all positions of the first batch
        first). Row c has ``orders[c, j] == i`` and the other T - 1 batches in increasing index
        order; ``j == i`` gives the reference order ``arange(T)``.

    Raises:
        OrderError: a batch id or position outside ``0..T-1`` or not an integer (the message
            names the offending values). ConfigError: empty or repeated ids or positions.
    """
    if T < 1:
        raise ConfigError(f"T must be at least 1, got {T}")
    ids, pos = _int_list(batch_ids, "batch ids"), _int_list(positions, "positions")
    for vals, what in ((ids, "batch ids"), (pos, "positions")):
        if not vals:
            raise ConfigError(f"give at least one of the {what}")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"{what} {vals} repeat {sorted({v for v in vals if vals.count(v) > 1})}; give each once")
    bad = [i for i in ids if not 0 <= i < T]
    if bad:
        raise OrderError(f"unknown batch id(s) {bad}: the plan has T = {T} window batches, ids 0..{T - 1}")
    bad = [j for j in pos if not 0 <= j < T]
    if bad:
        raise OrderError(f"position(s) {bad} outside 0..{T - 1} (the window has T = {T} steps)")
    cells = [(i, j) for i in ids for j in pos]
    i = torch.tensor([c[0] for c in cells], dtype=torch.int64)[:, None]
    j = torch.tensor([c[1] for c in cells], dtype=torch.int64)[:, None]
    p = torch.arange(T, dtype=torch.int64)[None, :]
    k = p - (p > j).long()  # index into the reference order with i removed
    orders = torch.where(p == j, i, k + (k >= i).long())
    return orders, cells


def default_positions(T: int, n: int = 6) -> list[int]:
    """``n`` evenly spaced positions from 0 to T - 1, both included (fewer when T < n)."""
    return sorted({int(round(x)) for x in np.linspace(0, T - 1, min(n, T))})


def default_batches(plan_or_store, per_domain: int = 2) -> list[int]:
    """``per_domain`` batches of every domain, evenly spread over the domain's reference
    positions (the earliest and the latest for 2); sorted batch ids.

    Args:
        plan_or_store: a :class:`~currsearch.plan.BatchPlan` or a
            :class:`~currsearch.store.TrajectoryStore` (anything with ``domains``, length T).
        per_domain: batches per domain (``"mixed"`` batching counts as one domain).

    Raises:
        ConfigError: ``per_domain < 1``.
    """
    if per_domain < 1:
        raise ConfigError(f"per_domain must be at least 1, got {per_domain}")
    domains = list(plan_or_store.domains)
    out = []
    for d in sorted(set(domains)):
        ids = [i for i, x in enumerate(domains) if x == d]
        picks = np.linspace(0, len(ids) - 1, min(per_domain, len(ids)))
        out += [ids[int(round(p))] for p in picks]
    return sorted(set(out))


# ---------------------------------------------------------------------------- analysis
def _slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y on x (with intercept); NaN for fewer than 2 distinct x."""
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan")
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def _stats(v) -> dict:
    v = np.asarray(v, dtype=float)
    v = v[np.isfinite(v)]
    nan = float("nan")
    return {"mean": float(v.mean()) if v.size else nan, "min": float(v.min()) if v.size else nan,
            "max": float(v.max()) if v.size else nan, "n": int(v.size)}


def validation_metrics(est: np.ndarray, true: np.ndarray, est_change: np.ndarray, true_change: np.ndarray,
                       displacement: np.ndarray) -> dict:
    """Agreement of estimated and true values of one quantity over the verified cells.

    Args:
        est, true: float ``[m]`` losses (nats/token) of all verified cells (reference cells included).
        est_change, true_change: float ``[k]`` changes against the batch's reference position,
            nats/token, of the moved cells only.
        displacement: float ``[k]`` ``j - i`` of the moved cells (positions).

    Returns:
        ``{"n", "n_moved", "spearman", "absdiff", "max_abs_err", "spearman_change",
        "fraction_explained", "true_change_rms", "est_change_rms", "true_slope", "est_slope"}``
        (definitions in the module docstring; slopes in nats/token per position); NaN where
        undefined (e.g. no moved cells, constant inputs).
    """
    from .fidelity import fidelity_metrics

    nan = float("nan")
    m = fidelity_metrics(torch.as_tensor(est), torch.as_tensor(true)) if len(est) else {"spearman": nan, "absdiff": nan}
    err = np.abs(np.asarray(est) - np.asarray(true))
    ec, tc, d = (np.asarray(x, dtype=float) for x in (est_change, true_change, displacement))
    k = len(tc)
    ss = float((tc**2).sum())
    rho = fidelity_metrics(torch.as_tensor(ec), torch.as_tensor(tc))["spearman"] if k else nan
    dd = float((d * d).sum())
    return {
        "n": int(len(est)),
        "n_moved": k,
        "spearman": m["spearman"],
        "absdiff": m["absdiff"],
        "max_abs_err": float(err.max()) if err.size else nan,
        "spearman_change": rho,
        "fraction_explained": 1.0 - float(((ec - tc) ** 2).sum()) / ss if k and ss > 0 else nan,
        "true_change_rms": float(np.sqrt((tc**2).mean())) if k else nan,
        "est_change_rms": float(np.sqrt((ec**2).mean())) if k else nan,
        "true_slope": float((d * tc).sum() / dd) if k and dd > 0 else nan,
        "est_slope": float((d * ec).sum() / dd) if k and dd > 0 else nan,
    }


def summarize_positions(result: dict) -> dict:
    """Recency, forgetting and domain interference from the estimated grid of ``result``.

    Returns:
        ``{"recency": {...}, "forgetting": {...}, "interference": {...}}``, all in nats/token
        (forgetting: nats/token per position moved earlier), each with the mean, min, max
        over batches and a ``by_domain`` mean; see the module docstring for definitions.
    """
    pos = np.array(result["positions"], dtype=float)
    grid = result["grid"]
    M = np.array(grid["memorization"], dtype=float)  # [nb, np]
    ev = np.array(grid["eval"], dtype=float)  # [nb, np, E]
    names, batches = result["eval_names"], result["batches"]
    first, last = int(np.argmin(pos)), int(np.argmax(pos))
    has_span = pos.size >= 2 and pos[last] > pos[first]
    nan = float("nan")
    rec = M[:, last] - M[:, first] if has_span else np.full(len(batches), nan)
    forget = np.array([-_slope(pos, M[b]) for b in range(len(batches))])
    domain_cols = [e for e, n in enumerate(names) if n in result["domain_names"]]
    own, other, own_slope, other_slope = [], [], [], []
    for b, info in enumerate(batches):
        d = info["domain"]
        if d in result["domain_names"]:
            c = names.index(d)
            oc = [e for e in domain_cols if e != c]
            own.append(ev[b, last, c] - ev[b, first, c] if has_span else nan)
            own_slope.append(_slope(pos, ev[b, :, c]))
            o = ev[b][:, oc].mean(1) if oc else np.full(len(pos), nan)
            other.append(o[last] - o[first] if has_span else nan)
            other_slope.append(_slope(pos, o))
        else:
            own.append(nan), other.append(nan), own_slope.append(nan), other_slope.append(nan)
    a = names.index("all") if "all" in names else len(names) - 1
    all_change = ev[:, last, a] - ev[:, first, a] if has_span else np.full(len(batches), nan)
    doms = sorted({b["domain"] for b in batches})

    def by_domain(v):
        return {d: _stats([x for x, b in zip(v, batches) if b["domain"] == d])["mean"] for d in doms}

    return {
        "recency": {
            "definition": "M(i, last) - M(i, first): loss on B_i when placed at the last grid position minus at the first",
            "first_position": int(pos[first]), "last_position": int(pos[last]),
            **_stats(rec), "per_batch": rec.tolist(), "by_domain": by_domain(rec),
            "n_lower_when_last": int((rec < 0).sum()), "n_batches": len(batches),
        },
        "forgetting": {
            "definition": "-(least-squares slope of M(i, j) over j): rise of the loss on B_i per position moved earlier",
            **{f"{k}_per_position": v for k, v in _stats(forget).items() if k != "n"},
            "per_batch": forget.tolist(), "by_domain": by_domain(forget),
            "n_forgetting": int((forget > 0).sum()), "n_batches": len(batches),
        },
        "interference": {
            "definition": "last-minus-first change of the eval loss on B_i's own domain and, averaged, on the other domains",
            "own_domain": _stats(own)["mean"], "other_domains": _stats(other)["mean"], "all": _stats(all_change)["mean"],
            "own_minus_other": _stats(np.array(own) - np.array(other))["mean"],
            "own_slope": _stats(own_slope)["mean"], "other_slope": _stats(other_slope)["mean"],
            "per_batch_own": list(map(float, own)), "per_batch_other": list(map(float, other)),
            "by_domain": {d: {"own": by_domain(own)[d], "other": by_domain(other)[d]} for d in doms},
        },
    }


def analyze_positions(store, estimator="fut1-hvp", batch_ids=None, positions=None, n_verify: int = 20,
                      seed: int = 0, progress: bool = False) -> dict:
    """Estimate memorization and generalization for every (batch, position) cell and validate
    a sample of cells by real retraining (see the module docstring; arXiv 2505.22042).

    Args:
        store: a complete :class:`~currsearch.store.TrajectoryStore`.
        estimator: a registered estimator name (fitted here) or an estimator (fitted here if
            it is not); it must give per-batch losses (``fut1-hvp``; ``reference`` is the
            position-blind null model).
        batch_ids: batches i to move (default :func:`default_batches`, 2 per domain).
        positions: positions j (default :func:`default_positions`, 6 evenly spaced).
        n_verify: cells retrained for real: the reference cells (one training of the reference
            order) plus ``n_verify - 1`` random moved cells; 0 skips validation.
        seed: seed of the verified sample.
        progress: print what runs to stderr and show training progress.

    Returns:
        A JSON-ready dict (NaN for missing values): ``estimator``, ``T``, ``eval_names``,
        ``domain_names``, ``batch_ids``, ``positions``, ``batches`` (id, domain,
        reference_position), ``reference`` (estimated and true losses of the reference order),
        ``grid`` (``[n_batches][n_positions]`` estimated losses per quantity, ``eval``
        ``[..][..][E]``, ``*_change`` grids, ``true_*`` grids with NaN outside the sample),
        ``validation`` (per-cell values and errors, ``metrics`` per quantity from
        :func:`validation_metrics`), ``summary`` (:func:`summarize_positions`), ``seconds``.
        All losses in nats/token.

    Raises:
        OrderError, ConfigError: invalid batch ids or positions (:func:`position_orders`),
            ``n_verify < 0``, or an estimator without per-batch losses.
        StoreError: the store does not fit the estimator.
        ConfigError: also when the store was recorded along another order than ``0..T-1``.
    """
    from estimators.base import Estimator, get_estimator
    from estimators.hvp import window_batch_losses

    t_start = time.perf_counter()
    T = store.T
    if not torch.equal(store.reference_order, torch.arange(T)):
        raise ConfigError(f"store {str(store.path)!r} was recorded along another order than 0..T-1 (a trust-region "
                          "store?); the position analysis moves batches within the reference order: record the plain store")
    batch_ids = default_batches(store) if batch_ids is None else list(batch_ids)
    positions = default_positions(T) if positions is None else list(positions)
    orders, cells = position_orders(T, batch_ids, positions)
    if n_verify < 0:
        raise ConfigError(f"n_verify must be >= 0, got {n_verify}")
    est = get_estimator(estimator) if isinstance(estimator, str) else estimator
    if type(est).estimate_batch_losses is Estimator.estimate_batch_losses:
        raise ConfigError(f"estimator {est.name!r} gives no per-batch losses, which the memorization analysis needs; "
                          "use --estimator fut1-hvp (or reference, the position-blind null model)")
    if est.store is None:
        if progress:
            print(f"fitting estimator {est.name!r}", file=sys.stderr)
        est.fit(store)
    if est.T != T or list(est.eval_names) != list(store.eval_names):
        raise ConfigError(f"estimator {est.name!r} was fitted on another store (T = {est.T}, eval sets {est.eval_names}); "
                          f"fit it on this one (T = {T}, eval sets {store.eval_names})")
    names, domains = list(store.eval_names), list(store.domains)
    a = names.index("all") if "all" in names else len(names) - 1
    col = {i: names.index(domains[i]) if domains[i] in names else a for i in batch_ids}
    nb, npos = len(batch_ids), len(positions)

    # one estimator call over the distinct orders (reference first; adjacent swaps coincide)
    all_orders = torch.cat([torch.arange(T, dtype=torch.int64)[None], orders])
    uniq, inverse = torch.unique(all_orders, dim=0, return_inverse=True)
    if progress:
        print(f"estimating {len(cells)} cells ({uniq.shape[0]} distinct orders) with {est.name!r} in one call", file=sys.stderr)
    t0 = time.perf_counter()
    ev, bl = est.estimate_with_batch_losses(uniq)
    est_seconds = time.perf_counter() - t0
    if bl is None:
        raise ConfigError(f"estimator {est.name!r} returned no per-batch losses; use --estimator fut1-hvp")
    ev, bl = ev.detach().to("cpu", torch.float64), bl.detach().to("cpu", torch.float64)
    ref_row, rows = int(inverse[0]), inverse[1:].tolist()

    def values(e_row: torch.Tensor, b_row: torch.Tensor, i: int) -> dict:
        return {"memorization": float(b_row[i]), "generalization_all": float(e_row[a]),
                "generalization_domain": float(e_row[col[i]])}

    est_cell = [values(ev[r], bl[r], i) for r, (i, _) in zip(rows, cells)]
    est_ref = {i: values(ev[ref_row], bl[ref_row], i) for i in batch_ids}

    # validation: the reference order (every batch's reference cell) + random moved cells
    moved = [c for c, (i, j) in enumerate(cells) if i != j]
    g = torch.Generator().manual_seed(seed)
    k = min(max(n_verify - 1, 0), len(moved))
    picked = sorted(moved[p] for p in torch.randperm(len(moved), generator=g)[:k].tolist())
    train_rows = ([ref_row] if n_verify > 0 else []) + sorted({rows[c] for c in picked} - {ref_row})
    trainer = store.trainer()
    true_ev, true_bl, t_train = {}, {}, 0.0
    if train_rows and progress:
        print(f"verifying {len(picked)} moved cells + the reference cells by real training ({len(train_rows)} runs)", file=sys.stderr)
    for n_done, r in enumerate(train_rows):
        if n_done == 0:
            trainer.window_start(progress=progress)
        t0 = time.perf_counter()
        res = trainer.train(uniq[r])
        t_train += time.perf_counter() - t0
        true_ev[r], true_bl[r] = res.eval_losses.double(), window_batch_losses(trainer, res.theta)
        if progress:
            print(f"  trained {n_done + 1}/{len(train_rows)}", file=sys.stderr)
    true_ref = {i: values(true_ev[ref_row], true_bl[ref_row], i) for i in batch_ids} if n_verify > 0 else None

    nan = float("nan")
    val_cells = []
    if true_ref is not None:
        for i in batch_ids:
            val_cells.append({"batch": i, "position": i, "kind": "reference", "domain": domains[i],
                              "estimated": est_ref[i], "true": true_ref[i]})
        for c in picked:
            i, j = cells[c]
            val_cells.append({"batch": i, "position": j, "kind": "moved", "domain": domains[i],
                              "estimated": est_cell[c], "true": values(true_ev[rows[c]], true_bl[rows[c]], i)})
    for v in val_cells:
        i = v["batch"]
        v["error"] = {q: v["estimated"][q] - v["true"][q] for q in QUANTITIES}
        v["estimated_change"] = {q: v["estimated"][q] - est_ref[i][q] for q in QUANTITIES}
        v["true_change"] = {q: v["true"][q] - true_ref[i][q] for q in QUANTITIES}
    mv = [v for v in val_cells if v["kind"] == "moved"]
    metrics = {q: validation_metrics(np.array([v["estimated"][q] for v in val_cells]),
                                     np.array([v["true"][q] for v in val_cells]),
                                     np.array([v["estimated_change"][q] for v in mv]),
                                     np.array([v["true_change"][q] for v in mv]),
                                     np.array([v["position"] - v["batch"] for v in mv], dtype=float))
               for q in QUANTITIES}

    grid = {}
    for q in QUANTITIES:
        est_g = np.array([est_cell[c][q] for c in range(len(cells))]).reshape(nb, npos)
        true_g = np.full((nb, npos), nan)
        for v in val_cells:
            if v["kind"] == "moved" or v["position"] in positions:
                true_g[batch_ids.index(v["batch"]), positions.index(v["position"])] = v["true"][q]
        ref_est = np.array([est_ref[i][q] for i in batch_ids])[:, None]
        grid[q] = est_g.tolist()
        grid[f"{q}_change"] = (est_g - ref_est).tolist()
        grid[f"true_{q}"] = true_g.tolist()
        if true_ref is not None:
            grid[f"true_{q}_change"] = (true_g - np.array([true_ref[i][q] for i in batch_ids])[:, None]).tolist()
        else:
            grid[f"true_{q}_change"] = true_g.tolist()
    grid["eval"] = torch.stack([ev[r] for r in rows]).view(nb, npos, -1).tolist()

    result = {
        "source": SOURCE,
        "estimator": est.name,
        "T": T,
        "adam_state_at_window_start": "carried" if store.config().train.carry_optimizer_state else "fresh",
        "eval_names": names,
        "domain_names": [n for n in names if n != "all"],
        "batch_ids": batch_ids,
        "positions": positions,
        "n_cells": len(cells),
        "n_orders_estimated": int(uniq.shape[0]),
        "batches": [{"id": i, "domain": domains[i], "reference_position": i, "eval_column": names[col[i]]} for i in batch_ids],
        "reference": {
            "estimated_eval": dict(zip(names, ev[ref_row].tolist())),
            "estimated_batch_loss": bl[ref_row].tolist(),
            "true_eval": dict(zip(names, true_ev[ref_row].tolist())) if true_ref is not None else None,
            "true_batch_loss": true_bl[ref_row].tolist() if true_ref is not None else None,
        },
        "grid": grid,
        "validation": {"n_verify": n_verify, "seed": seed, "n_cells": len(val_cells), "n_moved": len(mv),
                       "n_trainings": len(train_rows), "cells": val_cells, "metrics": metrics},
        "seconds": {"estimate": est_seconds, "estimate_per_order": est_seconds / uniq.shape[0],
                    "train_per_order": t_train / len(train_rows) if train_rows else nan,
                    "verify": t_train},
    }
    result["summary"] = summarize_positions(result)
    result["seconds"]["total"] = time.perf_counter() - t_start
    return result


# ---------------------------------------------------------------------------- report
def _fmt(x, spec: str = "+.4f") -> str:
    return fmt(x, spec)


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def render_markdown(result: dict) -> str:
    """The ``positions.md`` summary. Every number it quotes is a value of ``result`` (as
    written to ``positions.json``), formatted; definitions are in code spans."""
    s, v = result["summary"], result["validation"]
    rec, fo, it = s["recency"], s["forgetting"], s["interference"]
    pos = result["positions"]
    lines = [
        "# Memorization and generalization versus sample position", "",
        f"Estimator `{result['estimator']}`, T = {result['T']} window batches; batches "
        f"{', '.join(str(i) for i in result['batch_ids'])} each moved to positions {', '.join(str(j) for j in pos)} "
        f"(the other batches keep their reference order): {result['n_cells']} cells, {result['n_orders_estimated']} "
        f"distinct orders estimated in one call ({_fmt(result['seconds']['estimate'], '.1f')} s); Adam state at the "
        f"window start: {result.get('adam_state_at_window_start', 'n/a')}. Losses are in "
        "nats/token; a *change* is against the same batch at its reference position (the reference order).", "",
        "## What the estimates show", "",
        f"- **Recency.** Placing a batch last (position {rec['last_position']}) instead of first (position "
        f"{rec['first_position']}) changes the final loss on that batch by {_fmt(rec['mean'])} nats/token on average "
        f"(range {_fmt(rec['min'])} to {_fmt(rec['max'])}; negative: a late batch is remembered better); it is lower "
        f"when last for {rec['n_lower_when_last']} of {rec['n_batches']} batches. " + _recency_sentence(rec),
        f"- **Forgetting.** Moving a batch one position earlier changes the final loss on it by "
        f"{_fmt(fo['mean_per_position'], '+.3g')} nats/token (minus the least-squares slope over position, mean over "
        f"batches; range {_fmt(fo['min_per_position'], '+.3g')} to {_fmt(fo['max_per_position'], '+.3g')}; positive: "
        f"forgetting); {fo['n_forgetting']} of {fo['n_batches']} batches show forgetting.",
        f"- **Domain interference.** Placing a batch last instead of first changes the eval loss on its own domain by "
        f"{_fmt(it['own_domain'])} and on the other domains by {_fmt(it['other_domains'])} nats/token (mean over "
        f"batches; overall `all` eval: {_fmt(it['all'])}); own minus other: {_fmt(it['own_minus_other'])}. "
        + _interference_sentence(it), "",
        _row(["domain", "recency (last - first)", "forgetting / position", "own-domain eval (last - first)",
              "other-domain eval (last - first)"]),
        _row(["---"] * 5),
    ]
    for d in rec["by_domain"]:
        lines.append(_row([d, _fmt(rec["by_domain"][d]), _fmt(fo["by_domain"][d], "+.3g"),
                           _fmt(it["by_domain"][d]["own"]), _fmt(it["by_domain"][d]["other"])]))
    lines += ["", "## Validation against real retraining", ""]
    if not v["n_cells"]:
        lines.append("No cells were retrained (`--verify 0`): the numbers above are unvalidated estimates.")
    else:
        lines += [
            f"{v['n_cells']} cells retrained for real in {v['n_trainings']} training runs: the reference cell of every "
            f"batch (one run of the reference order) and {v['n_moved']} random moved cells (seed {v['seed']}).", "",
            _row(["quantity", "rho (losses)", "rho (changes)", "fraction explained", "AbsDiff", "max error",
                  "true change RMS", "slope true / est (per position)"]),
            _row(["---"] * 8),
        ]
        for q in QUANTITIES:
            m = v["metrics"][q]
            lines.append(_row([_LABELS[q], _fmt(m["spearman"], ".3f"), _fmt(m["spearman_change"], ".3f"),
                               _fmt(m["fraction_explained"], ".3f"), _fmt(m["absdiff"], ".4f"),
                               _fmt(m["max_abs_err"], ".4f"), _fmt(m["true_change_rms"], ".4f"),
                               f"{_fmt(m['true_slope'], '+.3g')} / {_fmt(m['est_slope'], '+.3g')}"]))
        lines += ["", "rho (losses): Spearman over all verified cells; rho (changes) and fraction explained: over "
                  "the moved cells, with fraction explained `1 - sum((dX_est - dX_true)^2) / sum(dX_true^2)` "
                  "(`1`: exact; `0`: no better than assuming position does not matter; below `0`: worse). Slopes: "
                  "least squares through the origin of the change on the displacement `j - i`."]
    return "\n".join(lines) + "\n"


def _recency_sentence(rec: dict) -> str:
    m = rec["mean"]
    if not math.isfinite(m):
        return ""
    if m < 0:
        return "On average the model remembers recent batches better (recency)."
    return "On average the model remembers early batches better (primacy), the opposite of recency."


def _interference_sentence(it: dict) -> str:
    own, other = it["own_domain"], it["other_domains"]
    if not (math.isfinite(own) and math.isfinite(other)) or own == 0 or other == 0:
        return ""
    word = {True: "raises", False: "lowers"}
    if (own > 0) != (other > 0):
        return (f"Position trades domains against each other (interference): placing a batch late {word[own > 0]} "
                f"its own domain's eval loss and {word[other > 0]} the other domains'.")
    more = "more" if abs(own) > abs(other) else "less"
    return (f"Position moves every domain the same way (a shared effect, no interference in sign): placing a batch "
            f"late {word[own > 0]} the eval loss of all domains, {more} on its own domain than on the others.")


def write_position_report(result: dict, out_dir) -> list[Path]:
    """Write ``positions.json`` (the whole result, NaN as null), ``positions.md``,
    ``heatmap_memorization.png``, ``heatmap_generalization.png`` and ``curves.png`` into
    ``out_dir``; returns the paths.

    Heatmaps show the change (nats/token) against each batch's reference position over
    (batch, position): estimated everywhere, true on the verified cells (blank elsewhere).
    Curves: per domain, the estimated change of the loss on each of its batches, of the eval
    loss on its own domain (solid) and on the other domains (dashed) vs position, with the
    verified cells as markers.
    """
    import matplotlib

    out = Path(out_dir)
    paths = write_result_files(out, "positions", result, render_markdown(result))
    plt = pyplot()
    grid, pos, batches = result["grid"], result["positions"], result["batches"]
    ylabels = [f"B{b['id']} {b['domain']}" for b in batches]

    def heat(ax, values, vmax, title, cmap):
        im = ax.imshow(np.array(values, dtype=float), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(pos)), [str(p) for p in pos], fontsize=7)
        ax.set_yticks(range(len(batches)), ylabels, fontsize=7)
        ax.set(xlabel="position j", title=title)
        ax.figure.colorbar(im, ax=ax, label="change vs reference (nats/token)")

    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")
    for name, qs in (("heatmap_memorization.png", ["memorization"]),
                     ("heatmap_generalization.png", ["generalization_all", "generalization_domain"])):
        fig, axes = plt.subplots(len(qs), 2, figsize=(11, 3.6 * len(qs) + 0.6), squeeze=False)
        for r, q in enumerate(qs):
            e, t = np.array(grid[f"{q}_change"], dtype=float), np.array(grid[f"true_{q}_change"], dtype=float)
            vmax = float(np.nanmax(np.abs(np.concatenate([e.ravel(), t.ravel()])))) or 1e-12
            heat(axes[r, 0], e, vmax, f"estimated: {_LABELS[q]}", cmap)
            heat(axes[r, 1], t, vmax, f"true (verified cells): {_LABELS[q]}", cmap)
        paths.append(save_figure(fig, out / name))

    doms = sorted({b["domain"] for b in batches})
    fig, axes = plt.subplots(2, len(doms), figsize=(3.6 * len(doms) + 1, 6.5), squeeze=False, sharex=True)
    names = result["eval_names"]
    ev = np.array(grid["eval"], dtype=float)
    ref_eval = np.array([result["reference"]["estimated_eval"][n] for n in names])
    dom_cols = [e for e, n in enumerate(names) if n in result["domain_names"]]
    val = result["validation"]["cells"]
    for c, d in enumerate(doms):
        ax_m, ax_g = axes[0, c], axes[1, c]
        for b, info in enumerate(batches):
            if info["domain"] != d:
                continue
            line = ax_m.plot(pos, grid["memorization_change"][b], "o-", ms=3, label=f"B{info['id']}")[0]
            mine = [v for v in val if v["batch"] == info["id"]]
            ax_m.scatter([v["position"] for v in mine], [v["true_change"]["memorization"] for v in mine],
                         marker="x", color=line.get_color(), zorder=3)
            if d in names:
                oc = names.index(d)
                others = [e for e in dom_cols if e != oc]
                ax_g.plot(pos, ev[b, :, oc] - ref_eval[oc], "-", color=line.get_color(), label=f"B{info['id']} own")
                if others:
                    ax_g.plot(pos, (ev[b][:, others] - ref_eval[others]).mean(1), "--", color=line.get_color(),
                              label=f"B{info['id']} others")
                ax_g.scatter([v["position"] for v in mine], [v["true_change"]["generalization_domain"] for v in mine],
                             marker="x", color=line.get_color(), zorder=3)
            ax_m.axvline(info["reference_position"], color=line.get_color(), lw=0.6, ls=":")
        ax_m.set(title=f"{d} batches", ylabel="loss on B_i, change (nats/token)")
        ax_g.set(xlabel="position j", ylabel="eval loss change (nats/token)")
        for ax in (ax_m, ax_g):
            ax.axhline(0, color="k", lw=0.5)
            ax.legend(fontsize=6)
    fig.suptitle("estimated (lines) and true (x) change vs the reference order; dotted: reference position", fontsize=9)
    paths.append(save_figure(fig, out / "curves.png"))
    return paths
