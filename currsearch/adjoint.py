"""Linear response of the final eval losses to the batch taken at each step: the adjoint of the
AdamW window map along a recorded run, and the curvature-precedence matrix.

Step t of the window maps the state ``s_t = (theta_t, m_t, v_t)`` with batch B to
``s_{t+1} = F_t(s_t, B)`` (``currsearch.adam``; k the step count, bc1 = 1 - b1^k, bc2 = 1 - b2^k)::

    g = c_t grad L(theta_t; B)            (c_t: the global-norm clipping factor, held fixed)
    m' = b1 m + (1 - b1) g,   v' = b2 v + (1 - b2) g^2
    theta' = theta - eta_t ( (m'/bc1) / (sqrt(v'/bc2) + eps) + wd mask theta )

Along the recorded run the adjoint ``lambda_t = d L_e(theta_T) / d s_t`` (one per eval set e)
starts at ``lambda_T = (grad L_e(theta_T), 0, 0)`` and goes backward (reverse mode of F_t; the
Hessian-vector product is forward-over-reverse, ``torch.func.jvp`` of the gradient, since
reverse-over-reverse through eager attention gave NaN)::

    w = sqrt(v'/bc2) + eps
    a = d theta'/d m' = -eta_t / (bc1 w)
    b = d theta'/d v' = eta_t (m'/bc1) / (w^2 2 sqrt(v'/bc2) bc2)            (0 where v' = 0)
    mu_m = lambda'_m + a lambda'_theta,   mu_v = lambda'_v + b lambda'_theta
    lambda_theta = (1 - eta_t wd mask) lambda'_theta + c_t H(theta_t; B_t) [(1 - b1) mu_m + 2 (1 - b2) g mu_v]
    lambda_m = b1 mu_m,   lambda_v = b2 mu_v

Putting batch B_l instead of the recorded B_t at step t changes ``s_{t+1}`` by
``(-eta_t (Gamma_{t,l} - Gamma_{t,t}), (1 - b1)(g_l - g_t), (1 - b2)(g_l^2 - g_t^2))``, so to first
order in these changes (the linear response; arXiv 2505.22042 Eq. 5 summed along the window
in closed form instead of one rollout per order)::

    L_e(pi) ~ L_e(theta_T) + sum_t ( R_e[t, pi(t)] - R_e[t, t] )
    R_e[t, l] = -eta_t <lambda_theta,{t+1}, Gamma_{t,l}> + (1 - b1) <lambda_m,{t+1}, g_{t,l}>
                + (1 - b2) <lambda_v,{t+1}, g_{t,l}^2>

``Variant`` switches terms off, which gives the other zeroth- and first-order estimators as
special cases: no curvature, no momentum and no second moment is ``additive``; momentum alone is
the momentum transport of ``transported`` (a batch's gradient carried through the momentum tail
along the reference: ``sum_{s >= t} eta_s (1 - b1) b1^(s-t) / bc1(s) / (sqrt(vhat_s) + eps)``).

The precedence matrix (second order in the learning rate, for ``precedence``) at one anchor
t*: with the reference Adam preconditioner ``P = 1 / (sqrt(vhat_{t*}) + eps)`` and
``u_e = grad L_e(theta_T)``::

    C_e[a, b] = c_b < P g(theta_{t*}, B_a), H(theta_{t*}; B_b) P u_e >

the first-order effect on L_e of the gradient change of batch b caused by an earlier batch a's
displacement (one HVP per batch b and eval set).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adam import AdamState
from .config import OptimConfig


@dataclass(frozen=True)
class Variant:
    """Which terms of the linearized step the adjoint keeps.

    Attributes:
        name: tensor-name stem of its read-outs.
        curvature: the Hessian-vector product term (costs one HVP per eval set and step).
        momentum: the adjoint of the first moment m (momentum transport).
        second_moment: the adjoint of the second moment v (order-dependent normalization).
    """

    name: str
    curvature: bool = True
    momentum: bool = True
    second_moment: bool = True


#: read-outs the ``response`` term records (``currsearch.record``). ``linear-response`` reads
#: ``response``: curvature and momentum, with the second moment held at the reference, since its
#: linearization was measured to hurt (docs/estimators.md: at lr 1e-5 it is 4-6x off, and with a
#: fresh Adam state, whose bias correction makes d theta'/d v' about 1/(1 - b2) = 1000x larger at the
#: first steps, the read-outs blow up: AbsDiff 3.5 nats/token). The full linearization,
#: ``FULL_RESPONSE``, is recorded on request (``record(..., response_variants=...)``).
RECORDED_VARIANTS = (
    Variant("response", second_moment=False),                               # linear-response
    Variant("transport", curvature=False, second_moment=False),             # transported, momentum only
    Variant("transport_v", curvature=False),                                # transported (+ second moment)
)
#: every term of the linearized step (gradient through the HVP, Adam's m and v)
FULL_RESPONSE = Variant("response_v")


@dataclass
class AdjointState:
    """Adjoint of the state after a step, one row per eval set: float ``[E, P]`` each.

    Attributes:
        theta, m, v: d L_e(theta_T) / d (theta, m, v).
    """

    theta: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor

    @classmethod
    def final(cls, eval_grads: torch.Tensor) -> "AdjointState":
        """lambda_T: ``(grad L_e(theta_T), 0, 0)`` from the final eval gradients ``[E, P]``."""
        z = torch.zeros_like(eval_grads)
        return cls(eval_grads.clone(), z, z.clone())

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}theta": self.theta, f"{prefix}m": self.m, f"{prefix}v": self.v}

    @classmethod
    def from_tensors(cls, d: dict, prefix: str) -> "AdjointState":
        return cls(d[f"{prefix}theta"], d[f"{prefix}m"], d[f"{prefix}v"])


def _step_factors(g: torch.Tensor, adam: AdamState, lr: float, cfg: OptimConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` = (d theta'/d m', d theta'/d v') of the step with clipped gradient ``g`` [P]."""
    b1, b2, k = cfg.beta1, cfg.beta2, adam.step + 1
    bc1, bc2 = 1.0 - b1**k, 1.0 - b2**k
    m = b1 * adam.m + (1.0 - b1) * g
    v = b2 * adam.v + (1.0 - b2) * g * g
    sv = (v / bc2).sqrt()
    w = sv + cfg.eps
    a = -lr / (bc1 * w)
    b = torch.nan_to_num(lr * (m / bc1) / (w * w * 2.0 * sv * bc2), nan=0.0, posinf=0.0, neginf=0.0)
    return a, b


def readouts(lam: AdjointState, variant: Variant, updates: torch.Tensor, grads: torch.Tensor, lr: float,
             cfg: OptimConfig) -> torch.Tensor:
    """``R_e[t, l]`` for every batch l at one step (module docstring): float64 ``[T, E]``.

    Args:
        lam: the adjoint after the step, lambda_{t+1} (rows ``[E, P]``).
        updates: Gamma(theta_t, B_l) for every batch, float ``[T, P]`` (reference moments).
        grads: clipped g(theta_t, B_l), float ``[T, P]``.
        lr: eta_t.
    """
    r = -lr * (updates @ lam.theta.T).double()
    if variant.momentum:
        r = r + (1.0 - cfg.beta1) * (grads @ lam.m.T).double()
    if variant.second_moment:
        r = r + (1.0 - cfg.beta2) * ((grads * grads) @ lam.v.T).double()
    return r


def adjoint_step(lams: list[AdjointState], variants, hvp, g: torch.Tensor, adam: AdamState, lr: float,
                 decay_mask: torch.Tensor, cfg: OptimConfig) -> list[AdjointState]:
    """lambda_t from lambda_{t+1} for each variant, through the recorded step t (module docstring).

    Args:
        lams: lambda_{t+1} per variant.
        variants: the :class:`Variant` of each.
        hvp: ``y [D, P] -> (c_t, c_t H(theta_t; B_t) y [D, P])``: clipped Hessian-vector products of
            the recorded batch at theta_t (c_t its clipping factor).
        g: the clipped gradient g(theta_t, B_t), float ``[P]``.
        adam: the reference Adam state before step t.
        lr: eta_t; ``decay_mask`` [P] and ``cfg`` as in :func:`currsearch.adam.adam_direction`.

    Returns:
        lambda_t per variant (new tensors).
    """
    a, b = _step_factors(g, adam, lr, cfg)
    keep = 1.0 - lr * cfg.weight_decay * decay_mask
    mus, tangents = [], []
    for lam, var in zip(lams, variants):
        mu_m = (lam.m if var.momentum else 0.0) + a * lam.theta
        mu_v = lam.v + b * lam.theta if var.second_moment else torch.zeros_like(lam.theta)
        mus.append((mu_m, mu_v))
        if var.curvature:
            tangents.append((1.0 - cfg.beta1) * mu_m + 2.0 * (1.0 - cfg.beta2) * g * mu_v)
    hy = hvp(torch.cat(tangents)) if tangents else None
    out, i = [], 0
    for lam, var, (mu_m, mu_v) in zip(lams, variants, mus):
        theta = keep * lam.theta
        if var.curvature:
            n = lam.theta.shape[0]
            theta = theta + hy[i : i + n]
            i += n
        m = cfg.beta1 * mu_m if var.momentum else torch.zeros_like(mu_m)
        out.append(AdjointState(theta, m, cfg.beta2 * mu_v))
    return out


def clipped_hvp(loss, theta: torch.Tensor, batch: torch.Tensor, clip: float | None):
    """``y [D, P] -> c H(theta; batch) y`` (float ``[D, P]``), c the clipping factor of the batch's
    gradient at ``theta`` (held fixed, as ``fut1-hvp``). One forward-over-reverse ``torch.func.jvp``
    of ``torch.func.grad(loss)``, vmapped over the D tangents (the primal is computed once).

    Args:
        loss: ``(theta [P], input_ids [b, S]) -> scalar`` (``FlatModel.loss``).
        clip: ``optim.grad_clip`` (None: no clipping).
    """
    def one(y):
        return torch.func.jvp(lambda th: torch.func.grad(loss)(th, batch), (theta,), (y,))

    def apply(ys: torch.Tensor) -> torch.Tensor:
        g, hy = torch.func.vmap(one)(ys)
        if clip is None:
            return hy
        c = torch.clamp(clip / (torch.linalg.vector_norm(g[0]) + 1e-6), max=1.0)
        return c * hy

    return apply


def precedence_matrix(loss, theta: torch.Tensor, adam: AdamState, batches: torch.Tensor, grads: torch.Tensor,
                      eval_grads_final: torch.Tensor, cfg: OptimConfig) -> torch.Tensor:
    """``C_e[a, b]`` at one anchor (module docstring): float64 ``[T, T, E]`` (a, b, e).

    Args:
        loss: ``FlatModel.loss``.
        theta: theta_{t*} [P]; ``adam``: the reference state before step t* (step >= 1).
        batches: int64 ``[T, batch_size, seq_len]`` (plan order); ``grads``: clipped
            g(theta_{t*}, B_a), float ``[T, P]``.
        eval_grads_final: grad L_e(theta_T), float ``[E, P]``.

    Raises:
        ValueError: the Adam state has no step yet (its second moment defines no preconditioner).
    """
    if adam.step < 1:
        raise ValueError("precedence_matrix needs an anchor with at least one Adam step before it (vhat > 0)")
    vhat = adam.v / (1.0 - cfg.beta2**adam.step)
    precond = 1.0 / (vhat.sqrt() + cfg.eps)
    pu = eval_grads_final * precond  # [E, P]
    pg = grads * precond  # [T, P]
    cols = []
    for b in range(batches.shape[0]):
        h = clipped_hvp(loss, theta, batches[b].to(theta.device), cfg.grad_clip)(pu)  # [E, P]
        cols.append((pg @ h.T).double())  # [T(a), E]
    return torch.stack(cols, 1)
