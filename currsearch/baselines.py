"""Search with real training: the competitor currsearch must beat at equal compute.

Two strategies spend ``n_runs`` real window trainings and keep the best order:

* ``random-search``: ``n_runs`` uniformly random orders (Optuna's random sampler on the
  ``random_keys`` space: the argsort of i.i.d. uniform keys is a uniform permutation);
* ``optuna-real``: Optuna's TPE sampler on the same space, each trial a real training run.

Both run as Optuna studies (a journal file makes them resume after a kill; the sampler is
seeded per trial from (seed, trial), so a resumed search asks what an uninterrupted one would
have, :func:`~currsearch.search.seeded_per_trial`) and return every
trial in order, so the best loss after any prefix of ``k <= n_runs`` runs (the anytime curve
that ``benchmarks/anytime.py`` draws) comes from one call.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import optuna

from search_spaces import BatchInfo, get_space

from .errors import ConfigError
from .manifest import TRAJECTORY_SECTIONS
from .search import ask_and_tell, check_resume, make_sampler, seeded_per_trial
from .study import Session, make_storage, optuna_warnings_only, recover_stale_trials
from .train import Trainer

logger = logging.getLogger(__name__)

#: baseline name -> Optuna sampler name
BASELINES = {"random-search": "random", "optuna-real": "tpe"}


@dataclass(frozen=True)
class RealSearchResult:
    """A search whose objective is real training.

    Attributes:
        name: ``random-search``, ``optuna-real`` (or ``guided-tpe``, :mod:`currsearch.guided`).
        orders: the ``n_runs`` orders trained, in trial order (lists of T batch indices).
        losses: their final ``objective`` eval loss, nats/token, in trial order.
        objective: the eval set minimized.
        seed: the sampler seed.
        seconds: wall seconds of its runs, each trial's duration (training, evaluation and the
            sampler's suggestion), also of the trials an earlier call of a resumed search ran.
    """

    name: str
    orders: list[list[int]]
    losses: list[float]
    objective: str
    seed: int
    seconds: float

    @property
    def n_runs(self) -> int:
        """Real runs spent (one per trial)."""
        return len(self.losses)

    def best_after(self, k: int) -> float:
        """Best ``objective`` loss (nats/token) among the first ``k`` runs (1 <= k <= n_runs)."""
        if not 1 <= k <= self.n_runs:
            raise ConfigError(f"best_after needs 1 <= k <= {self.n_runs}, got {k}")
        return min(self.losses[:k])

    @property
    def best_order(self) -> list[int]:
        """The order with the lowest loss (the first one on ties)."""
        return self.orders[min(range(self.n_runs), key=lambda i: (self.losses[i], i))]

    @property
    def best_loss(self) -> float:
        """The lowest ``objective`` loss, nats/token."""
        return min(self.losses)

    @classmethod
    def from_trials(cls, name: str, trials: list[optuna.trial.FrozenTrial], objective: str, seed: int,
                    ) -> "RealSearchResult":
        """The result of completed ``trials`` told by :func:`real_scorer` (their ``order`` user
        attr, value and duration)."""
        return cls(name, [t.user_attrs["order"] for t in trials], [float(t.value) for t in trials], objective, seed,
                   sum(t.duration.total_seconds() for t in trials))


def objective_index(trainer: Trainer, objective: str) -> int:
    """Column of ``objective`` in the trainer's eval losses.

    Raises:
        ConfigError: the plan has no eval set of that name.
    """
    if objective not in trainer.plan.eval_names:
        raise ConfigError(f"unknown objective eval set {objective!r}; the plan has {list(trainer.plan.eval_names)}")
    return list(trainer.plan.eval_names).index(objective)


def real_scorer(trainer: Trainer, space, obj: int) -> Callable[[list], list]:
    """``score(trials)`` for :func:`~currsearch.search.ask_and_tell` whose objective is real training:
    each trial's order (``space.suggest``) is trained from the window start; the trial is told
    its final eval loss of column ``obj`` (nats/token; +inf when training diverged to a
    non-finite loss, so the run counts in the budget and a resumed search does not replace it)
    and keeps ``order`` (T ints) and ``losses`` (all E eval losses, ``plan.eval_names`` order)
    as user attrs."""

    def score(trials):
        out = []
        for t in trials:
            order = space.suggest(t)
            losses = trainer.train(order).eval_losses
            value = float(losses[obj])  # a diverged run (NaN or inf) is a run too: +inf, a COMPLETE trial, never best
            out.append((value if math.isfinite(value) else math.inf, {"order": order.tolist(), "losses": losses.tolist()}))
        return out

    return score


def open_real_study(study_name: str, sampler: optuna.samplers.BaseSampler, storage, trainer: Trainer,
                    ) -> tuple[optuna.Study, Session]:
    """Create or load a study of real runs on ``storage`` (:func:`~currsearch.study.make_storage`),
    check that a loaded one trained the same window (``trainer``'s config fingerprint of the
    data, model, optim and train sections, user attr ``currsearch_config``), start this call's
    :class:`~currsearch.study.Session` and re-queue the trials a killed call left RUNNING
    (:func:`~currsearch.study.recover_stale_trials`). Call within
    :func:`~currsearch.study.optuna_warnings_only`.

    Raises:
        ConfigError: the study's runs were trained with another config (a study from before
            this check holds no fingerprint and is taken as it is).
    """
    study = optuna.create_study(storage=make_storage(storage), sampler=sampler, study_name=study_name, load_if_exists=True)
    check_resume(study, {"config": trainer.cfg.fingerprint(*TRAJECTORY_SECTIONS)},
                 fix="its runs trained another config; use another --out (or storage) or the same config")
    session = Session(study)
    recover_stale_trials(study, session)
    return study, session


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The COMPLETE trials of ``study`` in trial-number order."""
    return sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number)


def real_search(trainer: Trainer, name: str, n_runs: int, seed: int = 0, objective: str = "all",
                storage=None, progress: bool = True) -> RealSearchResult:
    """Search orders with ``n_runs`` real trainings (module docstring); resumes from ``storage``.

    Args:
        trainer: the Trainer whose window is trained (its cached warm-up phase is shared).
        name: ``random-search`` or ``optuna-real`` (:data:`BASELINES`).
        n_runs: real runs to spend (>= 1).
        seed: sampler seed.
        objective: the eval set whose final loss (nats/token) is minimized.
        storage: ``None`` (in memory), a ``*.journal`` path or an Optuna storage URL; a rerun
            with the same storage resumes (trials left RUNNING by a killed call run again).
        progress: a tqdm bar.

    Returns:
        :class:`RealSearchResult` with the first ``n_runs`` completed trials.

    Raises:
        ConfigError: an unknown name or objective, or ``n_runs < 1``.
    """
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    if n_runs < 1:
        raise ConfigError(f"a real-training search needs n_runs >= 1, got {n_runs}")
    score = real_scorer(trainer, get_space("random_keys", BatchInfo.from_plan(trainer.plan)), objective_index(trainer, objective))
    with optuna_warnings_only():
        study, session = open_real_study(f"{name}-{objective}-seed{seed}", make_sampler(BASELINES[name], seed=seed), storage,
                                         trainer)
        done = len(complete_trials(study))
        ask_and_tell(study, max(0, n_runs - done), 1, score, progress=progress, desc=name, session=session,
                     sampler_for=seeded_per_trial(BASELINES[name], seed))
    return RealSearchResult.from_trials(name, complete_trials(study)[:n_runs], objective, seed)
