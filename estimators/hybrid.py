"""``hybrid`` (ours): a few-shot regression on the retraining-free estimators' terms.

The retraining-free estimators (``estimators/response.py``) give the right kind of signal with
the wrong scale and mix: each term is exact to first (or second) order around the recorded run,
but the default regime is far from linear. ``hybrid`` keeps their terms as a handful of
features and fits only how much each counts, per eval set e, to ``n_runs`` (default 32) real
runs::

    L_e(pi) ~ b_e + a_1 TR_e(pi) + a_2 LR_e(pi) + a_3 Q_e(pi) + r ADJ(pi)
              + sum_d ( z_d POS_d(pi) + y_d LAST_d(pi) )

with TR the momentum transport alone (``transported``, ``second_moment=False``), LR the
``linear-response`` estimate, Q the precedence cross term (``precedence`` minus
``linear-response``), ``ADJ`` the number of adjacent same-group pairs, ``POS_d`` the mean and
``LAST_d`` the last normalized position of group d's batches (G groups: the batch domains, see
``calibrated.batch_groups``): 4 + 2 G features (12 at G = 4), weighted ridge regression with
alpha by cross-validation (``calibrated.fit_ridge``). The feature set was chosen on the
development draw of held-out orders (seed 0) among a few candidates (docs/estimators.md). The
runs are drawn from the three families of ``calibrated-interactions``
(``calibrated.calibration_orders``: random, near the reference, clumped by group; clumped runs
weighted ``clumped_weight``) and cached in ``STORE/calibration/``.

Exact: nothing (a regression). Cost: ``n_runs`` real runs plus the recording of the
``response`` and ``precedence`` terms, then O(T^2 E) per order (the precedence term). Its
optimum is swap-local (:func:`~estimators.common.swap_descent` from the linear-response
assignment optimum).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .base import Estimator, register
from .calibrated import RUN_KEYS, batch_groups, calibration_orders, fit_ridge, load_or_fit_runs, set_fit_runs
from .common import swap_descent
from .response import LinearResponse, Precedence, Transported
from .simple import assignment_order


@register
class FewShotHybrid(Estimator):
    """Few-shot regression on the retraining-free estimators' terms (module docstring).

    Args:
        n_runs: orders retrained for real to fit (>= 8; default 32).
        seed: seed of those orders.
        clumped_weight: weight of the clumped runs in the fit (> 0).

    Raises:
        ConfigError: ``n_runs < 8`` or ``clumped_weight <= 0``.

    Attributes (after fit): ``runs`` (``orders``, ``kinds``, ``losses`` nats/token, ``seconds``, ``read_back``), ``fit_seconds``.
    """

    name = "hybrid"
    required_terms = ("response", "precedence")
    has_optimum = True
    needs_runs = True
    min_runs = 8
    NEAR_K = (1, 2, 3, 4, 6, 8, 12, 16)
    FEATURES_VERSION = 2  # part of the fit key: bump when the features or the fit change

    def __init__(self, device="cpu", n_runs: int = 32, seed: int = 0, clumped_weight: float = 0.1):
        super().__init__(device)
        set_fit_runs(self, n_runs, seed, clumped_weight)

    def features(self, orders: torch.Tensor) -> torch.Tensor:
        """Features of orders int64 ``[n, T]``: float64 ``[n, F, E]``, F = 4 + 2 G (module docstring)."""
        n, T = orders.shape
        E = len(self.eval_names)
        tr, lr, pr = (p.estimate(orders) for p in self.parts)  # [n, E] each
        g = self.groups[orders]  # [n, T] group at each step
        onehot = torch.nn.functional.one_hot(g, self.n_groups).double()  # [n, T, G]
        adj = (g[:, 1:] == g[:, :-1]).double().sum(1)  # [n]
        pos = torch.arange(T, dtype=torch.float64, device=orders.device) / max(T - 1, 1)
        mean_pos = torch.einsum("t,ntg->ng", pos, onehot) / onehot.sum(1).clamp(min=1)  # [n, G]
        last_pos = (onehot * pos[None, :, None]).amax(1)  # [n, G]
        shared = torch.cat([adj[:, None], mean_pos, last_pos], 1)[:, :, None].expand(-1, -1, E)
        return torch.cat([torch.stack([tr, lr, pr - lr], 1), shared], 1)

    def _fit(self, store) -> None:
        t0 = time.perf_counter()
        self.parts = [Transported(self.device, second_moment=False).fit(store), LinearResponse(self.device).fit(store),
                      Precedence(self.device).fit(store)]
        self.groups, _ = batch_groups(store)
        self.groups = self.groups.to(self.device)
        self.n_groups = int(self.groups.max()) + 1

        def regress(runs):
            X = self.features(torch.tensor(runs["orders"], device=self.device)).cpu().numpy()  # [n, F, E]
            sw = np.where(np.asarray(runs["kinds"]) == "clumped", self.clumped_weight, 1.0)
            fits = [fit_ridge(X[:, :, e], y, sample_weight=sw) for e, y in enumerate(np.asarray(runs["losses"]).T)]
            return {"w": np.stack([w for w, _ in fits], 1).tolist(), "b": [b for _, b in fits]}

        data = load_or_fit_runs(store, "hybrid", [self.n_runs, self.seed, list(self.NEAR_K), 1],
                                lambda: calibration_orders(store.T, store.reference_order, self.groups.cpu(), self.n_runs,
                                                           self.seed, self.NEAR_K),
                                regress, fit_settings=[self.clumped_weight, self.FEATURES_VERSION])
        self.runs = {k: data[k] for k in RUN_KEYS}
        self.W = torch.tensor(data["fit"]["w"], dtype=torch.float64, device=self.device)  # [F, E]
        self.b = torch.tensor(data["fit"]["b"], dtype=torch.float64, device=self.device)  # [E]
        self.fit_seconds = time.perf_counter() - t0

    def _estimate(self, orders: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nfe,fe->ne", self.features(orders), self.W) + self.b

    def assignment_optimum(self, eval_set: str = "all", max_swaps: int | None = None) -> torch.Tensor:
        """A swap-local optimum of the estimate of ``eval_set``: int64 ``[T]``. Approximate: from
        the linear-response assignment optimum, best improving transpositions until none improves."""
        e = self.eval_names.index(eval_set)
        order = assignment_order(self.parts[1].cost[:, :, e].cpu().numpy()).to(self.device)
        return swap_descent(lambda o: self._estimate(o)[:, e], order, max_swaps).cpu()
