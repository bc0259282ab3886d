"""The null model and the additive (TracIn-style) first-order score.

``reference``: every order gets the reference run's final eval losses.

``additive``: the first-order effect of putting batch B_l at step t instead of B_t,
propagated to the end with an identity Jacobian (B_t: the batch the recorded reference run
used at step t, ``store.reference_order[t]``) and read out exactly with the final
eval gradient (path-integrated first order; TracIn, Pruthi et al. 2020, Eq. 2, with the Adam
update term of arXiv 2505.22042 Sec. 3 in place of the gradient)::

    L_e(pi) ~ L_e(theta_T) - sum_t eta_t ( <grad L_e(theta_T), Gamma(theta_t, B_pi(t))>
                                          - <grad L_e(theta_T), Gamma(theta_t, B_t)> )

The inner products are the recorder's exact read-outs (``readout_update_final``); with an
anchor stride s, step t uses the read-outs of its anchor. The score is additive over
positions, so its exact minimum over all T! permutations is a linear assignment problem
(``assignment_optimum``, scipy.optimize.linear_sum_assignment).
"""

from __future__ import annotations

import torch

from currsearch.orders import validate_orders

from .base import Estimator, register
from .common import gather_positions, per_step, window_lrs
from .hvp import window_batch_losses


@register
class ReferenceEstimator(Estimator):
    """Null model: the reference run's final losses for every order."""

    name = "reference"
    has_batch_losses = True

    def _fit(self, store) -> None:
        self.ref = store.final()["eval_loss"].to(self.device)
        self._batch_ref = None  # per-batch losses of this store, computed on first use

    def _estimate(self, orders: torch.Tensor) -> torch.Tensor:
        return self.ref.expand(orders.shape[0], -1).clone()

    def estimate_batch_losses(self, orders) -> torch.Tensor:
        """The reference run's final loss on every window batch, for every order: float64
        ``[n, T]`` nats/token (computed once at theta_T, on first call)."""
        if self.store is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(store) before estimate_batch_losses()")
        o = validate_orders(orders, self.T)
        if self._batch_ref is None:
            tr = self.store.trainer()
            self._batch_ref = window_batch_losses(tr, self.store.final()["theta"]).to(self.device)
        return self._batch_ref.clone() if o.dim() == 1 else self._batch_ref.expand(o.shape[0], -1).clone()


def assignment_order(cost) -> torch.Tensor:
    """The order minimizing ``sum_t cost[t, order[t]]`` over all permutations: int64 ``[T]``
    for a float cost array ``[T, T]`` (step t, batch l). Exact (linear assignment, scipy's Hungarian
    algorithm)."""
    from scipy.optimize import linear_sum_assignment  # here, not at the top: scipy.optimize takes ~0.7 s to import

    rows, cols = linear_sum_assignment(cost)
    order = torch.empty(len(rows), dtype=torch.int64)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
    return order


@register
class AdditiveEstimator(Estimator):
    """Additive first-order score from exact read-outs (see module docstring).

    Args:
        readout: ``"final"`` (eval gradient at theta_T, default; term ``readouts``) or
            ``"checkpoint"`` (at theta_t, as TracIn; term ``readouts_checkpoint``).
    """

    name = "additive"
    required_terms = ("readouts",)
    has_optimum = True

    def __init__(self, device="cpu", readout: str = "final"):
        super().__init__(device)
        if readout not in ("final", "checkpoint"):
            raise ValueError(f"readout must be 'final' or 'checkpoint', got {readout!r}")
        self.readout = readout
        self.required_terms = ("readouts",) if readout == "final" else ("readouts_checkpoint",)

    def _fit(self, store) -> None:
        key = "readout_update_final" if self.readout == "final" else "readout_update"
        r = per_step(store.get(key), store).to(self.device)  # [T, T, E]
        eta = window_lrs(store).to(self.device)
        self.cost = -eta[:, None, None] * r  # [T, T, E]: loss change of batch l at step t
        ref_order = store.reference_order.to(self.device)
        self.ref = store.final()["eval_loss"].to(self.device) - gather_positions(self.cost, ref_order[None])[0].sum(0)

    def _estimate(self, orders: torch.Tensor) -> torch.Tensor:
        return self.ref + gather_positions(self.cost, orders).sum(1)

    def assignment_optimum(self, eval_set: str = "all") -> torch.Tensor:
        """The order minimizing the additive estimate of ``eval_set``: int64 ``[T]``.

        Exact over all permutations (linear assignment, Hungarian algorithm via scipy).
        """
        return assignment_order(self.cost[:, :, self.eval_names.index(eval_set)].cpu().numpy())
