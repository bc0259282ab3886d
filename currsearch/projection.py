"""Seeded Johnson-Lindenstrauss projections R^P -> R^k, regenerated from the seed.

The dense P x k matrix is never stored: it is generated block by block (``block`` input
coordinates at a time) from a ``torch.Generator`` seeded with ``(seed, block index)``, so
the same seed gives the same projection on any machine and device.

Kinds:
  * ``rademacher``: entries +-1/sqrt(k) (Achlioptas 2003).
  * ``gaussian``: entries N(0, 1/k) (Johnson & Lindenstrauss 1984).
  * ``countsketch``: each coordinate i goes to one bucket h(i) with sign s(i)
    (Charikar et al. 2002; a sparse JL transform with one non-zero per column), O(P) per vector.

All three preserve inner products in expectation: E[<Px, Py>] = <x, y>, with standard
deviation about ||x|| ||y|| sqrt(2/k) for the dense kinds.
"""

from __future__ import annotations

from enum import Enum

import torch


class ProjectionKind(str, Enum):
    """The JL projection kinds (``record.projection``); the value is the name written in
    configs and store manifests."""

    RADEMACHER = "rademacher"
    GAUSSIAN = "gaussian"
    COUNTSKETCH = "countsketch"


KINDS = tuple(k.value for k in ProjectionKind)


class Projector:
    """A seeded JL projection of ``dim_in``-vectors to ``dim_out``.

    Args:
        kind: a :class:`ProjectionKind` or its value (``rademacher``, ``gaussian``, ``countsketch``).
        dim_in: P, input dimension.
        dim_out: k, output dimension.
        seed: projection seed.
        block: input coordinates generated per block (memory ``block * k * 4`` bytes).
        cache_bytes: keep the generated blocks in memory (never on disk) when the whole
            projection takes at most this many bytes, so later calls are plain matmuls.

    Raises:
        ValueError: unknown kind or non-positive dimensions.
    """

    def __init__(self, kind: str, dim_in: int, dim_out: int, seed: int, block: int = 4096, cache_bytes: int = 512 * 2**20):
        if kind not in KINDS:  # a ProjectionKind member equals its value
            raise ValueError(f"unknown projection kind {kind!r}; choose one of {KINDS}")
        if dim_in <= 0 or dim_out <= 0:
            raise ValueError(f"projection dimensions must be positive, got {dim_in} -> {dim_out}")
        kind = ProjectionKind(kind).value  # plain str: describe() writes the same manifest as before
        self.kind, self.dim_in, self.dim_out, self.seed, self.block = kind, dim_in, dim_out, seed, block
        per_coord = 16 if kind == "countsketch" else 4 * dim_out
        self._cache: dict | None = {} if dim_in * per_coord <= cache_bytes else None

    def _blocks(self, j: int, rows: int, device):
        """Block j's matrix ([rows, k]) or, for countsketch, its (bucket, sign) vectors; cached if allowed."""
        key = (j, str(device))
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        if self.kind == "countsketch":
            g = self._gen(j)
            h = torch.randint(0, self.dim_out, (rows,), generator=g).to(device)
            s = (torch.randint(0, 2, (rows,), generator=g).float() * 2 - 1).to(device)
            out = (h, s)
        else:
            out = self._block_matrix(j, rows).to(device)
        if self._cache is not None:
            self._cache[key] = out
        return out

    def _gen(self, j: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + j)

    def _block_matrix(self, j: int, rows: int) -> torch.Tensor:
        g = self._gen(j)
        if self.kind == "gaussian":
            return torch.randn(rows, self.dim_out, generator=g) / self.dim_out**0.5
        signs = torch.randint(0, 2, (rows, self.dim_out), generator=g, dtype=torch.int8)
        return (signs.float() * 2 - 1) / self.dim_out**0.5

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` (float ``[..., P]``) to float32 ``[..., k]`` on ``x``'s device."""
        if x.shape[-1] != self.dim_in:
            raise ValueError(f"projection expects last dimension {self.dim_in}, got {tuple(x.shape)}")
        x = x.float()
        out = torch.zeros(*x.shape[:-1], self.dim_out, dtype=torch.float32, device=x.device)
        for j, lo in enumerate(range(0, self.dim_in, self.block)):
            hi = min(lo + self.block, self.dim_in)
            xb = x[..., lo:hi]
            blk = self._blocks(j, hi - lo, x.device)
            if self.kind == "countsketch":
                out.index_add_(-1, blk[0], xb * blk[1])
            else:
                out += xb @ blk
        return out

    def describe(self) -> dict:
        """JSON description (kind: the :class:`ProjectionKind` value, dims, seed, block), enough to
        regenerate the projection."""
        return {"kind": self.kind, "dim_in": self.dim_in, "dim_out": self.dim_out, "seed": self.seed, "block": self.block}
