"""Subsets of partitions: parsing names, normalized mixture weights, labels, enumeration and sampling.

A subset is given as bool ``[n, K]`` membership (uniform average), float ``[n, K]`` mixture
weights (normalized per row), or strings such as ``"bible+python"`` / ``"bible:3+python:1"``
(:func:`parse_subsets`); columns follow the K partition names.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

from ..errors import ConfigError


def parse_subsets(spec, names: Sequence[str]) -> torch.Tensor:
    """Parse subsets given by name into raw (unnormalized) weights.

    ``spec`` is one string or a list of strings; each string is one subset: partition names
    joined by ``+``, each optionally with a weight ``name:w`` (``"bible+python"``,
    ``"bible:3+python:1"``); ``*`` is the full set; a domain name that was split selects all of
    its parts (``"bible"`` = ``bible/0 + bible/1 + ...``).

    Returns:
        float64 ``[n, K]`` non-negative weights (columns in ``names`` order).

    Raises:
        ConfigError: an empty subset, an unknown name (the known ones are listed), a repeated
            partition, a weight that is not a non-negative finite number.
    """
    if isinstance(spec, str):
        spec = [spec]
    names = list(names)
    rows = []
    for s in spec:
        row = torch.zeros(len(names), dtype=torch.float64)
        named: set[int] = set()
        tokens = [t.strip() for t in str(s).split("+") if t.strip()]
        if not tokens:
            raise ConfigError(f"subset {s!r} is empty; name at least one partition of {names}")
        for tok in tokens:
            name, w = tok, 1.0
            if ":" in tok:
                head, _, tail = tok.rpartition(":")
                try:
                    w = float(tail)
                except ValueError:
                    raise ConfigError(f"subset {s!r}: weight {tail!r} of {head!r} is not a number") from None
                name = head.strip()
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"subset {s!r}: weight {w} of {name!r} must be a non-negative finite number")
            if name == "*":
                cols = list(range(len(names)))
            elif name in names:
                cols = [names.index(name)]
            else:
                cols = [k for k, n in enumerate(names) if n.startswith(name + "/")]
                if not cols:
                    raise ConfigError(f"subset {s!r}: unknown partition {name!r}; partitions are {names}")
            for c in cols:
                if c in named:
                    raise ConfigError(f"subset {s!r} names partition {names[c]!r} twice")
                named.add(c)
                row[c] = w
        if not bool((row > 0).any()):
            raise ConfigError(f"subset {s!r} has no partition with a positive weight")
        rows.append(row)
    return torch.stack(rows)


def subset_weights(subsets, names: Sequence[str]) -> torch.Tensor:
    """Validate subsets and return normalized mixture weights.

    Args:
        subsets: bool ``[n, K]`` or ``[K]`` (membership: uniform average), float ``[n, K]``
            (non-negative mixture weights, normalized per row), or names (:func:`parse_subsets`).
        names: the K partition names.

    Returns:
        float64 ``[n, K]``, rows non-negative and summing to 1.

    Raises:
        ConfigError: wrong shape, an empty subset (all-False / all-zero row), a negative or
            non-finite weight, unknown names.
    """
    K = len(names)
    if isinstance(subsets, str) or (isinstance(subsets, (list, tuple)) and subsets and isinstance(subsets[0], str)):
        w = parse_subsets(subsets, names)
    else:
        w = torch.as_tensor(subsets)
        if w.dim() == 1:
            w = w[None]
        if w.dim() != 2 or w.shape[1] != K:
            raise ConfigError(f"subsets must have shape [n, K={K}] (one column per partition {list(names)}), got {tuple(w.shape)}")
        w = w.to(torch.float64)
        if not bool(torch.isfinite(w).all()):
            rows = (~torch.isfinite(w)).any(1).nonzero().flatten().tolist()
            raise ConfigError(f"subset rows {rows[:5]} have non-finite weights")
        if bool((w < 0).any()):
            r, c = (w < 0).nonzero()[0].tolist()
            raise ConfigError(f"subset row {r}: weight {float(w[r, c])} of partition {names[c]!r} is negative; weights must be >= 0")
    empty = (w.sum(1) <= 0).nonzero().flatten().tolist()
    if empty:
        raise ConfigError(f"subset rows {empty[:5]} are empty (no partition selected); every subset needs at least one partition")
    return w / w.sum(1, keepdim=True)


def subset_label(weights, names: Sequence[str]) -> str:
    """``"bible+python"`` for a uniform subset, ``"bible:0.700+python:0.300"`` for a mixture."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    sel = [k for k in range(len(names)) if w[k] > 0]
    vals = w[sel]
    if vals.numel() and float(vals.max() - vals.min()) <= 1e-9:
        return "+".join(names[k] for k in sel)
    return "+".join(f"{names[k]}:{float(w[k]):.3f}" for k in sel)


def all_subsets(K: int) -> torch.Tensor:
    """Every non-empty subset of K partitions: bool ``[2^K - 1, K]``, ordered by size, then
    lexicographically (singletons first, the full set last)."""
    rows = []
    for size in range(1, K + 1):
        for comb in itertools.combinations(range(K), size):
            r = torch.zeros(K, dtype=torch.bool)
            r[list(comb)] = True
            rows.append(r)
    return torch.stack(rows)


def sample_subsets(K: int, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` distinct non-empty subsets of K partitions (seeded): the full set, then subsets
    whose size is uniform in 1..K and members uniform; bool ``[n, K]``.

    Raises:
        ConfigError: ``n`` exceeds ``2^K - 1`` or is < 1.
    """
    if n < 1 or (K < 60 and n > 2**K - 1):
        raise ConfigError(f"cannot sample {n} distinct non-empty subsets of {K} partitions")
    g = torch.Generator().manual_seed(seed)
    seen = {tuple(range(K))}
    rows = [torch.ones(K, dtype=torch.bool)]
    while len(rows) < n:
        size = int(torch.randint(1, K + 1, (1,), generator=g))
        members = tuple(sorted(torch.randperm(K, generator=g)[:size].tolist()))
        if members not in seen:
            seen.add(members)
            r = torch.zeros(K, dtype=torch.bool)
            r[list(members)] = True
            rows.append(r)
    return torch.stack(rows)
