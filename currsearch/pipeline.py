"""The main job as a library call: record, search, verify, refine, with a compute ledger.

    result = run_pipeline(cfg, PipelineSettings(out="runs/main"))
    write_run_report(result, "runs/main/report")        # currsearch.reports.pipeline

Phases (each resumes when rerun on the same ``out``):

1. **record** the reference trajectory store into ``OUT/store``;
2. **fit** the surrogate estimator (a calibrated estimator's real runs are cached in the store);
3. **search** orders with Optuna on the surrogate (journal ``OUT/study.journal``);
4. **verify** the ``top_k`` searched orders and the baselines (reference, random orders,
   heuristic curricula) by real training;
5. **refine** the best verified order with trust-region rounds (``fut1-hvp``, re-recording
   at each incumbent; ``OUT/trust_region``).

Every phase is entered in a :class:`~currsearch.ledger.ComputeLedger` (real runs, seconds,
run equivalents), so a report can compare the result with search on real training at the
same compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field, field_validator

from estimators import get_estimator
from estimators.base import Estimator

from .backends import SerialBackend
from .config import Config
from .errors import ConfigError
from .ledger import ComputeLedger, LedgerSummary
from .record import record
from .search import SearchResult, SearchSettings, run_search
from .settings import Settings
from .store import TrajectoryStore
from .trust_region import TrustRegionResult, TrustRegionSettings, refine_verified
from .verify import VerificationResult, baseline_orders, verify

logger = logging.getLogger(__name__)


class VerifySettings(Settings):
    """What the pipeline retrains for real after the search.

    Attributes:
        top_k: searched orders verified (>= 1).
        random: random baseline orders (seeds ``search.seed + i``; >= 0); the report compares
            with their median.
    """

    top_k: int = Field(3, ge=1)
    random: int = Field(5, ge=0)


class RefineSettings(Settings):
    """Trust-region rounds from the best verified order (:func:`~currsearch.trust_region.refine_verified`).

    Attributes:
        rounds: rounds (0 skips the phase).
        trials: orders estimated per round (>= 3).
        top_k: orders retrained per round (>= 1, < trials).
        estimator: the estimator of the rounds (default ``fut1-hvp``, accurate near the recorded run).
    """

    rounds: int = Field(2, ge=0)
    trials: int = Field(16, ge=3)
    top_k: int = Field(2, ge=1)
    estimator: str = "fut1-hvp"

    def trust_region(self, objective: str, seed: int) -> TrustRegionSettings:
        """The :class:`TrustRegionSettings` of these rounds (raises ConfigError when ``rounds == 0``)."""
        return TrustRegionSettings(rounds=self.rounds, trials=self.trials, top_k=self.top_k, estimator=self.estimator,
                                   objective=objective, seed=seed)


class PipelineSettings(Settings):
    """Settings of :func:`run_pipeline`, the single source of the main job's defaults.

    Attributes:
        out: output directory (store, study journal, trust-region rounds).
        search: the surrogate search; its estimator defaults to ``calibrated-interactions``
            here and its storage is always ``OUT/study.journal``.
        verify: what is retrained after the search.
        refine: trust-region rounds after the verification.
    """

    out: Path = Path("runs/main")
    search: SearchSettings = Field(default_factory=lambda: SearchSettings(estimator="calibrated-interactions"))
    verify: VerifySettings = Field(default_factory=VerifySettings)
    refine: RefineSettings = Field(default_factory=RefineSettings)

    @field_validator("search")
    @classmethod
    def _one_storage(cls, v: SearchSettings) -> SearchSettings:
        if v.storage is not None:
            raise ValueError("the pipeline keeps its study in OUT/study.journal; leave search.storage unset")
        return v

    def check(self, cfg: Config) -> None:
        """Checks that need the config (before anything is created).

        Raises:
            ConfigError: an objective that is not an eval set of ``cfg``'s plan, or refinement
                rounds with several objectives, or ``out`` naming an existing file.
        """
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"output directory {str(self.out)!r} is an existing file; pass another --out")
        if self.refine.rounds:
            if len(self.search.objectives) != 1:
                raise ConfigError("trust-region rounds minimize one objective; give one objective or refine.rounds = 0")
            self.refine.trust_region(self.search.objectives[0], self.search.seed)


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
    """

    settings: PipelineSettings
    store_path: Path
    search: SearchResult
    verification: VerificationResult
    trust_region: TrustRegionResult | None
    ledger: LedgerSummary


def _record(cfg: Config, out: Path, ledger: ComputeLedger, progress: bool) -> TrajectoryStore:
    """Record (or resume) ``OUT/store``; the ledger gets the store's recording time (also when
    an earlier job recorded it: that work is part of what the result cost)."""
    store = record(cfg, out / "store", progress=progress)
    ledger.add("record", store.manifest["record_seconds"], real_runs=1)
    return store


def _fit(store: TrajectoryStore, s: SearchSettings, ledger: ComputeLedger) -> Estimator:
    """The search's estimator fitted on ``store``; a calibrated estimator's real runs enter the
    ledger (also when cached in the store by an earlier job)."""
    with ledger.phase("fit") as counts:
        est = get_estimator(s.estimator, **s.estimator_kwargs).fit(store)
        counts["real_runs"] = est.n_runs if est.needs_runs else 0
    return est


def _verify(store: TrajectoryStore, est: Estimator, res: SearchResult, s: PipelineSettings, ledger: ComputeLedger,
            progress: bool) -> VerificationResult:
    """Retrain the top searched orders and the baselines (identical orders once)."""
    trainer = store.trainer()
    candidates = {f"search_{i + 1}": o for i, (o, _) in enumerate(res.top(s.verify.top_k))}
    candidates.update(baseline_orders(trainer, n_random=s.verify.random, seed=s.search.seed))
    est_rows = est.estimate(torch.stack([torch.as_tensor(o) for o in candidates.values()]))
    logger.info("verifying %d orders by real training", len(candidates))
    with ledger.phase("verify") as counts:
        result = verify(trainer, candidates, dict(zip(candidates, est_rows)), progress=progress)
        counts["real_runs"] = len({tuple(c.order) for c in result.candidates.values()})
    return result.with_search(res.top_record(s.verify.top_k))


def _refine(cfg: Config, store: TrajectoryStore, est: Estimator, result: VerificationResult, s: PipelineSettings,
            ledger: ComputeLedger, progress: bool) -> tuple[VerificationResult, TrustRegionResult | None]:
    """Trust-region rounds from the best verified order (skipped when ``refine.rounds == 0``)."""
    if not s.refine.rounds:
        return result, None
    trs = s.refine.trust_region(s.search.objectives[0], s.search.seed)
    logger.info("trust-region rounds from the best verified order (%d rounds, %s)", trs.rounds, trs.estimator)
    with ledger.phase("trust_region") as counts:
        result, tr = refine_verified(cfg, s.out / "trust_region", result, trs, progress=progress,
                                     trainer=store.trainer(), estimator=est)
        counts["real_runs"] = tr.verified_runs + 1  # the rounds' runs + the final incumbent's verification
    return result, tr


def run_pipeline(cfg: Config, settings: PipelineSettings | None = None, progress: bool = True) -> PipelineResult:
    """Run (or resume) the main job: record, fit, search, verify, refine (module docstring).

    Args:
        cfg: the experiment config (data, model, optimizer, training, recording).
        settings: :class:`PipelineSettings` (default: all defaults).
        progress: progress bars and INFO log lines.

    Returns:
        :class:`PipelineResult`; losses in nats/token, the ledger in real runs and seconds.

    Raises:
        ConfigError: invalid settings (checked before anything is written), or a resumed
            study / trust-region run with other settings.
        StoreError: ``OUT/store`` holds a store of another config or a corrupt one.
        BudgetError: the recording's estimated cost exceeds ``record.max_*``.
    """
    s = settings or PipelineSettings()
    s.check(cfg)
    ledger = ComputeLedger()
    store = _record(cfg, s.out, ledger, progress)
    est = _fit(store, s.search, ledger)
    search = s.search.model_copy(update={"storage": str(s.out / "study.journal")})
    with ledger.phase("search"):
        res = run_search(store, search, backend=SerialBackend(est), progress=progress)
    result = _verify(store, est, res, s, ledger, progress)
    result, tr = _refine(cfg, store, est, result, s, ledger, progress)
    run_seconds = float(torch.tensor([c.seconds for c in result.candidates.values()]).median())
    return PipelineResult(s, Path(store.path), res, result, tr, ledger.summary(run_seconds))
