"""fut1-hvp: first-order Taylor expansion with exact Hessian-vector products, Adam recomputed.

The fidelity ceiling of trajectory-based estimators for small models (../shared/DESIGN.md
Sec. 3, first row of the prototype table), at about the cost of retraining. For an order pi
with deviation delta_t = gamma_t - theta_a (theta_a: the reference checkpoint at the anchor
of step t; every step with anchor stride 1)::

    g'_t   = c_t ( g(theta_a, B_pi(t)) + H(theta_a, B_pi(t)) delta_t )       (first-order gradient)
    m', v' = Adam moments of the new order, recomputed from g'            (currsearch.adam)
    gamma_{t+1} = gamma_t - eta_t Gamma(g'_t; m', v', gamma_t)

c_t is the global-norm clipping factor of g(theta_a, B_pi(t)), held fixed (clipping is
not differentiated). The gradient and the HVP come from one forward-over-reverse
``torch.func.jvp`` of the gradient, vectorized over a chunk of orders with ``vmap``. The
final loss is evaluated exactly at gamma_T (``readout="exact"``) or by the first-order
Taylor read-out ``L_e(theta_T) + <grad L_e(theta_T), gamma_T - theta_T>`` (``"taylor"``).
Source: arXiv 2505.22042 Eq. 5 (first-order expansion), with the Hessian computed exactly.

Each order's rollout starts at the recorded checkpoint (theta and Adam state) of the last
anchor before its first departure from the recorded order (``start_anchors``): the shared
prefix would replay the recorded run (exactly with anchor stride 1), so near-reference orders
cost only their suffix.

Per-batch losses (memorization, arXiv 2505.22042's memorization/generalization application):
``estimate_batch_losses`` evaluates every window batch B_l exactly at gamma_T, whatever the
``readout``; ``estimate_with_batch_losses`` returns both outputs from one gamma_T computation.
"""

from __future__ import annotations

import torch

from currsearch.adam import AdamState, adam_direction
from currsearch.gradients import eval_gradients
from currsearch.orders import validate_orders

from .base import Estimator, register
from .common import anchor_of_step, window_lrs


@torch.no_grad()
def window_batch_losses(trainer, thetas: torch.Tensor) -> torch.Tensor:
    """Loss of every window batch B_l of ``trainer.plan`` at each parameter vector.

    Args:
        trainer: a :class:`~currsearch.train.Trainer` (its flat model and plan).
        thetas: float ``[n, P]`` (or ``[P]``) parameter vectors.

    Returns:
        float64 ``[n, T]`` (or ``[T]``) on the CPU: mean next-token loss of B_l in nats/token
        (every batch has the same token count), the quantity the Trainer minimizes.
    """
    fm = trainer.model
    th = thetas.reshape(-1, thetas.shape[-1]).to(fm.device)
    out = torch.empty(th.shape[0], trainer.T, dtype=torch.float64)
    for i in range(th.shape[0]):
        for l in range(trainer.T):
            out[i, l] = float(fm.loss(th[i], trainer.batch(l)))
    return out if thetas.dim() == 2 else out[0]


@register
class FUT1HVP(Estimator):
    """First-order FUT with exact HVPs and recomputed Adam moments (see module docstring).

    Args:
        chunk: orders processed together in one vmapped call (>= 1).
        readout: ``"exact"`` or ``"taylor"``.
        curvature: ``False`` drops the HVP term (zeroth order in theta, Adam still recomputed),
            an ablation that shows what the curvature term contributes.
    """

    name = "fut1-hvp"
    required_terms = ()
    has_batch_losses = True
    estimate_costs_runs = True

    def __init__(self, device="cpu", chunk: int = 8, readout: str = "exact", curvature: bool = True):
        super().__init__(device)
        if readout not in ("exact", "taylor"):
            raise ValueError(f"readout must be 'exact' or 'taylor', got {readout!r}")
        if chunk < 1:
            raise ValueError(f"chunk (orders per vmapped call) must be >= 1, got {chunk}")
        self.chunk, self.readout, self.curvature = chunk, readout, curvature

    def _fit(self, store) -> None:
        self.trainer = store.trainer()
        fm = self.trainer.model
        cks = [store.checkpoint(t, device=fm.device) for t in store.anchors]
        self.thetas = torch.stack([c["theta"] for c in cks])  # [A, P]
        self.moments = [AdamState(c["adam_m"], c["adam_v"], int(c["adam_step"])) for c in cks]  # Adam state at each anchor
        self.anchors = torch.tensor(store.anchors)
        self.ref_order = store.reference_order
        self.anchor = anchor_of_step(store)
        self.eta = window_lrs(store)
        fin = store.final()
        self.ref, self.theta_T = fin["eval_loss"], fin["theta"].to(fm.device)
        if self.readout == "taylor":
            self.eval_grads_T = eval_gradients(self.trainer, self.theta_T).double()

        clip = self.trainer.cfg.optim.grad_clip

        def grad_and_hvp(theta, batch, v):
            if self.curvature:
                g, hv = torch.func.jvp(lambda th: torch.func.grad(fm.loss)(th, batch), (theta,), (v,))
            else:
                g, hv = torch.func.grad(fm.loss)(theta, batch), 0.0
            if clip is None:
                return g + hv
            return torch.clamp(clip / (torch.linalg.vector_norm(g) + 1e-6), max=1.0) * (g + hv)

        self._ghv = torch.func.vmap(grad_and_hvp, in_dims=(None, 0, 0))

    def start_anchors(self, orders: torch.Tensor) -> torch.Tensor:
        """Index of the anchor each order's rollout starts from, for int64 orders ``[n, T]`` (any
        device): int64 ``[n]`` on the CPU, the last anchor at or before the first step where
        the order departs from ``store.reference_order``.

        Before that step the rollout would replay the recorded run (delta stays 0 with anchor
        stride 1; with a larger stride the recorded checkpoint is more exact than the
        linearized replay), so each order starts from that recorded checkpoint and Adam state:
        orders near the reference (trust-region search) pay only for their suffix.
        """
        differs = orders.cpu() != self.ref_order
        first = torch.where(differs.any(1), differs.int().argmax(1), torch.tensor(self.T))
        return torch.searchsorted(self.anchors, first, right=True) - 1

    def final_parameters(self, orders: torch.Tensor, deviation_map=None) -> torch.Tensor:
        """Estimated final parameters gamma_T for orders int64 ``[n, T]``: float ``[n, P]``.

        Each order starts at its own :meth:`start_anchors` checkpoint, whatever other orders
        share its chunk (a chunk runs from its earliest start; a row is reset to its recorded
        checkpoint and Adam state when its own start comes), so an order's estimate does not
        depend on the batch it is scored in. Orders are grouped by start to skip shared
        prefixes.

        Args:
            orders: int64 ``[n, T]`` validated orders.
            deviation_map: ablation hook ``f(t, delta) -> v``: the HVP at step t is applied to
                ``v`` (float ``[n_chunk, P]``) instead of the deviation ``delta`` (same shape);
                default identity.
        """
        tr, fm = self.trainer, self.trainer.model
        starts = self.start_anchors(orders)
        perm = torch.argsort(starts, descending=True, stable=True)
        out = torch.empty(orders.shape[0], fm.num_params, dtype=fm.dtype, device=fm.device)
        for i in range(0, orders.shape[0], self.chunk):
            rows = perm[i : i + self.chunk]
            o = orders[rows.to(orders.device)]
            n = o.shape[0]
            row_start = self.anchors[starts[rows]]  # [n] step at which each row leaves the recorded run
            gamma = state = None
            for t in range(int(row_start.min()), self.T):
                a = int(self.anchor[t])
                reset = (row_start == t).to(fm.device)[:, None]
                if reset.any():  # rows starting here take the recorded checkpoint and Adam state
                    s0 = self.moments[a]
                    if gamma is None:
                        gamma = self.thetas[a].expand(n, -1).clone()
                        state = AdamState(s0.m.expand(n, -1).clone(), s0.v.expand(n, -1).clone(), s0.step)
                    else:
                        gamma = torch.where(reset, self.thetas[a], gamma)
                        state = AdamState(torch.where(reset, s0.m, state.m), torch.where(reset, s0.v, state.v), state.step)
                batches = tr.plan.batches[o[:, t].cpu()].to(fm.device)
                delta = gamma - self.thetas[a]
                g = self._ghv(self.thetas[a], batches, delta if deviation_map is None else deviation_map(t, delta))
                step, state = adam_direction(g, state, gamma, fm.decay_mask, tr.cfg.optim)
                gamma = gamma - float(self.eta[t]) * step
            out[rows.to(out.device)] = gamma
        return out

    def _estimate(self, orders: torch.Tensor) -> torch.Tensor:
        return self._readout(self.final_parameters(orders))

    def estimate_batch_losses(self, orders) -> torch.Tensor:
        """Loss (nats/token) of every window batch B_l at the estimated gamma_T of each order:
        float64 ``[n, T]`` (``[T]`` for one order ``[T]``), evaluated exactly at gamma_T.

        Raises:
            OrderError: invalid orders. RuntimeError: ``fit`` was not called.
        """
        return self.estimate_with_batch_losses(orders)[1]

    def estimate_with_batch_losses(self, orders) -> tuple[torch.Tensor, torch.Tensor]:
        """``(estimate(orders), estimate_batch_losses(orders))`` from one :meth:`final_parameters` call."""
        if self.store is None:
            raise RuntimeError(f"call {type(self).__name__}.fit(store) before estimate_with_batch_losses()")
        o = validate_orders(orders, self.T)
        gammas = self.final_parameters(o.view(-1, self.T).to(self.device))
        ev, bl = self._readout(gammas), window_batch_losses(self.trainer, gammas).to(self.device)
        return (ev[0], bl[0]) if o.dim() == 1 else (ev, bl)

    def _readout(self, gammas: torch.Tensor) -> torch.Tensor:
        if self.readout == "taylor":
            return self.ref.to(self.device) + ((gammas - self.theta_T).double() @ self.eval_grads_T.T).to(self.device)
        return torch.stack([self.trainer.evaluate(g) for g in gammas]).to(self.device)
