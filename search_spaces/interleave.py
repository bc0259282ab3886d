"""Domain interleaving with proportions, by smooth weighted round robin.

Parameters: one weight per domain, ``w_<domain> = suggest_float("w_<domain>", w_min, 1)``
(domains in ``BatchInfo.domain_names`` order). Within a domain batches run in the
reference order (ascending batch index).

Decoding (smooth weighted round robin as in nginx, with weights normalized over all
domains, ``p_d = w_d / sum(w)``): every domain starts with credit 0; at step t each domain
that still has batches gets ``credit_d += p_d``; the domain with the largest credit among
those runs its next batch and pays ``credit_d -= 1`` (ties, within 1e-9, go to the first
domain in ``domain_names`` order). Equivalently the chosen domain maximises
``p_d * (a_d + 1) - n_d`` where ``a_d`` is the number of earlier steps at which d still had
batches and ``n_d`` how many it has run; credits are computed in this closed form.

While all domains have batches left, domain d gets a share ``p_d`` of the steps, spread
evenly; once a domain is exhausted the leftover share is split equally among the rest.

``encode`` solves a linear program (scipy ``linprog``): the steps of the order are linear
inequalities in ``p``; it maximises the margin of the strict ones, maps ``p`` to weights in
``[w_min, 1]`` and checks by decoding. Orders whose domains' batches are not in reference
order, or whose domain sequence no weights produce, raise
:class:`~currsearch.errors.OrderError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from currsearch.errors import ConfigError, OrderError

from .base import SearchSpace, register_space

TIE = 1e-9


@register_space
class InterleaveSpace(SearchSpace):
    """Weighted round robin over domains (see module doc). Options: ``w_min`` (default
    0.05, the lower bound of each weight, in (0, 1])."""

    name = "interleave"
    default_options = {"w_min": 0.05}

    def __init__(self, info, **options) -> None:
        super().__init__(info, **options)
        wm = float(self.options["w_min"])
        if not (0.0 < wm <= 1.0):
            raise ConfigError(f"interleave space: w_min must be in (0, 1], got {self.options['w_min']!r}")
        self.names = info.domain_names
        self.dom = info.domain_index()
        self.members = [(self.dom == j).nonzero().flatten().tolist() for j in range(len(self.names))]

    def param_names(self) -> list[str]:
        """Trial parameter name of each domain's weight (``w_<domain>``)."""
        return [f"w_{d}" for d in self.names]

    def domain_sequence(self, weights) -> list[int]:
        """Domain index run at each step (length T) for weights (any positive scale)."""
        w = np.asarray(weights, dtype=np.float64)
        p = w / w.sum()
        D = len(self.names)
        left = np.array([len(m) for m in self.members])
        active = np.zeros(D)  # steps each domain has been eligible (a_d)
        ran = np.zeros(D)  # batches run (n_d)
        seq = []
        for _ in range(self.T):
            elig = left > 0
            active += elig
            credit = np.where(elig, p * active - ran, -np.inf)
            best = credit.max()
            d = int(np.nonzero(credit >= best - TIE)[0][0])
            seq.append(d)
            ran[d] += 1
            left[d] -= 1
        return seq

    def decode(self, weights) -> torch.Tensor:
        """Order (int64 ``[T]``) for weights in domain_names order."""
        nxt = [0] * len(self.names)
        out = []
        for d in self.domain_sequence(weights):
            out.append(self.members[d][nxt[d]])
            nxt[d] += 1
        return torch.tensor(out, dtype=torch.int64)

    def suggest(self, trial) -> torch.Tensor:
        wm = float(self.options["w_min"])
        w = [trial.suggest_float(n, wm, 1.0) for n in self.param_names()]
        return self._finish(self.decode(w))

    def _params(self, w) -> dict[str, Any]:
        return {n: float(x) for n, x in zip(self.param_names(), w)}

    def _encode(self, order: torch.Tensor) -> dict[str, Any]:
        D = len(self.names)
        seq = self.dom[order].tolist()
        for j in range(D):
            got = [b for b in order.tolist() if self.dom[b] == j]
            if got != self.members[j]:
                raise OrderError(
                    f"order is not representable in the interleave space: the batches of domain "
                    f"{self.names[j]!r} do not run in reference (ascending index) order"
                )
        if D == 1:
            return self._params([1.0])
        for w in (np.ones(D), np.array([len(m) for m in self.members], dtype=np.float64)):
            w = w / w.max()
            if w.min() >= float(self.options["w_min"]) and self.domain_sequence(w) == seq:
                return self._params(w)
        for strict in (True, False):
            w = self._solve(seq, strict)
            if w is not None and self.domain_sequence(w) == seq:
                return self._params(w)
        raise OrderError(
            "order is not representable in the interleave space: no domain weights in "
            f"[{self.options['w_min']}, 1] give its domain sequence by weighted round robin"
        )

    def _solve(self, seq: list[int], strict: bool) -> np.ndarray | None:
        """LP over p (sum 1, p_d >= w_min * p_e) and margin m, maximising m: at each step
        the chosen domain's credit beats every other eligible domain by >= m (``strict``)
        or beats earlier-named ones by >= m and at least ties later-named ones."""
        from scipy.optimize import linprog

        D = len(self.names)
        wm = float(self.options["w_min"])
        left = np.array([len(m) for m in self.members])
        active = np.zeros(D)
        ran = np.zeros(D)
        A, b = [], []  # rows over [p_0..p_{D-1}, m]:  A x <= b
        for d in seq:
            elig = left > 0
            active += elig
            for e in np.nonzero(elig)[0]:
                if e == d:
                    continue
                # credit_e - credit_d (+ m if e wins ties) <= 0
                row = np.zeros(D + 1)
                row[e] += active[e]
                row[d] -= active[d]
                row[D] = 1.0 if (strict or e < d) else 0.0
                A.append(row)
                b.append(ran[e] - ran[d])
            ran[d] += 1
            left[d] -= 1
        for d in range(D):  # ratio bounds: wm * p_e - p_d <= 0
            for e in range(D):
                if d != e:
                    row = np.zeros(D + 1)
                    row[e], row[d] = wm, -1.0
                    A.append(row)
                    b.append(0.0)
        c = np.zeros(D + 1)
        c[D] = -1.0  # maximise the margin
        res = linprog(
            c,
            A_ub=np.array(A) if A else None,
            b_ub=np.array(b) if b else None,
            A_eq=np.r_[np.ones(D), 0.0][None, :],
            b_eq=[1.0],
            bounds=[(0.0, 1.0)] * D + [(None, 1.0)],
            method="highs",
        )
        if not res.success or res.x[D] < 1e-7:
            return None
        p = np.clip(res.x[:D], 1e-12, None)
        w = p / p.max()
        return np.clip(w, wm, 1.0)

    def default_params(self) -> list[dict[str, Any]]:
        """Uniform weights, and weights proportional to domain batch counts."""
        D = len(self.names)
        counts = np.array([len(m) for m in self.members], dtype=np.float64)
        prop = np.clip(counts / counts.max(), float(self.options["w_min"]), 1.0)
        out = [self._params(np.ones(D))]
        if not np.allclose(prop, 1.0):
            out.append(self._params(prop))
        return out
