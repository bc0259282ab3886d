"""Curriculum search: Optuna over a search space of orders, scored by a surrogate estimator.

::

    settings = SearchSettings(estimator="additive", trials=256, storage="runs/study.journal")
    result = run_search(store, settings)
    for order, est in result.top(5):        # int64 [T], float64 [E] (nats/token)
        ...

How it works (DESIGN.md section 5):

* Optuna ask/tell with batched asks: ask ``batch`` trials, decode each into an order
  with the space's ``suggest``, score all of them in ONE backend call
  (:mod:`currsearch.backends`), tell each its estimated loss(es). An order already
  evaluated in the study is not scored again: the trial is told the stored value.
* Objectives: the estimated final loss of the eval set(s) named in ``objectives``; one name
  gives a single-objective study, several a multi-objective one (Pareto front).
* Storage: ``None`` (in memory), a path ending in ``.journal`` (Optuna JournalStorage on a
  file; survives a kill) or any Optuna storage URL (``sqlite:///x.db``, an RDB for a
  cluster). Rerunning with the same ``study_name`` continues the study: trials already
  completed count toward ``trials`` and only the rest run. A kill at any point is safe
  (:mod:`currsearch.study`): a stale journal lock is released, trials a killed call left
  RUNNING are failed and queued again, and the starting trials are enqueued exactly once. An
  enqueued trial whose batch raised (Ctrl-C, a backend error) is queued again in its place too,
  so a trial whose scoring fails every time stops every rerun, with its error.
* The study is seeded (``enqueue_trial``) with the heuristic curricula the space can
  represent (:func:`search_spaces.heuristic_params`; ``reference`` among them) and, when
  the estimator has an optimum of its own (``assignment_optimum``: exact for the additive
  surrogates, a linear assignment problem; swap-local for ``calibrated-interactions``), that
  optimum per objective when the space can represent it.
* Each trial keeps its order (user attr ``"order"``: list of T ints) and all E estimates
  (``"estimates"``: list of E floats, ``eval_names`` order) so results are read back
  without decoding; enqueued trials also carry ``"source"`` (the heuristic's name), trials
  told a stored value ``"reused_from"`` (the trial number it came from).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import optuna
import torch
from pydantic import Field, field_validator

# tqdm.auto picks a notebook or terminal bar
from tqdm.auto import tqdm

from estimators import available as available_estimators
from estimators import get_estimator
from search_spaces import BatchInfo, SearchSpace, available_spaces, get_space, heuristic_orders, heuristic_params

from .backends import SerialBackend
from .config import SAMPLER_SEED_MAX
from .errors import ConfigError
from .manifest import TRAJECTORY_SECTIONS
from .settings import Settings
from .store import TrajectoryStore
from .study import (
    Session,
    enqueue_starts,
    known_values,
    make_storage,
    optuna_warnings_only,
    recover_stale_trials,
    requeue_in_order,
    session_starts,
    STARTS_ATTR,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SearchSettings", "SearchResult", "run_search", "ask_and_tell", "check_resume", "collect_result",
    "make_sampler", "make_storage", "optuna_warnings_only",
]

SAMPLERS = ("tpe", "cmaes", "gp", "nsga2", "random")
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "nsga2", "gp", "random")
# packages a sampler imports lazily (pip names)
SAMPLER_DEPS = {"cmaes": ("cmaes",), "gp": ("scipy", "torch")}


# ---------------------------------------------------------------- building blocks


def make_sampler(name: str, seed: int | None = 0, n_objectives: int = 1, **options) -> optuna.samplers.BaseSampler:
    """An Optuna sampler by name: ``tpe``, ``cmaes``, ``gp``, ``nsga2`` or ``random``.

    Args:
        name: sampler name.
        seed: sampler seed (reproducible suggestions for a fresh study).
        n_objectives: number of objectives; > 1 needs a multi-objective sampler
            (``tpe``, ``nsga2``, ``gp``, ``random``; not ``cmaes``).
        options: keyword arguments of the Optuna sampler class (e.g. ``population_size=16``
            for ``nsga2``).

    Raises:
        ConfigError: an unknown name, a single-objective sampler for several objectives,
            or a missing optional package (``cmaes`` needs ``pip install cmaes``).
    """
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if n_objectives > 1 and name not in MULTI_OBJECTIVE_SAMPLERS:
        raise ConfigError(
            f"sampler {name!r} is single-objective but {n_objectives} objectives were given; "
            f"use one of {', '.join(MULTI_OBJECTIVE_SAMPLERS)} (nsga2 or tpe recommended) or a single objective"
        )
    missing = [p for p in SAMPLER_DEPS.get(name, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"sampler {name!r} needs the package(s) {missing}; install them (pip install {' '.join(missing)})")
    cls = {
        "tpe": optuna.samplers.TPESampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "gp": optuna.samplers.GPSampler,
        "nsga2": optuna.samplers.NSGAIISampler,
        "random": optuna.samplers.RandomSampler,
    }[name]
    try:
        return cls(seed=seed, **options)
    except TypeError as err:
        raise ConfigError(f"sampler {name!r}: bad option(s) {sorted(options)}: {err}") from None


def seeded_per_trial(name: str, seed: int, **options) -> Callable[[int], optuna.samplers.BaseSampler]:
    """``sampler_for(k)``: a fresh :func:`make_sampler` ``name`` for the k-th trial (k = 0, 1, ...),
    seeded from ``(seed, k)`` by :class:`numpy.random.SeedSequence`.

    Given to :func:`ask_and_tell` (``sampler_for``), it makes a study's suggestions a function of
    its seed and its completed trials only, not of the sampler object's history: a study resumed
    after a kill asks what an uninterrupted one would have (a restarted ``RandomSampler`` would
    replay its first draws instead). Optuna's samplers keep no other state between trials.

    Raises:
        ConfigError: as :func:`make_sampler`.
    """
    make_sampler(name, seed=seed, **options)  # fail now on a bad name or option

    def sampler_for(k: int) -> optuna.samplers.BaseSampler:
        return make_sampler(name, seed=int(np.random.SeedSequence([seed, k]).generate_state(1)[0]), **options)

    return sampler_for


def _pareto_mask(values: torch.Tensor) -> torch.Tensor:
    """bool ``[m]``: rows of ``values`` ``[m, k]`` (minimized) not dominated by another row."""
    dominated = torch.zeros(values.shape[0], dtype=torch.bool)
    for j0 in range(0, values.shape[0], 1024):  # bounded memory: [m, 1024, k] at a time
        vj = values[None, j0 : j0 + 1024, :]
        le = (values[:, None, :] <= vj).all(-1)  # [i, j]: row i <= row j everywhere
        lt = (values[:, None, :] < vj).any(-1)
        dominated[j0 : j0 + 1024] = (le & lt).any(0)  # some i dominates j
    return ~dominated


# ---------------------------------------------------------------- result


@dataclass
class SearchResult:
    """What :func:`run_search` found.

    Attributes:
        study: the Optuna study (all trials, including earlier runs of a resumed study).
        eval_names: the E eval-set names (columns of ``estimates``).
        objectives: the objective eval-set names (columns of ``values``).
        orders: int64 ``[m, T]``: the distinct orders of all completed trials, best first
            (single objective: ascending value; several: Pareto-optimal first, then by
            the mean objective value).
        estimates: float64 ``[m, E]``: their estimated final losses (nats/token).
        values: float64 ``[m, k]``: their objective values (the ``objectives`` columns).
        pareto: bool ``[m]``: non-dominated among the completed trials (single objective:
            only the best).
        n_trials: completed trials in the study.
        n_run: trials asked by this call (a resumed study runs only the missing ones).
        seconds: wall time of this call.
        sources: per row, the ``"source"`` user attr of the first trial with that order
            (e.g. ``"reference"``, ``"assignment:all"``), else ``""``.
        requeued: trial numbers a killed call left RUNNING, failed and queued again by this call.
        n_reused: trials of this call told a stored value (their order was already evaluated).
        resumed_at: first trial number of every call after the first: trials from there on
            were sampled by a restarted sampler, so after a kill they may differ from an
            uninterrupted run's (the starts and requeued trials do not).
    """

    study: optuna.Study
    eval_names: list[str]
    objectives: list[str]
    orders: torch.Tensor
    estimates: torch.Tensor
    values: torch.Tensor
    pareto: torch.Tensor
    n_trials: int
    n_run: int
    seconds: float
    sources: list[str] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    n_reused: int = 0
    resumed_at: list[int] = field(default_factory=list)

    def top(self, k: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``k`` best distinct orders: list of ``(order int64 [T], estimates float64 [E])``."""
        return [(self.orders[i], self.estimates[i]) for i in range(min(k, self.orders.shape[0]))]

    def top_record(self, k: int = 10) -> dict:
        """JSON-ready record of the study and its ``k`` best distinct orders (``search.json``,
        the ``search`` entry of a run report): study name, trial counts, seconds, eval sets,
        objectives, the trials a resume requeued or reused and where resumed calls began
        (trials from there on may differ from an uninterrupted run's), and per order its
        estimates (nats/token) and source."""
        return {
            "study": self.study.study_name, "n_trials": self.n_trials, "n_run": self.n_run, "seconds": self.seconds,
            "eval_names": self.eval_names, "objectives": self.objectives,
            "requeued": self.requeued, "n_reused": self.n_reused, "resumed_at": self.resumed_at,
            "top": [{"order": o.tolist(), "estimates": dict(zip(self.eval_names, e.tolist())),
                     "source": self.sources[i] if i < len(self.sources) else ""}
                    for i, (o, e) in enumerate(self.top(k))],
        }

    @property
    def best_order(self) -> torch.Tensor:
        """int64 ``[T]``: the first of :meth:`top`.

        Raises:
            ConfigError: the study holds no finished trial (e.g. a new study run with ``trials=0``).
        """
        if len(self.orders) == 0:
            raise ConfigError("the search holds no finished trial, so it has no best order; run it with --trials >= 1")
        return self.orders[0]

    @property
    def best_value(self) -> torch.Tensor:
        """float64 ``[k]``: objective values of :attr:`best_order`."""
        return self.values[0]

    def pareto_set(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The non-dominated distinct orders: list of ``(order int64 [T], estimates float64 [E])``."""
        return [(self.orders[i], self.estimates[i]) for i in self.pareto.nonzero().flatten().tolist()]

    def summary(self) -> str:
        """A short human-readable report."""
        lines = [
            f"study {self.study.study_name!r}: {self.n_trials} completed trials ({self.n_run} run now, {self.seconds:.1f} s), "
            f"{self.orders.shape[0]} distinct orders, objectives {self.objectives}"
        ]
        if self.resumed_at or self.requeued:
            lines.append(f"  resumed: calls began at trials {self.resumed_at} (sampled trials from there on may differ from an "
                         f"uninterrupted run's); requeued after a kill: {self.requeued}; values reused: {self.n_reused}")
        for i, (o, e) in enumerate(self.top(5)):
            v = ", ".join(f"{n} {x:.4f}" for n, x in zip(self.objectives, self.values[i].tolist()))
            src = f" [{self.sources[i]}]" if self.sources and self.sources[i] else ""
            lines.append(f"  #{i + 1}: {v}{src}  order {o.tolist()}")
        return "\n".join(lines)


def collect_result(study: optuna.Study, space, backend, objectives: Sequence[str], n_run: int = 0, seconds: float = 0.0) -> SearchResult:
    """Read the completed trials of ``study`` back into a :class:`SearchResult`.

    Orders come from the ``"order"`` user attr (else decoded from the trial's parameters
    with ``space``); estimates from ``"estimates"`` (else re-scored with ``backend``).
    """
    eval_names = list(backend.eval_names)
    obj_idx = [eval_names.index(o) for o in objectives]
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    orders, ests, srcs, rescore = [], [], [], []
    for t in trials:
        o = t.user_attrs.get("order")
        if o is None:
            o = space.suggest(optuna.trial.FixedTrial(t.params)).tolist()
        e = t.user_attrs.get("estimates")
        if e is None or len(e) != len(eval_names):
            rescore.append(len(orders))
            e = [math.nan] * len(eval_names)
        orders.append(o)
        ests.append(e)
        srcs.append(str(t.user_attrs.get("source", "")))
    T = backend.T
    O = torch.tensor(orders, dtype=torch.int64).view(-1, T)
    E = torch.tensor(ests, dtype=torch.float64).view(-1, len(eval_names))
    if rescore:
        E[rescore] = backend.score(O[rescore])
    # distinct orders (first occurrence)
    seen: dict[tuple, int] = {}
    keep = []
    for i, o in enumerate(orders):
        key = tuple(o)
        if key not in seen:
            seen[key] = i
            keep.append(i)
    O, E = O[keep], E[keep]
    srcs = [srcs[i] for i in keep]
    V = E[:, obj_idx]
    multi = len(obj_idx) > 1
    mean = torch.nan_to_num(V.mean(1), nan=math.inf)  # [m]; a NaN estimate sorts last
    by_mean = torch.sort(mean, stable=True).indices
    if V.shape[0] == 0:
        pareto = torch.zeros(0, dtype=torch.bool)
    elif multi:
        pareto = _pareto_mask(torch.nan_to_num(V, nan=math.inf))
    else:
        pareto = mean == mean.min()
    # Pareto-optimal first (multi-objective), then ascending mean objective value
    rank = torch.cat([by_mean[pareto[by_mean]], by_mean[~pareto[by_mean]]]) if multi else by_mean
    return SearchResult(
        study=study,
        eval_names=eval_names,
        objectives=list(objectives),
        orders=O[rank],
        estimates=E[rank],
        values=V[rank],
        pareto=pareto[rank],
        n_trials=len(trials),
        n_run=n_run,
        seconds=seconds,
        sources=[srcs[i] for i in rank.tolist()],
    )




# ---------------------------------------------------------------- settings


class SearchSettings(Settings):
    """What :func:`run_search` searches: the single source of the search defaults.

    Attributes:
        estimator: registered estimator fitted on the store (``estimators.available()``;
            ignored when a backend is given: the backend's estimator is used).
        space: search-space name (``search_spaces.available_spaces()``).
        sampler: ``tpe``, ``cmaes``, ``gp``, ``nsga2`` or ``random``.
        trials: total completed trials wanted in the study (>= 0; a resumed study counts
            the ones it has; failed trials of this call count toward it too).
        batch: trials asked (and scored in one backend call) at a time (>= 1).
        objectives: eval-set names to minimize; one -> single-objective, several ->
            multi-objective (use ``nsga2`` or ``tpe``).
        seed: sampler seed (0 <= seed <= ``SAMPLER_SEED_MAX`` = 2**32 - 1, the range NumPy takes).
        storage: ``None`` (in memory), a ``*.journal`` file path or an Optuna storage URL.
        study_name: default ``"<estimator>-<space>-<objectives joined by +>"``, so that a
            rerun with the same settings and storage resumes.
        enqueue_heuristics: seed the study with the heuristic curricula the space can
            represent (``reference`` included).
        enqueue_assignment: seed it with the estimator's own optimum per objective.
        space_options: keyword options of the space (e.g. ``{"by": "difficulty"}``).
        estimator_kwargs: keyword arguments of the estimator (default backend only).
        sampler_options: keyword arguments of the Optuna sampler class.
        max_seconds: wall seconds this call's trials may take (> 0; None: no limit), like
            the ``timeout`` of Optuna's ``study.optimize`` but sized per batch: the first batch
            is asked in full, each later one holds at most as many trials as fit in the seconds
            left at the mean seconds per trial so far, so the search can stop short of
            ``trials`` (``SearchResult.n_run`` says how many ran).
    """

    estimator: str = "additive"
    space: str = "random_keys"
    sampler: str = "tpe"
    trials: int = Field(128, ge=0)
    batch: int = Field(32, ge=1)
    objectives: tuple[str, ...] = ("all",)
    seed: int = Field(0, ge=0, le=SAMPLER_SEED_MAX)
    storage: str | None = None
    study_name: str | None = None
    enqueue_heuristics: bool = True
    enqueue_assignment: bool = True
    space_options: dict[str, Any] = Field(default_factory=dict)
    estimator_kwargs: dict[str, Any] = Field(default_factory=dict)
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    max_seconds: float | None = Field(None, gt=0)

    @field_validator("objectives", mode="before")
    @classmethod
    def _objectives(cls, v):
        v = (v,) if isinstance(v, str) else tuple(v)
        if not v:
            raise ValueError("is empty; name at least one eval set (e.g. 'all')")
        if len(set(v)) != len(v):
            raise ValueError(f"{list(v)} repeat an eval set")
        return v

    @field_validator("estimator")
    @classmethod
    def _estimator(cls, v):
        if v not in available_estimators():
            raise ValueError(f"unknown estimator {v!r}; choose one of {', '.join(available_estimators())}")
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v):
        if v not in available_spaces():
            raise ValueError(f"unknown search space {v!r}; choose one of {', '.join(available_spaces())}")
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v):
        if v not in SAMPLERS:
            raise ValueError(f"unknown sampler {v!r}; choose one of {', '.join(SAMPLERS)}")
        return v

    @field_validator("storage", mode="before")
    @classmethod
    def _storage(cls, v):
        return None if v is None else str(v)


# old run_search keyword names -> SearchSettings fields
_LEGACY = {"estimator_name": "estimator", "n_trials": "trials", "batch_size": "batch"}


# ---------------------------------------------------------------- the driver


def _starts(space: SearchSpace, backend, settings: SearchSettings) -> list[tuple[dict[str, Any], str]]:
    """The starting trials ``[(params, source), ...]``: heuristics, then the estimator's optima."""
    queued: list[tuple[dict[str, Any], str]] = []
    if settings.enqueue_heuristics:
        named = {tuple(o.tolist()): n for n, o in heuristic_orders(space.info).items()}
        for p in heuristic_params(space):
            order = tuple(space.suggest(optuna.trial.FixedTrial(p)).tolist())
            queued.append((p, named.get(order, f"{space.name}_default")))
    if settings.enqueue_assignment:
        for obj in settings.objectives:
            opt = backend.assignment_optimum(obj)
            if opt is None or not space.representable(opt):
                continue
            p = space.encode(opt)
            if all(p != q for q, _ in queued):
                queued.append((p, f"assignment:{obj}"))
    return queued


def check_resume(study: optuna.Study, meta: dict[str, Any], fix: str = "use another study_name (or storage) or "
                 "the same settings", record: bool = True) -> None:
    """Check a resumed study's setup, then record it: ``meta`` (JSON-serializable values, e.g.
    estimator, space, objectives) is compared with the study's user attrs ``currsearch_<key>``,
    and keys the study lacks (a fresh study) are stored (unless ``record`` is False: a check
    before the work). ``fix`` ends the error message: what the user can do.

    Raises:
        ConfigError: a stored value differs (the study was run with another setup), naming the keys.
    """
    old = {k: study.user_attrs.get(f"currsearch_{k}") for k in meta}
    diff = [f"{k} ({old[k]!r} in the study vs {v!r} now)" for k, v in meta.items() if old[k] is not None and old[k] != v]
    if diff:
        raise ConfigError(f"study {study.study_name!r} exists in this storage with another setup: {', '.join(diff)}; {fix}")
    if not record:
        return
    for k, v in meta.items():
        if old[k] is None:
            study.set_user_attr(f"currsearch_{k}", v)


def _tell_batch(study: optuna.Study, trials: list, score: Callable) -> None:
    """Score ``trials`` with one ``score`` call and tell each; on any error (Ctrl-C included) the
    trials not yet told are told FAIL first, so none is left RUNNING, and those that were
    enqueued (starting trials, a surrogate's proposals) are queued again in their place, before
    the WAITING trials, so a rerun runs them in the original order (as after a SIGKILL,
    :func:`~currsearch.study.recover_stale_trials`)."""
    told = 0
    try:
        results = score(trials)
        if len(results) != len(trials):
            raise ValueError(f"ask_and_tell(): score returned {len(results)} results for {len(trials)} trials")
        for t, (value, attrs) in zip(trials, results):
            for key, v in attrs.items():
                t.set_user_attr(key, v)
            if isinstance(value, optuna.trial.TrialState):
                study.tell(t, state=value)
            else:
                study.tell(t, value)
            told += 1
    except BaseException:
        for t in trials[told:]:  # leave no trial RUNNING behind
            study.tell(t, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        cut = {t.number for t in trials[told:]}
        lost = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
                if t.number in cut and "fixed_params" in t.system_attrs]
        if lost:  # queued again with the WAITING trials, in trial-number order (as recover_stale_trials does)
            requeue_in_order(study, lost)
        raise


def ask_and_tell(
    study: optuna.Study,
    n_trials: int,
    batch_size: int,
    score: Callable[[list[optuna.trial.Trial]], list[tuple[Any, dict[str, Any]]]],
    progress: bool = False,
    desc: str = "search",
    *,
    session: Session | None = None,
    limit: Callable[[], int] | None = None,
    sampler_for: Callable[[int], optuna.samplers.BaseSampler] | None = None,
) -> int:
    """Ask ``n_trials`` trials, ``batch_size`` at a time, score each batch with ONE ``score`` call and tell the results.

    Args:
        study: the Optuna study.
        n_trials: trials to ask (>= 0).
        batch_size: trials per ``score`` call (>= 1).
        score: ``score(trials) -> [(value, user_attrs), ...]``, one entry per trial in order.
            ``value`` is what the trial is told: a float (one objective), a list of floats
            (several), or an ``optuna.trial.TrialState`` (``FAIL``, ``PRUNED``) to tell that state;
            ``user_attrs`` (``{name: JSON-serializable value}``) are set on the trial first.
        progress: show a tqdm progress bar (``desc``, one tick per trial).
        session: if given, each asked trial is tagged with it and it beats once per batch
            (:class:`currsearch.study.Session`: lets a rerun recover the trials of a killed call).
        limit: if given, called before each batch: the most trials still wanted (e.g. fewer
            once a concurrent call has completed some); the loop stops at 0.
        sampler_for: if given, ``study.sampler`` is set to ``sampler_for(k)`` before each ask,
            k = the study's completed trials + the trial's place in its batch
            (:func:`seeded_per_trial`: resumable searches that do not depend on a kill).

    Returns:
        The number of trials asked (``n_trials`` unless ``limit`` stopped it earlier).

    Raises:
        ValueError: ``score`` returned another number of entries than trials.
        Whatever ``score`` or the storage raises. In every case the batch's trials not yet told
        are told ``FAIL`` first, so no trial is left RUNNING in the storage.
    """
    n_run = 0
    with tqdm(total=n_trials, desc=desc, unit="trial", disable=not (progress and n_trials)) as bar:
        while n_run < n_trials:
            k = min(batch_size, n_trials - n_run, limit() if limit is not None else batch_size)
            if k <= 0:
                break
            trials = [_ask(study, sampler_for, i) for i in range(k)]
            if session is not None:
                for t in trials:
                    session.tag(t)
            n_run += k
            _tell_batch(study, trials, score)
            if session is not None:
                session.beat()
            bar.update(k)
    return n_run


def _ask(study: optuna.Study, sampler_for, i: int) -> optuna.trial.Trial:
    """``study.ask()``, with ``study.sampler = sampler_for(completed + i)`` first when given."""
    if sampler_for is not None:
        study.sampler = sampler_for(len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))) + i)
    return study.ask()


def _settings(settings: SearchSettings | None, legacy: dict[str, Any]) -> tuple[SearchSettings, Any]:
    """Merge the old keyword form into ``settings``; returns (settings, a sampler object or None)."""
    sampler_obj = None
    if isinstance(legacy.get("sampler"), optuna.samplers.BaseSampler):
        sampler_obj = legacy.pop("sampler")
    elif "sampler" in legacy and not isinstance(legacy["sampler"], str):
        raise ConfigError(f"sampler must be a name ({', '.join(SAMPLERS)}) or an optuna sampler, got {type(legacy['sampler']).__name__}")
    values = {_LEGACY.get(k, k): v for k, v in legacy.items() if v is not None or k in ("storage", "study_name")}
    base = settings.model_dump() if settings is not None else {}
    return SearchSettings(**{**base, **values}), sampler_obj


def _study_name(s: SearchSettings, estimator_name: str) -> str:
    return s.study_name or f"{estimator_name}-{s.space}-{'+'.join(s.objectives)}"


def check_objectives(objectives, eval_names, holder: str = "the store") -> None:
    """Refuse objectives that are not eval sets of ``eval_names`` (``holder`` names whose, in the message).

    Raises:
        ConfigError: naming the unknown objectives and the eval sets there are.
    """
    unknown = [o for o in objectives if o not in eval_names]
    if unknown:
        raise ConfigError(f"unknown objective eval set(s) {unknown}; {holder} has {list(eval_names)}")


def _kwargs_meta(s: SearchSettings) -> str:
    return json.dumps(s.estimator_kwargs, sort_keys=True, default=str)  # e.g. a fit's n_runs, seed


def _proposal_meta(s: SearchSettings) -> dict[str, Any]:
    """The settings a resumed study must share besides its name: the estimator's options (e.g. a
    fit's ``n_runs``) and the sampler's name, seed and options (a rerun with another ``seed`` would
    otherwise read back the old seed's trials as its own)."""
    return {"estimator_kwargs": _kwargs_meta(s), "sampler": s.sampler, "seed": s.seed,
            "sampler_options": json.dumps(s.sampler_options, sort_keys=True, default=str)}


def check_study_before_fit(s: SearchSettings, estimator_name: str, fix: str) -> None:
    """Refuse, before a fit's real runs are spent, a search that :func:`run_search` would refuse
    after them: ``s.storage`` (a ``.journal`` path) already holds this search's study with
    other ``estimator_kwargs`` (e.g. another budget's ``n_runs``) or another sampler, seed or
    sampler options. Nothing is written.

    Raises:
        ConfigError: the stored options differ; ``fix`` ends the message.
    """
    if s.storage is None or not str(s.storage).endswith(".journal") or not Path(s.storage).expanduser().is_file():
        return
    with optuna_warnings_only():
        try:
            study = optuna.load_study(study_name=_study_name(s, estimator_name), storage=make_storage(s.storage))
        except KeyError:  # the journal holds other studies only
            return
    check_resume(study, _proposal_meta(s), fix=fix, record=False)


def _open_study(store: TrajectoryStore, s: SearchSettings, sp: SearchSpace, backend, sampler) -> optuna.Study:
    """Create or load the study, check that a resumed one has the same setup."""
    objectives = list(s.objectives)
    name = _study_name(s, backend.estimator_name)
    study = optuna.create_study(
        storage=make_storage(s.storage), sampler=sampler, study_name=name,
        directions=["minimize"] * len(objectives), load_if_exists=True,
    )
    if len(study.directions) != len(objectives):
        raise ConfigError(
            f"study {name!r} has {len(study.directions)} objective(s) but {len(objectives)} were given; "
            "use another study_name or the same objectives"
        )
    meta = {
        "estimator": backend.estimator_name,
        "space": s.space,
        "space_options": json.dumps(sp.options, sort_keys=True, default=str),
        **_proposal_meta(s),
        "objectives": objectives,
        "T": store.T,
        "store": store_identity(store),
    }
    check_resume(study, meta)
    return study


def store_identity(store: TrajectoryStore) -> str:
    """SHA-256 (hex) of what makes a store's estimates: its config's trajectory fingerprint, its
    projection settings and its reference order (not its path, nor budgets such as
    ``record.max_seconds``). A study resumed on another store is refused by it."""
    cfg = store.config()
    ident = {"config": cfg.fingerprint(*TRAJECTORY_SECTIONS), "reference_order": store.reference_order.tolist(),
             "record": cfg.record.projection_key()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _scorer(sp: SearchSpace, backend, objectives: list[str], study: optuna.Study, reused: list[int]) -> Callable:
    """``score(trials)`` for :func:`ask_and_tell`: decode, reuse the values of orders already
    evaluated in the study (also by a concurrent call), score the rest in one backend call."""
    obj_idx = torch.tensor([list(backend.eval_names).index(o) for o in objectives])

    def told(est: torch.Tensor):  # est: float64 [E] -> what the trial is told
        v = est[obj_idx]
        if not torch.isfinite(v).all():
            return optuna.trial.TrialState.FAIL  # a non-finite estimate
        return v.tolist() if len(objectives) > 1 else float(v[0])

    def score(trials):
        orders = torch.stack([sp.suggest(t) for t in trials])  # [k, T]
        known = known_values(study)
        keys = [tuple(o.tolist()) for o in orders]
        new = list(dict.fromkeys(k for k in keys if k not in known))
        fresh = dict(zip(new, backend.score(torch.tensor(new, dtype=torch.int64).view(-1, orders.shape[1])))) if new else {}
        out = []
        for key in keys:
            attrs = {"order": list(key)}
            if key in known:
                prev = known[key]
                est = torch.tensor(prev.user_attrs["estimates"], dtype=torch.float64)
                attrs["reused_from"] = prev.number
                reused.append(prev.number)
            else:
                est = fresh[key]
            attrs["estimates"] = est.tolist()
            out.append((told(est), attrs))
        return out

    return score


def run_search(
    store,
    settings: SearchSettings | None = None,
    *,
    backend=None,
    progress: bool = True,
    info: BatchInfo | None = None,
    **legacy,
) -> SearchResult:
    """Search training orders that minimize the estimated final eval loss(es).

    Args:
        store: a :class:`~currsearch.store.TrajectoryStore` or its directory.
        settings: :class:`SearchSettings` (default: all defaults).
        backend: a :mod:`currsearch.backends` backend (default: a :class:`SerialBackend`
            over ``get_estimator(settings.estimator, **settings.estimator_kwargs).fit(store)``,
            closed on return).
        progress: show a tqdm progress bar (and log at INFO).
        info: a :class:`search_spaces.BatchInfo` (default: from the store's plan).
        legacy: the old keyword form, merged over ``settings``: any SearchSettings field,
            ``estimator_name`` / ``n_trials`` / ``batch_size`` (= ``estimator`` / ``trials`` /
            ``batch``), and ``sampler`` may also be an Optuna sampler object (used as is;
            not reseeded, so not reproducible across restarts).

    Returns:
        :class:`SearchResult` (orders int64 ``[m, T]``, estimates float64 ``[m, E]`` nats/token).

    Raises:
        ConfigError: an invalid setting (unknown sampler, space, space option or objective,
            a single-objective sampler with several objectives, ``trials < 0``, ``batch < 1``),
            a resumed study set up with another estimator/space/objectives/sampler/seed, a backend for
            another store, an unknown keyword.
        StoreError: the store cannot be opened or lacks a term the estimator needs.
    """
    t0 = time.perf_counter()
    s, sampler_obj = _settings(settings, legacy)
    if not isinstance(store, TrajectoryStore):
        store = TrajectoryStore.open(store)
    check_objectives(s.objectives, store.eval_names)
    if sampler_obj is None:
        sampler_obj = make_sampler(s.sampler, seed=s.seed, n_objectives=len(s.objectives), **s.sampler_options)
    info = BatchInfo.from_plan(store) if info is None else info  # the store carries the plan's domains and metadata
    sp = get_space(s.space, info, **s.space_options)
    if sp.T != store.T:
        raise ConfigError(f"BatchInfo has T = {sp.T} batches but the store has T = {store.T}")
    own_backend = backend is None
    if own_backend:
        backend = SerialBackend(get_estimator(s.estimator, **s.estimator_kwargs).fit(store))
    try:
        if backend.T != store.T or list(backend.eval_names) != list(store.eval_names):
            raise ConfigError(
                f"the backend scores T = {backend.T} batches with eval sets {backend.eval_names}, "
                f"the store has T = {store.T} and {store.eval_names}; use a backend built on this store"
            )
        with optuna_warnings_only():  # Optuna logs every trial at INFO
            return _search(store, s, sp, backend, sampler_obj, progress, t0)
    finally:
        if own_backend:
            backend.close()


def _search(store, s: SearchSettings, sp: SearchSpace, backend, sampler, progress: bool, t0: float) -> SearchResult:
    """The resumable part of :func:`run_search`: open, recover, enqueue, ask/tell, collect."""
    objectives = list(s.objectives)
    study = _open_study(store, s, sp, backend, sampler)
    session = Session(study)
    requeued = recover_stale_trials(study, session)
    if not study.user_attrs.get(STARTS_ATTR):
        n = enqueue_starts(study, _starts(sp, backend, s))
        logger.info("study %r: enqueued %d starting trial(s)", study.study_name, n)

    def complete() -> int:
        return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))

    budget = max(0, s.trials - complete())
    logger.info("study %r: %d trial(s) to run (of %d)", study.study_name, budget, s.trials)
    reused: list[int] = []
    first, t_trials = complete(), time.perf_counter()

    def limit() -> int:  # trials still wanted, and (under max_seconds) that fit in the seconds left
        left, done = s.trials - complete(), complete() - first
        if s.max_seconds is None or done == 0:
            return left
        elapsed = time.perf_counter() - t_trials
        return min(left, max(0, math.floor((s.max_seconds - elapsed) / (elapsed / done))))

    n_run = ask_and_tell(
        study, budget, s.batch, _scorer(sp, backend, objectives, study, reused), progress=progress,
        desc=f"search {study.study_name}", session=session, limit=limit,
    )
    res = collect_result(study, sp, backend, objectives, n_run=n_run, seconds=time.perf_counter() - t0)
    res.requeued, res.n_reused, res.resumed_at = requeued, len(reused), session_starts(study)
    return res
