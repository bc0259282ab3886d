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
"""

from __future__ import annotations

import torch

from currsearch.adam import AdamState, adam_direction
from currsearch.record import eval_gradients

from .base import Estimator, register
from .common import anchor_of_step, window_lrs


@register
class FUT1HVP(Estimator):
    """First-order FUT with exact HVPs and recomputed Adam moments (see module docstring).

    Args:
        chunk: orders processed together in one vmapped call.
        readout: ``"exact"`` or ``"taylor"``.
        curvature: ``False`` drops the HVP term (zeroth order in theta, Adam still recomputed),
            an ablation that shows what the curvature term contributes.
    """

    name = "fut1-hvp"
    required_terms = ()

    def __init__(self, device="cpu", chunk: int = 8, readout: str = "exact", curvature: bool = True):
        super().__init__(device)
        if readout not in ("exact", "taylor"):
            raise ValueError(f"readout must be 'exact' or 'taylor', got {readout!r}")
        self.chunk, self.readout, self.curvature = chunk, readout, curvature

    def _fit(self, store) -> None:
        self.trainer = store.trainer()
        fm = self.trainer.model
        self.thetas = torch.stack([store.checkpoint(t)["theta"] for t in store.anchors]).to(fm.device)
        c0 = store.checkpoint(store.anchors[0])
        self.start = AdamState(c0["adam_m"].to(fm.device), c0["adam_v"].to(fm.device), int(c0["adam_step"]))
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

    def final_parameters(self, orders: torch.Tensor) -> torch.Tensor:
        """Estimated final parameters gamma_T for orders int64 ``[n, T]``: float ``[n, P]``."""
        tr, fm = self.trainer, self.trainer.model
        out = []
        for i in range(0, orders.shape[0], self.chunk):
            o = orders[i : i + self.chunk]
            n = o.shape[0]
            gamma = self.thetas[0].expand(n, -1).clone()
            state = AdamState(self.start.m.expand(n, -1), self.start.v.expand(n, -1), self.start.step)
            for t in range(self.T):
                a = int(self.anchor[t])
                batches = tr.plan.batches[o[:, t].cpu()].to(fm.device)
                g = self._ghv(self.thetas[a], batches, gamma - self.thetas[a])
                step, state = adam_direction(g, state, gamma, fm.decay_mask, tr.cfg.optim)
                gamma = gamma - float(self.eta[t]) * step
            out.append(gamma)
        return torch.cat(out)

    def _estimate(self, orders: torch.Tensor) -> torch.Tensor:
        gammas = self.final_parameters(orders)
        if self.readout == "taylor":
            return self.ref.to(self.device) + ((gammas - self.theta_T).double() @ self.eval_grads_T.T).to(self.device)
        return torch.stack([self.trainer.evaluate(g) for g in gammas]).to(self.device)
