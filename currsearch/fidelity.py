"""Fidelity benchmark: estimated vs true final eval loss on held-out orders (DESIGN.md section 4).

Held-out orders (random, domain-blocked, easy-to-hard, hard-to-easy, near the reference and
the reference itself) are retrained for real with the :class:`~currsearch.train.Trainer`;
each estimator, fitted once on a recorded trajectory store, scores all of them in one
vectorized call. The report gives rank and error metrics per subset of orders and per eval
set, metrics as a function of the Kendall distance to the reference, and costs::

    run_fidelity_settings(cfg, ["additive"], "runs/fidelity")   # fresh and warm Adam state

Files written per setting: ``fidelity.json``, ``fidelity.md``, ``scatter_<estimator>.png``,
``rho_vs_distance.png`` (:mod:`currsearch.reports.fidelity`). Non-finite numbers are written
to JSON as ``null``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from estimators.base import get_estimator

from .adjoint import RECORDED_VARIANTS, clipped_hvp
from .errors import ConfigError, StoreError
from .manifest import atomic_write_bytes
from .orders import random_transpositions
from .record import record
from .train import Trainer

logger = logging.getLogger(__name__)

#: Bin edges of the normalized Kendall distance to the reference; the last bin is closed.
DISTANCE_BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 1.0)
#: Subsets of held-out orders the metrics are reported on, by order kind.
SUBSETS = {
    "all": None,
    "random": ("random",),
    "near": ("reference", "near"),
    "structured": ("domain-block", "easy-to-hard", "hard-to-easy"),
}
SETTINGS = {"fresh": False, "warm": True}  # setting name -> train.carry_optimizer_state
_MAX_BLOCK_ORDERS = 24


def kendall_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of discordant pairs between permutations ``a`` and ``b`` (int64 ``[T]``).

    0 for identical orders, ``T(T-1)/2`` for reversed ones. O(T^2) work in chunks of rows
    (O(T) memory per chunk).

    Raises:
        ValueError: ``a`` and ``b`` differ in shape or are not 1-D.
    """
    a, b = torch.as_tensor(a, dtype=torch.int64), torch.as_tensor(b, dtype=torch.int64)
    if a.dim() != 1 or a.shape != b.shape:
        raise ValueError(f"kendall_distance takes two 1-D orders of equal length, got {tuple(a.shape)} and {tuple(b.shape)}")
    pos_b = torch.empty_like(b)
    pos_b[b] = torch.arange(b.numel())
    seq = pos_b[a]  # position in b of the item at each position of a
    total, T, chunk = 0, seq.numel(), 1024
    for i in range(0, T, chunk):
        rows = seq[i : i + chunk, None]
        later = torch.arange(i, min(i + chunk, T))[:, None] < torch.arange(T)[None, :]
        total += int(((rows > seq[None, :]) & later).sum())
    return total


def normalized_kendall_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """:func:`kendall_distance` divided by ``T(T-1)/2``, in ``[0, 1]`` (0 when T < 2)."""
    pairs = a.numel() * (a.numel() - 1) // 2
    return kendall_distance(a, b) / pairs if pairs else 0.0


@dataclass
class HeldoutOrder:
    """One held-out order.

    Attributes:
        name: unique name, e.g. ``"random-03"``, ``"block-bible-devil-jargon-python"``, ``"near-4-02"``.
        kind: ``"reference"``, ``"random"``, ``"domain-block"``, ``"easy-to-hard"``,
            ``"hard-to-easy"`` or ``"near-k"`` (k = number of random transpositions).
        order: int64 ``[T]`` permutation of ``0..T-1``.
        distance: Kendall distance (discordant pairs) to the reference ``arange(T)``.
    """

    name: str
    kind: str
    order: torch.Tensor
    distance: int

    @property
    def distance_norm(self) -> float:
        """``distance / (T(T-1)/2)``, in ``[0, 1]``."""
        T = self.order.numel()
        return self.distance / max(T * (T - 1) // 2, 1)

    @property
    def group(self) -> str:
        """Kind with the ``-k`` of ``near-k`` dropped (``"near"``)."""
        return group_of(self.kind)


def group_of(kind: str) -> str:
    """Order group of a held-out order kind: ``near-k`` -> ``"near"``, others unchanged."""
    return "near" if kind.startswith("near-") else kind


def _gen(seed: int, tag: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{tag}".encode()))


def _fresh(draw, taken: set) -> torch.Tensor:
    """``draw()`` until it gives an order not in ``taken`` (at most 1000 tries).

    Raises:
        ConfigError: every try gave a taken order (the space of such orders is exhausted).
    """
    for _ in range(1000):
        o = draw()
        if tuple(o.tolist()) not in taken:
            return o
    raise ConfigError("could not draw a held-out order outside the calibration orders in 1000 tries; use fewer "
                      "held-out or calibration orders, or a larger T")


def heldout_orders(
    T: int, domains: list[str], difficulty: torch.Tensor, n_random: int = 30,
    near: tuple[int, ...] = (1, 2, 4, 8), n_near: int = 5, seed: int = 0, exclude=(),
) -> list[HeldoutOrder]:
    """Build the held-out orders of the fidelity benchmark, deterministic given ``seed`` and ``exclude``.

    Args:
        T: number of window batches.
        domains: domain of each batch (length T); ``"mixed"`` batches give no block orders.
        difficulty: float ``[T]`` difficulty proxy per batch (e.g. unigram NLL, nats/token).
        n_random: number of uniformly random permutations.
        near: numbers k of random transpositions (of two arbitrary positions) applied to the reference.
        n_near: orders per k.
        seed: base seed (each kind draws from its own generator).
        exclude: orders (sequences of T ints) that must not be held out, e.g. the orders a
            calibrated estimator was fitted to: random and near orders are drawn again until
            they are new, and a structured order (reference, domain blocks, easy/hard) among
            them is left out. Held-out and calibration orders are disjoint by construction.

    Returns:
        Orders in the sequence reference, random, domain-block, easy-to-hard, hard-to-easy,
        near-k; identical orders are dropped, keeping the first.

    Raises:
        ConfigError: negative counts, k < 1, or ``domains``/``difficulty`` not of length T.
    """
    if n_random < 0 or n_near < 0 or any(k < 1 for k in near):
        raise ConfigError(f"n_random ({n_random}) and n_near ({n_near}) must be >= 0 and every near k ({near}) >= 1")
    if len(domains) != T or torch.as_tensor(difficulty).numel() != T:
        raise ConfigError(f"domains ({len(domains)}) and difficulty ({torch.as_tensor(difficulty).numel()}) need T = {T} entries")
    taken = {tuple(int(i) for i in o) for o in exclude}
    fixed = _structured_orders(T, domains, difficulty, seed)
    ref = fixed[0][2]
    g = _gen(seed, "random")
    drawn = [(f"random-{i:02d}", "random", _fresh(lambda: torch.randperm(T, generator=g), taken)) for i in range(n_random)]
    if T >= 2:
        for k in near:
            g = _gen(seed, f"near-{k}")
            drawn += [(f"near-{k}-{j:02d}", f"near-{k}", _fresh(lambda: random_transpositions(ref, k, g), taken))
                      for j in range(n_near)]
    cands = [fixed[0]] + drawn[:n_random] + fixed[1:] + drawn[n_random:]
    seen, out = set(taken), []
    for name, kind, o in cands:
        key = tuple(o.tolist())
        if key not in seen:
            seen.add(key)
            out.append(HeldoutOrder(name, kind, o, kendall_distance(o, ref)))
    return out


def _structured_orders(T: int, domains: list[str], difficulty, seed: int) -> list[tuple[str, str, torch.Tensor]]:
    """The reference, the domain-block orders and easy-to-hard / hard-to-easy (name, kind, order)."""
    cands = [("reference", "reference", torch.arange(T, dtype=torch.int64))]
    names = sorted(set(domains))
    if "mixed" not in names and len(names) > 1:
        if math.factorial(len(names)) <= _MAX_BLOCK_ORDERS:
            perms = list(itertools.permutations(names))
        else:
            g = _gen(seed, "blocks")
            perms = [[names[i] for i in torch.randperm(len(names), generator=g)] for _ in range(_MAX_BLOCK_ORDERS)]
        for p in perms:
            blocks = [i for d in p for i in range(T) if domains[i] == d]
            cands.append(("block-" + "-".join(p), "domain-block", torch.tensor(blocks, dtype=torch.int64)))
    diff = torch.as_tensor(difficulty, dtype=torch.float64)
    cands.append(("easy-to-hard", "easy-to-hard", torch.argsort(diff, stable=True)))
    cands.append(("hard-to-easy", "hard-to-easy", torch.argsort(diff, descending=True, stable=True)))
    return cands


def check_disjoint(heldout: list[HeldoutOrder], calibration) -> None:
    """Raise ConfigError when a held-out order is also a calibration order (sequences of T ints).

    Raises:
        ConfigError: naming the overlapping held-out orders.
    """
    cal = {tuple(int(i) for i in o) for o in calibration}
    both = [h.name for h in heldout if tuple(h.order.tolist()) in cal]
    if both:
        raise ConfigError(f"held-out orders {both} are also calibration orders; a fitted estimator has seen them, so "
                          "they cannot measure its fidelity (heldout_orders(..., exclude=calibration orders) avoids it)")


def fidelity_metrics(est: torch.Tensor, true: torch.Tensor) -> dict:
    """Agreement of estimated and true final losses over n orders (float64 arithmetic).

    Args:
        est, true: float ``[n]`` losses in nats/token.

    Returns:
        ``{"spearman", "kendall"`` (NaN when n < 3 or either input is constant),
        ``"absdiff"`` (mean |est - true|, nats/token), ``"rel_err"`` (mean |est - true| / |true|),
        ``"spread"`` (max - min of true, nats/token), ``"err_frac_of_spread"`` (absdiff / spread),
        ``"top1"`` (1.0 when the argmins agree), ``"top5"`` (overlap of the k = min(5, n)
        lowest by est and by true, divided by k; both NaN for a constant estimate, whose
        ranking is arbitrary), ``"n"}``; NaN where undefined.

    Raises:
        ValueError: ``est`` and ``true`` differ in length.
    """
    e = torch.as_tensor(est, dtype=torch.float64).reshape(-1).cpu().numpy()
    t = torch.as_tensor(true, dtype=torch.float64).reshape(-1).cpu().numpy()
    if e.shape != t.shape:
        raise ValueError(f"est and true need the same length, got {e.size} and {t.size}")
    n, nan = int(t.size), float("nan")
    if n == 0:
        return {k: nan for k in ("spearman", "kendall", "absdiff", "rel_err", "spread", "err_frac_of_spread", "top1", "top5")} | {"n": 0}
    ranked = n >= 3 and np.ptp(e) > 0 and np.ptp(t) > 0
    absdiff, spread = float(np.mean(np.abs(e - t))), float(np.ptp(t))
    k = min(5, n)
    top_e, top_t = set(np.argsort(e, kind="stable")[:k].tolist()), set(np.argsort(t, kind="stable")[:k].tolist())
    return {
        "spearman": float(stats.spearmanr(e, t).statistic) if ranked else nan,
        "kendall": float(stats.kendalltau(e, t).statistic) if ranked else nan,
        "absdiff": absdiff,
        "rel_err": float(np.mean(np.abs(e - t) / np.abs(t))),
        "spread": spread,
        "err_frac_of_spread": absdiff / spread if spread > 0 else nan,
        "top1": float(np.argmin(e) == np.argmin(t)) if np.ptp(e) > 0 else nan,
        "top5": len(top_e & top_t) / k if np.ptp(e) > 0 else nan,
        "n": n,
    }


def distance_bin(dnorm: float) -> int:
    """Index of the :data:`DISTANCE_BINS` bin holding a normalized distance in ``[0, 1]``."""
    return min(int(np.searchsorted(DISTANCE_BINS, dnorm, side="right")) - 1, len(DISTANCE_BINS) - 2)


def nonlinearity_index(store) -> dict:
    """How far the recorded window is from the linear regime, from the store alone (T HVPs).

    * ``curvature_drift`` (the index): ``sum_a ||H(theta_a; B_a) (theta_a - theta_a')|| / mean_a ||g(theta_a; B_a)||``
      over consecutive anchors a < a' (theta_T after the last): how much the window's own steps
      change the gradient, relative to its size. Near 0, every first-order expansion around the
      recorded run is nearly exact; of order 1 or more, the order effects are strongly nonlinear.
    * ``second_moment_drift``: ``||v_T - v_0|| / ||v_T||`` of Adam's second moment over the window
      (about 1 with a fresh state, whose normalization is set by the first batches of each order).
    * ``adam_step0``: the optimizer step count at the window start (0: fresh state).

    Returns:
        ``{"index", "curvature_drift", "second_moment_drift", "adam_step0"}`` (floats; int step).
    """
    tr = store.trainer()
    fm, ref = tr.model, store.reference_order.tolist()
    thetas = [store.checkpoint(a)["theta"].to(fm.device) for a in store.anchors] + [store.final()["theta"].to(fm.device)]
    drift, gnorm = 0.0, []
    for i, a in enumerate(store.anchors):
        batch = tr.batch(ref[a])
        hvp = clipped_hvp(fm.loss, thetas[i], batch, None)
        drift += float(torch.linalg.vector_norm(hvp((thetas[i] - thetas[i + 1])[None])))
        gnorm.append(float(torch.linalg.vector_norm(fm.grad(thetas[i], batch)[1])))
    c0 = store.checkpoint(store.anchors[0])
    last = store.checkpoint(store.anchors[-1])  # v before the last anchor's step (v_T is not stored)
    vd = float(torch.linalg.vector_norm(last["adam_v"] - c0["adam_v"]) / (torch.linalg.vector_norm(last["adam_v"]) + 1e-30))
    kappa = drift / max(sum(gnorm) / len(gnorm), 1e-30)
    return {"index": kappa, "curvature_drift": kappa, "second_moment_drift": vd, "adam_step0": int(c0["adam_step"])}


def retrain_orders(trainer, orders: list[HeldoutOrder], progress: bool = True, cache=None) -> tuple[torch.Tensor, float]:
    """Retrain every order for real; returns (float64 ``[n, E]`` final eval losses in nats/token
    in ``trainer.plan.eval_names`` order, mean wall seconds per ``trainer.train`` call).

    The warm-up phase runs (and is cached) before timing starts; the timed call includes evaluation.
    With ``cache`` (a JSON path), the result is read from it when it holds these same orders,
    else computed and written there atomically (the caller keys the path by config and draw).
    """
    key = [h.order.tolist() for h in orders]
    if cache is not None and Path(cache).is_file():
        try:
            d = json.loads(Path(cache).read_text())
            if d["orders"] == key:
                return torch.tensor(d["losses"], dtype=torch.float64), d["seconds_per_run"]
        except (ValueError, KeyError, TypeError):
            logger.warning("true-loss cache %s is unreadable; retraining its orders", cache)
    trainer.window_start(progress=progress)
    losses, seconds = [], 0.0
    for h in tqdm(orders, desc="retraining held-out orders", unit="order", disable=not progress):
        t0 = time.perf_counter()
        losses.append(trainer.train(h.order).eval_losses)
        seconds += time.perf_counter() - t0
    true, per_run = torch.stack(losses).to(torch.float64), seconds / max(len(orders), 1)
    if cache is not None:
        atomic_write_bytes(Path(cache), json.dumps({"orders": key, "losses": true.tolist(), "seconds_per_run": per_run}).encode())
    return true, per_run


def _score_estimator(name: str, est, all_orders: torch.Tensor, true: torch.Tensor, eval_names: list[str], subsets: dict,
                     bins: torch.Tensor, cost: dict) -> dict:
    """One estimator's entry of :func:`evaluate_estimators`: its estimates of ``all_orders``
    (timed, one call), metrics per eval set and subset, metrics by distance bin, and ``cost``
    completed with the estimate time per order and the speedup over retraining."""
    missing = [e for e in eval_names if e not in est.eval_names]
    if missing:
        raise StoreError(f"estimator {name!r} gives eval sets {est.eval_names}, lacking {missing}; re-record the store for this config")
    cols = [est.eval_names.index(e) for e in eval_names]
    t0 = time.perf_counter()
    out = est.estimate(all_orders).detach().to("cpu", torch.float64)
    per_order = (time.perf_counter() - t0) / all_orders.shape[0]
    out = out[:, cols]
    metrics, by_dist = {}, {}
    for j, ev in enumerate(eval_names):
        metrics[ev] = {s: fidelity_metrics(out[m, j], true[m, j]) for s, m in subsets.items()}
        by_dist[ev] = []
        for b in range(len(DISTANCE_BINS) - 1):
            m = fidelity_metrics(out[bins == b, j], true[bins == b, j])
            by_dist[ev].append({"bin": [DISTANCE_BINS[b], DISTANCE_BINS[b + 1]], "n": m["n"],
                                "spearman": m["spearman"], "absdiff": m["absdiff"], "spread": m["spread"]})
    retrain = cost["retrain_seconds_per_order"]
    return {"estimates": out.tolist(), "metrics": metrics, "by_distance": by_dist,
            "cost": {"estimate_seconds_per_order": per_order, "retrain_seconds_per_order": retrain,
                     "speedup": retrain / per_order if per_order > 0 else float("inf"),
                     **{k: v for k, v in cost.items() if k != "retrain_seconds_per_order"}}}


def evaluate_estimators(
    orders: list[HeldoutOrder], true_losses: torch.Tensor, eval_names: list[str], estimators: dict,
    retrain_seconds_per_order: float, fit_seconds: dict | None = None, store_info: dict | None = None,
) -> dict:
    """Score fitted estimators against true losses: metrics, metrics vs distance and costs.

    Args:
        orders: the n held-out orders.
        true_losses: float ``[n, E]`` retrained final eval losses (nats/token), columns ``eval_names``.
        eval_names: the E eval set names.
        estimators: ``{name: fitted Estimator}``; each is timed on ONE ``estimate`` call over all n orders.
        retrain_seconds_per_order: mean wall seconds of one real retraining.
        fit_seconds: ``{name: seconds of fit}`` (NaN where absent).
        store_info: ``{"bytes", "record_seconds", "reference_seconds", ...}`` of the store.

    Returns:
        The result dict (see :func:`currsearch.reports.fidelity.write_report`): ``orders``, ``true_losses``, ``store``,
        ``retrain_seconds_per_order`` and per estimator ``estimates``, ``metrics[eval][subset]``,
        ``by_distance[eval]`` and ``cost``.

    Raises:
        ConfigError: no orders. StoreError: an estimator's eval sets lack one of ``eval_names``.
    """
    if not orders:
        raise ConfigError("evaluate_estimators needs at least one held-out order")
    true = torch.as_tensor(true_losses, dtype=torch.float64)
    store = dict(store_info or {})
    nan = float("nan")
    ref_s, rec_s = store.get("reference_seconds", nan), store.get("record_seconds", nan)
    bins = torch.tensor([distance_bin(h.distance_norm) for h in orders])
    subsets = {s: torch.tensor([k is None or h.group in k for h in orders]) for s, k in SUBSETS.items()}
    all_orders = torch.stack([h.order for h in orders])
    result = {
        "eval_names": list(eval_names),
        "orders": [{"name": h.name, "kind": h.kind, "distance": h.distance, "distance_norm": h.distance_norm,
                    "order": h.order.tolist()} for h in orders],
        "true_losses": true.tolist(),
        "retrain_seconds_per_order": retrain_seconds_per_order,
        "store": store,
        "distance_bins": list(DISTANCE_BINS),
        "estimators": {},
    }
    for name, est in estimators.items():
        result["estimators"][name] = _score_estimator(name, est, all_orders, true, list(eval_names), subsets, bins, {
            "retrain_seconds_per_order": retrain_seconds_per_order, "fit_seconds": (fit_seconds or {}).get(name, nan),
            "store_bytes": store.get("bytes", nan), "record_seconds": rec_s,
            "record_over_reference": rec_s / ref_s if ref_s and ref_s > 0 else nan})
    return result


def run_fidelity(cfg, estimator_names: list[str], out_dir, n_random: int = 30, n_near: int = 5, seed: int = 0,
                 store_dir=None, progress: bool = True, extra_estimators: dict | None = None,
                 response_variants=RECORDED_VARIANTS, check_budget: bool = True, true_loss_cache=None) -> dict:
    """Record (or reuse) the store for ``cfg``, retrain held-out orders, score estimators (write the
    report with :func:`currsearch.reports.fidelity.write_report`).

    Args:
        cfg: the experiment :class:`~currsearch.config.Config`.
        estimator_names: registered estimator names (``estimators.base.get_estimator``); the
            store records ``cfg.record.terms`` plus the terms they require.
        out_dir: report directory; the store goes to ``store_dir`` or ``out_dir/store``.
        n_random, n_near, seed: see :func:`heldout_orders`.
        extra_estimators: ``{name: unfitted Estimator}`` scored too, for estimators built with
            arguments (e.g. ``ResponseCost(variant=...)``); their terms must be recorded.
        response_variants, check_budget: passed to :func:`~currsearch.record.record`.
        true_loss_cache: JSON path of the held-out orders' true losses (:func:`retrain_orders`).

    Returns:
        The result dict (NaN kept as float here; null in ``fidelity.json``): that of
        :func:`evaluate_estimators` plus ``setting``, ``config``, ``seed``, ``n_random``,
        ``n_near``, ``fit_runs`` (``{name: real runs}`` of the estimators fitted to runs),
        ``window_start_loss`` and ``unigram_baseline`` (``{eval set: nats/token}``,
        :meth:`~currsearch.train.Trainer.unigram_baseline`).

    Raises:
        ConfigError: no or unknown estimator names, invalid counts. StoreError: the store does
            not fit an estimator. Recorder and Trainer errors pass through.
    """
    if not estimator_names:
        raise ConfigError("give at least one estimator name, e.g. --estimators additive")
    classes = [type(get_estimator(name)) for name in estimator_names]  # fails fast on unknown names
    out = Path(out_dir)
    needed = [t for cls in classes for t in cls.required_terms if t not in cfg.record.terms]
    if needed:  # record what the chosen estimators read, in one store
        cfg = cfg.replace(record={"terms": list(cfg.record.terms) + list(dict.fromkeys(needed))})
    trainer = Trainer.from_config(cfg)
    difficulty = torch.tensor([m["unigram_nll"] for m in trainer.plan.metadata], dtype=torch.float64)
    store = record(cfg, Path(store_dir) if store_dir else out / "store", progress=progress, trainer=trainer,
                   check_budget=check_budget, response_variants=response_variants)
    if store.T != trainer.T:
        raise StoreError(f"store at {str(store.path)!r} has T = {store.T} batches but the config gives T = {trainer.T}")
    fitted, fit_s = {}, {}
    for name, est in [(n, get_estimator(n)) for n in estimator_names] + list((extra_estimators or {}).items()):
        t0 = time.perf_counter()
        fitted[name] = est.fit(store)
        fit_s[name] = time.perf_counter() - t0
    calibration = [o for est in fitted.values() if est.needs_runs for o in est.fit_orders().tolist()]
    orders = heldout_orders(trainer.T, trainer.plan.domains, difficulty, n_random=n_random, n_near=n_near, seed=seed,
                            exclude=calibration)
    check_disjoint(orders, calibration)
    true, retrain_s = retrain_orders(trainer, orders, progress=progress, cache=true_loss_cache)
    man = store.manifest
    info = {"path": str(store.path), "bytes": int(store.nbytes()), "formula_bytes": man.get("formula_bytes"),
            "terms": sorted(store.terms), "record_seconds": float(man.get("record_seconds", float("nan"))),
            "reference_seconds": float(man.get("reference_seconds", float("nan"))), "nonlinearity": nonlinearity_index(store)}
    result = evaluate_estimators(orders, true, list(trainer.plan.eval_names), fitted, retrain_s, fit_s, info)
    setting = "warm" if cfg.train.carry_optimizer_state else "fresh"
    names = list(trainer.plan.eval_names)
    result = {"setting": setting, "config": cfg.to_dict(), "seed": seed, "n_random": n_random, "n_near": n_near,
              "fit_runs": {n: len(e.fit_orders()) for n, e in fitted.items() if e.needs_runs},
              "window_start_loss": dict(zip(names, trainer.evaluate(trainer.window_start().theta).tolist())),
              "unigram_baseline": dict(zip(names, trainer.unigram_baseline().tolist())), **result}
    return result


def run_fidelity_settings(cfg, estimator_names: list[str], out_dir, settings=("fresh", "warm"), store_dir=None,
                          **kwargs) -> dict:
    """:func:`run_fidelity` once per optimizer-state setting (``"fresh"``: Adam state reset at
    the window start; ``"warm"``: carried from the warm-up phase) into ``out_dir/<setting>``
    (stores in ``store_dir/<setting>`` when given). Write the reports with
    :func:`currsearch.reports.fidelity.write_settings_report`.

    Returns:
        ``{setting: result dict}``.

    Raises:
        ConfigError: no, repeated or unknown setting names.
    """
    settings = list(settings)
    bad = [s for s in settings if s not in SETTINGS]
    if not settings or bad or len(set(settings)) != len(settings):
        raise ConfigError(f"settings {settings} must be distinct names from {sorted(SETTINGS)}")
    out, results = Path(out_dir), {}
    for s in settings:
        results[s] = run_fidelity(cfg.replace(train={"carry_optimizer_state": SETTINGS[s]}), estimator_names, out / s,
                                  store_dir=Path(store_dir) / s if store_dir else None, **kwargs)
    return results
