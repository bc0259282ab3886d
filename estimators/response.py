"""Retraining-free estimators from the recorded linear response (``currsearch.adjoint``).

``linear-response`` (ours; the first order of the whole window map, made cheap): the final eval
loss of an order is the reference loss plus the first-order response to each step's batch
change, read out with the adjoint of the AdamW window along the recorded run (the gradient
through the exact Hessian-vector product and Adam's first moment linearized; the second moment
held at the reference, because its linearization was measured to hurt, see
``currsearch.adjoint.RECORDED_VARIANTS``; the full linearization is the ``response_v`` read-out
of ``currsearch.adjoint.FULL_RESPONSE``, scored by ``ResponseCost(variant="response_v")``)::

    L_e(pi) ~ L_e(theta_T) + sum_t ( R_e[t, pi(t)] - R_e[t, t] )            (recorded ``response_readout``)

``transported`` (ours; zeroth order in the curvature): the same with the Hessian dropped, so each
batch's gradient is carried through the momentum tail along the reference, divided by the
reference normalization ``sqrt(vhat_s) + eps`` at every later step s, plus (``second_moment``)
the first-order effect of its squared gradient on the later normalizations (the order-dependent
second moment of a fresh state). ``additive`` is the same with neither (only the ``(1 - b1)``
share of the gradient at its own step).

All three are sums over positions, so their exact optimum over all T! orders is a linear
assignment (``assignment_optimum``). Cost per order: O(T E) after recording (the ``response``
term: one backward sweep of T Hessian-vector products of E tangents).

``precedence`` (ours; second order in the learning rate): ``linear-response`` plus the pairwise
effect of an earlier batch a on a later batch b through b's curvature. Expanding the training map
to second order in the step sizes, a's displacement ``-P g_a`` (spread by momentum) changes b's
gradient by ``H_b delta``, which moves the final parameters by ``+P H_b P g_a`` (spread again)::

    L_e(pi) ~ linear-response(pi) + sum_{s < t} W(s, t) ( C_e[pi(s), pi(t)] - C_e[pi(s), t] - C_e[s, pi(t)] + C_e[s, t] )
    C_e[a, b] = c_b < P g_a, H_b P grad L_e(theta_T) >           (recorded ``precedence``, one anchor t*)
    W(s, t) = ( sum_{r = s}^{t-1} w_{s,r} ) ( sum_{r = t}^{T-1} w_{t,r} ),   w_{s,r} = eta_r (1 - b1) b1^(r-s) / bc1(r)

(reference batch indices ``t`` stand for ``reference_order[t]``). Approximations, named: the
preconditioner P and the Hessians are those of one anchor t* (the middle of the window); the
cross term is read out with the final eval gradient (no curvature carry after t); the diagonal
second-order terms (a batch with itself) and third-order terms are dropped. Per-order cost
O(T^2 E). The optimum is a quadratic-assignment (linear-ordering) problem: ``assignment_optimum``
enumerates all orders for T <= 8 and otherwise starts from the linear-assignment optimum of the
first-order part and takes best improving transpositions until none improves (swap-local).
"""

from __future__ import annotations

import itertools

import torch

from .base import Estimator, register
from .common import gather_positions, swap_descent, window_lrs
from .simple import AdditiveEstimator, assignment_order


class ResponseCost(AdditiveEstimator):
    """An additive cost ``cost[t, l, e]``: the read-outs ``R_e[t, l]`` of one recorded response
    variant (``currsearch.adjoint.Variant``; e.g. an ablation recorded with
    ``record(..., response_variants=...)``).

    Args:
        variant: the variant's name (its tensor ``<variant>_readout``); default the class's ``VARIANT``.
    """

    VARIANT = "response"
    required_terms = ("response",)

    def __init__(self, device="cpu", variant: str | None = None):
        Estimator.__init__(self, device)
        if variant is not None:
            self.VARIANT = variant

    def _fit(self, store) -> None:
        self.cost = store.get(f"{self.VARIANT}_readout").to(self.device, torch.float64)  # [T, T, E]
        ref_order = store.reference_order.to(self.device)
        self.ref = store.final()["eval_loss"].to(self.device) - gather_positions(self.cost, ref_order[None])[0].sum(0)


@register
class LinearResponse(ResponseCost):
    """Exact first order of the window map around the recorded run (module docstring)."""

    name = "linear-response"
    VARIANT = "response"


@register
class Transported(ResponseCost):
    """Momentum transport along the reference, no curvature (module docstring).

    Args:
        second_moment: also the first-order effect of each batch's squared gradient on the later
            Adam normalizations (default True; False: the momentum transport alone).
    """

    name = "transported"

    def __init__(self, device="cpu", second_moment: bool = True):
        super().__init__(device, "transport_v" if second_moment else "transport")


def transport_weights(eta: torch.Tensor, b1: float, step0: int) -> torch.Tensor:
    """``w[s, r] = eta_r (1 - b1) b1^(r - s) / (1 - b1^(step0 + r + 1))`` for r >= s (0 below):
    float64 ``[T, T]``, the share of a gradient entering the first moment at step s that moves the
    parameters at step r, in units of the preconditioned gradient (Adam with bias correction;
    ``step0`` is the optimizer step count at the window start)."""
    T = eta.shape[0]
    s, r = torch.arange(T)[:, None], torch.arange(T)[None, :]
    bc1 = 1.0 - b1 ** (step0 + torch.arange(T, dtype=torch.float64) + 1)
    w = eta[None, :] * (1.0 - b1) * b1 ** (r - s).clamp(min=0).double() / bc1[None, :]
    return torch.where(r >= s, w, torch.zeros((), dtype=torch.float64))


def precedence_weights(eta: torch.Tensor, b1: float, step0: int) -> torch.Tensor:
    """``W[s, t]`` of the module docstring: float64 ``[T, T]``, zero for s >= t."""
    w = transport_weights(eta, b1, step0)
    T = eta.shape[0]
    cum = torch.cumsum(w, 1)  # cum[s, r] = sum_{r' <= r} w[s, r']
    landed = torch.zeros(T, T, dtype=torch.float64)  # landed[s, t] = sum_{r = s}^{t-1} w[s, r]
    landed[:, 1:] = cum[:, :-1]
    spread = w.sum(1)  # spread[t] = sum_{r >= t} w[t, r]
    return torch.triu(landed * spread[None, :], diagonal=1)


@register
class Precedence(Estimator):
    """``linear-response`` plus the curvature-precedence term (module docstring).

    Args:
        chunk: orders per vectorized block of the O(T^2 E) pairwise sum (memory bound; >= 1).
    """

    name = "precedence"
    required_terms = ("response", "precedence")
    has_optimum = True

    def __init__(self, device="cpu", chunk: int = 512):
        super().__init__(device)
        if chunk < 1:
            raise ValueError(f"chunk (orders per batched call) must be >= 1, got {chunk}")
        self.chunk = chunk

    def _fit(self, store) -> None:
        cfg = store.config()
        first = store.get("response_readout").to(self.device, torch.float64)  # [T, T, E]
        C = store.get("precedence").to(self.device, torch.float64)  # [T(a), T(b), E]
        step0 = int(store.checkpoint(store.anchors[0])["adam_step"])
        W = precedence_weights(window_lrs(store), cfg.optim.beta1, step0).to(self.device)
        ref = store.reference_order.to(self.device)
        # linear parts of the cross term: K1[s, a] = sum_{t>s} W[s,t] C[a, ref_t], K2[t, b] = sum_{s<t} W[s,t] C[ref_s, b]
        k1 = torch.einsum("st,ate->sae", W, C[:, ref])
        k2 = torch.einsum("st,sbe->tbe", W, C[ref])
        self.C, self.W = C, W
        self.cost = first - k1 - k2
        self.base = torch.zeros(len(self.eval_names), dtype=torch.float64, device=self.device)
        self.base = store.final()["eval_loss"].to(self.device) - self._estimate(ref[None])[0]

    def _quadratic(self, orders: torch.Tensor) -> torch.Tensor:
        """``sum_{s<t} W[s, t] C[pi(s), pi(t)]``: float64 ``[n, E]``."""
        cg = self.C[orders[:, :, None], orders[:, None, :]]  # [n, T, T, E]
        return torch.einsum("st,nste->ne", self.W, cg)

    def _estimate(self, orders: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, orders.shape[0], self.chunk):
            o = orders[i : i + self.chunk]
            out.append(self.base + gather_positions(self.cost, o).sum(1) + self._quadratic(o))
        return torch.cat(out)

    def assignment_optimum(self, eval_set: str = "all", max_swaps: int | None = None) -> torch.Tensor:
        """An order minimizing the estimate of ``eval_set``: int64 ``[T]``.

        Exact for T <= 8 (all T! orders scored); otherwise swap-local: from the linear-assignment
        optimum of the first-order part, the best improving transposition of the full estimate
        until none improves (or ``max_swaps``; :func:`~estimators.common.swap_descent`).
        """
        e = self.eval_names.index(eval_set)
        T = self.T
        if T <= 8:
            perms = torch.tensor(list(itertools.permutations(range(T))), dtype=torch.int64, device=self.device)
            return perms[int(torch.argmin(self._estimate(perms)[:, e]))].cpu()
        order = assignment_order(self.cost[:, :, e].cpu().numpy()).to(self.device)
        return swap_descent(lambda o: self._estimate(o)[:, e], order, max_swaps).cpu()
