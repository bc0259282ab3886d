"""Calibrated estimators: position models whose coefficients are fitted to real training runs.

Ours. The position analysis and ``benchmarks/learned_surrogate.py`` (docs/estimators.md)
show that, on random orders, the order effect is mostly additive over positions (a batch's
primacy under Adam), while the additive models derived from the trajectory (``additive``, the
adjoint) get the coefficients wrong.

``calibrated`` keeps the additive form and fits the coefficients to the truth::

    L_e(pi) ~ b_e + sum_t C_e[t, pi(t)],
    C_e[t, l] = w_e[l] * t / (T - 1) + u_e[l, q(t)],      q(t) = min(floor(4 t / (T - 1)), 3)

(a per-batch linear position effect plus a per-batch position-quartile effect, 5 T
coefficients per eval set) by ridge regression (standardized features, alpha by 5-fold
cross-validation) on ``n_runs`` seeded random orders retrained for real with the store's
Trainer. Being additive over positions, its exact optimum over all T! orders is a linear
assignment problem (``assignment_optimum``, inherited from ``additive``). Approximate: the
additive form (no interactions between positions) and the training distribution (random
orders: measured to transfer poorly to domain-blocked orders).

``calibrated-interactions`` adds group-level second-order features (``interaction_features``:
how the batches of each domain are spread over the window, and their pairwise products) and
fits to three families of orders (random, near the reference, clumped by domain), so that
it also ranks blocked curricula; its optimum is only swap-local.

Cost: fitting retrains ``n_runs`` orders; the runs and the fitted coefficients are cached in
``STORE/calibration/`` (keyed by the store's hashes, reference order and the estimator's
settings), so a rerun or a Ray actor reads them and scores bit-identically; an estimate is
O(T E) (``calibrated``) or O((T + F) E) (``calibrated-interactions``) per order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from currsearch.errors import ConfigError, CurrsearchError
from currsearch.orders import random_transpositions, validate_orders

from .base import Estimator, register
from .common import swap_descent
from .simple import AdditiveEstimator, assignment_order

logger = logging.getLogger(__name__)


def position_features(orders: torch.Tensor) -> torch.Tensor:
    """Features of orders int64 ``[n, T]``: float64 ``[n, 5 T]`` on the orders' device, per
    batch l its position ``t / (T - 1)`` (columns 0..T-1) and its position-quartile one-hot
    (columns T + 4 l + q)."""
    n, T = orders.shape
    pos = torch.empty(n, T, dtype=torch.float64, device=orders.device)
    pos.scatter_(1, orders, torch.arange(T, dtype=torch.float64, device=orders.device).expand(n, -1) / max(T - 1, 1))
    quart = torch.nn.functional.one_hot((pos * 4).long().clamp(max=3), 4).reshape(n, -1).double()
    return torch.cat([pos, quart], 1)


def position_cost(w: np.ndarray, T: int) -> np.ndarray:
    """Cost matrix float64 ``[T, T]`` (step t, batch l) of the coefficients ``w`` of
    :func:`position_features` (its first 5 T entries): ``w[l] t / (T - 1) + w[T + 4 l + q(t)]``."""
    t = np.arange(T) / max(T - 1, 1)
    q = np.minimum((t * 4).astype(int), 3)
    return np.outer(t, w[:T]) + w[T:5 * T].reshape(T, 4)[:, q].T


def fit_ridge(X: np.ndarray, y: np.ndarray, alphas=tuple(np.logspace(-4, 3, 30)), folds: int = 5,
              sample_weight: np.ndarray | None = None):
    """Weighted ridge regression of ``y`` ``[n]`` on ``X`` ``[n, d]`` (standardized columns),
    alpha by k-fold cross-validation of the weighted squared error. ``sample_weight`` ``[n]``
    (default: ones) weighs each run in the fit and in the cross-validation. With fewer runs than
    features (n < d) it solves the n x n dual system ``w = Z^T (Z Z^T + alpha I)^{-1} y`` (the
    same minimizer as the d x d primal, at O(n^2 d) instead of O(d^3)).
    Runs with a non-finite ``y`` (training diverged) are left out, with a warning.
    Returns ``(w [d], b)`` in raw feature units: ``y ~ X @ w + b``.

    Raises:
        CurrsearchError: fewer than 2 runs have a finite loss (lower ``optim.lr`` or set
            ``optim.grad_clip``)."""
    y = np.asarray(y, dtype=np.float64)
    sw = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    ok = np.isfinite(y)
    if not ok.all():
        if ok.sum() < 2:
            raise CurrsearchError(f"only {int(ok.sum())} of {len(y)} fit runs have a finite loss: training diverges; "
                                  "lower optim.lr or set optim.grad_clip")
        logger.warning("%d of %d fit runs diverged (non-finite loss) and are left out of the fit", int((~ok).sum()), len(y))
        X, y, sw = X[ok], y[ok], sw[ok]

    def fit(Xf, yf, wf, a):
        mu = wf @ Xf / wf.sum()
        sd = np.sqrt(wf @ (Xf - mu) ** 2 / wf.sum()) + 1e-12
        Z, ym = (Xf - mu) / sd, wf @ yf / wf.sum()
        if Z.shape[0] < Z.shape[1]:  # fewer runs than features: the n x n dual system, the same minimizer
            Zs, v = Z * np.sqrt(wf)[:, None], np.sqrt(wf) * (yf - ym)
            w = Zs.T @ np.linalg.solve(Zs @ Zs.T + a * np.eye(Z.shape[0]), v) / sd
        else:
            w = np.linalg.solve((Z * wf[:, None]).T @ Z + a * np.eye(Z.shape[1]), (Z * wf[:, None]).T @ (yf - ym)) / sd
        return w, ym - mu @ w

    idx = np.arange(len(y))
    parts = np.array_split(np.random.default_rng(0).permutation(idx), min(folds, len(y)))

    def cv(a):
        err = 0.0
        for f in parts:
            keep = np.setdiff1d(idx, f)
            w, b = fit(X[keep], y[keep], sw[keep], a)
            err += float(sw[f] @ (X[f] @ w + b - y[f]) ** 2)
        return err

    return fit(X, y, sw, min(alphas, key=cv))


#: the keys of :func:`load_or_fit_runs`'s output that a fitted estimator keeps as ``runs``
RUN_KEYS = ("orders", "kinds", "losses", "seconds", "read_back")


def cached_runs(store, exclude: str = "") -> dict[tuple[int, ...], tuple[list[float], float | None]]:
    """Final eval losses (``[E]``, nats/token) and training wall seconds (None when the cache
    predates run times) of every order trained for a fit cached in ``STORE/calibration/`` (files
    the manifest lists, checksums checked; ``exclude`` skipped), keyed by the order. A run depends only on the store's Trainer and the order, so a calibrated
    estimator reuses them instead of retraining (e.g. ``calibrated-interactions`` and ``hybrid``
    draw the same orders from :func:`calibration_orders` at equal ``n_runs`` and seed).

    Raises:
        StoreError: a listed cache file is missing, truncated or modified.
    """
    out = {}
    for rel in sorted(type(store).read_manifest(store.path)["files"]):  # on disk: other processes may have fitted
        if rel.startswith("calibration/") and rel != exclude:
            d = json.loads(store.read_listed_bytes(rel) or b"{}")
            out.update({tuple(o): (list(l), t) for o, l, t in zip(d.get("orders", []), d.get("losses", []), _run_seconds(d))})
    return out


def _run_seconds(data: dict) -> list:
    """Per cached run (``losses``) its training wall seconds, None for the runs of a cache
    written before currsearch kept them (no or a shorter ``seconds`` list; a longer one is cut)."""
    n = len(data.get("losses", []))
    t = list(data.get("seconds", []))[:n]
    return t + [None] * (n - len(t))


def load_or_fit_runs(store, name: str, run_settings: list, make_orders, regress, fit_settings: list = (),
                     save_every: int = 16) -> dict:
    """Real runs and fitted coefficients of a calibrated estimator, cached in ``STORE/calibration/``.

    Args:
        store: the trajectory store (its Trainer retrains the orders; its hashes and reference
            order key the cache).
        name: estimator name (cache file prefix).
        run_settings: JSON-serializable settings that change the orders (part of the file key).
        make_orders: ``() -> (orders int64 [n, T], kinds list[str])``, the orders to retrain.
        regress: ``(runs dict) -> dict`` of fitted coefficients (JSON-serializable).
        fit_settings: JSON-serializable settings that change only the fit (stored in the file as
            ``fit_key``): changing them refits from the cached runs without retraining.
        save_every: runs between atomic saves of the partial runs (an interrupted fit resumes).
            Orders already trained for another cached fit on this store are not retrained
            (:func:`cached_runs`).

    Returns:
        ``{"orders": [n][T], "kinds": [n], "losses": [n][E] (nats/token), "seconds": [n] (each
        run's training wall seconds; None for runs cached before currsearch kept them), "fit":
        coefficients, "fit_key": fit_settings}`` as cached, plus ``read_back`` ([n] bools, not
        cached: True for a run this call did not train, read from this cache or another fit's),
        from which a job's ledger counts the time of the runs an earlier call trained. The cache file is listed in the store's checksummed manifest
        (``store.write_listed_bytes``); a cache file the manifest does not list (an older
        currsearch, an interrupted write) is not trusted and is refitted, with a warning; when
        the store is read-only a warning says that every process fitting this estimator repeats
        the runs.

    Raises:
        StoreError: the listed cache file is missing, truncated or modified (its message says
            how to repair the store: ``currsearch record`` drops the damaged cache).
    """
    key = hashlib.sha256(json.dumps([store.manifest["hashes"], store.reference_order.tolist(), *run_settings],
                                    sort_keys=True).encode()).hexdigest()[:16]
    rel = f"calibration/{name}_{key}.json"
    path = store.path / rel
    fit_key = json.loads(json.dumps(list(fit_settings)))
    raw = store.read_listed_bytes(rel)
    if raw is None and path.is_file():
        logger.warning("%s: %s is not listed in the store's manifest (an older currsearch or an interrupted write); "
                       "not trusting it, refitting", name, path)
    data = json.loads(raw) if raw is not None else {}
    if "fit" in data and data.get("fit_key", []) == fit_key:
        return {**data, "seconds": _run_seconds(data), "read_back": [True] * len(data["losses"])}

    def save():
        try:
            store.write_listed_bytes(rel, json.dumps(data).encode())
        except (OSError, ConfigError) as err:
            logger.warning("%s: could not cache the fit in %s (%s); every process that fits this estimator on this "
                           "store repeats the real runs", name, path, err)

    if "orders" not in data:
        orders, kinds = make_orders()
        data = {"orders": orders.tolist(), "kinds": list(kinds), "losses": []}
    data.setdefault("losses", [])
    data["seconds"] = _run_seconds(data)
    todo = range(len(data["losses"]), len(data["orders"]))
    read_back = [True] * len(data["orders"])
    if todo:
        trained = cached_runs(store, exclude=rel)
        reused = sum(tuple(data["orders"][i]) in trained for i in todo)
        logger.info(f"{name}: retraining {len(todo) - reused} of {len(data['orders'])} orders for real to fit the "
                    f"estimator ({reused} reused from other fits on this store; saved every {save_every} runs in "
                    f"{path}; an interrupted fit resumes)")
        tr = store.trainer() if reused < len(todo) else None
        # a bar whenever the job logs its progress (INFO), also into a log file (tqdm's own
        # default shows it only on a terminal, so a redirected 1,024-run fit went silent)
        for i in tqdm(todo, desc=f"{name} runs", unit="run", leave=False, disable=not logger.isEnabledFor(logging.INFO)):
            known = trained.get(tuple(data["orders"][i]))
            if known is None:  # train it: the run's wall seconds as verification times its runs
                t0 = time.perf_counter()
                losses = tr.train(torch.tensor(data["orders"][i])).eval_losses.tolist()
                known, read_back[i] = (losses, time.perf_counter() - t0), False
            data["losses"].append(known[0])
            data["seconds"].append(known[1])
            if (i + 1) % save_every == 0:
                save()
        save()
    data["fit"], data["fit_key"] = regress(data), fit_key
    save()  # the coefficients are cached too, so every process (Ray actors) scores identically
    return {**data, "read_back": read_back}


@register
class CalibratedAdditive(AdditiveEstimator):
    """Additive position model fitted to real training runs (see module docstring).

    Args:
        n_runs: random orders retrained for real to fit the coefficients (>= 8).
        seed: seed of those orders.

    Attributes (after fit): ``fit_seconds`` (seconds, retraining included unless cached),
    ``runs`` (``{"orders": [n_runs][T], "losses": [n_runs][E]}``, nats/token, and ``seconds``,
    ``read_back``: :func:`load_or_fit_runs`).
    """

    name = "calibrated"
    required_terms = ()
    needs_runs = True
    min_runs = 8

    def __init__(self, device="cpu", n_runs: int = 64, seed: int = 0):
        super().__init__(device)
        if n_runs < self.min_runs:
            raise ConfigError(f"{self.name} needs n_runs >= {self.min_runs} real runs to fit, got {n_runs}")
        self.required_terms = ()
        self.n_runs, self.seed = n_runs, seed

    def _fit(self, store) -> None:
        t0 = time.perf_counter()
        T = store.T

        def make_orders():
            g = torch.Generator().manual_seed(self.seed)
            return torch.stack([torch.randperm(T, generator=g) for _ in range(self.n_runs)]), ["random"] * self.n_runs

        data = load_or_fit_runs(store, "runs", [self.n_runs, self.seed], make_orders, lambda r: self._regress(r, T))
        self.runs = {k: data[k] for k in RUN_KEYS if k != "kinds"}
        self.cost = torch.tensor(data["fit"]["cost"], dtype=torch.float64, device=self.device)  # [T, T, E]
        self.ref = torch.tensor(data["fit"]["ref"], dtype=torch.float64, device=self.device)  # [E]
        self.fit_seconds = time.perf_counter() - t0

    @staticmethod
    def _regress(runs: dict, T: int) -> dict:
        """Cost tensor ``[T, T, E]`` (position t, batch l) and intercepts ``[E]`` fitted to the runs."""
        X = position_features(torch.tensor(runs["orders"])).numpy()
        Y = np.asarray(runs["losses"])  # [n, E]
        cost = np.zeros((T, T, Y.shape[1]))
        ref = np.zeros(Y.shape[1])
        for e in range(Y.shape[1]):
            w, ref[e] = fit_ridge(X, Y[:, e])
            cost[:, :, e] = position_cost(w, T)
        return {"cost": cost.tolist(), "ref": ref.tolist()}


def batch_groups(plan) -> tuple[torch.Tensor, str]:
    """Group of each window batch for the interaction features: int64 ``[T]`` and what the
    groups are. ``plan``: a ``BatchPlan`` or a ``TrajectoryStore`` (``.domains``, ``.metadata``).
    Domains when the batches are domain-homogeneous and of several domains, else (mixed
    batches, or a single domain) quartiles of the unigram-NLL difficulty proxy (min(4, T) bins)."""
    names = sorted(set(plan.domains))
    if len(names) > 1 and "mixed" not in names:
        return torch.tensor([names.index(d) for d in plan.domains], dtype=torch.int64), "domain"
    diff = torch.tensor([m["unigram_nll"] for m in plan.metadata], dtype=torch.float64)
    T = len(diff)
    rank = torch.empty(T, dtype=torch.int64)
    rank[torch.argsort(diff, stable=True)] = torch.arange(T)
    return (rank * min(4, T)) // max(T, 1), "difficulty quartile"


def interaction_features(orders: torch.Tensor, groups: torch.Tensor, n_groups: int, segments: int = 8) -> torch.Tensor:
    """Group-level features of orders int64 ``[n, T]`` (on any device): float64 ``[n, F]``.

    With ``g_t`` the group of the batch at step t, ``S = min(segments, T)`` equal segments of
    the window and G = ``n_groups``: the histogram ``H[d, s]`` = number of group-d batches in
    segment s (G S columns), all pairwise products ``H[a] H[b]`` (upper triangle with the
    diagonal, GS (GS + 1) / 2 columns: clustering and forgetting are not additive over
    positions), the number of adjacent same-group steps per group (G), the last position of
    each group divided by T - 1 (G), and per batch l the number ``a_l`` of same-group batches
    trained after it, ``a_l^2`` and ``a_l * p_l`` with ``p_l`` its position / (T - 1)
    (3 T columns: what a batch taught is overwritten by later batches of its own group).
    F = G S + GS (GS + 1) / 2 + 2 G + 3 T columns (664 at T = 32, G = 4); O(n (T G + F)) time
    and memory.
    """
    n, T = orders.shape
    g = groups.to(orders.device)[orders]  # [n, T]
    S = max(1, min(segments, T))
    seg = (torch.arange(T, device=orders.device) * S) // T
    H = torch.zeros(n, n_groups, S, dtype=torch.float64, device=orders.device)
    H.view(n, -1).scatter_add_(1, g * S + seg, torch.ones(n, T, dtype=torch.float64, device=orders.device))
    H = H.reshape(n, -1)
    iu = torch.triu_indices(H.shape[1], H.shape[1], device=orders.device)
    Q = H[:, iu[0]] * H[:, iu[1]]
    same = (g[:, 1:] == g[:, :-1])
    adj = torch.stack([(same & (g[:, 1:] == d)).sum(1) for d in range(n_groups)], 1).double()
    steps = torch.arange(T, device=orders.device).expand(n, -1)
    last = torch.stack([torch.where(g == d, steps, -1).max(1).values for d in range(n_groups)], 1).double() / max(T - 1, 1)
    onehot = torch.nn.functional.one_hot(g, n_groups).double()  # [n, T, G]
    later = onehot.sum(1, keepdim=True) - onehot.cumsum(1)  # [n, T, G]: group-d batches after step t
    a_step = later.gather(2, g[:, :, None])[:, :, 0]  # [n, T]: same-group batches after the one at step t
    a = torch.empty_like(a_step).scatter_(1, orders, a_step)  # [n, T]: indexed by batch l
    p = torch.empty_like(a_step).scatter_(1, orders, steps.double()) / max(T - 1, 1)
    return torch.cat([H, Q, adj, last, a, a * a, a * p], 1)


def set_fit_runs(est: Estimator, n_runs: int, seed: int, clumped_weight: float) -> None:
    """Check and set the fit settings of an estimator fitted to three families of real runs
    (``n_runs``, ``seed``, ``clumped_weight``: see :func:`calibration_orders`).

    Raises:
        ConfigError: ``n_runs < est.min_runs`` or ``clumped_weight <= 0``.
    """
    if n_runs < est.min_runs:
        raise ConfigError(f"{est.name} needs n_runs >= {est.min_runs} real runs to fit, got {n_runs}")
    if not clumped_weight > 0:
        raise ConfigError(f"clumped_weight must be > 0, got {clumped_weight}")
    est.n_runs, est.seed, est.clumped_weight = n_runs, seed, float(clumped_weight)


def calibration_orders(T: int, reference: torch.Tensor, groups: torch.Tensor, n_runs: int, seed: int,
                       near_k=(1, 2, 3, 4, 6, 8, 12, 16)) -> tuple[torch.Tensor, list[str]]:
    """Orders of three families to retrain for a fit: int64 ``[n_runs, T]`` and their family names.

    Half (the rest) uniformly random, ``n_runs // 4`` near ``reference`` (k = ``near_k`` random
    transpositions, cycled) and ``n_runs // 4`` "clumped" (batches sorted by a random rank of
    their group, ``groups`` int64 ``[T]``, plus Gaussian noise of standard deviation sigma G, sigma
    log-uniform in 0.03-10: from fully blocked to random), drawn in that order from one generator
    seeded with ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    n_near = n_clumped = n_runs // 4
    orders, kinds = [], []
    for _ in range(n_runs - n_near - n_clumped):
        orders.append(torch.randperm(T, generator=g)), kinds.append("random")
    for i in range(n_near):
        k = near_k[i % len(near_k)]
        orders.append(random_transpositions(reference, k, g)), kinds.append(f"near-{k}")
    G = int(groups.max()) + 1
    for _ in range(n_clumped):
        sigma = 10 ** (float(torch.rand(1, generator=g)) * 2.5 - 1.5)  # noise std sigma G, sigma in 0.03 .. 10
        rank = torch.randperm(G, generator=g).double()
        orders.append(torch.argsort(rank[groups] + sigma * G * torch.randn(T, generator=g, dtype=torch.float64)))
        kinds.append("clumped")
    return torch.stack(orders), kinds


@register
class CalibratedInteractions(Estimator):
    """Position model with group interactions fitted to real runs of three families of orders.

    Our estimator for fidelity over the whole order space (docs/estimators.md, section
    ``calibrated-interactions``). Model, per eval set e::

        L_e(pi) ~ b_e + position_features(pi) . w_e + interaction_features(pi) . v_e

    fitted by weighted ridge regression (alpha by 5-fold cross-validation) to ``n_runs`` orders
    retrained for real: half uniformly random, a quarter near the store's reference order
    (k = 1, 2, 3, 4, 6, 8, 12, 16 random transpositions) and a quarter "clumped" orders (batches
    sorted by a random group rank, ranks 1 apart, plus Gaussian noise of standard deviation
    sigma G with sigma log-uniform in 0.03-10: from fully blocked to random), the clumped runs
    weighted ``clumped_weight`` (their large losses would otherwise dominate the fit). Groups
    are the batch domains (``batch_groups``).

    Exact: nothing (a regression). Approximates: the order effect by per-batch position effects
    plus second-order group/segment interactions; fidelity measured in docs/estimators.md.
    Cost: ``n_runs`` retraining runs at fit (cached in ``STORE/calibration/``), then
    O(T G + F E) per order with F = 5 T + (8 G)(8 G + 1) / 2 + 10 G + 3 T features (824 at
    T = 32, G = 4). Its :meth:`assignment_optimum` is approximate (a swap-local optimum),
    unlike ``calibrated``'s.

    Raises:
        ConfigError: ``n_runs < 16`` or ``clumped_weight <= 0``; at fit: T < 2.

    Args:
        n_runs: orders retrained for real (>= 16).
        seed: seed of those orders.
        clumped_weight: weight of the clumped runs in the fit (> 0).

    Attributes (after fit): ``fit_seconds`` (seconds), ``runs`` (``orders``, ``kinds``, ``seconds``, ``read_back``,
    ``losses`` nats/token), ``groups`` (int64 ``[T]``), ``group_kind`` (str).
    """

    name = "calibrated-interactions"
    has_optimum = True
    needs_runs = True
    min_runs = 16
    NEAR_K = (1, 2, 3, 4, 6, 8, 12, 16)
    ORDERS_VERSION = 1  # part of the runs' cache key: bump when calibration_orders changes
    CACHE_NAME = "interactions"  # the fit's cache file in STORE/calibration/: a subclass with other features needs its own
    FEATURES_VERSION = 2  # part of the fit key: bump when the features or the fit change

    def __init__(self, device="cpu", n_runs: int = 1024, seed: int = 0, clumped_weight: float = 0.1):
        super().__init__(device)
        set_fit_runs(self, n_runs, seed, clumped_weight)

    def calibration_orders(self, T: int, reference: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """The ``n_runs`` orders to retrain: int64 ``[n_runs, T]`` and their family names (:func:`calibration_orders`)."""
        return calibration_orders(T, reference, self.groups.cpu(), self.n_runs, self.seed, self.NEAR_K)

    def _features(self, orders: torch.Tensor) -> torch.Tensor:
        return torch.cat([position_features(orders), interaction_features(orders, self.groups, self.n_groups)], 1)

    def _set_groups(self, plan) -> None:
        """Groups of the window batches (``batch_groups``) of ``plan`` (a store or a ``BatchPlan``)."""
        if len(plan.domains) < 2:
            raise ConfigError(f"{self.name} needs a window of T >= 2 batches, got T = {len(plan.domains)}")
        self.groups, self.group_kind = batch_groups(plan)
        self.n_groups = int(self.groups.max()) + 1

    def _regress(self, runs: dict) -> dict:
        """Coefficients ``{"w": [F][E], "b": [E]}`` fitted to ``runs`` (``orders``, ``kinds``, ``losses``)."""
        X = self._features(torch.tensor(runs["orders"])).numpy()
        sw = np.where(np.asarray(runs["kinds"]) == "clumped", self.clumped_weight, 1.0)
        fits = [fit_ridge(X, y, sample_weight=sw) for y in np.asarray(runs["losses"]).T]
        return {"w": np.stack([w for w, _ in fits], 1).tolist(), "b": [b for _, b in fits]}

    def _load(self, data: dict) -> None:
        """Keep the runs and the fitted coefficients of ``data`` (:meth:`_regress`'s ``fit``)."""
        self.runs = {k: data[k] for k in RUN_KEYS}
        self.groups = self.groups.to(self.device)
        self.W = torch.tensor(data["fit"]["w"], dtype=torch.float64, device=self.device)  # [F, E]
        self.b = torch.tensor(data["fit"]["b"], dtype=torch.float64, device=self.device)  # [E]

    def _fit(self, store) -> None:
        t0 = time.perf_counter()
        self._set_groups(store)
        data = load_or_fit_runs(store, self.CACHE_NAME, [self.n_runs, self.seed, list(self.NEAR_K), self.ORDERS_VERSION],
                                lambda: self.calibration_orders(store.T, store.reference_order), self._regress,
                                fit_settings=[self.clumped_weight, self.FEATURES_VERSION])
        self._load(data)
        self.fit_seconds = time.perf_counter() - t0

    @classmethod
    def from_runs(cls, plan, eval_names, orders, losses, kinds=None, clumped_weight: float = 0.1,
                  device="cpu") -> "CalibratedInteractions":
        """The model fitted to runs trained elsewhere (no store, no calibration runs of its own).

        The same features and weighted ridge fit as :meth:`fit`, on the given runs: e.g. the
        real trials of a search with real training (:mod:`currsearch.guided`).

        Args:
            plan: the ``BatchPlan`` (or a store) the orders index: its ``domains`` and
                ``metadata`` give the groups (``batch_groups``); kept as ``store``.
            eval_names: the E eval-set names of the columns of ``losses`` (e.g. only the objective).
            orders: int64 ``[n, T]`` orders trained for real (n >= ``min_runs``).
            losses: float ``[n, E]`` their final eval losses, nats/token.
            kinds: per run its family (``"clumped"`` runs weigh ``clumped_weight``); default all ``"random"``.
            clumped_weight: see the class.

        Returns:
            The fitted estimator (``runs`` holds the given runs; ``fit_seconds`` the fit's seconds).

        Raises:
            ConfigError: fewer than ``min_runs`` runs, shapes that do not match, T < 2.
            OrderError: an invalid order.
        """
        t0 = time.perf_counter()
        o = validate_orders(orders, len(plan.domains)).view(-1, len(plan.domains))
        y = torch.as_tensor(losses, dtype=torch.float64)
        if tuple(y.shape) != (o.shape[0], len(eval_names)):
            raise ConfigError(f"from_runs: losses must be [n = {o.shape[0]}, E = {len(eval_names)}] (one column per "
                              f"eval set), got {tuple(y.shape)}")
        kinds = ["random"] * o.shape[0] if kinds is None else list(kinds)
        if len(kinds) != o.shape[0]:
            raise ConfigError(f"from_runs: {len(kinds)} kinds for {o.shape[0]} runs; give one per run")
        est = cls(device=device, n_runs=o.shape[0], clumped_weight=clumped_weight)
        est.store, est.eval_names, est.T = plan, list(eval_names), o.shape[1]
        est._set_groups(plan)
        n = o.shape[0]  # runs trained elsewhere, given: none read back from a cache, their seconds unknown here
        data = {"orders": o.tolist(), "kinds": kinds, "losses": y.tolist(), "seconds": [None] * n, "read_back": [False] * n}
        est._load({**data, "fit": est._regress(data)})
        est.fit_seconds = time.perf_counter() - t0
        return est

    def _estimate(self, orders: torch.Tensor) -> torch.Tensor:
        return self._features(orders) @ self.W + self.b

    def assignment_optimum(self, eval_set: str = "all", max_swaps: int | None = None, chunk: int = 4096) -> torch.Tensor:
        """A swap-local optimum of the estimate of ``eval_set``: int64 ``[T]``. Approximate.

        Starts from the exact linear-assignment optimum of the position part of the model and
        applies :meth:`swap_descent` (best improving transpositions until none improves or
        ``max_swaps`` swaps were made).
        """
        e = self.eval_names.index(eval_set)
        return self.swap_descent(assignment_order(self._position_cost(e)), eval_set, max_swaps, chunk)

    def _position_cost(self, e: int) -> np.ndarray:
        """Cost matrix float64 ``[T, T]`` (step t, batch l) of the position part of eval set ``e``'s model."""
        return position_cost(self.W[:, e].cpu().numpy(), self.T)

    def swap_descent(self, order, eval_set: str = "all", max_swaps: int | None = None, chunk: int = 4096) -> torch.Tensor:
        """Best-improvement transpositions of ``order`` (int64 ``[T]``) on the estimate of
        ``eval_set`` until none improves or ``max_swaps`` were made: int64 ``[T]``, a
        swap-local optimum (all T (T - 1) / 2 transpositions scored per step, ``chunk`` orders
        per call; the estimate strictly decreases, so this terminates).

        Raises:
            OrderError: ``order`` is not an order of T batches.
        """
        e, T = self.eval_names.index(eval_set), self.T
        order = validate_orders(order, T).view(T).cpu()
        return swap_descent(lambda o: self.estimate(o)[:, e], order, max_swaps, chunk)


class CalibratedPositions(CalibratedInteractions):
    """``calibrated-interactions``' fit on the T per-batch position features alone (the first T
    columns of :func:`position_features`): ``L_e(pi) ~ b_e + sum_l w_{l,e} t_pi(l) / (T - 1)``.

    Ours; not registered: a low-capacity control for few runs, fitted with :meth:`from_runs`
    (``benchmarks/guided_skill.py`` compares it with ``calibrated-interactions`` fitted to a
    search's first runs). Linear in the positions, so its :meth:`assignment_optimum` is exact
    (linear assignment).
    """

    CACHE_NAME = "positions"

    def _features(self, orders: torch.Tensor) -> torch.Tensor:
        return position_features(orders)[:, :orders.shape[1]]

    def _position_cost(self, e: int) -> np.ndarray:
        t = np.arange(self.T) / max(self.T - 1, 1)
        return np.outer(t, self.W[:, e].cpu().numpy())
