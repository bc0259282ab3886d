"""The main job as a library call: record, search, verify, refine, with a compute ledger.

    result = run_pipeline(cfg, PipelineSettings(out="runs/main"))
    write_run_report(result, "runs/main/report")        # currsearch.reports.pipeline

Phases (each resumes when rerun on the same ``out``):

1. **record** the reference trajectory store into ``OUT/store``;
2. **fit** the surrogate estimator (a calibrated estimator's real runs are cached in the store);
3. **search** orders with Optuna on the surrogate (journal ``OUT/study.journal``);
4. **verify** the ``top_k`` searched orders and the baselines (reference, random orders,
   heuristic curricula) by real training, each finished run kept in the store
   (``OUT/store/verify/runs.json``: a rerun trains only the orders it lacks); a calibrated
   estimator's best fit run joins them as ``fit_best`` (a real run already paid for);
5. **refine** the best verified order with trust-region rounds (``fut1-hvp``, re-recording
   at each incumbent; ``OUT/trust_region``).

Every phase is entered in a :class:`~currsearch.ledger.ComputeLedger` (real runs, seconds,
run equivalents), so a report can compare the result with search on real training at the
same compute.

``PipelineSettings.strategy = "guided-tpe"`` (``currsearch run --strategy guided-tpe``) runs
another job in their place: :func:`currsearch.guided.guided_search`, TPE with real training
guided by surrogates refitted to those runs, then the suffix polish of its best run (real runs
resumed from a late step, :mod:`currsearch.polish`; journal ``OUT/guided.journal``), within
``budget`` run equivalents; its best runs are the verified candidates.
"""

from __future__ import annotations

import logging
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from estimators import get_estimator
from estimators.base import Estimator

from .backends import SerialBackend
from .baselines import BASELINES, RealSearchResult, real_search
from .config import Config
from .errors import BudgetTooSmallError, ConfigError, CurrsearchError
from .guided import GuidedResult, GuidedSettings, guided_search
from .ledger import ComputeLedger, LedgerSummary
from .record import record, record_run_equivalents
from .search import SearchResult, SearchSettings, check_objectives, check_study_before_fit, run_search
from .settings import Settings
from .store import TrajectoryStore
from .train import Trainer
from .trust_region import TrustRegionResult, TrustRegionSettings, record_config, refine_verified
from .verify import VerificationResult, VerifiedCandidate, baseline_orders, verified_runs, verify

logger = logging.getLogger(__name__)


#: the main job's default budget in real-run equivalents: about 3 minutes on 2 CPU cores with
#: the default config (README)
DEFAULT_BUDGET = 256


class VerifySettings(Settings):
    """What the pipeline retrains for real after the search.

    Attributes:
        top_k: searched orders verified (>= 1).
        random: random baseline orders (seeds ``search.seed + i``; >= 0); the report compares
            with their median.
        baselines: also verify the reference order, ``random`` random orders and the
            heuristic curricula (off under a budget: the yardstick there is search with real
            training at the same budget, see ``PipelineSettings.baselines``).
    """

    top_k: int = Field(3, ge=1)
    random: int = Field(5, ge=0)
    baselines: bool = True


#: trust-region rounds of a job without a budget (``RefineSettings.rounds`` None)
DEFAULT_ROUNDS = 2


class RefineSettings(Settings):
    """Trust-region rounds from the best verified order (:func:`~currsearch.trust_region.refine_verified`).

    Attributes:
        rounds: rounds (0 skips the phase; None: :data:`DEFAULT_ROUNDS` without a budget, 0
            under one, since the rounds' ``fut1-hvp`` estimates count by their time, which the
            budget can plan only until a round has measured it, and measured 85-133 run
            equivalents for a gain of 0.0005-0.006 nats/token on the default config).
        trials: orders estimated per round (>= 3).
        top_k: orders retrained per round (>= 1, < trials).
        estimator: the estimator of the rounds (default ``fut1-hvp``, accurate near the recorded run).
    """

    rounds: Optional[int] = Field(None, ge=0)
    trials: int = Field(16, ge=3)
    top_k: int = Field(2, ge=1)
    estimator: str = "fut1-hvp"

    @property
    def round_run_equivalents(self) -> float:
        """Planned cost of one round in real-run equivalents: its recorded run, its ``top_k``
        retrained orders and its ``trials`` estimates at :data:`HVP_RUNS_PER_ESTIMATE` each."""
        return 1 + self.top_k + self.trials * HVP_RUNS_PER_ESTIMATE

    def trust_region(self, objective: str, seed: int, budget: float | None = None,
                     run_seconds: float | None = None) -> TrustRegionSettings:
        """The :class:`TrustRegionSettings` of these rounds, stopped early when their measured
        spend would exceed ``budget`` run equivalents of ``run_seconds`` each (None: measured
        by the rounds); raises ConfigError when ``rounds == 0``."""
        return TrustRegionSettings(rounds=self.rounds, trials=self.trials, top_k=self.top_k, estimator=self.estimator,
                                   objective=objective, seed=seed, budget=budget, run_seconds=run_seconds)


class PipelineSettings(Settings):
    """Settings of :func:`run_pipeline`, the single source of the main job's defaults.

    Attributes:
        out: output directory (store, study journal, trust-region rounds).
        search: the surrogate search; its estimator defaults to ``calibrated-interactions``
            here and its storage is always ``OUT/study.journal``.
        verify: what is retrained after the search.
        refine: trust-region rounds after the verification.
        budget: real-run equivalents the whole job may spend (default :data:`DEFAULT_BUDGET`;
            None: no cap); the phases are sized to it by :func:`size_to_budget`.
        baselines: searches with real training run at the same budget for comparison
            (``random-search``, ``optuna-real``; :mod:`currsearch.baselines`). Their runs are
            not part of the job's budget: they are what the job is compared with.
        strategy: ``surrogate`` (record, fit, search the surrogate, verify, refine: the
            phases above) or ``guided-tpe`` (:mod:`currsearch.guided`: TPE with real training
            guided by refitted surrogates, then the suffix polish of its best run; every run is
            real, so there is no recording, verification or refinement; ``search`` gives its
            seed and objective).
        guided: the ``guided-tpe`` strategy's settings.
    """

    out: Path = Path("runs/main")
    budget: Optional[int] = Field(DEFAULT_BUDGET, ge=1)
    baselines: tuple[str, ...] = ()
    strategy: Literal["surrogate", "guided-tpe"] = "surrogate"
    guided: GuidedSettings = Field(default_factory=GuidedSettings)
    search: SearchSettings = Field(default_factory=lambda: SearchSettings(estimator="calibrated-interactions"))
    verify: VerifySettings = Field(default_factory=VerifySettings)
    refine: RefineSettings = Field(default_factory=RefineSettings)

    @model_validator(mode="after")
    def _rounds(self) -> "PipelineSettings":
        if self.refine.rounds is None:  # frozen model: set the resolved value once, at construction
            rounds = DEFAULT_ROUNDS if self.budget is None else 0
            object.__setattr__(self, "refine", self.refine.model_copy(update={"rounds": rounds}))
        return self

    @field_validator("baselines", mode="before")
    @classmethod
    def _known_baselines(cls, v):
        v = tuple(v)
        unknown = [b for b in v if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
        return v

    @field_validator("search")
    @classmethod
    def _one_storage(cls, v: SearchSettings) -> SearchSettings:
        if v.storage is not None:
            raise ValueError("the pipeline keeps its study in OUT/study.journal; leave search.storage unset")
        return v

    def check(self, cfg: Config) -> None:
        """Checks that need the config (before anything is created).

        Raises:
            ConfigError: refinement rounds with several objectives, ``out`` naming an
                existing file, or ``guided-tpe`` without a budget, with rounds or with several objectives.
        """
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"output directory {str(self.out)!r} is an existing file; pass another --out")
        if self.strategy == "guided-tpe":
            if self.budget is None:
                raise ConfigError("the guided-tpe strategy spends exactly its --budget on real runs; give a budget instead of --no-budget")
            if self.refine.rounds or len(self.search.objectives) != 1:
                raise ConfigError("the guided-tpe strategy minimizes one objective and has no trust-region rounds; "
                                  "give one objective and --rounds 0")
            return
        if self.refine.rounds:
            if len(self.search.objectives) != 1:
                raise ConfigError("trust-region rounds minimize one objective; give one objective or refine.rounds = 0")
            self.refine.trust_region(self.search.objectives[0], self.search.seed)


#: planned cost of one ``fut1-hvp`` estimate in real runs: it recomputes Adam with exact
#: Hessian-vector products after an order's first departure from the recorded run (measured
#: about 3 runs per order on the default config; an upper bound for orders near the incumbent)
HVP_RUNS_PER_ESTIMATE = 3.0


@dataclass(frozen=True)
class BudgetPlan:
    """How :func:`size_to_budget` splits a budget of real-run equivalents (planned; the
    ledger reports what was spent).

    Attributes:
        budget: the cap N.
        record: the recording (1 run plus the pair terms' gradients, :func:`~currsearch.record.record_run_equivalents`).
        fit_runs: real runs of a calibrated estimator's fit (0 for the others).
        verify: searched orders retrained.
        refine: the trust-region rounds (each: a re-recording, ``top_k`` runs and ``trials``
            ``fut1-hvp`` estimates at :data:`HVP_RUNS_PER_ESTIMATE`; plus the final check). A
            round after the first starts only if the rounds' measured spend leaves room for it
            (``TrustRegionSettings.budget``).
    """

    budget: int
    record: float
    fit_runs: int
    verify: int
    refine: float

    @property
    def total(self) -> float:
        """Planned run equivalents of all phases (<= budget; the trust-region rounds' search
        stops early when its time-counted ``fut1-hvp`` estimates would leave too little of
        ``refine`` for their retraining, ``TrustRegionSettings.budget``; the ledger says what
        was spent)."""
        return self.record + self.fit_runs + self.verify + self.refine


def size_to_budget(s: PipelineSettings, trainer: Trainer, rcfg: Config, est_cls: type[Estimator],
                   ) -> tuple[PipelineSettings, BudgetPlan | None]:
    """Size the phases to ``s.budget`` (unchanged settings and None without a budget).

    Policy: the recording (only the estimator's required terms), the ``verify.top_k``
    searched orders and the ``refine`` rounds are planned first; a calibrated estimator's fit
    gets every run left (``n_runs``; giving one is an error); any other estimator spends what
    is left on verifying more searched orders, and its search proposes at least that many
    (``search.trials`` raised to ``verify.top_k``). Under a budget the reference, random and
    heuristic orders are not retrained (the comparison is ``PipelineSettings.baselines``).

    Raises:
        BudgetTooSmallError: the budget is below the minimum, which the message names (with its parts).
        ConfigError: ``n_runs`` given for a calibrated fit (the budget sizes it), or a search
            estimator whose estimates cost real runs (``estimate_costs_runs``: ``fut1-hvp``).
    """
    if s.budget is None:
        return s, None
    if est_cls.estimate_costs_runs:
        raise ConfigError(f"{est_cls.name} costs about {HVP_RUNS_PER_ESTIMATE:.0f} real runs per estimate, so a search "
                          "on it cannot be sized to a budget (under --budget it serves the trust-region rounds, "
                          "--rounds); search with another --estimator or use --no-budget")
    if est_cls.needs_runs and "n_runs" in s.search.estimator_kwargs:
        raise ConfigError("under a budget the fit's real runs are what the budget leaves; drop --fit-runs "
                          "(estimator_kwargs n_runs) or use --no-budget")
    record_eq = record_run_equivalents(trainer, rcfg)
    r = s.refine
    refine_eq = r.rounds * r.round_run_equivalents + 1 if r.rounds else 0.0
    left = s.budget - record_eq - s.verify.top_k - refine_eq
    need = est_cls.min_runs if est_cls.needs_runs else 0
    if left < need:
        raise BudgetTooSmallError(
            f"budget {s.budget} is below the minimum {math.ceil(s.budget - left + need)} real-run equivalents for these "
            f"settings: recording {record_eq:.1f}, verifying {s.verify.top_k}, trust-region rounds {refine_eq:.0f}"
            + (f", and {need} runs to fit {est_cls.name}" if need else "") + "; raise --budget or use --rounds 0 / a smaller --top-k")
    fit_runs, top_k = (math.floor(left), s.verify.top_k) if est_cls.needs_runs else (0, s.verify.top_k + math.floor(left))
    kwargs = {**s.search.estimator_kwargs, **({"n_runs": fit_runs} if est_cls.needs_runs else {})}
    trials = max(s.search.trials, top_k)  # the orders to verify are searched ones
    sized = s.model_copy(update={"search": s.search.model_copy(update={"estimator_kwargs": kwargs, "trials": trials}),
                                 "verify": VerifySettings(top_k=top_k, random=0, baselines=False)})
    return sized, BudgetPlan(s.budget, record_eq, fit_runs, top_k, refine_eq)


@dataclass(frozen=True)
class PipelineResult:
    """What :func:`run_pipeline` produced.

    Attributes:
        settings: the settings it ran with.
        store_path: the recorded store's directory.
        search: the surrogate search (:class:`~currsearch.search.SearchResult`).
        verification: every verified candidate (the searched ones, baselines and, after
            refinement, ``search_trust_region``), losses in nats/token.
        trust_region: the refinement rounds, or None when ``refine.rounds == 0``.
        ledger: the compute spent per phase (real runs, seconds, run equivalents).
        budget: the plan of a budgeted job (None without ``budget``).
        baselines: ``{name: RealSearchResult}`` of the searches with real training run at
            the same budget (``settings.baselines``).
        guided: the ``guided-tpe`` search (None for the ``surrogate`` strategy, which has
            ``store_path`` and ``search`` instead; the guided job has neither).
    """

    settings: PipelineSettings
    store_path: Path | None
    search: SearchResult | None
    verification: VerificationResult
    trust_region: TrustRegionResult | None
    ledger: LedgerSummary
    budget: BudgetPlan | None = None
    baselines: dict[str, RealSearchResult] = field(default_factory=dict)
    guided: GuidedResult | None = None

    @property
    def baseline_runs(self) -> int:
        """Real runs each baseline got: the budget, else the job's total run equivalents (rounded)."""
        return self.settings.budget if self.settings.budget else max(1, round(self.ledger.run_equivalents))


def _record(cfg: Config, out: Path, trainer: Trainer, ledger: ComputeLedger, progress: bool) -> TrajectoryStore:
    """Record (or resume) ``OUT/store``; the ledger gets the store's recording time (also when
    an earlier job recorded it: that work is part of what the result cost)."""
    store = record(cfg, out / "store", progress=progress, trainer=trainer)
    ledger.add("record", store.manifest["record_seconds"], real_runs=1, equivalents=record_run_equivalents(trainer, cfg))
    return store


def _fit(store: TrajectoryStore, s: SearchSettings, ledger: ComputeLedger) -> Estimator:
    """The search's estimator fitted on ``store``; a calibrated estimator's real runs enter the
    ledger (also when cached in the store by an earlier job, with the seconds they took then)."""
    with ledger.phase("fit") as counts:
        est = get_estimator(s.estimator, **s.estimator_kwargs).fit(store)
        counts["real_runs"] = counts["equivalents"] = est.n_runs if est.needs_runs else 0
        if est.needs_runs:
            counts["earlier_seconds"], counts["untimed_runs"] = est.fit_runs_read_back()
    return est


def _search(store: TrajectoryStore, est: Estimator, search: SearchSettings, s: PipelineSettings, ledger: ComputeLedger,
            progress: bool) -> tuple[SearchResult, dict, dict]:
    """The search phase: the surrogate search, then the orders to verify (the top searched
    ones and the baselines) and their estimates. Its time counts in seconds only, as the
    baselines' sampler time does (:mod:`currsearch.ledger`), unless the estimates retrain
    (``estimate_costs_runs``: then by their time).

    Returns:
        ``(result, {name: order}, {name: estimate float64 [E]})``.

    Raises:
        CurrsearchError: no order got a finite estimate (nothing to verify).
    """
    with ledger.phase("search") as counts:
        counts["equivalents"] = None if est.estimate_costs_runs else 0.0
        res = run_search(store, search, backend=SerialBackend(est), progress=progress)
        candidates = {f"search_{i + 1}": o for i, (o, _) in enumerate(res.top(s.verify.top_k))}
        if s.verify.baselines:
            candidates.update(baseline_orders(store.trainer(), n_random=s.verify.random, seed=s.search.seed))
        if not candidates:
            raise CurrsearchError(f"the search gave no order a finite estimate ({res.n_trials} trials); nothing to verify: "
                                  "check the fit's runs for a diverged training (optim.lr) or use another --estimator")
        est_rows = est.estimate(torch.stack([torch.as_tensor(o) for o in candidates.values()]))
    return res, candidates, dict(zip(candidates, est_rows))


def _verify(store: TrajectoryStore, est: Estimator, res: SearchResult, candidates: dict, estimates: dict,
            s: PipelineSettings, ledger: ComputeLedger, progress: bool) -> VerificationResult:
    """Retrain ``candidates`` (identical orders once; those an earlier call verified are read
    back from the store, with the seconds they took then), then add the best fit run on the objective."""
    logger.info("verifying %d orders by real training", len(candidates))
    with ledger.phase("verify") as counts:
        earlier = verified_runs(store)
        result = verify(store.trainer(), candidates, estimates, progress=progress, store=store)
        orders = {tuple(c.order) for c in result.candidates.values()}
        counts["real_runs"] = counts["equivalents"] = len(orders)
        counts["earlier_seconds"] = sum(earlier[o][1] for o in orders & set(earlier))
    result = result.with_search(res.top_record(s.verify.top_k))
    return _with_best_fit_run(result, est, s.search.objectives[0]) if est.needs_runs else result


def _with_best_fit_run(result: VerificationResult, est: Estimator, objective: str) -> VerificationResult:
    """Add the best (on ``objective``) of the orders the estimator's fit trained for real as
    ``fit_best`` (kind ``fit``): those runs are real, already paid for, and their final eval
    losses are what :func:`~currsearch.verify.verify` would measure (same Trainer,
    deterministic; a diverged run's non-finite loss is +inf there, and never the best here), so
    the job keeps the best order it has actually trained, whether the surrogate found it or not."""
    e = result.eval_names.index(objective)
    losses = torch.tensor(est.runs["losses"], dtype=torch.float64)  # [n_runs, E], nats/token
    losses = losses.nan_to_num(nan=math.inf, posinf=math.inf, neginf=math.inf)
    i = int(losses[:, e].argmin())
    order = est.fit_orders()[i]
    cand = VerifiedCandidate("fit", order.tolist(), dict(zip(result.eval_names, losses[i].tolist())),
                             dict(zip(result.eval_names, est.estimate(order).tolist())), 0.0)
    return result.with_candidate("fit_best", cand)


def _refine(cfg: Config, store: TrajectoryStore, est: Estimator, result: VerificationResult, s: PipelineSettings,
            plan: BudgetPlan | None, ledger: ComputeLedger, run_seconds: float, progress: bool,
            ) -> tuple[VerificationResult, TrustRegionResult | None]:
    """Trust-region rounds from the best verified order (skipped when ``refine.rounds == 0``),
    within the run equivalents ``plan`` reserved for them less the final check, counted in the
    ledger's unit ``run_seconds``."""
    if not s.refine.rounds:
        return result, None
    trs = s.refine.trust_region(s.search.objectives[0], s.search.seed, budget=plan.refine - 1 if plan else None,
                                run_seconds=run_seconds)
    logger.info("trust-region rounds from the best verified order (%d rounds, %s)", trs.rounds, trs.estimator)
    with ledger.phase("trust_region") as counts:
        result, tr = refine_verified(cfg, s.out / "trust_region", result, trs, progress=progress,
                                     trainer=store.trainer(), estimator=est, store=store)
        counts["real_runs"] = tr.verified_runs + 1  # the rounds' runs + the final incumbent's verification
        # counted from the rounds' stored seconds, so rounds read back by a resumed job count what they cost
        counts["equivalents"] = tr.run_equivalents + 1.0
    return result, tr


def _baselines(trainer: Trainer, s: PipelineSettings, n_runs: int, progress: bool) -> dict[str, RealSearchResult]:
    """The searches with real training of ``s.baselines`` at ``n_runs`` runs each (journals in ``OUT/baselines``)."""
    return {name: real_search(trainer, name, n_runs, seed=s.search.seed, objective=s.search.objectives[0],
                              storage=str(s.out / "baselines" / f"{name}.journal"), progress=progress)
            for name in s.baselines}


def _run_guided(cfg: Config, s: PipelineSettings, progress: bool) -> PipelineResult:
    """The ``guided-tpe`` job: :func:`~currsearch.guided.guided_search` with ``budget`` real
    runs (journal ``OUT/guided.journal``), its ``verify.top_k`` best orders as the verified
    candidates, then the baselines. Ledger: ``guided_runs`` (the full real runs, counted),
    ``surrogate`` (the refits' fit and search: seconds, 0 run equivalents) and, with
    ``guided.polish > 0``, ``polish`` (its resumed runs, counted by the steps they train plus
    their evaluation: :attr:`~currsearch.polish.PolishResult.run_equivalents`)."""
    trainer = Trainer.from_config(cfg)
    res = guided_search(trainer, s.budget, s.guided, seed=s.search.seed, objective=s.search.objectives[0],
                        storage=str(s.out / "guided.journal"), progress=progress)
    ledger = ComputeLedger()
    ledger.add("guided_runs", res.runs.seconds, real_runs=res.n_runs, equivalents=res.n_runs)  # its trials' durations
    ledger.add("surrogate", res.surrogate_seconds, real_runs=0, equivalents=0.0)
    if res.polish is not None:
        ledger.add("polish", res.polish.seconds, real_runs=res.polish.state_runs,  # its moves train parts of a window
                   equivalents=res.polish.run_equivalents)
    out = PipelineResult(s, None, None, res.verification(trainer, s.verify.top_k), None, ledger.summary(res.run_seconds),
                         guided=res)
    return dataclasses.replace(out, baselines=_baselines(trainer, s, out.baseline_runs, progress))


def run_pipeline(cfg: Config, settings: PipelineSettings | None = None, progress: bool = True) -> PipelineResult:
    """Run (or resume) the main job: record, fit, search, verify, refine (module docstring),
    then the baselines with real training at the same budget; with ``strategy="guided-tpe"``,
    the guided search with real training instead (:func:`_run_guided`).

    Args:
        cfg: the experiment config (data, model, optimizer, training; ``record.terms`` is cut
            to the estimator's required terms).
        settings: :class:`PipelineSettings` (default: all defaults).
        progress: progress bars and INFO log lines.

    Returns:
        :class:`PipelineResult`; losses in nats/token, the ledger in real runs and seconds.

    Raises:
        ConfigError: invalid settings or a budget below the minimum (checked before anything
            is written), or a resumed study / trust-region run with other settings.
        StoreError: ``OUT/store`` holds a store of another config or a corrupt one.
        BudgetError: the recording's estimated cost exceeds ``record.max_*``.
    """
    s = settings or PipelineSettings()
    s.check(cfg)
    if s.strategy == "guided-tpe":
        return _run_guided(cfg, s, progress)
    est_cls = type(get_estimator(s.search.estimator, **s.search.estimator_kwargs))
    rcfg = record_config(cfg, est_cls)
    trainer = Trainer.from_config(rcfg)
    check_objectives(s.search.objectives, trainer.plan.eval_names, "the plan")  # before the recording writes anything
    s, plan = size_to_budget(s, trainer, rcfg, est_cls)
    search = s.search.model_copy(update={"storage": str(s.out / "study.journal")})
    check_study_before_fit(search, est_cls.name, fix="it was searched with another budget split (--budget, --top-k, "
                           "--rounds, --fit-runs) or sampler (--sampler, --seed); use another --out or the same options")
    ledger = ComputeLedger()
    store = _record(rcfg, s.out, trainer, ledger, progress)
    est = _fit(store, s.search, ledger)
    res, candidates, estimates = _search(store, est, search, s, ledger, progress)
    result = _verify(store, est, res, candidates, estimates, s, ledger, progress)
    # the ledger's unit, which the rounds' budget counts in too: the median retrained order (fit_best was not retrained)
    run_seconds = float(torch.tensor([c.seconds for c in result.candidates.values() if c.kind != "fit"]).median())
    result, tr = _refine(rcfg, store, est, result, s, plan, ledger, run_seconds, progress)
    out = PipelineResult(s, Path(store.path), res, result, tr, ledger.summary(run_seconds), plan)
    return dataclasses.replace(out, baselines=_baselines(trainer, s, out.baseline_runs, progress))
