"""Helpers shared by estimators: learning rates, anchor maps, gathers over orders."""

from __future__ import annotations

import torch

from currsearch.adam import lr_at


def window_lrs(store) -> torch.Tensor:
    """Learning rate eta_t of every window step t: float64 ``[T]`` (the Trainer's schedule)."""
    cfg = store.config()
    total = cfg.train.warmup_steps + store.T
    return torch.tensor([lr_at(cfg.train.warmup_steps + t, total, cfg.optim) for t in range(store.T)], dtype=torch.float64)


def anchor_of_step(store) -> torch.Tensor:
    """Index (into ``store.anchors``) of the last anchor at or before each step: int64 ``[T]``."""
    anchors = torch.tensor(store.anchors)
    return torch.searchsorted(anchors, torch.arange(store.T), right=True) - 1


def per_step(x: torch.Tensor, store) -> torch.Tensor:
    """Expand a per-anchor tensor ``[A, ...]`` to per-step ``[T, ...]`` (each step takes its anchor's row)."""
    return x[anchor_of_step(store).to(x.device)]


def gather_positions(x: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """``x[t, orders[i, t]]`` for a per-step, per-batch tensor ``x [T, T, ...]``: ``[n, T, ...]``."""
    T = x.shape[0]
    t_idx = torch.arange(T, device=orders.device).expand_as(orders)
    return x[t_idx, orders]
