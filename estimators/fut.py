"""FUT (arXiv 2505.22042) first- and second-order Taylor estimators on the projected store.

A reconstruction of the paper's method, as faithful as its text allows (no public code).
Everything lives in the k-dimensional JL-projected space (``record.projection``): u_{t,l} =
P Gamma(theta_t, B_l) (term ``updates``), p_t = P theta_t (the checkpoints, projected at fit
time with the store's seeded projector), and the read-out vector P grad L_e(theta_T).

The deviation d_t ~ P(gamma_t - theta_t) of the new order pi from the reference follows
(paper Eq. 5-7, Adam update expanded around the reference checkpoint)::

    d_0 = 0
    d_{t+1} = d_t - eta_t ( u_{t,pi(t)} + D_{t,pi(t)} * d_t [+ 1/2 D2_{t,pi(t)} * d_t^2] - u_{t,r(t)} )

where r = ``store.reference_order`` (the batch the recorded run used at step t), with the
curvature approximated element-wise by finite differences along the trajectory
(the paper's "differences between successive checkpoints")::

    D_{t,l}  = (u_{t+1,l} - u_{t,l}) / (p_{t+1} - p_t)          (first order, fut1)
    D2_{t,l} = (D_{t+1,l} - D_{t,l}) / (p_{t+1} - p_t)          (second order, fut2)

(element-wise; a ratio whose denominator is below 1e-3 of the median |p_{t+1} - p_t| is set
to 0). Stabilization, ours (the paper describes none): taken literally the recursion
diverges in the projected space (measured here: AbsDiff 1e1 to 1e81 nats/token at T = 8-16),
because a ratio of two JL coordinates can be negative or huge; so eta_t D is clamped to
[0, 1] (each coordinate of d is damped, never amplified), eta_t^2 D2 to [-1, 1], and the
quadratic term of each coordinate is capped at the magnitude of the linear one. The Adam moments stay those of the reference run (the update
terms u were computed with them): the paper's "linearized Adam". The estimated loss is
``L_e(theta_T) + <P grad L_e(theta_T), d_T>``.

Known limits (../shared/DESIGN.md Sec. 3): element-wise finite-difference curvature is
noisy, the reference moments ignore the order-dependence of Adam's second moment, and the
read-out through a JL projection carries an error of order ||g|| ||d|| / sqrt(k), larger than
typical order effects.
"""

from __future__ import annotations

import torch

from currsearch.projection import Projector

from .base import Estimator, register
from .common import anchor_of_step, gather_positions, window_lrs


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    ok = den.abs() > 1e-3 * den.abs().median()
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


class _FUT(Estimator):
    order_: int = 1
    required_terms = ("updates",)

    def _fit(self, store) -> None:
        proj = Projector(**{k: store.manifest["projection"][k] for k in ("kind", "dim_in", "dim_out", "seed", "block")})
        p = torch.stack([proj.project(store.checkpoint(t)["theta"]) for t in store.anchors] + [proj.project(store.final()["theta"])])
        p = p.double()  # [A+1, k]
        u = store.get("update_proj").double()  # [A, T, k]
        dp = p[1:] - p[:-1]  # [A, k]
        u_next = torch.cat([u[1:], u[-1:]])  # last anchor: reuse its successor's difference below
        eta = window_lrs(store)
        e = eta[torch.tensor(store.anchors)][:, None, None]  # step size at each anchor
        D = _safe_ratio(u_next - u, dp[:, None, :])  # [A, T, k]
        if len(store.anchors) > 1:
            D[-1] = D[-2]
        D = (e * D).clamp(0.0, 1.0) / e  # stabilization, see module docstring
        idx = anchor_of_step(store)
        self.u = u[idx].to(self.device)  # [T, T, k]
        self.D = D[idx].to(self.device)
        self.D2 = None
        if self.order_ == 2:
            D2 = _safe_ratio(torch.cat([D[1:], D[-1:]]) - D, dp[:, None, :])
            if len(store.anchors) > 1:
                D2[-1] = D2[-2]
            self.D2 = ((e * e * D2).clamp(-1.0, 1.0) / (e * e))[idx].to(self.device)
        self.eta = eta.to(self.device)
        self.readout = store.final_eval_grads_proj().double().to(self.device)  # [E, k]
        self.ref = store.final()["eval_loss"].to(self.device)
        self.ref_order = store.reference_order.to(self.device)

    def _estimate(self, orders: torch.Tensor) -> torch.Tensor:
        n, T = orders.shape
        d = torch.zeros(n, self.u.shape[-1], dtype=torch.float64, device=self.device)
        u_new = gather_positions(self.u, orders)  # [n, T, k]
        D_new = gather_positions(self.D, orders)
        D2_new = gather_positions(self.D2, orders) if self.D2 is not None else None
        u_ref = gather_positions(self.u, self.ref_order[None])[0]  # [T, k]: the recorded run's own updates
        for t in range(T):
            lin = D_new[:, t] * d
            step = u_new[:, t] + lin - u_ref[t]
            if D2_new is not None:  # quadratic term, capped at the size of the linear one
                lim = lin.abs()
                step = step + torch.maximum(torch.minimum(0.5 * D2_new[:, t] * d * d, lim), -lim)
            d = d - self.eta[t] * step
        return self.ref + d @ self.readout.T


@register
class FUT1(_FUT):
    """First-order FUT with finite-difference curvature, projected store (see module docstring)."""

    name = "fut1"
    order_ = 1


@register
class FUT2(_FUT):
    """Second-order FUT with finite-difference curvature, projected store (see module docstring)."""

    name = "fut2"
    order_ = 2
