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
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from search_spaces import BatchInfo, heuristic_orders

from .errors import ConfigError
from .manifest import TRAJECTORY_SECTIONS, atomic_write_bytes
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


def _line_sum(entry: dict) -> str:
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def read_verify_journal(path, trainer) -> dict[tuple[int, ...], tuple[list[float], float]]:
    """The runs a :func:`verify` journal holds: ``{order: (eval losses [E] nats/token, seconds)}``.

    The journal is JSON lines: a header (the trainer's config fingerprint of the data, model,
    optim and train sections, T and the eval-set names), then one line per trained order with
    its losses, seconds and the SHA-256 of those; lines are appended (and fsynced) as runs
    finish. A line that does not parse or whose checksum fails (a write cut by a kill, a
    damaged file) is left out with a warning, so its order is trained again.

    Raises:
        ConfigError: the journal was written for another config, window or eval sets.
        OSError: the file cannot be read.
    """
    path = Path(path)
    raw = path.read_bytes() if path.is_file() else b""
    if not raw.partition(b"\n")[1]:  # no file, or no whole header line (a kill cut it): nothing verified yet
        return {}
    lines = raw.decode(errors="replace").splitlines()  # undecodable bytes fail their line's checksum
    want = _journal_header(trainer)
    try:
        head = json.loads(lines[0])
    except ValueError:
        head = None
    if head != want:
        raise ConfigError(f"{str(path)!r} holds verified runs of another config or window ({head} vs {want}); "
                          "use another --out, or delete the file to retrain them")
    done, bad = {}, 0
    for line in lines[1:]:
        try:
            e = json.loads(line)
            body = {k: e[k] for k in ("order", "losses", "seconds")}
            if e["sha256"] != _line_sum(body) or len(body["order"]) != trainer.T:
                raise ValueError("checksum")
            done[tuple(body["order"])] = ([float(x) for x in body["losses"]], float(body["seconds"]))
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        logger.warning("%s: %d damaged line(s) left out; their orders are trained again", path, bad)
    return done


def _journal_header(trainer) -> dict:
    return {"config": trainer.cfg.fingerprint(*TRAJECTORY_SECTIONS), "T": trainer.T,
            "eval_names": list(trainer.plan.eval_names)}


def _open_journal(journal: Path, trainer) -> dict[tuple[int, ...], tuple[list[float], float]]:
    """The runs ``journal`` holds (:func:`read_verify_journal`), with the file ready for appends:
    a header written (atomically) when it has no whole one, a line cut by a kill ended."""
    done = read_verify_journal(journal, trainer)
    text = journal.read_bytes() if journal.is_file() else b""
    if not text.partition(b"\n")[1]:
        atomic_write_bytes(journal, (json.dumps(_journal_header(trainer), sort_keys=True) + "\n").encode())
    elif not text.endswith(b"\n"):
        with open(journal, "a") as f:  # so the next run gets a line of its own
            f.write("\n")
    return done


def _append(path: Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def verify(trainer, candidates: dict, estimates: dict | None = None, kinds: dict | None = None,
           progress: bool = False, journal=None) -> VerificationResult:
    """Retrain every candidate order for real.

    Args:
        trainer: a :class:`~currsearch.train.Trainer`.
        candidates: ``{name: order int64 [T]}``.
        estimates: optional ``{name: float [E]}`` estimated final losses (nats/token).
        kinds: optional ``{name: kind}``; default :func:`kind_of`.
        progress: log one line per candidate (INFO).
        journal: optional path of a JSON-lines file that keeps every finished run
            (:func:`read_verify_journal`): a rerun after a kill trains only the orders it lacks
            and reads the others back (losses and seconds as first measured).

    Returns:
        :class:`VerificationResult`, losses in nats/token; a run that diverged to a non-finite
        loss has +inf (never the best). Identical orders are trained once (training is deterministic).

    Raises:
        OrderError: a candidate is not a permutation of ``0..T-1``.
        ConfigError: ``journal`` holds runs of another config (:func:`read_verify_journal`).
    """
    names = list(trainer.plan.eval_names)
    journal = None if journal is None else Path(journal)
    done = _open_journal(journal, trainer) if journal is not None else {}
    if done:
        logger.info("verification resumed: %d of the orders were trained before (%s)",
                    len({tuple(validate_orders(o, trainer.T).tolist()) for o in candidates.values()} & done.keys()), journal)
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
            if journal is not None:
                body = {"order": list(key), "losses": losses, "seconds": done[key][1]}
                _append(journal, {**body, "sha256": _line_sum(body)})
        losses, secs = done[key]
        out[name] = VerifiedCandidate((kinds or {}).get(name, kind_of(name)), list(key), dict(zip(names, losses)),
                                      _estimated(names, estimates, name), secs)
        if progress:
            logger.info("verified %s: all = %.4f nats/token (%.2f s)", name, losses[-1], secs)
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
