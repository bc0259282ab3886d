"""``guided-tpe``: search with real training, guided by currsearch's order model.

Ours. An Optuna TPE study whose objective is real training, on the same search space
(``random_keys``) and sampler settings as the ``optuna-real`` baseline
(:mod:`currsearch.baselines`), where a surrogate fitted to the real runs proposes some of the
trials::

    result = guided_search(trainer, n_runs=128, settings=GuidedSettings(), seed=0)
    result.best_loss, result.best_order          # nats/token, T batch indices

1. The first ``first_batch`` trials are plain TPE (identical to ``optuna-real``'s with the
   same seed).
2. At every refit point ``p_k = first_batch + k * refit_every < n_runs``, the
   ``calibrated-interactions`` model (position effects plus group interactions,
   :class:`estimators.calibrated.CalibratedInteractions`) is fitted by ridge regression to
   the objective losses of the first ``p_k`` real runs
   (:meth:`~estimators.calibrated.CalibratedInteractions.from_runs`: the runs are the
   search's own, no calibration runs) and searched cheaply: its own swap-local optimum
   (``assignment_optimum``) and a best-improvement swap descent from each of the
   ``starts`` best real orders (``max_swaps`` swaps at most). Its ``enqueue`` best distinct
   orders that were not trained yet are enqueued (``study.enqueue_trial`` with the space's
   encoding) as the next trials; TPE proposes the rest of the segment, with every real run
   (the surrogate's included) in its history.

3. With ``polish > 0``, the budget's last ``polish`` fraction (rounded down to whole run
   equivalents) is spent on :func:`~currsearch.polish.suffix_polish` from the best run:
   transpositions late in the window, each trained for real from the incumbent's state at
   an anchor step, so it costs only its last steps (``(T - s) / T`` of a run plus its
   evaluation).

Every trial is a real run (a full one, or a polish move resumed from a late step), so the
result is the best real loss within ``n_runs`` run equivalents; there is no recording and no
separate verification. The surrogate's fit and search cost
seconds only (``surrogate_seconds``; a ledger counts them with 0 run equivalents, as the
surrogate search of the main job). The refit schedule does not depend on ``n_runs``, so the
first k trials of a longer search are those of a search with ``n_runs = k`` (same seed).

Resumable and kill-safe like the baselines (:mod:`currsearch.study`): each refit's proposals
are stored in the study (user attr ``currsearch_guided_refit:<k>``) before they are enqueued,
a proposal whose run was interrupted is queued again in its place (before the proposals
behind it), and trials left RUNNING by a killed call run again. TPE is seeded per trial
(:func:`~currsearch.search.seeded_per_trial`) and the refits' proposals depend only on the
first ``p_k`` runs, so a resumed search trains the orders an uninterrupted one would have, in
the same order (``resumed_at`` says where calls began).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import optuna
import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from estimators.calibrated import CalibratedInteractions
from search_spaces import BatchInfo, get_space

from .baselines import RealSearchResult, complete_trials, objective_index, open_real_study, real_scorer
from .errors import ConfigError
from .polish import PolishResult, PolishSettings, suffix_polish
from .search import ask_and_tell, check_resume, make_sampler, seeded_per_trial
from .settings import Settings
from .study import fail_unfinished, optuna_warnings_only, session_starts
from .train import Trainer
from .verify import VerificationResult, VerifiedCandidate

logger = logging.getLogger(__name__)

NAME = "guided-tpe"
REFIT_ATTR = "currsearch_guided_refit"
#: settings the full runs do not depend on (a journal's full runs serve every polish setting)
POLISH_FIELDS = {"polish", "polish_moves"}


class GuidedSettings(Settings):
    """How the surrogate guides the TPE study (module docstring).

    Defaults chosen on seeds 7 and 8 at N = 64 on the default config (not on the benchmark's
    seeds 0-2): best real loss after 64 runs, mean of the two seeds, 5.3476 with these
    (refit every 8 runs, 4 orders each, descents of at most 4 swaps) against 5.3592 for
    ``optuna-real``, 5.3496 with refits every 16 runs and 8 orders, 5.3569 with 2 swaps; on
    seed 7 alone, unlimited descents (to a swap-local optimum of a surrogate fitted to a few
    dozen runs) gave 5.3603-5.3662: the surrogate is trustworthy only near the runs it saw.
    Checked on development seeds 100-109 against four variants (6 orders per refit, refits
    every 4 runs, a group-level surrogate, no surrogate; ``benchmarks/guided_ablation.py``,
    docs/estimators.md): none did better at N = 64. ``polish`` (fourteenth session) was chosen
    on development seeds 210-215 at N = 64, both configs, among 0.25, 0.375 and 0.5: mean
    difference from TPE -0.0048 / -0.0057 / -0.0017 (default) and -0.0068 / -0.0077 / -0.0059
    (second) with anchors at 1/2 and 3/4, -0.0050 and -0.0087 at 0.375 with 1/4 added.

    Attributes:
        first_batch: plain TPE trials before the first refit (>= 16, the fewest runs
            ``calibrated-interactions`` fits).
        refit_every: real trials between refits (>= 1).
        enqueue: surrogate orders enqueued per refit (1 <= enqueue <= refit_every).
        starts: best real orders a swap descent starts from at each refit (>= 0; the
            surrogate's own optimum is always a candidate).
        max_swaps: transpositions per descent (None: until a swap-local optimum of the surrogate).
        polish: fraction of the budget spent polishing the best run at the end (0 <= polish < 1;
            :mod:`currsearch.polish`); 0 is the search of the first sessions' tables.
        polish_moves: how the polish moves (:class:`~currsearch.polish.PolishSettings`).
    """

    first_batch: int = Field(16, ge=CalibratedInteractions.min_runs)
    refit_every: int = Field(8, ge=1)
    enqueue: int = Field(4, ge=1)
    starts: int = Field(4, ge=0)
    max_swaps: Optional[int] = Field(4, ge=1)
    polish: float = Field(0.375, ge=0, lt=1)
    polish_moves: PolishSettings = Field(default_factory=PolishSettings)

    @model_validator(mode="after")
    def _enqueue_fits(self) -> "GuidedSettings":
        if self.enqueue > self.refit_every:
            raise ValueError(f"enqueue ({self.enqueue}) must be <= refit_every ({self.refit_every}): the surrogate's "
                             "orders are the first trials of each segment")
        return self

    def full_runs(self, budget: int) -> int:
        """Full runs (TPE and surrogate trials) of a search with ``budget`` run equivalents: all
        but the ``floor(polish * budget)`` the polish gets, or all of them when that share is
        under 2 (too little for the incumbent's run and a move)."""
        share = math.floor(self.polish * budget)
        return budget - share if share >= 2 else budget

    def refit_points(self, n_runs: int) -> list[int]:
        """The numbers of real runs at which the surrogate is refitted: ``first_batch + k refit_every < n_runs``."""
        return list(range(self.first_batch, n_runs, self.refit_every))


@dataclass(frozen=True)
class GuidedResult:
    """What :func:`guided_search` found.

    Attributes:
        runs: the full real runs (:class:`~currsearch.baselines.RealSearchResult` named ``guided-tpe``:
            orders, objective losses in nats/token, in trial order; ``seconds``: the sum of their
            trials' durations, also of trials an earlier call of a resumed search ran).
        eval_names: the E eval sets; eval_losses: ``[n_runs][E]`` every final eval loss of each run, nats/token.
        sources: per run ``"tpe"`` or ``"surrogate:<k>"`` (proposed by the k-th refit).
        refits: refits whose proposals are in the study.
        surrogate_seconds: wall seconds of this call's surrogate fits and searches.
        run_durations: per run, the wall seconds of its trial (one real training).
        resumed_at: first trial number of every later call that trained some of these runs (TPE restarted there).
        settings: the settings it ran with.
        polish: the final polish (:class:`~currsearch.polish.PolishResult`), None without a polish
            share (``polish = 0``, or a share under 2 run equivalents: :meth:`GuidedSettings.full_runs`).
    """

    runs: RealSearchResult
    eval_names: list[str]
    eval_losses: list[list[float]]
    sources: list[str]
    refits: int
    surrogate_seconds: float
    run_durations: list[float]
    resumed_at: list[int]
    settings: GuidedSettings
    polish: PolishResult | None = None

    @property
    def n_runs(self) -> int:
        """Full real runs spent (the polish's partial runs not included)."""
        return self.runs.n_runs

    @property
    def run_equivalents(self) -> float:
        """Real-run equivalents spent: the full runs plus the polish's."""
        return self.n_runs + (self.polish.run_equivalents if self.polish else 0.0)

    def _trained(self) -> list[tuple[list[int], float, list[float], float, str]]:
        """Every trained order, full runs then polish moves: ``(order, objective loss, eval losses, seconds, source)``."""
        out = [(o, x, e, d, src) for o, x, e, d, src in zip(self.runs.orders, self.runs.losses, self.eval_losses,
                                                           self.run_durations, self.sources)]
        if self.polish:
            p = self.polish
            out += [(o, x, e, d, "polish") for o, x, e, d in zip(p.orders, p.losses, p.eval_losses, p.durations)]
        return out

    @property
    def best_loss(self) -> float:
        """The lowest objective loss, nats/token."""
        return min(x for _, x, _, _, _ in self._trained())

    @property
    def best_order(self) -> list[int]:
        """The order with the lowest objective loss (the first trained on ties)."""
        return self._trained()[self.top(1)[0]][0]

    @property
    def best_source(self) -> str:
        """Who proposed the best order: ``tpe``, ``surrogate:<k>`` or ``polish``."""
        return self._trained()[self.top(1)[0]][4]

    @property
    def n_surrogate(self) -> int:
        """Runs of orders the surrogate proposed."""
        return sum(s != "tpe" for s in self.sources)

    @property
    def run_seconds(self) -> float:
        """Median wall seconds of one full real run (the ledger's unit)."""
        return statistics.median(self.run_durations) if self.run_durations else 0.0

    def top(self, k: int) -> list[int]:
        """Indices (full runs, then polish moves) of the ``k`` best distinct orders, best objective loss first."""
        trained = self._trained()
        firsts = {tuple(o): i for i, (o, *_) in reversed(list(enumerate(trained)))}  # first training of each order
        return sorted(firsts.values(), key=lambda i: (trained[i][1], i))[:k]

    def record(self) -> dict:
        """JSON-ready record: the strategy, its settings, runs, refits, surrogate runs and
        seconds, who proposed the best order, per run its source and objective loss
        (nats/token; the anytime curve), and the polish's record."""
        return {"strategy": NAME, "settings": self.settings.model_dump(), "n_runs": self.n_runs, "refits": self.refits,
                "n_surrogate": self.n_surrogate, "best_source": self.best_source,
                "surrogate_seconds": self.surrogate_seconds, "run_seconds": self.run_seconds,
                "run_equivalents": self.run_equivalents, "resumed_at": self.resumed_at, "sources": self.sources,
                "losses": self.runs.losses, "polish": self.polish.record() if self.polish else None}

    def verification(self, trainer: Trainer, top_k: int) -> VerificationResult:
        """The ``top_k`` best distinct orders as verified candidates ``search_1..top_k`` (kind
        ``searched``; their real losses are the runs', no retraining; no estimate), with
        :meth:`record` as the ``search`` record."""
        trained = self._trained()
        cands = {f"search_{j + 1}": VerifiedCandidate("searched", list(trained[i][0]), dict(zip(self.eval_names, trained[i][2])),
                                                      None, trained[i][3])
                 for j, i in enumerate(self.top(top_k))}
        return VerificationResult(self.eval_names, list(trainer.plan.domains), trainer.T, cands, search=self.record())


def propose(plan, objective: str, orders: list[list[int]], losses: list[float], exclude: set[tuple[int, ...]],
            s: GuidedSettings) -> list[list[int]]:
    """The surrogate's proposals from real runs: at most ``s.enqueue`` distinct orders, best estimate first.

    Fits ``calibrated-interactions`` to ``orders`` (``[n][T]``) and their ``objective``
    ``losses`` (``[n]``, nats/token), then scores its ``assignment_optimum`` and a swap
    descent from each of the ``s.starts`` best real orders; orders in ``exclude`` (trained
    already) are skipped. Deterministic.
    """
    est = CalibratedInteractions.from_runs(plan, [objective], orders, [[x] for x in losses])
    best_real = sorted(range(len(losses)), key=lambda i: (losses[i], i))[:s.starts]
    cands = [est.assignment_optimum(objective, max_swaps=s.max_swaps)]
    cands += [est.swap_descent(orders[i], objective, s.max_swaps) for i in best_real]
    return best_new_orders(est, objective, cands, exclude, s.enqueue)


def best_new_orders(est, objective: str, cands: list[torch.Tensor], exclude: set[tuple[int, ...]],
                    k: int) -> list[list[int]]:
    """The ``k`` candidate orders (int64 ``[T]`` each) with the lowest ``objective`` estimate of
    ``est``, distinct and not in ``exclude``, best first (ties by first appearance)."""
    distinct = list(dict.fromkeys(tuple(o.tolist()) for o in cands))
    fresh = [o for o in distinct if o not in exclude]
    if not fresh:
        return []
    est_loss = est.estimate(torch.tensor(fresh, dtype=torch.int64))[:, est.eval_names.index(objective)].tolist()
    ranked = sorted(range(len(fresh)), key=lambda i: (est_loss[i], i))
    return [list(fresh[i]) for i in ranked[:k]]


def _enqueue_refit(study: optuna.Study, k: int, point: int, plan, objective: str, space, s: GuidedSettings,
                   proposer=propose) -> None:
    """Make refit ``k`` (at ``point`` runs) and queue its proposals not trained yet, in proposal order.

    The proposals come from the stored ``currsearch_guided_refit:<k>`` attr when an earlier
    call made them (so a resumed call never refits twice), else from ``proposer`` (:func:`propose`) on the
    first ``point`` completed runs (those with a finite loss; none when fewer than the fit's
    minimum are), stored before they are enqueued. When the queue does not hold exactly the
    untrained proposals in proposal order (none of them being trained by a live call), its
    trials are told FAIL and every untrained proposal is queued again in order, so the resumed
    search trains them as an uninterrupted one would have (an interrupted batch and a killed
    call requeue in order themselves: :func:`~currsearch.search.ask_and_tell`,
    :func:`~currsearch.study.recover_stale_trials`)."""
    attempted = {tuple(t.user_attrs["order"]) for t in study.get_trials(deepcopy=False) if "losses" in t.user_attrs}
    proposals = study.user_attrs.get(f"{REFIT_ATTR}:{k}")
    if proposals is None:
        runs = [t for t in complete_trials(study)[:point] if math.isfinite(t.value)]  # a diverged run (+inf) fits nothing
        proposals = proposer(plan, objective, [t.user_attrs["order"] for t in runs], [float(t.value) for t in runs],
                            attempted, s) if len(runs) >= CalibratedInteractions.min_runs else []
        study.set_user_attr(f"{REFIT_ATTR}:{k}", proposals)
        logger.info("refit %d on %d runs: %d surrogate order(s) enqueued", k, point, len(proposals))
    running = {tuple(t.user_attrs["order"]) for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
               if "order" in t.user_attrs}  # another live call trains them
    untrained = [order for order in proposals if tuple(order) not in attempted | running]
    queued = sorted((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
                     if "order" in t.user_attrs), key=lambda t: t.number)
    if [t.user_attrs["order"] for t in queued] == untrained:
        return
    fail_unfinished(study, queued)
    for order in untrained:
        study.enqueue_trial(space.encode(order), user_attrs={"source": f"surrogate:{k}", "order": order})


def guided_search(trainer: Trainer, n_runs: int, settings: GuidedSettings | None = None, seed: int = 0,
                  objective: str = "all", storage=None, progress: bool = True, proposer=propose) -> GuidedResult:
    """Search orders within ``n_runs`` run equivalents of real training: TPE guided by refitted
    surrogates, then the suffix polish of the best run (module docstring).

    Args:
        trainer: the Trainer whose window is trained (its cached warm-up phase is shared).
        n_runs: the budget in real-run equivalents (>= 1): ``settings.full_runs(n_runs)`` full
            runs are asked (a run whose training diverges to a non-finite loss counts, with
            loss +inf), then the polish spends the rest (journal study
            ``guided-tpe-polish-<objective>-seed<seed>-budget<n_runs>-polish<its share>``; it
            can exceed its share by at most one evaluation, :func:`~currsearch.polish.suffix_polish`).
        settings: :class:`GuidedSettings` (default: all defaults).
        seed: TPE's seed (the surrogate's fit and search are deterministic).
        objective: the eval set whose final loss (nats/token) is minimized.
        storage: ``None`` (in memory), a ``*.journal`` path or an Optuna storage URL; a rerun
            with the same storage resumes, and a search with another budget or polish fraction
            reuses its full runs (they do not depend on the polish; its polish is a study of
            its own, named by the budget and the polish's share). Other ``polish_moves`` at the
            same budget and share are refused: use another storage.
        progress: tqdm bars (one tick per full run; the polish's in run equivalents).
        proposer: who proposes at each refit, with :func:`propose`'s signature and contract
            (at most ``settings.enqueue`` orders, deterministic), e.g. an ablation's
            (``benchmarks/guided_ablation.py``); its qualified name is stored in the study, so a
            resume with another proposer is refused.

    Returns:
        :class:`GuidedResult` with the first ``settings.full_runs(n_runs)`` completed runs and the polish.

    Raises:
        ConfigError: ``n_runs < 1``, an unknown objective, a study in ``storage`` made with
            other settings, or a polish share with a window of T < 3 steps (before any run).
    """
    s = settings or GuidedSettings()
    if n_runs < 1:
        raise ConfigError(f"a real-training search needs n_runs >= 1, got {n_runs}")
    budget, n_runs = n_runs, s.full_runs(n_runs)
    if n_runs < budget and trainer.T < 3:
        raise ConfigError(f"the suffix polish needs a window of at least 3 steps, got T = {trainer.T}; use polish = 0 "
                          "(--polish 0) or a longer window (data.num_batches)")
    space = get_space("random_keys", BatchInfo.from_plan(trainer.plan))
    train = real_scorer(trainer, space, objective_index(trainer, objective))
    surrogate_s = 0.0
    with optuna_warnings_only():
        study, session = open_real_study(f"{NAME}-{objective}-seed{seed}", make_sampler("tpe", seed=seed), storage,
                                         trainer)
        check_resume(study, {"guided": s.model_dump(mode="json", exclude=POLISH_FIELDS), "T": trainer.T, "proposer": _proposer_name(proposer)})
        left = max(0, n_runs - len(complete_trials(study)))
        with tqdm(total=left, desc=NAME, unit="run", disable=not (progress and left)) as bar:

            def score(trials):
                out = train(trials)
                bar.update(len(trials))
                return out

            while left > 0:
                done = len(complete_trials(study))
                points = s.refit_points(n_runs)
                due = [k for k, p in enumerate(points) if p <= done]
                if due:
                    t1 = time.perf_counter()
                    _enqueue_refit(study, due[-1], points[due[-1]], trainer.plan, objective, space, s, proposer)
                    surrogate_s += time.perf_counter() - t1
                stop = next((p for p in points if p > done), n_runs)
                m = min(max(1, stop - done), left)
                ask_and_tell(study, m, 1, score, session=session, sampler_for=seeded_per_trial("tpe", seed))
                left -= m
    res = _result(study, trainer, n_runs, objective, seed, s, surrogate_s)
    if n_runs == budget:
        return res
    pol = suffix_polish(trainer, res.best_order, res.best_loss, budget - n_runs, s.polish_moves, seed, objective, storage,
                        study_name=f"{NAME}-polish-{objective}-seed{seed}-budget{budget}-polish{budget - n_runs}",
                        progress=progress)
    return dataclasses.replace(res, polish=pol)


def _proposer_name(proposer) -> str:
    """``module.qualname`` of a proposer (its ``repr`` for a callable without one, e.g. a ``functools.partial``)."""
    name = getattr(proposer, "__qualname__", None)
    return f"{proposer.__module__}.{name}" if name and name != "<lambda>" else repr(proposer)


def _result(study: optuna.Study, trainer: Trainer, n_runs: int, objective: str, seed: int, s: GuidedSettings,
            surrogate_seconds: float) -> GuidedResult:
    """Read the first ``n_runs`` completed runs of ``study`` back into a :class:`GuidedResult`."""
    trials = complete_trials(study)[:n_runs]
    refits = sum(f"{REFIT_ATTR}:{k}" in study.user_attrs for k in range(len(s.refit_points(n_runs))))  # of these runs
    return GuidedResult(
        runs=RealSearchResult.from_trials(NAME, trials, objective, seed),
        eval_names=list(trainer.plan.eval_names), eval_losses=[list(t.user_attrs["losses"]) for t in trials],
        sources=[str(t.user_attrs.get("source", "tpe")) for t in trials], refits=refits,
        surrogate_seconds=surrogate_seconds, run_durations=[t.duration.total_seconds() for t in trials],
        resumed_at=[k for k in session_starts(study) if trials and k <= trials[-1].number], settings=s)  # calls that trained these
