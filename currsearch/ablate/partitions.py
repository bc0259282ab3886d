"""Partitions of the window batches and the matched token budget of data ablations.

Definitions (one place, used by every module of :mod:`currsearch.ablate`):

* **Partitions**: by default one per domain of the window batches (``plan.domains``),
  optionally split further into ``split`` contiguous groups of the domain's batch ids
  (names ``domain/0 .. domain/{split-1}``). A partition is a list of window batch ids;
  partitions are disjoint and non-empty.
* **Matched token budget**: every window batch has ``batch_size * seq_len`` tokens, so a token
  budget is a number of steps. Every partition model takes the same number of steps,
  ``n = epochs * max_k |partition_k|`` (the paper's equally sized base units), cycling over its
  batches in ascending id order (smaller partitions wrap around). A real model for a union S
  (and, more generally, a mixture with weights w over S) takes ``N = |S| * n`` steps: partition
  k contributes ``round(w_k N)`` of them (largest remainder; ``w_k = 1/|S|`` gives exactly n,
  the same tokens per partition as its partition model), drawn from the same cyclic partition
  stream, and the partition streams are interleaved evenly (step i of partition k sits at
  fractional position ``(i + 0.5) / c_k``), i.e. a well-mixed union, not blocks. A singleton
  union is therefore exactly its partition model, and the full set of T equally sized
  partitions with ``epochs = 1`` is one pass over the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError

PAPER = "Na et al. 2024, arXiv 2410.15661"


@dataclass(frozen=True)
class Partition:
    """A named, non-empty set of window batch ids (ascending).

    Attributes:
        name: e.g. ``"bible"`` or ``"bible/1"`` (after a split).
        batches: window batch ids (indices into ``plan.batches``), ascending, no repeats.
    """

    name: str
    batches: tuple[int, ...]

    def to_dict(self) -> dict:
        """``{"name": str, "batches": [int, ...]}`` (the form stored in the models manifest)."""
        return {"name": self.name, "batches": list(self.batches)}


def default_partitions(domains: Sequence[str], split: int = 1) -> list[Partition]:
    """One partition per domain of the window batches, optionally split further.

    Args:
        domains: domain name of each window batch (``plan.domains``), length T.
        split: groups per domain (>= 1); the domain's batch ids (ascending) are cut into
            ``split`` contiguous groups of near-equal size, named ``domain/0 .. domain/{split-1}``.

    Returns:
        Partitions sorted by name (``domain/i`` sorted by i).

    Raises:
        ConfigError: ``split < 1`` or a domain with fewer than ``split`` batches.
    """
    if split < 1:
        raise ConfigError(f"split must be >= 1, got {split}")
    by: dict[str, list[int]] = {}
    for l, d in enumerate(domains):
        by.setdefault(d, []).append(l)
    out = []
    for d in sorted(by):
        ids = by[d]
        if split == 1:
            out.append(Partition(d, tuple(ids)))
            continue
        if len(ids) < split:
            raise ConfigError(
                f"domain {d!r} has {len(ids)} window batches, fewer than split = {split}; lower --split or raise data.num_batches"
            )
        for i, part in enumerate(np.array_split(np.array(ids), split)):
            out.append(Partition(f"{d}/{i}", tuple(int(x) for x in part)))
    return out


def check_partitions(partitions, T: int) -> list[Partition]:
    """Validate partitions given as :class:`Partition` objects or ``{name: [batch ids]}``.

    Raises:
        ConfigError: fewer than two partitions, an empty partition, a repeated name, an id out
            of ``0..T-1``, a repeated id, or partitions that overlap.
    """
    if isinstance(partitions, dict):
        partitions = [Partition(str(n), tuple(int(x) for x in ids)) for n, ids in partitions.items()]
    parts = [p if isinstance(p, Partition) else Partition(str(p[0]), tuple(int(x) for x in p[1])) for p in partitions]
    if len(parts) < 2:
        names = [p.name for p in parts]
        raise ConfigError(
            f"a data ablation needs at least 2 partitions, got {len(parts)} {names}; split the domains further "
            "(--split K) or use data.batching = 'domain'"
        )
    seen_names, owner = set(), {}
    out = []
    for p in parts:
        if p.name in seen_names:
            raise ConfigError(f"partition name {p.name!r} is repeated")
        seen_names.add(p.name)
        if not p.batches:
            raise ConfigError(f"partition {p.name!r} is empty; every partition needs at least one window batch")
        bad = [l for l in p.batches if not 0 <= l < T]
        if bad:
            raise ConfigError(f"partition {p.name!r} has batch ids {bad} outside 0..{T - 1}")
        if len(set(p.batches)) != len(p.batches):
            raise ConfigError(f"partition {p.name!r} repeats a batch id")
        for l in p.batches:
            if l in owner:
                raise ConfigError(f"batch {l} is in partitions {owner[l]!r} and {p.name!r}; partitions must be disjoint")
            owner[l] = p.name
        out.append(Partition(p.name, tuple(sorted(p.batches))))
    return out


def steps_per_partition(partitions: Sequence[Partition], epochs: int = 1) -> int:
    """n: steps (= batches of ``batch_size * seq_len`` tokens) of every partition model,
    ``epochs * max_k |partition_k|``; every partition model gets the same token budget."""
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    return epochs * max(len(p.batches) for p in partitions)


def partition_stream(p: Partition, steps: int) -> list[int]:
    """The first ``steps`` batch ids of partition ``p``'s fixed stream: its ids in ascending
    order, repeated (a partition smaller than the budget wraps around)."""
    return [p.batches[i % len(p.batches)] for i in range(steps)]


def union_counts(weights: torch.Tensor, n: int) -> list[int]:
    """Steps per partition of a real union/mixture model (see module docstring).

    Args:
        weights: float ``[K]``, non-negative, summing to 1 (normalized subset weights).
        n: steps per partition model.

    Returns:
        K ints: largest-remainder rounding of ``w_k * N`` with ``N = |support(w)| * n``; they
        sum to N, and uniform weights over S give exactly n for each k in S.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    size = int((w > 0).sum())
    N = size * n
    raw = w * N
    base = torch.floor(raw + 1e-9).long()
    rest = N - int(base.sum())
    if rest > 0:
        frac = (raw - base.double()).tolist()
        order = sorted(range(len(frac)), key=lambda k: (-frac[k], k))
        for k in order[:rest]:
            base[k] += 1
    return base.tolist()


def union_stream(partitions: Sequence[Partition], weights: torch.Tensor, n: int) -> list[int]:
    """The batch ids, in training order, of the real model for a subset/mixture.

    Partition k contributes the first ``c_k`` ids of its :func:`partition_stream`
    (``c = union_counts(weights, n)``); the streams are interleaved evenly: step i of
    partition k has key ``(i + 0.5) / c_k`` and the ids are sorted by ``(key, k)``.
    """
    counts = union_counts(weights, n)
    items = []
    for k, (p, c) in enumerate(zip(partitions, counts)):
        for i, l in enumerate(partition_stream(p, c)):
            items.append(((i + 0.5) / c, k, l))
    items.sort(key=lambda x: (x[0], x[1]))
    return [l for _, _, l in items]
