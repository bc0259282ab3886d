"""Verify candidate orders by real training.

:func:`verify` retrains every candidate order from the same window start and records its
true final eval losses (nats/token) in a :class:`VerificationResult`; :func:`baseline_orders`
gives the orders to compare against (reference, random orders, heuristic curricula);
:func:`summarize` compares the best searched order with them (:class:`VerificationSummary`).
The report files (``report.json``, ``report.md``, plots, ``best_order.json``) are written by
:func:`currsearch.reports.verify.write_report`.

Candidate kinds (from the name unless given): ``searched`` (``search_*``), ``reference``,
``random`` (``random_*``; the summary compares with their median by verified ``all`` loss)
and ``heuristic`` (anything else).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from search_spaces import BatchInfo, heuristic_orders

from .errors import ConfigError
from .orders import random_order, reference_order, validate_orders

logger = logging.getLogger(__name__)


def kind_of(name: str) -> str:
    """Candidate kind from its name: searched, reference, random or heuristic."""
    if name.startswith("search"):
        return "searched"
    if name == "reference":
        return "reference"
    if name.startswith("random"):
        return "random"
    return "heuristic"


@dataclass(frozen=True)
class VerifiedCandidate:
    """One candidate order retrained for real.

    Attributes:
        kind: ``searched``, ``reference``, ``random`` or ``heuristic`` (:func:`kind_of`).
        order: the order, T batch indices.
        verified: ``{eval set: final eval loss}`` of real training, nats/token.
        estimated: ``{eval set: estimated final loss}`` (nats/token), or None.
        seconds: wall seconds of the training run.
    """

    kind: str
    order: list[int]
    verified: dict[str, float]
    estimated: dict[str, float] | None
    seconds: float

    @classmethod
    def from_json(cls, d: dict) -> VerifiedCandidate:
        """The candidate of one ``report.json`` ``candidates`` entry."""
        return cls(d["kind"], list(d["order"]), dict(d["verified"]), None if d["estimated"] is None else dict(d["estimated"]),
                   float(d["seconds"]))


@dataclass(frozen=True)
class RefinementSummary:
    """Trust-region rounds started from the best verified candidate (see
    :func:`currsearch.trust_region.refine_verified`); losses on ``objective`` in nats/token.

    Attributes:
        start: name of the start candidate; start_loss, final_loss: its and the final incumbent's
            verified loss; gain: ``start_loss - final_loss`` (>= 0); rounds: rounds run;
        verified_runs: real training runs of the rounds; estimator, objective: as run.
    """

    start: str
    start_loss: float
    final_loss: float
    gain: float
    rounds: int
    verified_runs: int
    estimator: str
    objective: str


@dataclass(frozen=True)
class VerificationResult:
    """Candidates retrained for real (:func:`verify`).

    Attributes:
        eval_names: the E eval sets (``plan.eval_names``); domains: domain of each of the T batches;
        T: window batches; candidates: ``{name: VerifiedCandidate}`` in the order given;
        trust_region: the refinement that added ``search_trust_region``, or None;
        search: optional JSON-ready record of the search that proposed the ``search_*`` candidates.
    """

    eval_names: list[str]
    domains: list[str]
    T: int
    candidates: dict[str, VerifiedCandidate]
    trust_region: RefinementSummary | None = None
    search: dict | None = field(default=None)

    def best(self, eval_set: str = "all", kind: str | None = None) -> str | None:
        """Name of the candidate (of ``kind``, if given) with the lowest verified ``eval_set``
        loss (ties: the first name in sort order); None when there is none."""
        names = [n for n, c in self.candidates.items() if kind is None or c.kind == kind]
        return min(names, key=lambda n: (self.candidates[n].verified[eval_set], n)) if names else None

    def with_candidate(self, name: str, candidate: VerifiedCandidate, trust_region: RefinementSummary | None = None,
                       ) -> VerificationResult:
        """A new result with ``candidate`` added as ``name`` (and ``trust_region`` set when given)."""
        return dataclasses.replace(self, candidates={**self.candidates, name: candidate},
                                   trust_region=trust_region if trust_region is not None else self.trust_region)

    def with_search(self, search: dict) -> VerificationResult:
        """A new result with the ``search`` record set."""
        return dataclasses.replace(self, search=search)

    @classmethod
    def from_json(cls, d: dict) -> VerificationResult:
        """The result of a ``report.json`` (extra keys such as ``summary`` and ``best`` are ignored)."""
        tr = d.get("trust_region")
        return cls(list(d["eval_names"]), list(d["domains"]), int(d["T"]),
                   {n: VerifiedCandidate.from_json(c) for n, c in d["candidates"].items()},
                   RefinementSummary(**tr) if tr else None, d.get("search"))


@dataclass(frozen=True)
class VerificationSummary:
    """The best verified searched order against the baselines, on ``eval_set`` (nats/token).

    Attributes:
        eval_set; best_searched (name or None) and best_searched_loss; random_median (the
        random candidate at the median, lower middle for an even count) and its loss;
        heuristics ``{name: loss}``; reference_loss; beats_random_median,
        beats_all_heuristics, beats_reference (None where a part is missing).
    """

    eval_set: str
    best_searched: str | None
    best_searched_loss: float | None
    random_median: str | None
    random_median_loss: float | None
    heuristics: dict[str, float]
    reference_loss: float | None
    beats_random_median: bool | None
    beats_all_heuristics: bool | None
    beats_reference: bool | None


def baseline_orders(trainer, n_random: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Baselines: ``reference``, ``random_0..n_random-1`` (seeds ``seed + i``) and the
    heuristic curricula of :func:`search_spaces.heuristic_orders` (int64 ``[T]`` each)."""
    T = trainer.T
    out = {"reference": reference_order(T)}
    for i in range(n_random):
        out[f"random_{i}"] = random_order(T, seed + i)
    for name, order in heuristic_orders(BatchInfo.from_plan(trainer.plan)).items():
        if name != "reference":
            out[name] = order
    return out


def _estimated(names: list[str], estimates: dict | None, name: str) -> dict[str, float] | None:
    if estimates is None or estimates.get(name) is None:
        return None
    return dict(zip(names, (float(x) for x in torch.as_tensor(estimates[name]).flatten())))


#: the store file (listed in its checksummed manifest) that keeps every run :func:`verify` trained
VERIFIED_RUNS = "verify/runs.json"


def verified_runs(store) -> dict[tuple[int, ...], tuple[list[float], float]]:
    """The runs :func:`verify` kept in ``store`` (``STORE/verify/runs.json``):
    ``{order: (final eval losses [E] nats/token, wall seconds)}``. A run depends only on the
    store's Trainer and the order, as the calibration cache's runs do (:func:`estimators.calibrated.cached_runs`).

    Raises:
        StoreError: the listed file is missing, truncated or modified (``currsearch record``
            on the store drops it).
    """
    raw = store.read_listed_bytes(VERIFIED_RUNS)
    d = json.loads(raw) if raw is not None else {"orders": [], "losses": [], "seconds": []}
    return {tuple(o): (list(l), float(t)) for o, l, t in zip(d["orders"], d["losses"], d["seconds"])}


def _keep_runs(store, done: dict) -> bool:
    """Write ``done`` to ``STORE/verify/runs.json`` (atomically, listed in the manifest); False
    with a warning when the store is not writable."""
    data = {"orders": [list(k) for k in done], "losses": [v[0] for v in done.values()],
            "seconds": [v[1] for v in done.values()]}
    try:
        store.write_listed_bytes(VERIFIED_RUNS, json.dumps(data).encode())
        return True
    except (OSError, ConfigError) as err:
        logger.warning("could not keep the verified runs in %s (%s); a killed verification retrains them",
                       store.path, err)
        return False


def verify(trainer, candidates: dict, estimates: dict | None = None, kinds: dict | None = None,
           progress: bool = False, store=None) -> VerificationResult:
    """Retrain every candidate order for real.

    Args:
        trainer: a :class:`~currsearch.train.Trainer`.
        candidates: ``{name: order int64 [T]}``.
        estimates: optional ``{name: float [E]}`` estimated final losses (nats/token).
        kinds: optional ``{name: kind}``; default :func:`kind_of`.
        progress: log one line per candidate (INFO).
        store: optional trajectory store whose Trainer is ``trainer``: every finished run is
            kept in it (:func:`verified_runs`, written after each run), so a rerun after a kill
            trains only the orders it lacks and reads the others back (losses and seconds as
            first measured).

    Returns:
        :class:`VerificationResult`, losses in nats/token; a run that diverged to a non-finite
        loss has +inf (never the best). Identical orders are trained once (training is deterministic).

    Raises:
        OrderError: a candidate is not a permutation of ``0..T-1``.
        StoreError: the store's kept runs are damaged (:func:`verified_runs`).
    """
    names = list(trainer.plan.eval_names)
    done = verified_runs(store) if store is not None else {}
    kept = set(done)
    out = {}
    for name, order in candidates.items():
        order = validate_orders(order, trainer.T)
        key = tuple(order.tolist())
        if key not in done:
            t0 = time.perf_counter()
            res = trainer.train(order)
            losses = [x if math.isfinite(x) else math.inf for x in res.eval_losses.tolist()]
            if math.inf in losses:  # a diverged run: +inf, so it is never the best (a NaN would be, under min)
                logger.warning("verifying %s: training diverged (non-finite eval loss), counted as +inf", name)
            done[key] = (losses, time.perf_counter() - t0)
            if store is not None and not _keep_runs(store, done):
                store = None
        losses, secs = done[key]
        out[name] = VerifiedCandidate((kinds or {}).get(name, kind_of(name)), list(key), dict(zip(names, losses)),
                                      _estimated(names, estimates, name), secs)
        if progress:
            logger.info("verified %s: all = %.4f nats/token (%.2f s)", name, losses[-1], secs)
    if kept:
        logger.info("verification resumed: %d of the %d orders were trained before (%s)",
                    len({tuple(c.order) for c in out.values()} & kept), len(out), VERIFIED_RUNS)
    return VerificationResult(names, list(trainer.plan.domains), trainer.T, out)


def summarize(result: VerificationResult, eval_set: str = "all") -> VerificationSummary:
    """Best verified searched order vs the random median and every heuristic (``eval_set`` loss);
    missing parts are None."""
    c = result.candidates
    loss = {n: v.verified[eval_set] for n, v in c.items()}
    randoms = sorted((n for n in c if c[n].kind == "random"), key=lambda n: (loss[n], n))
    heur = {n: loss[n] for n in c if c[n].kind == "heuristic"}
    best = result.best(eval_set, "searched")
    med = randoms[(len(randoms) - 1) // 2] if randoms else None
    b = loss[best] if best else None
    ref = loss.get("reference")
    return VerificationSummary(
        eval_set=eval_set, best_searched=best, best_searched_loss=b, random_median=med,
        random_median_loss=loss[med] if med else None, heuristics=heur, reference_loss=ref,
        beats_random_median=(b < loss[med]) if best and med else None,
        beats_all_heuristics=all(b < v for v in heur.values()) if best and heur else None,
        beats_reference=(b < ref) if best and ref is not None else None,
    )
