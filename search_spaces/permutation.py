"""Full-permutation spaces for small T: Lehmer code and random keys.

Both encode every permutation of ``0..T-1``; they differ in how a sampler sees them.

* ``lehmer``: the Lehmer code, as in the Optuna FAQ ("How can I deal with permutation as a
  parameter?"): ``lehmer_i = trial.suggest_int("lehmer_i", 0, T-1-i)`` for i in
  ``0..T-2`` picks, at step i, the batch of rank ``lehmer_i`` among those not yet used
  (the last step has one choice left and no parameter).
* ``random_keys``: one float ``key_b = trial.suggest_float("key_b", 0, 1)`` per batch b;
  the order is the stable ascending argsort of the keys (batch b runs earlier when its
  key is smaller; equal keys keep batch index order). ``encode`` sets
  ``key_b = (position of b + 0.5) / T``.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import SearchSpace, lehmer_decode, lehmer_encode, register_space


@register_space
class LehmerSpace(SearchSpace):
    """Every permutation, as a Lehmer code of T-1 integer parameters ``lehmer_i``."""

    name = "lehmer"

    def suggest(self, trial) -> torch.Tensor:
        T = self.T
        code = [trial.suggest_int(f"lehmer_{i}", 0, T - 1 - i) for i in range(T - 1)]
        return self._finish(lehmer_decode(code, T))

    def _encode(self, order: torch.Tensor) -> dict[str, Any]:
        code = lehmer_encode(order.tolist())
        return {f"lehmer_{i}": int(c) for i, c in enumerate(code[:-1])}


@register_space
class RandomKeysSpace(SearchSpace):
    """Every permutation, as T float keys ``key_b`` in [0, 1]; order = stable argsort."""

    name = "random_keys"

    def suggest(self, trial) -> torch.Tensor:
        keys = torch.tensor([trial.suggest_float(f"key_{b}", 0.0, 1.0) for b in range(self.T)], dtype=torch.float64)
        return self._finish(torch.sort(keys, stable=True).indices)

    def _encode(self, order: torch.Tensor) -> dict[str, Any]:
        T = self.T
        pos = torch.empty(T, dtype=torch.int64)
        pos[order] = torch.arange(T)
        return {f"key_{b}": (int(pos[b]) + 0.5) / T for b in range(T)}
