"""calibrated: an additive position model whose coefficients are fitted to real training runs.

Our estimator. The position analysis and ``benchmarks/learned_surrogate.py`` (docs/estimators.md)
show that, on random orders, the order effect is mostly additive over positions (a batch's
primacy under Adam), while the additive models derived from the trajectory (``additive``, the
adjoint) get the coefficients wrong. ``calibrated`` keeps the additive form and fits the
coefficients to the truth::

    L_e(pi) ~ b_e + sum_t C_e[t, pi(t)],
    C_e[t, l] = w_e[l] * t / (T - 1) + u_e[l, q(t)],      q(t) = min(floor(4 t / (T - 1)), 3)

(a per-batch linear position effect plus a per-batch position-quartile effect, 5 T
coefficients per eval set) by ridge regression (standardized features, alpha by 5-fold
cross-validation) on ``n_runs`` seeded random orders retrained for real with the store's
Trainer. Being additive over positions, its exact optimum over all T! orders is a linear
assignment problem (``assignment_optimum``, inherited from ``additive``).

Cost: fitting retrains ``n_runs`` orders; the runs and the fitted coefficients are cached in
``STORE/calibration/`` (keyed by the store's hashes, reference order, ``n_runs`` and ``seed``),
so a rerun or a Ray actor reads them and scores bit-identically; an estimate is O(T E) per order. Exact: nothing (a regression). Approximate: the
additive form (no interactions between positions) and the training distribution (random
orders: measured to transfer poorly to domain-blocked orders).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import numpy as np
import torch

from .base import register
from .simple import AdditiveEstimator


def position_features(orders: torch.Tensor) -> np.ndarray:
    """Features of orders int64 ``[n, T]``: float64 ``[n, 5 T]``, per batch l its position
    ``t / (T - 1)`` (columns 0..T-1) and its position-quartile one-hot (columns T + 4 l + q)."""
    n, T = orders.shape
    pos = torch.empty(n, T, dtype=torch.float64)
    pos.scatter_(1, orders.cpu(), torch.arange(T, dtype=torch.float64).expand(n, -1) / max(T - 1, 1))
    quart = torch.nn.functional.one_hot((pos * 4).long().clamp(max=3), 4).reshape(n, -1).double()
    return torch.cat([pos, quart], 1).numpy()


def fit_ridge(X: np.ndarray, y: np.ndarray, alphas=tuple(np.logspace(-4, 3, 30)), folds: int = 5):
    """Ridge regression of ``y`` ``[n]`` on ``X`` ``[n, d]`` (standardized columns), alpha by
    k-fold cross-validation. Returns ``(w [d], b)`` in raw feature units: ``y ~ X @ w + b``."""

    def fit(Xf, yf, a):
        mu, sd = Xf.mean(0), Xf.std(0) + 1e-12
        Z = (Xf - mu) / sd
        w = np.linalg.solve(Z.T @ Z + a * np.eye(Z.shape[1]), Z.T @ (yf - yf.mean())) / sd
        return w, yf.mean() - mu @ w

    idx = np.arange(len(y))
    parts = np.array_split(np.random.default_rng(0).permutation(idx), min(folds, len(y)))

    def cv(a):
        err = 0.0
        for f in parts:
            w, b = fit(X[np.setdiff1d(idx, f)], y[np.setdiff1d(idx, f)], a)
            err += float(((X[f] @ w + b - y[f]) ** 2).sum())
        return err

    return fit(X, y, min(alphas, key=cv))


@register
class CalibratedAdditive(AdditiveEstimator):
    """Additive position model fitted to real training runs (see module docstring).

    Args:
        n_runs: random orders retrained for real to fit the coefficients (>= 8).
        seed: seed of those orders.

    Attributes (after fit): ``fit_seconds`` (seconds, retraining included unless cached),
    ``runs`` (``{"orders": [n_runs][T], "losses": [n_runs][E]}``, nats/token).
    """

    name = "calibrated"
    required_terms = ()

    def __init__(self, device="cpu", n_runs: int = 64, seed: int = 0):
        super().__init__(device)
        if n_runs < 8:
            raise ValueError(f"calibrated needs n_runs >= 8 real runs to fit, got {n_runs}")
        self.required_terms = ()
        self.n_runs, self.seed = n_runs, seed

    def _fit(self, store) -> None:
        from currsearch.manifest import atomic_write_bytes

        t0 = time.perf_counter()
        key = hashlib.sha256(json.dumps([store.manifest["hashes"], store.reference_order.tolist(), self.n_runs,
                                         self.seed], sort_keys=True).encode()).hexdigest()[:16]
        path = store.path / "calibration" / f"runs_{key}.json"
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):  # a damaged cache is refitted, not trusted
            data = {}
        if "cost" not in data:
            if "orders" not in data:
                print(f"calibrated: retraining {self.n_runs} random orders for real to fit the estimator "
                      f"(cached in {path.parent})", file=sys.stderr)
                tr = store.trainer()
                g = torch.Generator().manual_seed(self.seed)
                orders = [torch.randperm(store.T, generator=g) for _ in range(self.n_runs)]
                data = {"orders": [o.tolist() for o in orders], "losses": [tr.train(o).eval_losses.tolist() for o in orders]}
            data["cost"], data["ref"] = self._regress(data, store.T)
            try:  # the fitted coefficients are cached too, so every process (Ray actors) scores identically
                path.parent.mkdir(exist_ok=True)
                atomic_write_bytes(path, json.dumps(data).encode())
            except OSError:  # a read-only store: fit again next time
                pass
        self.runs = {"orders": data["orders"], "losses": data["losses"]}
        self.cost = torch.tensor(data["cost"], dtype=torch.float64, device=self.device)  # [T, T, E]
        self.ref = torch.tensor(data["ref"], dtype=torch.float64, device=self.device)  # [E]
        self.fit_seconds = time.perf_counter() - t0

    @staticmethod
    def _regress(runs: dict, T: int) -> tuple[list, list]:
        """Cost tensor ``[T, T, E]`` (position t, batch l) and intercepts ``[E]`` fitted to the runs."""
        X = position_features(torch.tensor(runs["orders"]))
        Y = np.asarray(runs["losses"])  # [n, E]
        t = np.arange(T) / max(T - 1, 1)
        q = np.minimum((t * 4).astype(int), 3)
        cost = np.zeros((T, T, Y.shape[1]))
        ref = np.zeros(Y.shape[1])
        for e in range(Y.shape[1]):
            w, ref[e] = fit_ridge(X, Y[:, e])
            cost[:, :, e] = np.outer(t, w[:T]) + w[T:].reshape(T, 4)[:, q].T  # [t, l]
        return cost.tolist(), ref.tolist()
