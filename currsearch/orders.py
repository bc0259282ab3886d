"""Orders: which batch the optimizer sees at each step of the window.

An order is an int64 tensor ``[T]`` (one epoch: a permutation of ``0..T-1``; position t
holds the index of the batch used at step t) or ``[n, T]`` for n candidate orders. The
reference order is ``0, 1, ..., T-1`` (the plan's batch indices are already shuffled).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import OrderError
from .manifest import atomic_write_bytes


def validate_orders(orders, T: int, allow_repeats: bool = False) -> torch.Tensor:
    """Check and convert orders to an int64 tensor ``[T]`` or ``[n, T]`` (shape kept).

    Args:
        orders: a sequence, array or tensor of batch indices, 1-D or 2-D.
        T: number of batches in the plan.
        allow_repeats: accept sequences with repeated batches (not permutations).

    Raises:
        OrderError: wrong dimensionality or length, a non-integer value, an index outside
            ``0..T-1``, or (without ``allow_repeats``) a repeated or missing batch; the
            message names the row and the offending indices.
    """
    try:
        t = torch.as_tensor(orders)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise OrderError(f"order is not a sequence of integers: {err}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        if t.is_floating_point() and torch.equal(t, t.round()):
            t = t.long()
        else:
            raise OrderError(f"order must hold integer batch indices, got dtype {t.dtype}")
    t = t.long()
    if t.dim() not in (1, 2):
        raise OrderError(f"order must be 1-D [T] or 2-D [n, T], got shape {tuple(t.shape)}")
    if t.shape[-1] != T:
        raise OrderError(f"order has length {t.shape[-1]} but the plan has T = {T} batches; give one index per step")
    rows = t.reshape(-1, T)
    # vectorized checks over all rows; the message is built for the first offending row only
    out_of_range = ((rows < 0) | (rows >= T)).any(1)
    not_perm = torch.zeros_like(out_of_range)
    if not allow_repeats and T:
        not_perm = (rows.sort(dim=1).values != torch.arange(T, device=rows.device)).any(1)
    bad_rows = (out_of_range | not_perm).nonzero().flatten()
    if bad_rows.numel():
        i = int(bad_rows[0])
        row, where = rows[i].cpu(), f"order row {i}" if t.dim() == 2 else "order"
        bad = row[(row < 0) | (row >= T)]
        if bad.numel():
            raise OrderError(f"{where} has indices outside 0..{T - 1}: {sorted(set(bad.tolist()))[:10]}")
        counts = torch.bincount(row, minlength=T)
        rep = (counts > 1).nonzero().flatten().tolist()[:10]
        miss = (counts == 0).nonzero().flatten().tolist()[:10]
        raise OrderError(
            f"{where} is not a permutation of 0..{T - 1}: repeated {rep}, missing {miss}; "
            "each batch must appear exactly once"
        )
    return t


def reference_order(T: int) -> torch.Tensor:
    """The reference order ``arange(T)`` (int64 ``[T]``)."""
    return torch.arange(T, dtype=torch.int64)


def random_order(T: int, seed: int) -> torch.Tensor:
    """A uniformly random permutation of ``0..T-1`` (int64 ``[T]``) from ``seed``."""
    return torch.randperm(T, generator=torch.Generator().manual_seed(seed))


def random_transpositions(order: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """A copy of ``order`` (int64 ``[T]``, T >= 2) with ``k`` random transpositions of two
    distinct positions applied in turn (each drawn as the first two entries of a
    ``torch.randperm(T, generator=generator)``); a later transposition may undo an earlier one."""
    o = order.clone()
    for _ in range(k):
        p, q = torch.randperm(len(o), generator=generator)[:2].tolist()
        o[[p, q]] = o[[q, p]]
    return o


def parse_order(spec: str, T: int) -> torch.Tensor:
    """Turn an order spec into a validated int64 ``[T]`` order.

    Specs: ``reference``; ``random:SEED``; a path to a JSON file holding a list of indices
    or an object with key ``"order"``.

    Raises:
        OrderError: an unknown spec, a missing or unparsable file, or an invalid order.
    """
    if spec == "reference":
        return reference_order(T)
    if spec.startswith("random:"):
        seed = spec.split(":", 1)[1]
        if not seed.isdigit() or int(seed) >= 2**63:
            raise OrderError(f"order spec {spec!r}: the seed after 'random:' must be an integer in 0..2^63-1")
        return random_order(T, int(seed))
    p = Path(spec)
    if not p.is_file():
        raise OrderError(f"order spec {spec!r} is not 'reference', 'random:SEED' or an existing JSON file")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise OrderError(f"order file {spec!r} is not UTF-8 text; write the order as JSON, e.g. [3, 0, 1, 2]") from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise OrderError(f"order file {spec!r} is not valid JSON: {err}") from None
    if isinstance(obj, dict):
        if "order" not in obj:
            raise OrderError(f"order file {spec!r} holds an object without an 'order' key")
        obj = obj["order"]
    if not isinstance(obj, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in obj):
        raise OrderError(f"order file {spec!r} must hold one flat list of integer batch indices, e.g. [3, 0, 1, 2] "
                         "(one order, not a list of orders)")
    return validate_orders(obj, T)


def save_order(path: str | Path, order: torch.Tensor, **extra) -> None:
    """Write ``{"order": [...], **extra}`` as JSON (readable by :func:`parse_order`), atomically."""
    atomic_write_bytes(Path(path), json.dumps({"order": [int(i) for i in order], **extra}, indent=1).encode())
