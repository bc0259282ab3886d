"""Parametric curricula: a difficulty ranking plus a pacing function.

Follows the schedules of DeepSpeed curriculum learning (``fixed_linear``, ``fixed_root``,
``fixed_discrete``; Li et al., "The Stability-Efficiency Dilemma", 2022, and the DeepSpeed
data-efficiency docs), adapted from "maximum difficulty allowed at step t" to "which batch
of a fixed permutation runs at step t".

Decoding, exactly (T batches, steps t = 0..T-1):

1. Ranking ``L`` (int64 ``[T]``): batches sorted by difficulty, ascending for
   ``direction = "easy_to_hard"``, descending for ``"hard_to_easy"``; ties by batch index
   (``BatchInfo.by_difficulty``). ``rank[L[i]] = i``.
2. Pacing: the fraction ``c(t)`` of ``L`` that is available at step t, from
   ``s = start_frac`` and ``x(t) = t / (T-1)`` (``x = 1`` when T = 1):

   * ``linear``: ``c = s + (1-s) * x``
   * ``root``:   ``c = s + (1-s) * sqrt(x)``  (DeepSpeed ``fixed_root`` with degree 2)
   * ``step``:   ``c = s + (1-s) * floor(n_steps * t / T) / (n_steps - 1)`` (``n_steps``
     equal-length stages with equally spaced levels, as ``fixed_discrete``)

   Available prefix length ``k(t) = min(T, max(t + 1, ceil(c(t) * T)))``; the ``t + 1``
   floor guarantees an unused batch in the prefix, so the result is always a permutation.
   ``k`` is non-decreasing in t.
3. Tie-breaking: ``prio = torch.randperm(T, generator=torch.Generator().manual_seed(seed))``
   (``prio[b]`` = position of batch b in a seeded shuffle). At step t the batch run is the
   unused batch b with ``rank[b] < k(t)`` and the smallest ``prio[b]``.

With ``start_frac = 1`` the order is the seeded shuffle; with a small ``start_frac`` it is
close to a sorted curriculum. Parameters: ``direction``, ``pacing`` (categorical),
``start_frac`` (float in ``[min_start, 1]``), ``n_steps`` (int 2..8, asked only for
``step``), ``seed`` (int in ``0..n_seeds-1``).

``encode`` searches the discrete part (direction, seed, pacing, n_steps); for each it finds
the interval of ``start_frac`` consistent with the order (``k(t)`` is monotone in
``start_frac``; closed form, bisection as fallback) and checks by decoding. Orders this space did not produce raise
:class:`~currsearch.errors.OrderError`.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np
import torch

from currsearch.errors import ConfigError, OrderError

from .base import SearchSpace, register_space

DIRECTIONS = ["easy_to_hard", "hard_to_easy"]
PACINGS = ["linear", "root", "step"]
N_STEPS = (2, 8)


def pacing_fraction(pacing: str, start_frac: float, T: int, n_steps: int | None = None) -> np.ndarray:
    """Available fraction ``c(t)`` (float64 ``[T]``, non-decreasing, in [start_frac, 1])."""
    t = np.arange(T, dtype=np.float64)
    x = t / (T - 1) if T > 1 else np.ones(T)
    s = float(start_frac)
    if pacing == "linear":
        ramp = x
    elif pacing == "root":
        ramp = np.sqrt(x)
    elif pacing == "step":
        if n_steps is None or n_steps < 2:
            raise ConfigError(f"step pacing needs n_steps >= 2, got {n_steps!r}")
        ramp = np.floor(n_steps * t / T) / (n_steps - 1)
    else:
        raise ConfigError(f"unknown pacing {pacing!r}; known: {', '.join(PACINGS)}")
    return s + (1.0 - s) * ramp


def available_counts(c: np.ndarray, T: int) -> np.ndarray:
    """``k(t) = min(T, max(t + 1, ceil(c(t) * T)))`` (int64 ``[T]``)."""
    return np.minimum(T, np.maximum(np.arange(1, T + 1), np.ceil(c * T).astype(np.int64)))


def _priority(seed: int, T: int) -> torch.Tensor:
    return torch.randperm(T, generator=torch.Generator().manual_seed(int(seed)))


@register_space
class CurriculumSpace(SearchSpace):
    """Difficulty-ranked curriculum with linear / root / step pacing (see module doc).

    Options:
        min_start: lower bound of ``start_frac`` (default 0.05), in (0, 1].
        n_seeds: ``seed`` takes values ``0..n_seeds-1`` (default 1000).
    """

    name = "curriculum"
    default_options = {"min_start": 0.05, "n_seeds": 1000}

    def __init__(self, info, **options) -> None:
        super().__init__(info, **options)
        ms, ns = self.options["min_start"], self.options["n_seeds"]
        if not (0.0 < float(ms) <= 1.0):
            raise ConfigError(f"curriculum space: min_start must be in (0, 1], got {ms!r}")
        if not isinstance(ns, int) or ns < 1:
            raise ConfigError(f"curriculum space: n_seeds must be an integer >= 1, got {ns!r}")
        self.ranking = {d: info.by_difficulty(descending=(d == "hard_to_easy")) for d in DIRECTIONS}

    def decode(
        self, direction: str, pacing: str, start_frac: float, seed: int, n_steps: int | None = None
    ) -> torch.Tensor:
        """Order (int64 ``[T]``) for the given parameters (see module doc)."""
        T = self.T
        L = self.ranking[direction].tolist()
        k = available_counts(pacing_fraction(pacing, start_frac, T, n_steps), T).tolist()
        prio = _priority(seed, T).tolist()
        heap: list[tuple[int, int]] = []
        nxt, out = 0, []
        for t in range(T):
            while nxt < k[t]:
                heapq.heappush(heap, (prio[L[nxt]], L[nxt]))
                nxt += 1
            out.append(heapq.heappop(heap)[1])
        return torch.tensor(out, dtype=torch.int64)

    def suggest(self, trial) -> torch.Tensor:
        direction = trial.suggest_categorical("direction", DIRECTIONS)
        pacing = trial.suggest_categorical("pacing", PACINGS)
        start = trial.suggest_float("start_frac", float(self.options["min_start"]), 1.0)
        n_steps = trial.suggest_int("n_steps", *N_STEPS) if pacing == "step" else None
        seed = trial.suggest_int("seed", 0, self.options["n_seeds"] - 1)
        return self._finish(self.decode(direction, pacing, start, seed, n_steps))

    # ------------------------------------------------------------ encode
    def _candidate_seeds(self, o: np.ndarray, R: np.ndarray, k_floor: np.ndarray) -> list[int]:
        """Seeds passing a necessary condition: at each step t, o[t] has the smallest
        priority among unused batches of rank < max(R[t] + 1, k_floor[t]), where
        ``k_floor`` (>= t + 1) is the smallest prefix length any allowed parameters give."""
        T, S = self.T, self.options["n_seeds"]
        used = np.zeros(T, dtype=bool)
        rank_of = np.empty(T, dtype=np.int64)
        rank_of[o] = R
        checks = []  # (batch o[t], competitors) per step
        for t in range(T):
            m = max(R[t] + 1, k_floor[t])
            comp = np.nonzero((~used) & (rank_of < m))[0]
            comp = comp[comp != o[t]]
            if comp.size:
                checks.append((o[t], comp))
            used[o[t]] = True
        out: list[int] = []
        chunk = 256
        for lo in range(0, S, chunk):
            seeds = np.arange(lo, min(S, lo + chunk))
            P = np.stack([_priority(s, T).numpy() for s in seeds])  # [s, T]
            alive = np.ones(len(seeds), dtype=bool)
            for b, comp in checks:
                alive &= P[:, b] < P[:, comp].min(axis=1)
                if not alive.any():
                    break
            out += seeds[alive].tolist()
        return out

    def _encode(self, order: torch.Tensor) -> dict[str, Any]:
        T = self.T
        o = order.numpy()
        ms = float(self.options["min_start"])
        configs = [("linear", None), ("root", None)] + [("step", n) for n in range(N_STEPS[0], N_STEPS[1] + 1)]
        # the smallest prefix lengths a config allows (k is non-decreasing in start_frac)
        k_min = [available_counts(pacing_fraction(p, ms, T, n), T) for p, n in configs]
        k_floor = np.min(np.stack(k_min), axis=0)
        for direction in DIRECTIONS:
            rank = np.empty(T, dtype=np.int64)
            rank[self.ranking[direction].numpy()] = np.arange(T)
            R = rank[o]
            lo_k = R + 1
            for seed in self._candidate_seeds(o, R, k_floor):
                Po = _priority(seed, T).numpy()[o]
                hi_k = np.full(T, T, dtype=np.int64)
                for r0 in range(0, T, 512):  # hi[t] = min rank of a later, lower-priority batch
                    rows = np.arange(r0, min(T, r0 + 512))
                    mask = (np.arange(T)[None, :] > rows[:, None]) & (Po[None, :] < Po[rows][:, None])
                    hi_k[rows] = np.where(mask, R[None, :], T).min(axis=1)
                for (pacing, n), kmin in zip(configs, k_min):
                    if not (kmin <= hi_k).all():
                        continue
                    s = self._solve_start(pacing, n, lo_k, hi_k, ms)
                    if s is None:
                        continue
                    if torch.equal(self.decode(direction, pacing, s, seed, n), order):
                        p = {"direction": direction, "pacing": pacing, "start_frac": s, "seed": int(seed)}
                        if n is not None:
                            p["n_steps"] = n
                        return p
        raise OrderError(
            "order is not representable in the curriculum space: no direction, pacing, start_frac and seed "
            f"in 0..{self.options['n_seeds'] - 1} produce it"
        )

    def _solve_start(self, pacing, n, lo_k, hi_k, ms) -> float | None:
        """A start_frac in [ms, 1] with lo_k <= k(t) <= hi_k for all t, or None.

        With ramp r(t) = c(t) at s = 0, ``c = r + s (1 - r)``: ``k <= hi`` needs
        ``t + 1 <= hi`` and ``s <= (hi/T - r) / (1 - r)``; ``k >= lo`` needs ``t + 1 >= lo``
        or ``s > ((lo - 1)/T - r) / (1 - r)``. Candidates near the closed upper end are
        checked on the exact k; bisection is the fallback."""
        T = self.T
        t1 = np.arange(1, T + 1)
        r = pacing_fraction(pacing, 0.0, T, n)

        def k(s):
            return available_counts(pacing_fraction(pacing, s, T, n), T)

        def ok(s):
            kk = k(s)
            return bool((kk <= hi_k).all() and (kk >= lo_k).all())

        up_t = hi_k < T
        if (t1[up_t] > hi_k[up_t]).any() or (r[up_t] >= 1.0).any():
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            ub = np.where(up_t, (hi_k / T - r) / (1.0 - r), np.inf)
            low_t = (t1 < lo_k) & (r < 1.0)
            lb = np.where(low_t, ((lo_k - 1) / T - r) / (1.0 - r), -np.inf)
        s_hi, s_lo = min(1.0, float(ub.min())), max(ms, float(lb.max()))
        if s_hi < ms or s_hi < s_lo:
            return None
        cands = [s_hi]
        for _ in range(4):
            cands.append(float(np.nextafter(cands[-1], 0.0)))
        cands += [s_hi - 1e-12, 0.5 * (s_lo + s_hi)]
        for s in cands:
            if ms <= s <= 1.0 and ok(s):
                return s
        # fallback: bisection on the monotone upper constraint
        def upper_ok(s):
            return bool((k(s) <= hi_k).all())

        if not upper_ok(ms):
            return None
        a, b = ms, 1.0
        if upper_ok(1.0):
            a = 1.0
        else:
            for _ in range(200):
                mid = 0.5 * (a + b)
                if mid <= a or mid >= b:
                    break
                if upper_ok(mid):
                    a = mid
                else:
                    b = mid
        return a if ok(a) else None

    def default_params(self) -> list[dict[str, Any]]:
        s = max(0.2, float(self.options["min_start"]))
        return [
            {"direction": "easy_to_hard", "pacing": "linear", "start_frac": s, "seed": 0},
            {"direction": "easy_to_hard", "pacing": "root", "start_frac": s, "seed": 0},
            {"direction": "hard_to_easy", "pacing": "linear", "start_frac": s, "seed": 0},
        ]
