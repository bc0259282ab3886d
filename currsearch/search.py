"""Curriculum search: Optuna over a search space of orders, scored by a surrogate estimator.

::

    result = run_search(store, estimator_name="additive", space="random_keys", sampler="tpe",
                        n_trials=256, batch_size=32, storage="runs/study.journal")
    for order, est in result.top(5):        # int64 [T], float64 [E] (nats/token)
        ...

How it works (DESIGN.md section 5):

* Optuna ask/tell with batched asks: ask ``batch_size`` trials, decode each into an order
  with the space's ``suggest``, score all of them in ONE backend call
  (:mod:`currsearch.backends`), tell each its estimated loss(es).
* Objectives: the estimated final loss of the eval set(s) named in ``objectives``; one name
  gives a single-objective study, several a multi-objective one (Pareto front).
* Storage: ``None`` (in memory), a path ending in ``.journal`` (Optuna JournalStorage on a
  file; survives a crash) or any Optuna storage URL (``sqlite:///x.db``, an RDB for a
  cluster). Rerunning with the same ``study_name`` continues the study: trials already
  completed count toward ``n_trials`` and only the rest run.
* A fresh study is seeded (``enqueue_trial``) with the heuristic curricula the space can
  represent (:func:`search_spaces.heuristic_params`; ``reference`` among them) and, when
  the estimator has an optimum of its own (``assignment_optimum``: exact for the additive
  surrogates, a linear assignment problem; swap-local for ``calibrated-interactions``), that
  optimum per objective when the space can represent it.
* Each trial keeps its order (user attr ``"order"``: list of T ints) and all E estimates
  (``"estimates"``: list of E floats, ``eval_names`` order) so results are read back
  without decoding; enqueued trials also carry ``"source"`` (the heuristic's name).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
import torch

from .errors import ConfigError

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


def make_storage(storage) -> optuna.storages.BaseStorage | str | None:
    """Optuna storage from ``None`` (in memory), a path ending in ``.journal``
    (JournalStorage + JournalFileBackend; the parent folder is created), any Optuna storage
    URL (``sqlite:///x.db``, ``postgresql://...``; returned as is) or a storage object."""
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    s = str(storage)
    if s.endswith(".journal"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(s).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in s:
        raise ConfigError(f"storage {s!r} is neither a '.journal' file path nor a storage URL such as sqlite:///study.db")
    return s


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

    def top(self, k: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``k`` best distinct orders: list of ``(order int64 [T], estimates float64 [E])``."""
        return [(self.orders[i], self.estimates[i]) for i in range(min(k, self.orders.shape[0]))]

    @property
    def best_order(self) -> torch.Tensor:
        """int64 ``[T]``: the first of :meth:`top`."""
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


# ---------------------------------------------------------------- the driver


def _enqueue_fresh(study: optuna.Study, space, backend, objectives, enqueue_heuristics: bool, enqueue_assignment: bool) -> int:
    """Enqueue heuristic and estimator-optimum starts in a fresh study; return how many."""
    from search_spaces import heuristic_orders, heuristic_params

    queued: list[dict[str, Any]] = []
    sources: list[str] = []
    if enqueue_heuristics:
        named = {tuple(o.tolist()): n for n, o in heuristic_orders(space.info).items()}
        for p in heuristic_params(space):
            order = tuple(space.suggest(optuna.trial.FixedTrial(p)).tolist())
            queued.append(p)
            sources.append(named.get(order, f"{space.name}_default"))
    if enqueue_assignment:
        for obj in objectives:
            opt = backend.assignment_optimum(obj)
            if opt is None or not space.representable(opt):
                continue
            p = space.encode(opt)
            if p not in queued:
                queued.append(p)
                sources.append(f"assignment:{obj}")
    for p, src in zip(queued, sources):
        study.enqueue_trial(p, user_attrs={"source": src})
    return len(queued)


def check_resume(study: optuna.Study, meta: dict[str, Any]) -> None:
    """Check a resumed study's setup, then record it: ``meta`` (JSON-serializable values, e.g.
    estimator, space, objectives) is compared with the study's user attrs ``currsearch_<key>``,
    and keys the study lacks (a fresh study) are stored.

    Raises:
        ConfigError: a stored value differs (the study was run with another setup), naming the keys.
    """
    old = {k: study.user_attrs.get(f"currsearch_{k}") for k in meta}
    diff = [f"{k} ({old[k]!r} in the study vs {v!r} now)" for k, v in meta.items() if old[k] is not None and old[k] != v]
    if diff:
        raise ConfigError(
            f"study {study.study_name!r} exists in this storage with another setup: {', '.join(diff)}; "
            "use another study_name (or storage) or the same settings"
        )
    for k, v in meta.items():
        if old[k] is None:
            study.set_user_attr(f"currsearch_{k}", v)


def ask_and_tell(
    study: optuna.Study,
    n_trials: int,
    batch_size: int,
    score: Callable[[list[optuna.trial.Trial]], list[tuple[Any, dict[str, Any]]]],
    progress: bool = False,
    desc: str = "search",
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
        progress: show a progress bar (``desc``, one tick per trial).

    Returns:
        The number of trials asked (``n_trials``).

    Raises:
        ValueError: ``score`` returned another number of entries than trials.
        Whatever ``score`` or the storage raises. In every case the batch's trials not yet told
        are told ``FAIL`` first, so no trial is left RUNNING in the storage.
    """
    bar = None
    if progress and n_trials:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_trials, desc=desc, unit="trial")
    n_run = 0
    try:
        while n_run < n_trials:
            k = min(batch_size, n_trials - n_run)
            trials = [study.ask() for _ in range(k)]
            n_run += k
            told = 0
            try:
                results = score(trials)
                if len(results) != k:
                    raise ValueError(f"ask_and_tell(): score returned {len(results)} results for {k} trials")
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
                raise
            if bar is not None:
                bar.update(k)
    finally:
        if bar is not None:
            bar.close()
    return n_run


def run_search(
    store,
    estimator_name: str = "additive",
    space: str = "random_keys",
    sampler: str | optuna.samplers.BaseSampler = "tpe",
    n_trials: int = 64,
    batch_size: int = 16,
    storage=None,
    study_name: str | None = None,
    backend=None,
    objectives: Sequence[str] = ("all",),
    seed: int = 0,
    enqueue_heuristics: bool = True,
    enqueue_assignment: bool = True,
    progress: bool = True,
    space_options: dict[str, Any] | None = None,
    *,
    estimator_kwargs: dict[str, Any] | None = None,
    sampler_options: dict[str, Any] | None = None,
    info=None,
) -> SearchResult:
    """Search training orders that minimize the estimated final eval loss(es).

    Args:
        store: a :class:`~currsearch.store.TrajectoryStore` or its directory.
        estimator_name: registered estimator fitted on ``store`` (ignored when ``backend``
            is given: the backend's estimator is used).
        space: search-space name (``search_spaces.available_spaces()``).
        sampler: ``tpe``, ``cmaes``, ``gp``, ``nsga2``, ``random`` or an Optuna sampler object.
        n_trials: total completed trials wanted in the study (a resumed study counts the
            ones it has; failed trials of this call count toward it too).
        batch_size: trials asked (and scored in one backend call) at a time.
        storage: ``None`` (in memory), a ``*.journal`` file path or an Optuna storage URL.
        study_name: default ``"<estimator>-<space>-<objectives joined by +>"``, so that a rerun
            with the same settings and storage resumes.
        backend: a :mod:`currsearch.backends` backend (default: a :class:`SerialBackend` over
            ``get_estimator(estimator_name, **estimator_kwargs).fit(store)``).
        objectives: eval-set names to minimize (``store.eval_names``); one -> single-objective,
            several -> multi-objective (use ``nsga2`` or ``tpe``).
        seed: sampler seed.
        enqueue_heuristics: seed a fresh study with the heuristic curricula the space can
            represent (``reference`` included).
        enqueue_assignment: seed a fresh study with the estimator's own optimum per objective
            (``assignment_optimum``: exact for the additive estimators, swap-local for
            ``calibrated-interactions``), when the space can represent it.
        progress: show a progress bar.
        space_options: keyword options of the space (e.g. ``{"by": "difficulty"}``).
        estimator_kwargs: keyword arguments of the estimator (default backend only).
        sampler_options: keyword arguments of the Optuna sampler class.
        info: a :class:`search_spaces.BatchInfo` (default: from the store's plan, difficulty =
            ``unigram_nll``).

    Returns:
        :class:`SearchResult` (orders int64 ``[m, T]``, estimates float64 ``[m, E]`` nats/token).

    Raises:
        ConfigError: unknown sampler, space (or space option) or objective eval-set name, an
            empty or repeated objective list, a single-objective sampler with several
            objectives, ``n_trials < 0`` or ``batch_size < 1``, a resumed study set up with
            another estimator/space/objectives, a backend for another store.
        StoreError: the store cannot be opened or lacks a term the estimator needs.
    """
    from search_spaces import BatchInfo, get_space

    from .backends import SerialBackend
    from .store import TrajectoryStore

    t0 = time.perf_counter()
    if n_trials < 0 or batch_size < 1:
        raise ConfigError(f"n_trials must be >= 0 and batch_size >= 1 (got {n_trials}, {batch_size})")
    if isinstance(objectives, str):
        objectives = (objectives,)
    objectives = list(objectives)
    if not objectives:
        raise ConfigError("objectives is empty; name at least one eval set (e.g. 'all')")
    if len(set(objectives)) != len(objectives):
        raise ConfigError(f"objectives {objectives} repeat an eval set")
    if not isinstance(store, TrajectoryStore):
        store = TrajectoryStore.open(store)
    unknown = [o for o in objectives if o not in store.eval_names]
    if unknown:
        raise ConfigError(f"unknown objective eval set(s) {unknown}; the store has {store.eval_names}")
    if isinstance(sampler, str):
        sampler_obj = make_sampler(sampler, seed=seed, n_objectives=len(objectives), **(sampler_options or {}))
    elif isinstance(sampler, optuna.samplers.BaseSampler):
        sampler_obj = sampler
    else:
        raise ConfigError(f"sampler must be a name ({', '.join(SAMPLERS)}) or an optuna sampler, got {type(sampler).__name__}")
    info = BatchInfo.from_plan(store) if info is None else info  # the store carries the plan's domains and metadata
    sp = get_space(space, info, **(space_options or {}))
    if sp.T != store.T:
        raise ConfigError(f"BatchInfo has T = {sp.T} batches but the store has T = {store.T}")
    storage_obj = make_storage(storage)

    verbosity = optuna.logging.get_verbosity()  # Optuna logs every trial at INFO; keep warnings
    own_backend = backend is None
    if own_backend:
        from estimators import get_estimator

        backend = SerialBackend(get_estimator(estimator_name, **(estimator_kwargs or {})).fit(store))
    optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))
    try:
        if backend.T != store.T or list(backend.eval_names) != list(store.eval_names):
            raise ConfigError(
                f"the backend scores T = {backend.T} batches with eval sets {backend.eval_names}, "
                f"the store has T = {store.T} and {store.eval_names}; use a backend built on this store"
            )
        est_name = backend.estimator_name
        name = study_name or f"{est_name}-{space}-{'+'.join(objectives)}"
        study = optuna.create_study(
            storage=storage_obj,
            sampler=sampler_obj,
            study_name=name,
            directions=["minimize"] * len(objectives),
            load_if_exists=True,
        )
        if len(study.directions) != len(objectives):
            raise ConfigError(
                f"study {name!r} has {len(study.directions)} objective(s) but {len(objectives)} were given; "
                "use another study_name or the same objectives"
            )
        fresh = len(study.get_trials(deepcopy=False)) == 0
        meta = {
            "estimator": est_name,
            "space": space,
            "space_options": json.dumps(sp.options, sort_keys=True, default=str),
            "objectives": objectives,
            "T": store.T,
        }
        check_resume(study, meta)
        if fresh:
            _enqueue_fresh(study, sp, backend, objectives, enqueue_heuristics, enqueue_assignment)

        n_complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
        budget = max(0, n_trials - n_complete)
        obj_idx = torch.tensor([list(backend.eval_names).index(o) for o in objectives])

        def score(trials):
            orders = torch.stack([sp.suggest(t) for t in trials])  # [k, T]
            scores = backend.score(orders)  # [k, E]: one backend call per batch
            values = scores[:, obj_idx]
            out = []
            for o, row, v in zip(orders, scores, values):
                if torch.isfinite(v).all():
                    value = v.tolist() if len(objectives) > 1 else float(v[0])
                else:
                    value = optuna.trial.TrialState.FAIL  # a non-finite estimate
                out.append((value, {"order": o.tolist(), "estimates": row.tolist()}))
            return out

        n_run = ask_and_tell(study, budget, batch_size, score, progress=progress, desc=f"search {name}")
        return collect_result(study, sp, backend, objectives, n_run=n_run, seconds=time.perf_counter() - t0)
    finally:
        optuna.logging.set_verbosity(verbosity)
        if own_backend:
            backend.close()
