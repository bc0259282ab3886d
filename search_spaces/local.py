"""Trust-region space: orders within a few transpositions of a center order.

Trajectory-based estimators are accurate only near the recorded run (docs/estimators.md:
``fut1-hvp`` keeps its ranking within about 2% of the maximal Kendall distance). This space
searches exactly that neighbourhood: ``moves`` transpositions applied, in turn, to the
``center`` order (by default ``0..T-1``, the plan's reference)::

    swap_k_a = trial.suggest_int("swap_k_a", 0, T-1)   # positions exchanged by move k
    swap_k_b = trial.suggest_int("swap_k_b", 0, T-1)   # a == b: the move does nothing

so every order at transposition distance <= ``moves`` from the center (the Cayley distance,
``T`` minus the number of cycles of ``center^-1 o order``) can be produced, and nothing
farther. ``encode`` writes a minimal sequence of transpositions (cycle decomposition), padded
with no-op moves ``(0, 0)``. Used by the trust-region rounds of :mod:`currsearch.trust_region`.
"""

from __future__ import annotations

from typing import Any

import torch

from currsearch.errors import ConfigError, OrderError
from currsearch.orders import validate_orders

from .base import SearchSpace, register_space


def transpositions_between(center: torch.Tensor, order: torch.Tensor) -> list[tuple[int, int]]:
    """A minimal list of position swaps turning ``center`` into ``order`` (both int64 ``[T]``
    permutations of the same T batches; validate them first, e.g. with ``validate_orders``).

    Its length is the Cayley distance (``T`` minus the number of cycles of the position
    permutation); applying the swaps in turn to ``center`` gives ``order``.
    """
    cur = center.tolist()
    target = order.tolist()
    where = {b: i for i, b in enumerate(cur)}
    swaps = []
    for i, b in enumerate(target):
        if cur[i] != b:
            j = where[b]
            swaps.append((i, j))
            where[cur[i]], where[b] = j, i
            cur[i], cur[j] = cur[j], cur[i]
    return swaps


@register_space
class LocalSpace(SearchSpace):
    """Orders within ``moves`` transpositions of ``center`` (see module docstring).

    Options:
        center: the center order (list of T ints; default: ``info.reference_order``, the order
            the store was recorded along, else ``0..T-1``).
        moves: maximal number of transpositions, the trust-region radius (default 4).
    """

    name = "local"
    default_options = {"center": None, "moves": 4}

    def __init__(self, info, **options) -> None:
        super().__init__(info, **options)
        c = self.options["center"]
        try:
            if c is None:
                c = torch.arange(self.T) if info.reference_order is None else info.reference_order
            self.center = validate_orders(torch.as_tensor(c), self.T).view(-1)
        except OrderError as err:
            raise ConfigError(f"search space 'local': option center is not an order of the {self.T} batches: {err}") from None
        m = self.options["moves"]
        if not isinstance(m, int) or m < 1:
            raise ConfigError(f"search space 'local': moves must be an integer >= 1, got {m!r}")
        self.moves = m

    def suggest(self, trial) -> torch.Tensor:
        """Apply the trial's ``moves`` swaps (``swap_k_a``, ``swap_k_b``) to the center: int64 ``[T]``."""
        order = self.center.clone()
        for k in range(self.moves):
            a = trial.suggest_int(f"swap_{k}_a", 0, self.T - 1)
            b = trial.suggest_int(f"swap_{k}_b", 0, self.T - 1)
            order[[a, b]] = order[[b, a]]
        return self._finish(order)

    def _encode(self, order: torch.Tensor) -> dict[str, Any]:
        swaps = transpositions_between(self.center, order)
        if len(swaps) > self.moves:
            raise OrderError(
                f"order is {len(swaps)} transpositions from the center, more than this space's moves={self.moves}"
            )
        swaps += [(0, 0)] * (self.moves - len(swaps))
        return {f"swap_{k}_{s}": int(v) for k, ab in enumerate(swaps) for s, v in zip("ab", ab)}

    def default_params(self) -> list[dict[str, Any]]:
        """The center itself (all moves no-ops)."""
        return [self._encode(self.center)]
