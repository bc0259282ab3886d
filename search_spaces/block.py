"""Block permutations: order whole groups of batches, then order batches inside each group.

For large T a full permutation is too big a space; the ``block`` space instead orders B
blocks (B small) and applies one within-block rule to all blocks.

Blocks (option ``by``):

* ``"domain"`` (default): one block per domain, canonical block order = sorted domain
  names (``BatchInfo.domain_names``).
* ``"difficulty"``: ``n_buckets`` buckets of the easy-to-hard list of batches
  (``BatchInfo.by_difficulty()``; bucket j holds ranks ``j*T//n .. (j+1)*T//n - 1``);
  canonical block order = easiest bucket first. ``n_buckets`` is capped at T.

Parameters:

* ``block_i = suggest_int("block_i", 0, B-1-i)`` for i in ``0..B-2``: the block order as a
  Lehmer code over the canonical block order (Optuna FAQ); all zeros = canonical order.
* ``within = suggest_categorical("within", ["reference", "easy_to_hard", "hard_to_easy",
  "shuffle"])``: inside every block, ascending batch index (the reference order),
  ascending difficulty, descending difficulty (ties by batch index), or a seeded shuffle.
* ``within_seed = suggest_int("within_seed", 0, n_seeds-1)``, asked only for ``"shuffle"``:
  ``g = torch.Generator().manual_seed(within_seed)``, then for each block in *canonical*
  order ``members[torch.randperm(len(members), generator=g)]`` (members in ascending
  batch index), so the within-block arrangement does not depend on the block order.

``encode`` accepts orders whose blocks are contiguous and whose within-block order is one
of the deterministic rules, or a shuffle reproduced by some seed in ``0..n_seeds-1``
(found by trying them all).
"""

from __future__ import annotations

from typing import Any

import torch

from currsearch.errors import ConfigError, OrderError

from .base import SearchSpace, lehmer_decode, lehmer_encode, register_space

WITHIN = ["reference", "easy_to_hard", "hard_to_easy", "shuffle"]


@register_space
class BlockSpace(SearchSpace):
    """Permutation of domain blocks or difficulty buckets, with a within-block rule.

    Options:
        by: ``"domain"`` or ``"difficulty"``.
        n_buckets: number of difficulty buckets (``by="difficulty"``), >= 1.
        n_seeds: number of shuffle seeds (``within_seed`` in ``0..n_seeds-1``), >= 1.
    """

    name = "block"
    default_options = {"by": "domain", "n_buckets": 4, "n_seeds": 1000}

    def __init__(self, info, **options) -> None:
        super().__init__(info, **options)
        by, nb, ns = self.options["by"], self.options["n_buckets"], self.options["n_seeds"]
        if by not in ("domain", "difficulty"):
            raise ConfigError(f"block space: by must be 'domain' or 'difficulty', got {by!r}")
        if not isinstance(ns, int) or ns < 1:
            raise ConfigError(f"block space: n_seeds must be an integer >= 1, got {ns!r}")
        T = self.T
        if by == "domain":
            dom = info.domain_index()
            self.block_names = info.domain_names
            # blocks[j]: int64 members of block j in ascending batch index
            self.blocks = [(dom == j).nonzero().flatten() for j in range(len(self.block_names))]
        else:
            if not isinstance(nb, int) or nb < 1:
                raise ConfigError(f"block space: n_buckets must be an integer >= 1, got {nb!r}")
            nb = min(nb, T)
            ranked = info.by_difficulty()
            self.block_names = [f"bucket{j}" for j in range(nb)]
            self.blocks = [ranked[j * T // nb : (j + 1) * T // nb].sort().values for j in range(nb)]
        self.B = len(self.blocks)
        self.block_of = torch.empty(T, dtype=torch.int64)
        for j, m in enumerate(self.blocks):
            self.block_of[m] = j
        # deterministic within-block arrangements: rule -> list of member tensors per block
        diff = info.difficulty
        self._within = {
            "reference": self.blocks,
            "easy_to_hard": [m[torch.sort(diff[m], stable=True).indices] for m in self.blocks],
            "hard_to_easy": [m[torch.sort(-diff[m], stable=True).indices] for m in self.blocks],
        }

    def _shuffled(self, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(int(seed))
        return [m[torch.randperm(len(m), generator=g)] for m in self.blocks]

    def decode(self, block_code: list[int], within: str, within_seed: int | None = None) -> torch.Tensor:
        """Order (int64 ``[T]``) from a block Lehmer code, a within rule and a seed."""
        arrangement = self._shuffled(within_seed) if within == "shuffle" else self._within[within]
        perm = lehmer_decode(block_code, self.B)
        return torch.cat([arrangement[j] for j in perm])

    def suggest(self, trial) -> torch.Tensor:
        code = [trial.suggest_int(f"block_{i}", 0, self.B - 1 - i) for i in range(self.B - 1)]
        within = trial.suggest_categorical("within", WITHIN)
        seed = trial.suggest_int("within_seed", 0, self.options["n_seeds"] - 1) if within == "shuffle" else None
        return self._finish(self.decode(code, within, seed))

    def _encode(self, order: torch.Tensor) -> dict[str, Any]:
        by = self.options["by"]
        blk = self.block_of[order].tolist()
        runs: list[int] = []
        for b in blk:
            if not runs or runs[-1] != b:
                if b in runs:
                    raise OrderError(
                        f"order is not representable in the block space (by={by!r}): the batches of block "
                        f"{self.block_names[b]!r} are not contiguous"
                    )
                runs.append(b)
        code = lehmer_encode(runs)
        params: dict[str, Any] = {f"block_{i}": int(c) for i, c in enumerate(code[:-1])}
        # observed within-block arrangement, in canonical block order
        start, seen = 0, {}
        for b in runs:
            n = len(self.blocks[b])
            seen[b] = order[start : start + n]
            start += n
        for rule in WITHIN[:-1]:
            if all(torch.equal(seen[j], self._within[rule][j]) for j in range(self.B)):
                return {**params, "within": rule}
        for seed in range(self.options["n_seeds"]):
            g = torch.Generator().manual_seed(seed)
            ok = True
            for j, m in enumerate(self.blocks):
                if not torch.equal(m[torch.randperm(len(m), generator=g)], seen[j]):
                    ok = False
                    break
            if ok:
                return {**params, "within": "shuffle", "within_seed": seed}
        raise OrderError(
            f"order is not representable in the block space (by={by!r}): blocks are contiguous but the order "
            f"inside them is not reference, easy_to_hard, hard_to_easy, nor a shuffle from a seed in "
            f"0..{self.options['n_seeds'] - 1}"
        )

    def default_params(self) -> list[dict[str, Any]]:
        zero = {f"block_{i}": 0 for i in range(self.B - 1)}
        return [{**zero, "within": w} for w in WITHIN[:-1]]
