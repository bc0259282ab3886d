"""Trust-region search: estimate only near a recorded run, verify, re-record, repeat.

A Taylor expansion around one trajectory is accurate only near it (docs/estimators.md;
../shared/DESIGN.md Sec. 3, lesson 5), so each round searches a neighbourhood of the current
incumbent order and moves only on real-training evidence:

1. record the trajectory along the incumbent (``record(..., reference_order=incumbent)``;
   with ``record.terms`` cut to what the estimator needs: ``fut1-hvp`` needs only the
   checkpoints, i.e. one training run). That run is also the incumbent's verified loss.
2. search orders within ``radius`` transpositions of the incumbent (search space ``local``)
   with the estimator fitted on that store (Optuna, a journal per round: a killed round
   resumes);
3. retrain the ``top_k`` best estimated orders for real; the best of them becomes the new
   incumbent if it beats the incumbent's verified loss;
4. update the radius like a classical trust region: with ``rho = actual / predicted``
   improvement of the best estimated order, the radius doubles when ``rho >= 0.5``, halves
   when no verified candidate improved, and stays otherwise.

``trust_region.json`` (rewritten atomically after every round) makes a rerun skip finished
rounds. :func:`currsearch.reports.trust_region.write_trust_region_report` writes markdown and a PNG of
verified loss per round.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from pydantic import Field, model_validator

from estimators import get_estimator

from .backends import SerialBackend
from .config import SAMPLER_SEED_MAX, Config
from .errors import ConfigError
from .manifest import TRAJECTORY_SECTIONS, atomic_write_bytes, config_diff, make_output_dir
from .orders import validate_orders
from .record import record
from .results import to_json
from .search import SearchSettings, run_search
from .settings import Settings
from .train import Trainer
from .verify import RefinementSummary, VerificationResult, verify

logger = logging.getLogger(__name__)


class TrustRegionSettings(Settings):
    """Settings of :func:`run_trust_region`, the single source of their defaults.

    Attributes:
        rounds: number of rounds R >= 1.
        estimator: registered estimator name (default ``fut1-hvp``, the one accurate near the
            recorded run); estimator_kwargs: its keyword arguments (e.g. ``{"chunk": 4}``).
        radius: initial trust-region radius, in transpositions (>= 1).
        trials: estimated orders per round (Optuna trials, the incumbent included; > top_k).
        top_k: searched orders retrained for real per round (>= 1).
        sampler, batch_size, seed: as :func:`currsearch.search.run_search` (round r uses ``seed + r``).
        objective: the eval set whose final loss (nats/token) is minimized.
        min_radius, max_radius: radius bounds (default max: T - 1).
        budget: real-run equivalents the rounds may spend, measured as their wall seconds over
            one real run's (:func:`rounds_run_equivalents`); a round starts only if the spend
            so far plus the costliest finished round fit in it (None: all ``rounds`` run).
            The first round always runs: plan it (``fut1-hvp``'s time per estimate varies by
            config, so only a finished round measures it). A round's search stops early when
            its estimates would leave too little of the budget for the round's retraining
            (``SearchSettings.max_seconds``; the round is then marked ``search_cut``), so the
            rounds end within the budget except by timing noise, by a round's first batch of
            estimates (it runs in full when any time is left) and by a round's fixed costs
            (recording with checkpoint writes, opening the store and study), which on a
            tiny model (tests: 0.04 s per run) alone exceed the budget's share.
        run_seconds: wall seconds of one real run, the unit of ``budget`` (> 0; e.g. the
            pipeline's ledger unit, so that both count alike; None: each round counts in its
            own ``unit_seconds``, measured in the round, :class:`TrustRegionRound`).

    Raises:
        ConfigError: (on construction) a value out of range or an unknown key.
    """

    rounds: int = 3
    estimator: str = "fut1-hvp"
    estimator_kwargs: dict = Field(default_factory=dict)
    radius: int = 4
    trials: int = 32
    top_k: int = 2
    sampler: str = "tpe"
    batch_size: int = 8
    objective: str = "all"
    seed: int = Field(0, ge=0, le=SAMPLER_SEED_MAX)
    min_radius: int = 1
    max_radius: Optional[int] = None
    budget: Optional[float] = Field(None, gt=0)
    run_seconds: Optional[float] = Field(None, gt=0)

    @model_validator(mode="after")
    def _ranges(self) -> "TrustRegionSettings":
        if self.rounds < 1 or self.radius < 1 or self.top_k < 1 or self.trials < self.top_k + 1 or self.min_radius < 1:
            raise ValueError(
                "trust region needs rounds >= 1, radius >= 1, min_radius >= 1, top_k >= 1 and trials > top_k "
                f"(got rounds={self.rounds}, radius={self.radius}, min_radius={self.min_radius}, top_k={self.top_k}, "
                f"trials={self.trials})")
        return self


@dataclass(frozen=True)
class RoundCandidate:
    """A searched order retrained in a round: its order, estimated and verified ``objective``
    loss (nats/token)."""

    order: list[int]
    estimated: float
    verified: float


@dataclass(frozen=True)
class TrustRegionRound:
    """One finished round (an entry of ``trust_region.json``'s ``rounds``); losses in nats/token.

    Attributes:
        round: index r; radius: its radius (transpositions); incumbent: the order it started from;
        incumbent_loss: its verified loss (the recorded run); incumbent_estimate: the estimator's
        estimate of it; candidates: the retrained searched orders, best estimated first;
        predicted_improvement, actual_improvement: of the best estimated candidate over the incumbent;
        rho: actual / predicted (None when no gain was predicted); improved: whether the incumbent moved;
        next_incumbent, next_radius, next_incumbent_loss: the state after the round;
        seconds: ``{"record", "search", "verify"}`` wall seconds;
        search_cut: the budget stopped the round's search before its ``trials`` (such a round
            is finished again when read back: :func:`run_trust_region`);
        unit_seconds: wall seconds of one real run in this round: its recorded reference run's
            training steps, timed just before its search (the same kind of time as
            :attr:`~currsearch.train.TrainResult.seconds`, the main job's ledger unit). The
            round's search is planned and its spend counted in this one unit; None in rounds
            written before the field.
    """

    round: int
    radius: int
    incumbent: list[int]
    incumbent_loss: float
    incumbent_estimate: float
    candidates: list[RoundCandidate]
    predicted_improvement: float
    actual_improvement: float
    rho: float | None
    improved: bool
    next_incumbent: list[int]
    next_radius: int
    next_incumbent_loss: float
    seconds: dict[str, float]
    search_cut: bool = False
    unit_seconds: float | None = None

    @classmethod
    def from_json(cls, d: dict) -> TrustRegionRound:
        """The round of one ``trust_region.json`` ``rounds`` entry."""
        return cls(**{**d, "candidates": [RoundCandidate(**c) for c in d["candidates"]]})


@dataclass(frozen=True)
class TrustRegionResult:
    """The rounds of :func:`run_trust_region`; losses on ``objective`` in nats/token.

    Attributes:
        rounds: the finished rounds, in order; objective, estimator: as run;
        start_loss: verified loss of the start order; incumbent, incumbent_loss: the final
        incumbent and its verified loss; verified_runs: real training runs (one recorded run
        plus the retrained candidates per round); seconds: wall seconds of this call.
    """

    rounds: list[TrustRegionRound]
    objective: str
    estimator: str
    start_loss: float
    incumbent: list[int]
    incumbent_loss: float
    verified_runs: int
    seconds: float
    run_equivalents: float

    @classmethod
    def from_rounds(cls, rounds: list[TrustRegionRound], objective: str, estimator: str, seconds: float,
                    run_seconds: float | None = None) -> TrustRegionResult:
        """The result of finished ``rounds`` (at least one); ``run_seconds`` as :func:`rounds_run_equivalents`."""
        return cls(rounds, objective, estimator, rounds[0].incumbent_loss, rounds[-1].next_incumbent,
                   rounds[-1].next_incumbent_loss, sum(1 + len(x.candidates) for x in rounds), seconds,
                   sum(rounds_run_equivalents(rounds, run_seconds)))


def rounds_run_equivalents(rounds: list[TrustRegionRound], run_seconds: float | None = None) -> list[float]:
    """Each round's measured spend in real-run equivalents: its wall seconds (recording,
    search with its estimates, retraining) over ``run_seconds``, the seconds of one real run
    (None: each round's own :attr:`~TrustRegionRound.unit_seconds`, the unit its search was
    planned in, so a round's count is final when it ends and follows the machine's speed at that
    time; rounds written before that field: the mean over the rounds' retrained candidates, or
    over their recordings when no candidate was retrained).

    A unit re-measured after each round from the mean of all the rounds' retrained runs (2 per
    round) changed the counts of finished rounds: when the machine's load changed in the middle
    of a run, runs planned within N = 64 were counted at 81.1 and 85.8 (thirteenth session).
    """
    legacy = _retrained_run_seconds(rounds) or sum(x.seconds["record"] for x in rounds) / len(rounds)
    return [sum(x.seconds.values()) / (run_seconds or x.unit_seconds or legacy) for x in rounds]


def _retrained_run_seconds(rounds: list[TrustRegionRound]) -> float | None:
    """Mean wall seconds of the rounds' retrained candidates (None when none was retrained)."""
    retrained = sum(len(x.candidates) for x in rounds)
    return sum(x.seconds["verify"] for x in rounds) / retrained if retrained else None


def _fits_budget(rounds: list[TrustRegionRound], s: TrustRegionSettings) -> bool:
    """Whether one more round fits ``s.budget`` (always without one, and before the first round)."""
    budget = s.budget
    if budget is None or not rounds:
        return True
    spent = rounds_run_equivalents(rounds, s.run_seconds)
    if sum(spent) + max(spent) <= budget:
        return True
    logger.info("stopping after %d trust-region rounds: %.1f run equivalents spent, the costliest round took %.1f, "
                "the budget is %.1f", len(rounds), sum(spent), max(spent), budget)
    return False


def record_config(cfg: Config, estimator_cls) -> Config:
    """``cfg`` with ``record.terms`` cut to the estimator's required terms (cheapest store)."""
    return cfg.replace(record={"terms": tuple(estimator_cls.required_terms)})


def _next_radius(radius: int, rho: float | None, improved: bool, lo: int, hi: int) -> int:
    if not improved:
        return max(lo, radius // 2)
    if rho is not None and rho >= 0.5:
        return min(hi, radius * 2)
    return radius


def _state_settings(s: TrustRegionSettings, rcfg: Config, start: torch.Tensor, radius: int, max_radius: int) -> dict:
    """The settings a ``trust_region.json`` must hold to be resumed (``radius``: the first
    round's, ``min(s.radius, max_radius)``)."""
    return {"estimator": s.estimator, "estimator_kwargs": dict(s.estimator_kwargs), "objective": s.objective,
            "trials": s.trials, "top_k": s.top_k, "sampler": s.sampler, "batch_size": s.batch_size, "seed": s.seed,
            "start": start.tolist(), "radius": radius, "min_radius": s.min_radius, "max_radius": max_radius,
            "config": rcfg.fingerprint(*TRAJECTORY_SECTIONS), "record": rcfg.record.projection_key()}


def _load_rounds(state_path: Path, settings: dict) -> list[TrustRegionRound]:
    """The finished rounds of ``trust_region.json`` (none when absent).

    Raises:
        ConfigError: the file holds a run with other settings, or is damaged.
    """
    if not state_path.exists():
        return []
    damaged = (f"{str(state_path)!r} is damaged ({{}}); delete it to run the rounds again (their recorded stores "
               "and journals are reused)")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(damaged.format(f"not JSON: {err}")) from None
    if not isinstance(state, dict) or not isinstance(state.get("rounds"), list):
        raise ConfigError(damaged.format("not an object with a 'rounds' list"))
    stored = state.get("settings")
    if isinstance(stored, dict) and "radius" not in stored and "max_radius" in stored:  # written before the key:
        stored = {**stored, "radius": min(TrustRegionSettings.model_fields["radius"].default, stored["max_radius"])}
    if stored != settings:
        raise ConfigError(f"{str(state_path)!r} holds a trust-region run with other settings; use another --out or the same settings")
    try:
        return [TrustRegionRound.from_json(x) for x in state["rounds"]]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ConfigError(damaged.format(f"a round is malformed: {type(err).__name__}: {err}")) from None


def _save_rounds(state_path: Path, settings: dict, rounds: list[TrustRegionRound]) -> None:
    atomic_write_bytes(state_path, json.dumps({"settings": settings, "rounds": to_json(rounds)}, indent=1).encode())


def _search_seconds(s: TrustRegionSettings, done: list[TrustRegionRound], store, spent_s: float) -> float | None:
    """Wall seconds a round's search may still take under ``s.budget`` (None: no limit): the
    run equivalents left after the finished rounds, less the round's retraining, in seconds of
    one real run (``s.run_seconds``, else this round's recorded training steps, timed just
    before its search), less the ``spent_s`` seconds the round has taken so far."""
    if s.budget is None:
        return None
    run_s = s.run_seconds or store.manifest["reference_seconds"]
    left = s.budget - (sum(rounds_run_equivalents(done, s.run_seconds)) if done else 0.0) - s.top_k
    return left * run_s - spent_s


def _run_round(r: int, s: TrustRegionSettings, rcfg: Config, trainer, rdir: Path, incumbent: torch.Tensor, radius: int,
               max_radius: int, obj: int, progress: bool, done: list[TrustRegionRound],
               carried: TrustRegionRound | None = None) -> TrustRegionRound:
    """Round ``r`` (module docstring, steps 1-4) from ``incumbent`` within ``radius``, after the
    finished rounds ``done``; ``carried``: this round as an earlier call left it with its
    search cut (its store and journal are reused and its record and search seconds counted)."""
    before = {"record": 0.0, "search": 0.0} if carried is None else carried.seconds
    t0 = time.perf_counter()
    store = record(rcfg, rdir / "store", progress=progress, trainer=trainer, reference_order=incumbent)
    inc_loss = float(store.final()["eval_loss"][obj])
    t1 = time.perf_counter()
    est = get_estimator(s.estimator, **s.estimator_kwargs).fit(store)
    allowed = _search_seconds(s, done, store, before["record"] + before["search"] + time.perf_counter() - t0)
    search = SearchSettings(space="local", space_options={"center": incumbent.tolist(), "moves": radius},
                            sampler=s.sampler, trials=s.trials, batch=s.batch_size, storage=str(rdir / "study.journal"),
                            objectives=[s.objective], seed=s.seed + r, enqueue_assignment=False)
    if allowed is not None:  # no trial at all when none fits: the search reads back what the journal holds
        search = search.model_copy(update={"max_seconds": allowed} if allowed > 0 else {"trials": 0})
    res = run_search(store, search, backend=SerialBackend(est), progress=progress)
    if carried is not None and res.n_run == 0:  # nothing new to retrain: the cut round stands as it was
        return carried
    cut = res.n_trials < s.trials
    inc_est = float(est.estimate(incumbent)[obj])
    cands = [(o, e) for o, e in res.top(len(res.orders)) if not torch.equal(o, incumbent)][:s.top_k]
    t2 = time.perf_counter()
    verified = [float(trainer.train(o).eval_losses[obj]) for o, _ in cands]
    t3 = time.perf_counter()
    if not cands:  # the whole neighbourhood searched was the incumbent
        best_i, predicted, actual = None, 0.0, 0.0
    else:
        best_i = min(range(len(cands)), key=lambda i: verified[i])
        predicted = inc_est - float(cands[0][1][obj])
        actual = inc_loss - verified[0]
    improved = best_i is not None and verified[best_i] < inc_loss
    rho = actual / predicted if predicted > 0 else None  # undefined when no gain was predicted
    nxt = cands[best_i][0] if improved else incumbent
    return TrustRegionRound(
        round=r, radius=radius, incumbent=incumbent.tolist(), incumbent_loss=inc_loss, incumbent_estimate=inc_est,
        candidates=[RoundCandidate(o.tolist(), float(e[obj]), v) for (o, e), v in zip(cands, verified)],
        predicted_improvement=predicted, actual_improvement=actual, rho=rho, improved=improved,
        next_incumbent=nxt.tolist(), next_radius=_next_radius(radius, rho, improved, s.min_radius, max_radius),
        next_incumbent_loss=verified[best_i] if improved else inc_loss,
        seconds={"record": before["record"] + t1 - t0, "search": before["search"] + t2 - t1, "verify": t3 - t2},
        search_cut=cut, unit_seconds=store.manifest["reference_seconds"])


def _log_round(x: TrustRegionRound) -> None:
    best = min((c.verified for c in x.candidates), default=float("nan"))
    logger.info("round %d: radius %d, incumbent %.4f, best candidate %.4f (predicted gain %+.4f, actual %+.4f) -> %s, "
                "radius %d", x.round, x.radius, x.incumbent_loss, best, x.predicted_improvement, x.actual_improvement,
                "moved" if x.improved else "stayed", x.next_radius)


def run_trust_region(cfg: Config, out_dir, settings: TrustRegionSettings | None = None, *, start=None,
                     progress: bool = True, trainer=None, **overrides) -> TrustRegionResult:
    """Run (or resume) ``settings.rounds`` trust-region rounds (see module docstring).

    Args:
        cfg: experiment config (its ``record`` section gives anchor stride and projection;
            ``record.terms`` is replaced by the estimator's required terms).
        out_dir: directory; round r writes ``round_{r}/store`` and ``round_{r}/study.journal``,
            and ``trust_region.json`` holds the finished rounds (a rerun resumes from it).
        settings: :class:`TrustRegionSettings` (default: its defaults).
        start: the first incumbent, int64 ``[T]`` (default ``0..T-1``).
        progress: log one line per round (INFO) and show the recorder's and search's progress bars.
        trainer: a :class:`~currsearch.train.Trainer` with ``cfg``'s training settings, whose
            cached warm-up phase is reused (default: built once).
        overrides: :class:`TrustRegionSettings` fields replacing those of ``settings``
            (e.g. ``rounds=2, trials=6``).

    Returns:
        :class:`TrustRegionResult` (the first ``rounds`` rounds of ``trust_region.json``, fewer
        when ``settings.budget`` stops them).

    Raises:
        ConfigError: invalid settings (see :class:`TrustRegionSettings`), an unknown
            estimator or objective, or ``out_dir`` holding a run with other settings.
    """
    s = TrustRegionSettings(**{**(settings.model_dump() if settings is not None else {}), **overrides})
    rcfg = record_config(cfg, type(get_estimator(s.estimator, **s.estimator_kwargs)))
    if trainer is None or config_diff(trainer.cfg.to_dict(), rcfg.to_dict()):
        trainer = Trainer.from_config(rcfg)
    T = trainer.T
    if s.objective not in trainer.plan.eval_names:
        raise ConfigError(f"unknown objective eval set {s.objective!r}; the plan has {list(trainer.plan.eval_names)}")
    max_radius = T - 1 if s.max_radius is None else s.max_radius
    radius = min(s.radius, max_radius)
    incumbent = validate_orders(torch.arange(T) if start is None else start, T).view(-1)
    state = _state_settings(s, rcfg, incumbent, radius, max_radius)
    out = make_output_dir(out_dir)
    state_path = out / "trust_region.json"
    done = _load_rounds(state_path, state)
    obj = trainer.plan.eval_names.index(s.objective)
    trainer.window_start(progress=progress)  # the warm-up phase (cached on disk) is no round's cost
    t_all = time.perf_counter()
    rounds: list[TrustRegionRound] = []
    for r in range(s.rounds):  # resume: finished rounds are read back, under the same budget rule
        if not _fits_budget(rounds, s):
            break
        if r < len(done) and not done[r].search_cut:
            rounds.append(done[r])
        else:  # a round whose search a budget cut is finished again, under this call's budget
            rounds.append(_run_round(r, s, rcfg, trainer, out / f"round_{r}", incumbent, radius, max_radius, obj,
                                     progress, rounds, done[r] if r < len(done) else None))
            _save_rounds(state_path, state, rounds)
            if progress:
                _log_round(rounds[-1])
        incumbent, radius = torch.tensor(rounds[-1].next_incumbent), rounds[-1].next_radius
    return TrustRegionResult.from_rounds(rounds, s.objective, s.estimator, time.perf_counter() - t_all, s.run_seconds)


def refine_verified(cfg: Config, out_dir, result: VerificationResult, settings: TrustRegionSettings | None = None, *,
                    progress: bool = True, trainer=None, estimator=None, store=None, **overrides,
                    ) -> tuple[VerificationResult, TrustRegionResult]:
    """Trust-region rounds started from the best order of a verification ``result``.

    The start is the candidate of ``result`` (:func:`currsearch.verify.verify`) with the lowest
    verified ``objective`` loss, whatever its kind. The final incumbent is retrained once more
    with :func:`~currsearch.verify.verify` (all eval sets). ``result`` is not changed.

    Args:
        cfg, out_dir, settings, progress, overrides: as :func:`run_trust_region` (``out_dir``
            holds the rounds; write their report with
            :func:`currsearch.reports.trust_region.write_trust_region_report`).
        trainer: the Trainer that verifies the final incumbent (default: built from ``cfg``).
        estimator: a fitted estimator whose estimate of the final incumbent is reported next
            to the other candidates' (default: none).
        store: a trajectory store whose Trainer is ``trainer``: the final run is kept in it
            (:func:`~currsearch.verify.verify`), so a rerun reads it back instead of retraining.

    Returns:
        ``(new result, rounds)``: a copy of ``result`` with the final incumbent added as
        ``search_trust_region`` (kind ``searched``) and ``trust_region`` set
        (:class:`~currsearch.verify.RefinementSummary`: the start, the gain in nats/token,
        >= 0 since every move was verified), and the :class:`TrustRegionResult`.
    """
    s = TrustRegionSettings(**{**(settings.model_dump() if settings is not None else {}), **overrides})
    start_name = result.best(s.objective)
    res = run_trust_region(cfg, out_dir, s, start=torch.tensor(result.candidates[start_name].order), progress=progress,
                           trainer=trainer)
    if trainer is None:
        trainer = Trainer.from_config(cfg)
    order = torch.tensor(res.incumbent)
    est = {"search_trust_region": estimator.estimate(order)} if estimator is not None else None
    final = verify(trainer, {"search_trust_region": order}, est, kinds={"search_trust_region": "searched"}, store=store)
    summary = RefinementSummary(start=start_name, start_loss=res.start_loss, final_loss=res.incumbent_loss,
                                gain=res.start_loss - res.incumbent_loss, rounds=len(res.rounds),
                                verified_runs=res.verified_runs, estimator=res.estimator, objective=s.objective)
    return result.with_candidate("search_trust_region", final.candidates["search_trust_region"], summary), res
