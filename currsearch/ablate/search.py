"""Search over subsets (and mixture weights) of partitions with the Optuna driver of
:mod:`currsearch.search`, scored by the merged-model estimate, and verification of the best
subsets by real training (Na et al. 2024, arXiv 2410.15661, proxy)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import optuna
import torch

from ..errors import ConfigError
from ..manifest import make_output_dir
from ..search import ask_and_tell, check_resume, make_sampler
from ..study import make_storage, optuna_warnings_only
from .merge import MergeEstimator
from .models import as_models
from .partitions import PAPER
from .results import MergedOptimum, SearchedSubset, SubsetCandidate, SubsetSearchRecord, SubsetSearchReport, SubsetSearchSummary
from .subsets import all_subsets, subset_label, subset_weights
from .training import real_union

logger = logging.getLogger(__name__)


@dataclass
class SubsetSearchResult:
    """Distinct subsets/mixtures scored by an Optuna study, best first.

    Attributes:
        study: the Optuna study (earlier runs of a resumed study included).
        names: the K partition names; eval_names: the E eval sets; objective: the minimized one.
        weights: float64 ``[m, K]`` normalized weights of the distinct completed trials, best first.
        estimates: float64 ``[m, E]`` merged eval losses (nats/token).
        values: float64 ``[m]`` the objective column of ``estimates``.
        n_trials: finished trials in the study (complete + pruned empty subsets).
        n_run: trials asked by this call; seconds: its wall time.
        labels: human-readable label of each row of ``weights`` (e.g. ``"bible+python"``).
    """

    study: object
    names: list[str]
    eval_names: list[str]
    objective: str
    weights: torch.Tensor
    estimates: torch.Tensor
    values: torch.Tensor
    n_trials: int
    n_run: int
    seconds: float
    labels: list[str] = field(default_factory=list)

    def top(self, k: int = 1) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """The ``k`` best: list of ``(label, weights float64 [K], estimates float64 [E])``."""
        return [(self.labels[i], self.weights[i], self.estimates[i]) for i in range(min(k, self.weights.shape[0]))]


def _decode(trial, names: Sequence[str], use_weights: bool, min_weight: float) -> list[float]:
    use = [trial.suggest_categorical(f"use:{n}", [0, 1]) for n in names]
    if not use_weights:
        return [float(u) for u in use]
    return [trial.suggest_float(f"weight:{n}", min_weight, 1.0) if u else 0.0 for n, u in zip(names, use)]


def _key(w: torch.Tensor) -> tuple:
    return tuple(round(float(x), 6) for x in w)


def _enqueue_starts(study, names: Sequence[str], weights: bool) -> None:
    """Seed a fresh study with the full set and every single partition."""
    full = {f"use:{n}": 1 for n in names}
    if weights:
        full.update({f"weight:{n}": 1.0 for n in names})
    study.enqueue_trial(full, user_attrs={"source": "full"})
    for n in names:
        p = {f"use:{m}": int(m == n) for m in names}
        if weights:
            p[f"weight:{n}"] = 1.0
        study.enqueue_trial(p, user_attrs={"source": f"single:{n}"})


def _scorer(est: MergeEstimator, names: Sequence[str], weights: bool, min_weight: float, j: int):
    """The ``score(trials)`` of :func:`currsearch.search.ask_and_tell`: one merged estimate per
    batch of trials (identical subsets scored once, cached), empty subsets PRUNED."""
    cache: dict[tuple, torch.Tensor] = {}  # rounded normalized weights -> merged eval losses [E]

    def score(trials):
        raw = [torch.tensor(_decode(t, names, weights, min_weight), dtype=torch.float64) for t in trials]
        normed = [r / r.sum() if r.sum() > 0 else None for r in raw]
        new = list(dict.fromkeys(_key(w) for w in normed if w is not None and _key(w) not in cache))
        if new:  # one estimate call per batch; identical subsets are scored once
            cache.update(zip(new, est.estimate(torch.tensor(new, dtype=torch.float64))))
        out = []
        for w in normed:
            if w is None:
                out.append((optuna.trial.TrialState.PRUNED, {"reason": "empty subset"}))
            else:
                s = cache[_key(w)]
                out.append((float(s[j]), {"weights": w.tolist(), "estimates": s.tolist(), "label": subset_label(w, names)}))
        return out

    return score


def _distinct_ranked(study, K: int, E: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights float64 ``[m, K]`` and estimates ``[m, E]`` of the distinct complete trials, sorted
    (stable) by estimate column ``j``."""
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    seen: dict[tuple, int] = {}
    W, E_ = [], []
    for t in trials:
        w = t.user_attrs.get("weights")
        e = t.user_attrs.get("estimates")
        if w is None or e is None:
            continue
        key = _key(torch.tensor(w))
        if key not in seen:
            seen[key] = len(W)
            W.append(w)
            E_.append(e)
    Wt = torch.tensor(W, dtype=torch.float64).view(-1, K)
    Et = torch.tensor(E_, dtype=torch.float64).view(-1, E)
    rank = torch.sort(Et[:, j], stable=True).indices
    return Wt[rank], Et[rank]


def search_subsets(estimator, n_trials: int = 64, sampler="tpe", weights: bool = False, objective: str = "all",
                   storage=None, study_name: str | None = None, seed: int = 0, batch_size: int = 8,
                   min_weight: float = 0.05, progress: bool = False) -> SubsetSearchResult:
    """Search subsets (and optionally mixture weights) minimizing the merged eval loss.

    Optuna ask/tell (the driver of :mod:`currsearch.search`: :func:`make_sampler`,
    :func:`make_storage`, resumable with a ``.journal`` storage): one categorical 0/1 parameter
    ``use:<partition>`` per partition and, with ``weights``, ``weight:<partition>`` in
    ``[min_weight, 1]`` for each used partition (normalized). An empty subset is told PRUNED.
    Trials are asked ``batch_size`` at a time and their subsets scored in one
    :meth:`MergeEstimator.estimate` call (identical subsets are scored once). A fresh study is
    seeded with the full set and every single partition.

    Args:
        estimator: a :class:`MergeEstimator` (or an :class:`AblationModels` / directory).
        n_trials: finished trials wanted in the study (a resumed study counts its own).
        sampler: ``tpe``, ``cmaes``, ``gp``, ``nsga2``, ``random`` or an Optuna sampler.
        weights: search mixture weights too (merged model = weighted average).
        objective: eval set whose merged loss is minimized.
        storage: ``None``, a ``*.journal`` path or an Optuna storage URL.
        study_name: default ``"ablate-subsets-<objective>"`` / ``"ablate-weights-<objective>"``.

    Returns:
        :class:`SubsetSearchResult`.

    Raises:
        ConfigError: unknown objective or sampler, ``n_trials < 0``, ``batch_size < 1``, a bad
            ``min_weight``, a resumed study of other partitions/models/objective/mode.
    """
    t0 = time.perf_counter()
    est = estimator if isinstance(estimator, MergeEstimator) else MergeEstimator(estimator)
    names, ev = est.names, est.eval_names
    if objective not in ev:
        raise ConfigError(f"unknown objective eval set {objective!r}; eval sets are {ev}")
    if n_trials < 0 or batch_size < 1:
        raise ConfigError(f"n_trials must be >= 0 and batch_size >= 1 (got {n_trials}, {batch_size})")
    if not 0 < min_weight <= 1:
        raise ConfigError(f"min_weight must be in (0, 1], got {min_weight}")
    j = ev.index(objective)
    sampler_obj = make_sampler(sampler, seed=seed) if isinstance(sampler, str) else sampler
    name = study_name or f"ablate-{'weights' if weights else 'subsets'}-{objective}"
    with optuna_warnings_only():  # Optuna logs every trial at INFO
        study = optuna.create_study(storage=make_storage(storage), sampler=sampler_obj, study_name=name,
                                    direction="minimize", load_if_exists=True)
        fresh = len(study.get_trials(deepcopy=False)) == 0
        check_resume(study, {"partitions": names, "objective": objective, "weights": bool(weights),
                              "models": est.models.manifest["hashes"].get("base", ""), "min_weight": min_weight})
        if fresh:
            _enqueue_starts(study, names, weights)
        done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        budget = max(0, n_trials - len(study.get_trials(deepcopy=False, states=done_states)))
        score = _scorer(est, names, weights, min_weight, j)
        n_run = ask_and_tell(study, budget, batch_size, score, progress=progress, desc=f"search {name}")
        Wt, Et = _distinct_ranked(study, len(names), len(ev), j)
        n_finished = len(study.get_trials(deepcopy=False, states=done_states))
        return SubsetSearchResult(study, names, ev, objective, Wt, Et, Et[:, j], n_finished, n_run,
                                  time.perf_counter() - t0, [subset_label(w, names) for w in Wt])


def verify_subsets(models, candidates: dict, estimator: MergeEstimator | None = None,
                   progress: bool = False) -> dict[str, SubsetCandidate]:
    """Train each candidate subset/mixture for real (:func:`real_union`) next to its merged estimate.

    Args:
        models: the partition-models directory (path or :class:`AblationModels`).
        candidates: ``{name: subset}`` (weights ``[K]``, bool ``[K]`` or a name string).
        estimator: the :class:`MergeEstimator` giving the ``estimated`` column (default: one
            built on ``models``).
        progress: show training progress.

    Raises:
        ConfigError: an invalid subset (empty, unknown name, negative weight).

    Returns:
        ``{name: SubsetCandidate}`` in the order given (merged and real losses in nats/token,
        steps, seconds); identical subsets are trained once.
    """
    models = as_models(models)
    est = estimator or MergeEstimator(models)
    ev = models.eval_names
    done: dict[tuple, tuple] = {}
    out = {}
    for name, sub in candidates.items():
        w = subset_weights(sub, models.names)[0]
        key = _key(w)
        if key not in done:
            r = real_union(models, w)
            e = est.estimate(w[None])[0]
            done[key] = (r, e)
            if progress:
                logger.info("verified %s (%s): %s = %.4f nats/token real, %.4f merged (%.2f s)", name,
                            subset_label(w, models.names), ev[-1], float(r["eval_loss"][-1]), float(e[-1]), r["seconds"])
        r, e = done[key]
        out[name] = SubsetCandidate(label=subset_label(w, models.names), weights=w.tolist(),
                                    estimated=dict(zip(ev, e.tolist())), verified=dict(zip(ev, r["eval_loss"].tolist())),
                                    steps=r["steps"], seconds=r["seconds"], reused_partition_model=r["reused"])
    return out


def _merged_optimum(est: MergeEstimator, res: SubsetSearchResult, objective: str) -> MergedOptimum:
    """The exhaustive optimum of the merged estimate on ``objective`` over all ``2^K - 1`` subsets."""
    subs = all_subsets(len(res.names))
    allest = est.estimate(subs)[:, res.eval_names.index(objective)]
    i = int(torch.argmin(allest))
    return MergedOptimum(label=subset_label(subs[i], res.names), estimated=float(allest[i]))


def _summarize(verified: dict[str, SubsetCandidate], objective: str, optimum: MergedOptimum | None,
               searched_labels: list[str]) -> SubsetSearchSummary:
    """The best verified ``search_*`` candidate against ``full`` and the ``single:*`` candidates;
    ``searched_labels``: the search's labels, best estimate first."""
    loss = {n: v.verified[objective] for n, v in verified.items()}
    searched = [n for n in verified if n.startswith("search_")]
    singles = [n for n in verified if n.startswith("single:")]
    best = min(searched, key=lambda n: (loss[n], n)) if searched else None
    best_single = min(singles, key=lambda n: (loss[n], n))
    return SubsetSearchSummary(
        objective=objective,
        best_searched=best, best_searched_label=verified[best].label if best else None,
        best_searched_loss=loss[best] if best else None,
        full_loss=loss["full"], best_single=best_single, best_single_loss=loss[best_single],
        beats_full=(loss[best] < loss["full"]) if best else None,
        best_is_full=(verified[best].label == verified["full"].label) if best else None,
        beats_best_single=(loss[best] < loss[best_single]) if best else None,
        merged_optimum=optimum,
        search_found_merged_optimum=None if optimum is None else bool(searched_labels) and searched_labels[0] == optimum.label,
    )


def _search_record(res: SubsetSearchResult, storage, sampler, weights: bool, top_k: int) -> SubsetSearchRecord:
    return SubsetSearchRecord(
        study=res.study.study_name, storage=str(storage) if storage else None, n_trials=res.n_trials, n_run=res.n_run,
        seconds=res.seconds, weights=weights, sampler=sampler if isinstance(sampler, str) else type(sampler).__name__,
        distinct=int(res.weights.shape[0]),
        top=[SearchedSubset(label=l, weights=w.tolist(), estimates=dict(zip(res.eval_names, e.tolist())))
             for l, w, e in res.top(max(top_k, 10))])


def run_subset_search(models, out=None, n_trials: int = 64, sampler="tpe", weights: bool = False, objective: str = "all",
                      top_k: int = 3, seed: int = 0, batch_size: int = 8, storage=None, progress: bool = False,
                      ) -> tuple[SubsetSearchReport, object]:
    """Search subsets with :func:`search_subsets`, verify the top-k by real training, and report
    them against the full set and the best single partition (both also trained for real).

    Args:
        models: an :class:`AblationModels` or its directory.
        out: directory of the study journal (``study.journal`` unless ``storage`` is given);
            ``None``: in memory. Write ``search.json``, ``search.md`` and
            ``optimization_history.png`` there with :func:`currsearch.reports.ablate.write_search_report`.
        top_k: distinct searched subsets to verify.
        Others: as :func:`search_subsets`.

    Returns:
        ``(report, study)``: the :class:`SubsetSearchReport` (search record with the top
        subsets, ``{name: SubsetCandidate}`` for ``search_1..k``, ``full`` and
        ``single:<partition>``, and the :class:`SubsetSearchSummary`, whose ``merged_optimum``
        is the exhaustive merged optimum when K <= 10 and no weights) and the Optuna study.

    Raises:
        ConfigError: ``top_k < 1``, ``batch_size < 1`` or ``n_trials < 0`` (before anything is written).
        StoreError: ``models`` is not a complete ablation models directory.
    """
    if top_k < 1 or batch_size < 1 or n_trials < 0:
        raise ConfigError(f"subset search needs top_k >= 1, batch_size >= 1 and n_trials >= 0 "
                          f"(got top_k={top_k}, batch_size={batch_size}, n_trials={n_trials})")
    models = as_models(models)
    est = MergeEstimator(models)
    if out is not None:
        out = make_output_dir(out)
        storage = storage or str(out / "study.journal")
    res = search_subsets(est, n_trials=n_trials, sampler=sampler, weights=weights, objective=objective, storage=storage,
                         seed=seed, batch_size=batch_size, progress=progress)
    cands = {f"search_{i + 1}": w for i, (_, w, _) in enumerate(res.top(top_k))}
    cands["full"] = torch.ones(models.K, dtype=torch.float64)
    for k, n in enumerate(models.names):
        cands[f"single:{n}"] = torch.nn.functional.one_hot(torch.tensor(k), models.K).double()
    verified = verify_subsets(models, cands, est, progress=progress)
    optimum = _merged_optimum(est, res, objective) if not weights and models.K <= 10 else None
    report = SubsetSearchReport(
        method=PAPER, models=str(models.path), partitions=list(models.names), eval_names=list(res.eval_names),
        search=_search_record(res, storage, sampler, weights, top_k), candidates=verified,
        summary=_summarize(verified, objective, optimum, res.labels))
    return report, res.study
