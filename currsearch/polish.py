"""Suffix polish: local search with real training that pays only for the steps an order changes.

Ours. Training is deterministic, so an order that shares its first ``s`` batches with one
already trained can resume from that order's state after ``s`` steps
(:class:`~currsearch.train.PrefixState`) and train only the last ``T - s`` steps: the result
is bit-identical to training it from the window start, at ``(T - s) / T`` of a run's
training steps. The last steps of the window are also where an order's final loss is most
sensitive (the recency of a batch's update), so transpositions late in the window are the
cheapest real moves and, measured, not the least useful ones (docs/estimators.md, fourteenth
session).

:func:`suffix_polish` hill-climbs from a start order (the best run of a search so far):

1. The incumbent is trained once from the window start, keeping its states at the anchor
   steps ``round(f T)`` for ``f`` in ``PolishSettings.starts``; its loss is checked against the
   start's (it must reproduce; a mismatch is logged). Cost: one run plus its evaluation.
2. Polish move ``k``: an anchor ``s`` and two positions ``s <= i < j < T`` drawn from
   ``random.Random(f"{seed}:{k}")`` (:func:`move`: more transpositions once every single one
   was tried); the incumbent with positions ``i`` and ``j`` swapped is trained from the
   incumbent's state at ``s``. Cost ``(T - s) / T + e`` run equivalents,
   ``e`` = the evaluation's seconds over a window's training seconds, measured on step 1's
   run and stored, so every later count (and a resumed call's) uses the same number.
3. A move with a lower loss becomes the incumbent (it shares the first ``s`` batches, so its
   states at anchors ``<= s`` are the old incumbent's and those after ``s`` come from its run).
4. Stop before a move whose cost would take the spend over ``budget``, or when :func:`move`
   finds no untried order.

Every move is one trial of an Optuna study (``storage``: a ``*.journal`` path resumes after a
kill; moves depend only on ``seed``, ``k`` and the incumbent, so a resumed call makes the moves
an uninterrupted one would have, as far as its budget goes: it trains its incumbent again for
the states (step 1 again, counted again: ``state_runs``, also when a kill cut it short), so it
makes fewer).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

from pydantic import Field, field_validator
from tqdm.auto import tqdm

from .baselines import complete_trials, objective_index, open_real_study
from .errors import ConfigError
from .search import ask_and_tell, check_resume, make_sampler
from .settings import Settings
from .study import optuna_warnings_only
from .train import PrefixState, Trainer

logger = logging.getLogger(__name__)

EVAL_ATTR = "currsearch_polish_eval_fraction"
#: the evaluation's cost is rounded up to a multiple of this (run equivalents)
EVAL_GRID = 0.05
STATES_ATTR = "currsearch_polish_state_runs"


class PolishSettings(Settings):
    """How :func:`suffix_polish` moves (module docstring).

    Chosen with ``GuidedSettings.polish`` on development seeds 200-207 and 210-215 at N = 64
    on both configs (docs/estimators.md, fourteenth session), not on the benchmark's seeds:
    anchors at 1/2 and 3/4 of the window beat 3/4 alone in all 4 (config, fraction) pairs of
    the first round; adding 1/4 moved the mean difference from TPE by +0.0007 (default) and
    -0.0010 (second) in the second round, and won the rule fixed before it (the lowest mean
    over both configs).

    Attributes:
        starts: anchor steps as fractions of the window, ``0 < f < 1`` (each rounded to a step
            ``1 <= round(f T) <= T - 2``); a move resumes from one of them, drawn uniformly.
    """

    starts: tuple[float, ...] = Field((0.25, 0.5, 0.75), min_length=1)

    @field_validator("starts")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < f < 1 for f in v):
            raise ValueError(f"polish starts are fractions of the window strictly between 0 and 1, got {list(v)}")
        return tuple(sorted(set(v)))

    def anchors(self, T: int) -> list[int]:
        """The anchor steps for a window of ``T`` steps (distinct, ``1 <= s <= T - 2``, so two positions remain)."""
        return sorted({min(max(1, round(f * T)), T - 2) for f in self.starts})


@dataclass(frozen=True)
class PolishResult:
    """What :func:`suffix_polish` trained.

    Attributes:
        start_order, start_loss: the order it started from and its ``objective`` loss (nats/token).
        orders, losses: the moves trained, in order, and their ``objective`` loss (nats/token).
        eval_losses: ``[moves][E]`` every eval set's final loss per move (nats/token).
        departures: per move, the anchor step it resumed from.
        costs: per move, its run equivalents ``(T - s) / T + eval_fraction``.
        eval_fraction: the evaluation's seconds over one window's training seconds (measured once).
        state_runs: full trainings of an incumbent for its states, one per call whose budget
            held it and a move (0 when the budget is too small), a killed one included.
        seconds: wall seconds of this call.
        durations: per move, the wall seconds of its trial (training and evaluation).
    """

    start_order: list[int]
    start_loss: float
    orders: list[list[int]]
    losses: list[float]
    eval_losses: list[list[float]]
    departures: list[int]
    costs: list[float]
    eval_fraction: float
    state_runs: int
    seconds: float
    durations: list[float]

    @property
    def run_equivalents(self) -> float:
        """Real-run equivalents spent: the moves' costs plus ``state_runs`` x (1 + eval_fraction)."""
        return sum(self.costs) + self.state_runs * (1 + self.eval_fraction)

    @property
    def best_loss(self) -> float:
        """The lowest ``objective`` loss, the start's included (nats/token)."""
        return min([self.start_loss, *self.losses])

    @property
    def best_order(self) -> list[int]:
        """The order of :attr:`best_loss` (the start on ties)."""
        if not self.losses or min(self.losses) >= self.start_loss:
            return list(self.start_order)
        return self.orders[min(range(len(self.losses)), key=lambda i: (self.losses[i], i))]

    def record(self) -> dict:
        """JSON-ready record of the polish (moves, costs, spend, best)."""
        return {"start_loss": self.start_loss, "moves": len(self.losses), "improvements": self.improvements,
                "eval_fraction": self.eval_fraction, "state_runs": self.state_runs,
                "run_equivalents": self.run_equivalents, "best_loss": self.best_loss,
                "departures": self.departures, "losses": self.losses}

    @property
    def improvements(self) -> int:
        """Moves that lowered the incumbent's loss."""
        best, n = self.start_loss, 0
        for x in self.losses:
            if x < best:
                best, n = x, n + 1
        return n


def eval_fraction(eval_seconds: float, train_seconds: float) -> float:
    """A move's evaluation cost in run equivalents: ``eval_seconds / train_seconds`` (one
    window's training) rounded up to a multiple of :data:`EVAL_GRID`, so that timing jitter
    rarely changes how many moves a budget holds and the count errs on the high side
    (measured 0.075-0.092 on the default and second configs: counted 0.10)."""
    ratio = eval_seconds / max(train_seconds, 1e-9)
    return math.ceil(round(ratio / EVAL_GRID, 9)) * EVAL_GRID


def move(order: list[int], anchors: list[int], seed: int, k: int,
         tried: set[tuple[int, ...]]) -> tuple[int, list[int]] | None:
    """Polish move ``k`` from ``order``: ``(anchor s, order with positions >= s transposed)``,
    or None when no draw gives an order outside ``tried``.

    Drawn from ``random.Random(f"{seed}:{k}")``: an anchor, then one transposition of two
    positions at or after it. An order in ``tried`` is redrawn (64 draws); when every draw was
    tried (the incumbent is a local optimum of single late transpositions), two transpositions
    are drawn, then three, and so on up to ``len(order)``; None after that (e.g. T = 3, whose
    one anchor leaves a single transposition). Deterministic.
    """
    rng = random.Random(f"{seed}:{k}")
    for n_swaps in range(1, len(order) + 1):
        for _ in range(64):
            s = rng.choice(anchors)
            cand = list(order)
            for _ in range(n_swaps):
                i, j = rng.sample(range(s, len(order)), 2)
                cand[i], cand[j] = cand[j], cand[i]
            if tuple(cand) not in tried:
                return s, cand
    return None


def suffix_polish(trainer: Trainer, start_order: list[int], start_loss: float, budget: float,
                  settings: PolishSettings | None = None, seed: int = 0, objective: str = "all", storage=None,
                  study_name: str = "polish", progress: bool = True) -> PolishResult:
    """Hill-climb from ``start_order`` with resumed real runs within ``budget`` run equivalents (module docstring).

    Args:
        trainer: the Trainer whose window is trained.
        start_order: T batch indices, the order to polish (e.g. the best run of a search).
        start_loss: its ``objective`` loss, nats/token (reproduced by the first training).
        budget: run equivalents this call may spend (an earlier call's on the same study
            included); a budget below one run plus the cheapest move trains nothing.
        settings: :class:`PolishSettings`.
        seed: the moves' seed.
        objective: the eval set whose final loss (nats/token) is minimized.
        storage: ``None`` (in memory), a ``*.journal`` path or an Optuna storage URL; a rerun
            with the same storage and ``study_name`` resumes.
        study_name: the study's name in ``storage`` (one per polish).
        progress: a tqdm bar in run equivalents, with the best loss so far.

    Returns:
        :class:`PolishResult`. The incumbent is trained only when it and the cheapest move fit
        the budget (before ``e`` is measured, with ``e = 0``), so ``run_equivalents`` stays
        within ``budget`` plus at most one evaluation.

    Raises:
        ConfigError: an unknown objective, a study in ``storage`` made from another start,
            settings, seed or budget, or a window too short to polish (T < 3).
    """
    s = settings or PolishSettings()
    T, obj = trainer.T, objective_index(trainer, objective)
    if T < 3:
        raise ConfigError(f"suffix polish needs a window of at least 3 steps, got T = {T}")
    anchors = s.anchors(T)
    t0 = time.perf_counter()
    with optuna_warnings_only():
        study, session = open_real_study(study_name, make_sampler("random", seed=seed), storage, trainer)
        check_resume(study, {"polish": s.model_dump(mode="json"), "seed": seed, "objective": objective,
                             "start": [int(x) for x in start_order], "budget": float(budget)})
        e = study.user_attrs.get(EVAL_ATTR)
        state_runs = int(study.user_attrs.get(STATES_ATTR, 0))
        done = complete_trials(study)
        spent = sum(float(t.user_attrs["cost"]) for t in done) + state_runs * (1 + (e or 0.0))
        inc, inc_loss = list(start_order), float(start_loss)
        for t in done:
            if float(t.value) < inc_loss:
                inc, inc_loss = list(t.user_attrs["order"]), float(t.value)
        states: dict[int, PrefixState] = {}
        if spent + 1 + 2 * (e or 0.0) + (T - anchors[-1]) / T <= budget + 1e-9:  # the states, then one move, fit
            state_runs += 1
            study.set_user_attr(STATES_ATTR, state_runs)  # before the run: a kill during it leaves it counted
            r = trainer.train(inc, keep=anchors)
            if e is None:
                e = eval_fraction(r.eval_seconds, r.seconds)
                study.set_user_attr(EVAL_ATTR, e)
            spent += 1 + e
            if float(r.eval_losses[obj]) != inc_loss:
                logger.warning("the incumbent did not reproduce its loss (%.6f, recorded %.6f): another device or thread "
                               "count than its first run; polishing from the states just trained",
                               float(r.eval_losses[obj]), inc_loss)
            states = dict(r.states)
        tried = {tuple(start_order)} | {tuple(t.user_attrs["order"]) for t in done}
        k = len(done)
        bar = tqdm(total=round(budget, 2), initial=round(min(spent, budget), 2), desc="suffix polish", unit="run eq.",
                   disable=not (progress and states))
        while states:
            drawn = move(inc, anchors, seed, k, tried)
            if drawn is None:
                break
            a, cand = drawn
            cost = (T - a) / T + e
            if spent + cost > budget + 1e-9:
                break

            def score(trials, a=a, cand=cand, cost=cost):
                res = trainer.train(cand, start=states[a], keep=[x for x in anchors if x > a])
                value = float(res.eval_losses[obj])
                attrs = {"order": cand, "losses": res.eval_losses.tolist(), "departure": a, "cost": cost}
                score.result = res
                return [(value if math.isfinite(value) else math.inf, attrs)]

            ask_and_tell(study, 1, 1, score, session=session)
            spent, k = spent + cost, k + 1
            bar.n = round(min(spent, budget), 2)  # rounded: a sum of float costs prints badly
            bar.refresh()
            tried.add(tuple(cand))
            loss = float(score.result.eval_losses[obj])
            if loss < inc_loss:
                inc, inc_loss = cand, loss
                states.update(score.result.states)
                bar.set_postfix(best=f"{inc_loss:.4f}")
        bar.close()
        done = complete_trials(study)
    return PolishResult([int(x) for x in start_order], float(start_loss), [list(t.user_attrs["order"]) for t in done],
                        [float(t.value) for t in done], [list(t.user_attrs["losses"]) for t in done],
                        [int(t.user_attrs["departure"]) for t in done], [float(t.user_attrs["cost"]) for t in done],
                        float(e or 0.0), state_runs, time.perf_counter() - t0,
                        [t.duration.total_seconds() for t in done])

