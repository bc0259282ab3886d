"""Named heuristic curricula: starting points to enqueue in a study and baselines for
verification.

:func:`heuristic_orders` returns int64 ``[T]`` orders; :func:`heuristic_params` turns them
(and a space's own defaults) into parameter sets of one space for ``study.enqueue_trial``.
"""

from __future__ import annotations

from typing import Any

import torch

from currsearch.errors import OrderError

from .base import BatchInfo, SearchSpace
from .block import BlockSpace
from .interleave import InterleaveSpace
from .lfr import lfr_baseline


def heuristic_orders(info: BatchInfo) -> dict[str, torch.Tensor]:
    """Named heuristic orders, each an int64 ``[T]`` permutation of ``0..T-1``.

    * ``reference``: ``0..T-1`` (the plan's shuffled batch order).
    * ``easy_to_hard`` / ``hard_to_easy``: sorted by difficulty (ties by batch index).
    * ``domain_blocks``: all batches of each domain together, domains in sorted-name order,
      reference order inside (block space, ``by="domain"``, identity block order).
    * ``uniform_interleave``: interleave space with equal domain weights.
    * ``lfr``: :func:`search_spaces.lfr.lfr_baseline`.
    """
    T = info.T
    blocks = BlockSpace(info, by="domain")
    inter = InterleaveSpace(info)
    return {
        "reference": torch.arange(T, dtype=torch.int64),
        "easy_to_hard": info.by_difficulty(),
        "hard_to_easy": info.by_difficulty(descending=True),
        "domain_blocks": blocks.decode([0] * (blocks.B - 1), "reference"),
        "uniform_interleave": inter.decode([1.0] * len(inter.names)),
        "lfr": lfr_baseline(info),
    }


def heuristic_params(space: SearchSpace, orders: dict[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Parameter sets of ``space`` to enqueue: its :meth:`~SearchSpace.default_params`,
    then the encodings of the heuristic orders it can represent (``orders`` defaults to
    :func:`heuristic_orders`), without duplicates."""
    orders = heuristic_orders(space.info) if orders is None else orders
    out: list[dict[str, Any]] = []
    for p in space.default_params():
        if p not in out:
            out.append(p)
    for order in orders.values():
        try:
            p = space.encode(order)
        except OrderError:
            continue
        if p not in out:
            out.append(p)
    return out
