"""Learn-Focus-Review (LFR) style orders, adapted to one epoch of T batches.

LFR (Prakriya et al., arXiv 2409.06131, "Learn-Focus-Review: a bio-inspired approach to
data-efficient LLM pretraining") trains in *learn* phases over the data, *focuses* on data
the model still finds hard (high perplexity), and *reviews* data learned early that it has
since forgotten, revisiting batches several times.

Here an order is a permutation (each batch exactly once), so batches cannot be revisited
and per-batch losses during training are not available to the order. The adaptation is a
static schedule driven by the difficulty score (``BatchInfo.difficulty``, higher = harder):

* Sort batches easy-to-hard (ties by batch index). The hardest
  ``n_focus = clamp(round(focus_frac * T), 1, T)`` batches form the *focus* set F; the
  easiest ``n_review = min(round(review_frac * T), T - n_focus)`` form the *review* set V
  ("review" batches are easy material held back to be interleaved late, standing in for
  revisits of early data); the rest (easy to moderate) form the *learn* set. Rounding is
  half-up.
* ``g = torch.Generator().manual_seed(seed)``; learn phase = learn set (ascending batch
  index) permuted by ``torch.randperm(n_learn, generator=g)``; focus batches = F
  (ascending batch index) permuted by the next ``torch.randperm(n_focus, generator=g)``.
* Order = learn phase, then the focus phase: after every ``review_every`` focus batches
  one review batch is inserted (review batches in easy-to-hard order); review batches left
  when the focus batches run out go at the end.

Parameters: ``focus_frac`` (float in [0.1, 0.5]), ``review_frac`` (float in [0, 0.3]),
``review_every`` (int 1..8), ``seed`` (int ``0..n_seeds-1``). :func:`lfr_baseline` gives
the order for fixed defaults (0.3, 0.1, 3, seed 0), a heuristic baseline.

``encode`` derives (n_focus, n_review) from the learn-phase prefix, checks the phase
structure and finds review_every, then searches the seed; other orders raise
:class:`~currsearch.errors.OrderError`.
"""

from __future__ import annotations

from typing import Any

import torch

from currsearch.errors import ConfigError, OrderError

from .base import BatchInfo, SearchSpace, register_space, round_half_up

FOCUS_RANGE = (0.1, 0.5)
REVIEW_RANGE = (0.0, 0.3)
EVERY_RANGE = (1, 8)
BASELINE = {"focus_frac": 0.3, "review_frac": 0.1, "review_every": 3, "seed": 0}


def _frac_for(n: int, T: int, lo: float, hi: float) -> float | None:
    """A fraction f in [lo, hi] with round_half_up(f * T) == n, or None."""
    for f in (n / T, lo, hi):
        f = min(max(f, lo), hi)
        if round_half_up(f * T) == n:
            return f
    return None


@register_space
class LFRSpace(SearchSpace):
    """Learn phase, then a focus phase on the hardest batches with easy batches
    interleaved as reviews (see module doc). Options: ``n_seeds`` (default 1000)."""

    name = "lfr"
    default_options = {"n_seeds": 1000}

    def __init__(self, info, **options) -> None:
        super().__init__(info, **options)
        ns = self.options["n_seeds"]
        if not isinstance(ns, int) or ns < 1:
            raise ConfigError(f"lfr space: n_seeds must be an integer >= 1, got {ns!r}")
        self.easy_to_hard = info.by_difficulty()

    def sizes(self, focus_frac: float, review_frac: float) -> tuple[int, int]:
        """``(n_focus, n_review)`` for the fractions."""
        T = self.T
        nf = min(max(round_half_up(focus_frac * T), 1), T)
        nr = min(max(round_half_up(review_frac * T), 0), T - nf)
        return nf, nr

    def _sets(self, nf: int, nr: int):
        T, asc = self.T, self.easy_to_hard
        review = asc[:nr]
        learn = asc[nr : T - nf].sort().values
        focus = asc[T - nf :].sort().values
        return learn, focus, review

    @staticmethod
    def _interleave(focus: list[int], review: list[int], every: int) -> list[int]:
        out, r = [], 0
        for j, f in enumerate(focus):
            out.append(f)
            if (j + 1) % every == 0 and r < len(review):
                out.append(review[r])
                r += 1
        return out + review[r:]

    def decode(self, focus_frac: float, review_frac: float, review_every: int, seed: int) -> torch.Tensor:
        """Order (int64 ``[T]``) for the given parameters (see module doc)."""
        nf, nr = self.sizes(focus_frac, review_frac)
        learn, focus, review = self._sets(nf, nr)
        g = torch.Generator().manual_seed(int(seed))
        learn = learn[torch.randperm(len(learn), generator=g)]
        focus = focus[torch.randperm(len(focus), generator=g)]
        tail = self._interleave(focus.tolist(), review.tolist(), int(review_every))
        return torch.tensor(learn.tolist() + tail, dtype=torch.int64)

    def suggest(self, trial) -> torch.Tensor:
        ff = trial.suggest_float("focus_frac", *FOCUS_RANGE)
        rf = trial.suggest_float("review_frac", *REVIEW_RANGE)
        every = trial.suggest_int("review_every", *EVERY_RANGE)
        seed = trial.suggest_int("seed", 0, self.options["n_seeds"] - 1)
        return self._finish(self.decode(ff, rf, every, seed))

    def _structures(self, o: list[int]):
        """Candidate ``(n_focus, n_review)``: the learn phase (a prefix of length n_learn)
        must hold the batches of difficulty ranks ``n_review .. T-n_focus-1``."""
        T = self.T
        rank = [0] * T
        for i, b in enumerate(self.easy_to_hard.tolist()):
            rank[b] = i
        out = [(T - nr, nr) for nr in range(T)]  # empty learn phase: any split
        lo, hi = T, -1
        for nl in range(1, T):
            r = rank[o[nl - 1]]
            lo, hi = min(lo, r), max(hi, r)
            if hi - lo + 1 == nl:
                out.append((T - nl - lo, lo))
        return out

    def _encode(self, order: torch.Tensor) -> dict[str, Any]:
        T = self.T
        o = order.tolist()
        for nf, nr in self._structures(o):
            ff = _frac_for(nf, T, *FOCUS_RANGE) if nf >= 1 else None
            rf = _frac_for(nr, T, *REVIEW_RANGE)
            if ff is None or rf is None or self.sizes(ff, rf) != (nf, nr):
                continue
            learn, focus, review = self._sets(nf, nr)
            nl = len(learn)
            fset = set(focus.tolist())
            focus_seen = [b for b in o[nl:] if b in fset]
            if len(focus_seen) != nf:
                continue
            every = next(
                (
                    e
                    for e in range(EVERY_RANGE[0], EVERY_RANGE[1] + 1)
                    if self._interleave(focus_seen, review.tolist(), e) == o[nl:]
                ),
                None,
            )
            if every is None:
                continue
            pos_l = {b: i for i, b in enumerate(learn.tolist())}
            pos_f = {b: i for i, b in enumerate(focus.tolist())}
            want_l = torch.tensor([pos_l[b] for b in o[:nl]], dtype=torch.int64)
            want_f = torch.tensor([pos_f[b] for b in focus_seen], dtype=torch.int64)
            for seed in range(self.options["n_seeds"]):
                g = torch.Generator().manual_seed(seed)
                if torch.equal(torch.randperm(nl, generator=g), want_l) and torch.equal(
                    torch.randperm(nf, generator=g), want_f
                ):
                    return {"focus_frac": ff, "review_frac": rf, "review_every": every, "seed": seed}
        raise OrderError(
            "order is not representable in the lfr space: it is not a seeded learn phase followed by the "
            f"hardest batches with the easiest interleaved every 1..8 steps (seeds 0..{self.options['n_seeds'] - 1})"
        )

    def default_params(self) -> list[dict[str, Any]]:
        return [dict(BASELINE)]


def lfr_baseline(info: BatchInfo) -> torch.Tensor:
    """The LFR order (int64 ``[T]``) for fixed defaults: focus_frac 0.3, review_frac 0.1,
    review_every 3, seed 0."""
    b = BASELINE
    return LFRSpace(info).decode(b["focus_frac"], b["review_frac"], b["review_every"], b["seed"])
