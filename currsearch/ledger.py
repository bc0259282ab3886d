"""Compute ledger: what a job spends, in real-run equivalents and wall seconds.

The unit is one **real run**: one training of the T-step window from the window start
(the cached warm-up phase excluded, since every strategy shares it). A phase records

* ``real_runs``: how many window trainings it performed (recording's reference run, a
  calibrated estimator's fit runs, verification, trust-region re-recordings). Work reused
  from an earlier job (a recorded store, cached calibration runs) still counts: it is part
  of what the result cost;
* ``seconds``: its wall time, including the recorded time of real runs it read back from an
  earlier call of the same job instead of training them (a resumed job's cached fit runs and
  verified runs: ``earlier_seconds``; a guided job's runs are its trials' durations), so a job
  interrupted and resumed reports what its runs cost, not only what its last call did. Runs
  cached by a currsearch that did not record run times count as ``untimed_runs``. The search,
  the trust-region rounds, the polish and a guided job's surrogate fits count this call's time
  only, and work lost at a kill (fit runs after the last save, a killed trial) is not counted;
* ``run_equivalents``: its compute in real runs. Phases whose work is counted give it
  (a training phase: its ``real_runs``; the recording: its gradient count over a run's,
  :func:`currsearch.record.record_run_equivalents`), so a budget holds to the run whatever
  the machine's load. Other gradient work (``fut1-hvp``'s Hessian-vector products, in the
  trust-region rounds or as the search's estimator) is counted by its time, ``max(real_runs, seconds / run_seconds)``,
  where ``run_seconds`` is the measured wall time of one real window training in the same
  job. The Optuna sampler's and a cheap surrogate's time (the ``search`` phase) count in
  seconds only, as the sampler time of the baselines does: neither trains the model.

The ledger is what the equal-compute yardstick compares: a searched order is worth its
cost only if search with real training at the same number of run equivalents (best of N
random orders, Optuna TPE on real training) does no better.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import ConfigError


@dataclass(frozen=True)
class LedgerEntry:
    """One phase of a job.

    Attributes:
        phase: the phase's name (``record``, ``fit``, ``search``, ``verify``, ``trust_region``).
        real_runs: window trainings performed (count).
        seconds: wall time, seconds (read-back runs' recorded time included, module docstring).
        run_equivalents: compute in real runs (see the module docstring).
        untimed_runs: real runs read back without a recorded time (not in ``seconds``).
    """

    phase: str
    real_runs: int
    seconds: float
    run_equivalents: float
    untimed_runs: int = 0


@dataclass(frozen=True)
class LedgerSummary:
    """The phases of a finished job and their totals (see :class:`ComputeLedger`).

    Attributes:
        run_seconds: wall seconds of one real window training, the unit of ``run_equivalents``.
        entries: the phases, in order.
        real_runs, run_equivalents, seconds: totals over the phases.
    """

    run_seconds: float
    entries: tuple[LedgerEntry, ...]
    real_runs: int
    run_equivalents: float
    seconds: float


@dataclass
class ComputeLedger:
    """Collects the phases of one job while it runs; :meth:`summary` converts them into run
    equivalents once the seconds of one real run are known.

    Attributes:
        phases: ``(phase, real_runs, seconds, equivalents or None, untimed_runs)`` in the order added.
    """

    phases: list[tuple[str, int, float, float | None, int]] = field(default_factory=list)

    def add(self, phase: str, seconds: float, real_runs: int = 0, equivalents: float | None = None,
            untimed_runs: int = 0) -> None:
        """Append a phase of ``seconds`` wall time (read-back runs' recorded time included) with
        ``real_runs`` window trainings, ``untimed_runs`` of them read back without a recorded
        time, and, when its work is counted, its ``equivalents`` in real runs (None: counted by its time)."""
        if seconds < 0 or real_runs < 0 or untimed_runs < 0 or (equivalents is not None and equivalents < 0):
            raise ConfigError(f"ledger phase {phase!r}: seconds, real_runs, untimed_runs and equivalents must be >= 0")
        self.phases.append((phase, int(real_runs), float(seconds), None if equivalents is None else float(equivalents),
                            int(untimed_runs)))

    @contextmanager
    def phase(self, name: str):
        """Time a block as one phase: ``with ledger.phase("verify") as counts: ...``; the
        block may set ``counts["real_runs"]``, ``counts["equivalents"]``, and, for runs it read
        back from an earlier call, ``counts["earlier_seconds"]`` (their recorded seconds, added
        to the block's time) and ``counts["untimed_runs"]`` (see :meth:`add`)."""
        counts = {"real_runs": 0, "equivalents": None, "earlier_seconds": 0.0, "untimed_runs": 0}
        t0 = time.perf_counter()
        yield counts
        self.add(name, time.perf_counter() - t0 + counts["earlier_seconds"], counts["real_runs"], counts["equivalents"],
                 counts["untimed_runs"])

    def summary(self, run_seconds: float) -> LedgerSummary:
        """Every phase in run equivalents: its counted equivalents, else ``max(real_runs, seconds / run_seconds)``.

        Raises:
            ConfigError: ``run_seconds <= 0``.
        """
        if not run_seconds > 0:
            raise ConfigError(f"the seconds of one real run must be > 0, got {run_seconds}")
        entries = tuple(LedgerEntry(p, k, s, max(float(k), s / run_seconds) if eq is None else eq, u)
                        for p, k, s, eq, u in self.phases)
        return LedgerSummary(float(run_seconds), entries, sum(e.real_runs for e in entries),
                             sum(e.run_equivalents for e in entries), sum(e.seconds for e in entries))
