"""Functional AdamW on flat parameter vectors: the one Adam implementation of currsearch.

The Trainer, the recorder and every estimator use these functions, so the update that an
estimator expands is bit-for-bit the update that training takes.

Math (Kingma & Ba 2015, Alg. 1; decoupled weight decay of Loshchilov & Hutter 2019;
notation of arXiv 2505.22042 Sec. 3)::

    g_t   = clip(grad L(theta_t; B_t))
    m_t   = b1 m_{t-1} + (1 - b1) g_t                      (first moment)
    v_t   = b2 v_{t-1} + (1 - b2) g_t^2                    (second moment)
    Gamma = (m_t / (1 - b1^k)) / (sqrt(v_t / (1 - b2^k)) + eps) + wd * mask * theta_t
    theta_{t+1} = theta_t - eta_t * Gamma

with k the optimizer step count (1-based). ``mask`` is 1 for weight matrices (embeddings included)
and 0 for biases and LayerNorm parameters (the usual exclusion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import OptimConfig


@dataclass
class AdamState:
    """Adam moments of a flat parameter vector.

    Attributes:
        m: first moment, float tensor ``[P]`` (same dtype/device as the parameters).
        v: second moment, float tensor ``[P]``.
        step: number of optimizer steps already taken (0 for a fresh state).
    """

    m: torch.Tensor
    v: torch.Tensor
    step: int

    @classmethod
    def fresh(cls, like: torch.Tensor) -> "AdamState":
        """A zero state for parameters shaped like ``like`` (``[P]``)."""
        return cls(torch.zeros_like(like), torch.zeros_like(like), 0)

    def clone(self) -> "AdamState":
        return AdamState(self.m.clone(), self.v.clone(), self.step)

    def to(self, device: torch.device | str) -> "AdamState":
        return AdamState(self.m.to(device), self.v.to(device), self.step)


def clip_grad(grad: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """Scale ``grad`` ([P]) to global L2 norm at most ``max_norm`` (as torch.nn.utils.clip_grad_norm_)."""
    if max_norm is None:
        return grad
    norm = torch.linalg.vector_norm(grad)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return grad * coef


def adam_direction(
    grad: torch.Tensor, state: AdamState, theta: torch.Tensor, decay_mask: torch.Tensor, cfg: OptimConfig
) -> tuple[torch.Tensor, AdamState]:
    """The AdamW update direction Gamma for one (already clipped) gradient.

    Args:
        grad: clipped gradient ``[P]`` or ``[n, P]`` (a batch of gradients against one state).
        state: moments *before* this step (``m``, ``v`` broadcastable to ``grad``).
        theta: parameters ``[P]`` or ``[n, P]`` the weight-decay term is taken at.
        decay_mask: ``[P]``, 1.0 where weight decay applies, 0.0 elsewhere.
        cfg: the optimizer config (betas, eps, weight decay).

    Returns:
        ``(Gamma, new_state)``: Gamma has the shape of ``grad``; ``theta - lr * Gamma`` is
        the next iterate. ``new_state`` holds the updated moments and ``step + 1``.
    """
    b1, b2 = cfg.beta1, cfg.beta2
    k = state.step + 1
    m = b1 * state.m + (1.0 - b1) * grad
    v = b2 * state.v + (1.0 - b2) * grad * grad
    mhat = m / (1.0 - b1**k)
    vhat = v / (1.0 - b2**k)
    gamma = mhat / (vhat.sqrt() + cfg.eps)
    if cfg.weight_decay:
        gamma = gamma + cfg.weight_decay * decay_mask * theta
    return gamma, AdamState(m, v, k)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate eta at 0-based global step ``step`` of ``total_steps``.

    ``constant``: ``cfg.lr``. ``warmup_cosine``: linear warm-up over the first
    ``warmup_frac * total_steps`` steps, then cosine decay to ``min_lr_ratio * lr``.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    warm = int(round(cfg.warmup_frac * total_steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    span = max(total_steps - warm, 1)
    progress = min((step - warm) / span, 1.0)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))
