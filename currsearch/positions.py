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
on the other domains). :func:`currsearch.reports.positions.write_position_report` writes
``positions.json``, ``positions.md``, heatmaps and loss-vs-position curves.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from estimators.base import get_estimator
from estimators.hvp import window_batch_losses

from .errors import ConfigError, OrderError
from .fidelity import fidelity_metrics

logger = logging.getLogger(__name__)

SOURCE = ("arXiv 2505.22042 (Taylor-expanded training dynamics of sample orders), application to "
          "memorization and generalization versus sample position")
QUANTITIES = ("memorization", "generalization_all", "generalization_domain")


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


@dataclass(frozen=True)
class PositionResult:
    """The result of :func:`analyze_positions` (written as ``positions.json``, same keys).

    All losses in nats/token; NaN marks a missing value (null in the JSON).

    Attributes:
        source: the method's source; estimator: its name; T: window batches;
        adam_state_at_window_start: ``"carried"`` or ``"fresh"``; eval_names, domain_names;
        batch_ids, positions: the grid (i, j); n_cells; n_orders_estimated: distinct orders;
        batches: ``[{"id", "domain", "reference_position", "eval_column"}]``;
        reference: estimated and true losses of the reference order; grid:
        ``[n_batches][n_positions]`` estimated losses per quantity, ``eval`` ``[..][..][E]``,
        ``*_change`` grids, ``true_*`` grids (NaN outside the sample); validation: per-cell
        values and errors and ``metrics`` per quantity (:func:`validation_metrics`);
        summary: :func:`summarize_positions` (None until computed); seconds: wall times.
    """

    source: str
    estimator: str
    T: int
    adam_state_at_window_start: str
    eval_names: list[str]
    domain_names: list[str]
    batch_ids: list[int]
    positions: list[int]
    n_cells: int
    n_orders_estimated: int
    batches: list[dict]
    reference: dict
    grid: dict
    validation: dict
    seconds: dict
    summary: dict | None

    @classmethod
    def from_json(cls, d: dict) -> PositionResult:
        """The result of a ``positions.json`` (nulls stay None)."""
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


def _by_domain(v, batches: list[dict]) -> dict:
    doms = sorted({b["domain"] for b in batches})
    return {d: _stats([x for x, b in zip(v, batches) if b["domain"] == d])["mean"] for d in doms}


def _interference(result: PositionResult, pos: np.ndarray, first: int, last: int, has_span: bool) -> dict:
    """The ``interference`` part of :func:`summarize_positions`."""
    ev = np.array(result.grid["eval"], dtype=float)  # [nb, np, E]
    names, batches = result.eval_names, result.batches
    nan = float("nan")
    domain_cols = [e for e, n in enumerate(names) if n in result.domain_names]
    own, other, own_slope, other_slope = [], [], [], []
    for b, info in enumerate(batches):
        d = info["domain"]
        if d in result.domain_names:
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
    own_d, other_d = _by_domain(own, batches), _by_domain(other, batches)
    return {
        "definition": "last-minus-first change of the eval loss on B_i's own domain and, averaged, on the other domains",
        "own_domain": _stats(own)["mean"], "other_domains": _stats(other)["mean"], "all": _stats(all_change)["mean"],
        "own_minus_other": _stats(np.array(own) - np.array(other))["mean"],
        "own_slope": _stats(own_slope)["mean"], "other_slope": _stats(other_slope)["mean"],
        "per_batch_own": list(map(float, own)), "per_batch_other": list(map(float, other)),
        "by_domain": {d: {"own": own_d[d], "other": other_d[d]} for d in own_d},
    }


def summarize_positions(result: PositionResult) -> dict:
    """Recency, forgetting and domain interference from the estimated grid of ``result``.

    Returns:
        ``{"recency": {...}, "forgetting": {...}, "interference": {...}}``, all in nats/token
        (forgetting: nats/token per position moved earlier), each with the mean, min, max
        over batches and a ``by_domain`` mean; see the module docstring for definitions.
    """
    pos = np.array(result.positions, dtype=float)
    M = np.array(result.grid["memorization"], dtype=float)  # [nb, np]
    batches = result.batches
    first, last = int(np.argmin(pos)), int(np.argmax(pos))
    has_span = pos.size >= 2 and pos[last] > pos[first]
    rec = M[:, last] - M[:, first] if has_span else np.full(len(batches), float("nan"))
    forget = np.array([-_slope(pos, M[b]) for b in range(len(batches))])
    return {
        "recency": {
            "definition": "M(i, last) - M(i, first): loss on B_i when placed at the last grid position minus at the first",
            "first_position": int(pos[first]), "last_position": int(pos[last]),
            **_stats(rec), "per_batch": rec.tolist(), "by_domain": _by_domain(rec, batches),
            "n_lower_when_last": int((rec < 0).sum()), "n_batches": len(batches),
        },
        "forgetting": {
            "definition": "-(least-squares slope of M(i, j) over j): rise of the loss on B_i per position moved earlier",
            **{f"{k}_per_position": v for k, v in _stats(forget).items() if k != "n"},
            "per_batch": forget.tolist(), "by_domain": _by_domain(forget, batches),
            "n_forgetting": int((forget > 0).sum()), "n_batches": len(batches),
        },
        "interference": _interference(result, pos, first, last, has_span),
    }


def _fitted_estimator(store, estimator, progress: bool):
    """``estimator`` (a name or an estimator) fitted on ``store``, checked to give per-batch losses."""
    est = get_estimator(estimator) if isinstance(estimator, str) else estimator
    if not est.has_batch_losses:
        raise ConfigError(f"estimator {est.name!r} gives no per-batch losses, which the memorization analysis needs; "
                          "use --estimator fut1-hvp (or reference, the position-blind null model)")
    if est.store is None:
        if progress:
            logger.info("fitting estimator %r", est.name)
        est.fit(store)
    if est.T != store.T or list(est.eval_names) != list(store.eval_names):
        raise ConfigError(f"estimator {est.name!r} was fitted on another store (T = {est.T}, eval sets {est.eval_names}); "
                          f"fit it on this one (T = {store.T}, eval sets {store.eval_names})")
    return est


class _Cells:
    """The estimated cells: distinct orders (reference first) scored in one estimator call."""

    def __init__(self, store, est, batch_ids: list[int], positions: list[int], progress: bool):
        T = store.T
        orders, self.cells = position_orders(T, batch_ids, positions)
        self.names, self.domains = list(store.eval_names), list(store.domains)
        a = self.names.index("all") if "all" in self.names else len(self.names) - 1
        self.a = a
        self.col = {i: self.names.index(self.domains[i]) if self.domains[i] in self.names else a for i in batch_ids}
        # one estimator call over the distinct orders (reference first; adjacent swaps coincide)
        all_orders = torch.cat([torch.arange(T, dtype=torch.int64)[None], orders])
        self.uniq, inverse = torch.unique(all_orders, dim=0, return_inverse=True)
        if progress:
            logger.info("estimating %d cells (%d distinct orders) with %r in one call", len(self.cells),
                        self.uniq.shape[0], est.name)
        t0 = time.perf_counter()
        ev, bl = est.estimate_with_batch_losses(self.uniq)
        self.seconds = time.perf_counter() - t0
        if bl is None:
            raise ConfigError(f"estimator {est.name!r} returned no per-batch losses; use --estimator fut1-hvp")
        self.ev, self.bl = ev.detach().to("cpu", torch.float64), bl.detach().to("cpu", torch.float64)
        self.ref_row, self.rows = int(inverse[0]), inverse[1:].tolist()
        self.est_cell = [self.values(self.ev[r], self.bl[r], i) for r, (i, _) in zip(self.rows, self.cells)]
        self.est_ref = {i: self.values(self.ev[self.ref_row], self.bl[self.ref_row], i) for i in batch_ids}

    def values(self, e_row: torch.Tensor, b_row: torch.Tensor, i: int) -> dict:
        return {"memorization": float(b_row[i]), "generalization_all": float(e_row[self.a]),
                "generalization_domain": float(e_row[self.col[i]])}


def _retrain(store, uniq: torch.Tensor, train_rows: list[int], progress: bool) -> tuple[dict, dict, float]:
    """Real training of the distinct orders ``uniq[train_rows]``: ``({row: eval losses float64 [E]},
    {row: window batch losses [T]}, training seconds)``."""
    trainer = store.trainer()
    true_ev, true_bl, t_train = {}, {}, 0.0
    if train_rows:
        trainer.window_start(progress=progress)
    for r in tqdm(train_rows, desc="verifying cells", unit="run", disable=not progress):
        t0 = time.perf_counter()
        res = trainer.train(uniq[r])
        t_train += time.perf_counter() - t0
        true_ev[r], true_bl[r] = res.eval_losses.double(), window_batch_losses(trainer, res.theta)
    return true_ev, true_bl, t_train


def _validation_cells(cells: _Cells, batch_ids, picked, true_ev, true_bl, true_ref) -> list[dict]:
    """The verified cells (reference cells first, then the picked moved cells) with their errors and changes."""
    val_cells = []
    if true_ref is not None:
        for i in batch_ids:
            val_cells.append({"batch": i, "position": i, "kind": "reference", "domain": cells.domains[i],
                              "estimated": cells.est_ref[i], "true": true_ref[i]})
        for c in picked:
            i, j = cells.cells[c]
            r = cells.rows[c]
            val_cells.append({"batch": i, "position": j, "kind": "moved", "domain": cells.domains[i],
                              "estimated": cells.est_cell[c], "true": cells.values(true_ev[r], true_bl[r], i)})
    for v in val_cells:
        i = v["batch"]
        v["error"] = {q: v["estimated"][q] - v["true"][q] for q in QUANTITIES}
        v["estimated_change"] = {q: v["estimated"][q] - cells.est_ref[i][q] for q in QUANTITIES}
        v["true_change"] = {q: v["true"][q] - true_ref[i][q] for q in QUANTITIES}
    return val_cells


def _metrics(val_cells: list[dict]) -> dict:
    mv = [v for v in val_cells if v["kind"] == "moved"]
    return {q: validation_metrics(np.array([v["estimated"][q] for v in val_cells]),
                                  np.array([v["true"][q] for v in val_cells]),
                                  np.array([v["estimated_change"][q] for v in mv]),
                                  np.array([v["true_change"][q] for v in mv]),
                                  np.array([v["position"] - v["batch"] for v in mv], dtype=float))
            for q in QUANTITIES}


def _grids(cells: _Cells, batch_ids: list[int], positions: list[int], val_cells: list[dict], true_ref) -> dict:
    nb, npos = len(batch_ids), len(positions)
    grid = {}
    for q in QUANTITIES:
        est_g = np.array([cells.est_cell[c][q] for c in range(len(cells.cells))]).reshape(nb, npos)
        true_g = np.full((nb, npos), float("nan"))
        for v in val_cells:
            if v["kind"] == "moved" or v["position"] in positions:
                true_g[batch_ids.index(v["batch"]), positions.index(v["position"])] = v["true"][q]
        ref_est = np.array([cells.est_ref[i][q] for i in batch_ids])[:, None]
        grid[q] = est_g.tolist()
        grid[f"{q}_change"] = (est_g - ref_est).tolist()
        grid[f"true_{q}"] = true_g.tolist()
        if true_ref is not None:
            grid[f"true_{q}_change"] = (true_g - np.array([true_ref[i][q] for i in batch_ids])[:, None]).tolist()
        else:
            grid[f"true_{q}_change"] = true_g.tolist()
    grid["eval"] = torch.stack([cells.ev[r] for r in cells.rows]).view(nb, npos, -1).tolist()
    return grid


def _pick(cells: _Cells, n_verify: int, seed: int) -> tuple[list[int], list[int]]:
    """The moved cells verified (a seeded sample of ``n_verify - 1``) and the distinct order rows
    to train (the reference order first)."""
    moved = [c for c, (i, j) in enumerate(cells.cells) if i != j]
    g = torch.Generator().manual_seed(seed)
    k = min(max(n_verify - 1, 0), len(moved))
    picked = sorted(moved[p] for p in torch.randperm(len(moved), generator=g)[:k].tolist())
    train_rows = ([cells.ref_row] if n_verify > 0 else []) + sorted({cells.rows[c] for c in picked} - {cells.ref_row})
    return picked, train_rows


def analyze_positions(store, estimator="fut1-hvp", batch_ids=None, positions=None, n_verify: int = 20,
                      seed: int = 0, progress: bool = False) -> PositionResult:
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
        progress: log what runs (INFO) and show training progress bars.

    Returns:
        :class:`PositionResult` (NaN for missing values; losses in nats/token).

    Raises:
        OrderError, ConfigError: invalid batch ids or positions (:func:`position_orders`),
            ``n_verify < 0``, or an estimator without per-batch losses.
        StoreError: the store does not fit the estimator.
        ConfigError: also when the store was recorded along another order than ``0..T-1``.
    """
    t_start = time.perf_counter()
    T = store.T
    if not torch.equal(store.reference_order, torch.arange(T)):
        raise ConfigError(f"store {str(store.path)!r} was recorded along another order than 0..T-1 (a trust-region "
                          "store?); the position analysis moves batches within the reference order: record the plain store")
    batch_ids = default_batches(store) if batch_ids is None else list(batch_ids)
    positions = default_positions(T) if positions is None else list(positions)
    position_orders(T, batch_ids, positions)  # validates ids and positions before any fitting
    if n_verify < 0:
        raise ConfigError(f"n_verify must be >= 0, got {n_verify}")
    est = _fitted_estimator(store, estimator, progress)
    cells = _Cells(store, est, batch_ids, positions, progress)
    picked, train_rows = _pick(cells, n_verify, seed)
    if train_rows and progress:
        logger.info("verifying %d moved cells + the reference cells by real training (%d runs)", len(picked), len(train_rows))
    true_ev, true_bl, t_train = _retrain(store, cells.uniq, train_rows, progress)
    ref_row, names = cells.ref_row, cells.names
    true_ref = {i: cells.values(true_ev[ref_row], true_bl[ref_row], i) for i in batch_ids} if n_verify > 0 else None
    val_cells = _validation_cells(cells, batch_ids, picked, true_ev, true_bl, true_ref)
    n_uniq, nan = int(cells.uniq.shape[0]), float("nan")
    result = PositionResult(
        source=SOURCE, estimator=est.name, T=T,
        adam_state_at_window_start="carried" if store.config().train.carry_optimizer_state else "fresh",
        eval_names=names, domain_names=[n for n in names if n != "all"], batch_ids=batch_ids, positions=positions,
        n_cells=len(cells.cells), n_orders_estimated=n_uniq,
        batches=[{"id": i, "domain": cells.domains[i], "reference_position": i, "eval_column": names[cells.col[i]]}
                 for i in batch_ids],
        reference={
            "estimated_eval": dict(zip(names, cells.ev[ref_row].tolist())),
            "estimated_batch_loss": cells.bl[ref_row].tolist(),
            "true_eval": dict(zip(names, true_ev[ref_row].tolist())) if true_ref is not None else None,
            "true_batch_loss": true_bl[ref_row].tolist() if true_ref is not None else None,
        },
        grid=_grids(cells, batch_ids, positions, val_cells, true_ref),
        validation={"n_verify": n_verify, "seed": seed, "n_cells": len(val_cells),
                    "n_moved": sum(v["kind"] == "moved" for v in val_cells), "n_trainings": len(train_rows),
                    "cells": val_cells, "metrics": _metrics(val_cells)},
        summary=None,
        seconds={"estimate": cells.seconds, "estimate_per_order": cells.seconds / n_uniq,
                 "train_per_order": t_train / len(train_rows) if train_rows else nan, "verify": t_train},
    )
    summary = summarize_positions(result)
    return dataclasses.replace(result, summary=summary, seconds={**result.seconds, "total": time.perf_counter() - t_start})
