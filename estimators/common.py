"""Helpers shared by estimators: learning rates, anchor maps, gathers over orders, swap descent."""

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


def swap_descent(score, order: torch.Tensor, max_swaps: int | None = None, chunk: int = 4096) -> torch.Tensor:
    """A swap-local minimum of ``score`` from ``order``: int64 ``[T]``.

    Applies the best improving transposition (all T (T - 1) / 2 scored, ``chunk`` orders per
    call) until none improves (the score strictly decreases, so this terminates) or
    ``max_swaps`` swaps were made.

    Args:
        score: ``orders int64 [n, T] -> float [n]`` (lower is better).
        order: int64 ``[T]`` start.
    """
    T = order.shape[0]
    iu = torch.triu_indices(T, T, 1)
    best, swaps = float(score(order[None])[0]), 0
    while max_swaps is None or swaps < max_swaps:
        vals = []
        for c in torch.split(torch.arange(iu.shape[1]), chunk):
            cand = order.expand(len(c), -1).clone()
            r = torch.arange(len(c))
            cand[r, iu[0, c]], cand[r, iu[1, c]] = order[iu[1, c]], order[iu[0, c]]
            vals.append(score(cand).cpu())
        vals = torch.cat(vals)
        i = int(vals.argmin())
        if float(vals[i]) >= best:
            break
        a, b = iu[0, i], iu[1, i]
        order = order.clone()
        order[a], order[b] = order[b].clone(), order[a].clone()
        best, swaps = float(vals[i]), swaps + 1
    return order
