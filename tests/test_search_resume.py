"""Kill-safe search (issue 16, items 1-4): real Optuna journals, real SIGKILLs, a tiny recorded store.

A "kill" is a real ``SIGKILL`` of a forked child process at a chosen point (the child patches one
function to kill itself there), or, where nothing runs between the kill point and the end
of the process, an injected ``BaseException`` that no cleanup code catches.
"""

import json
import multiprocessing
import os
import signal
import sys
import time
import warnings

import optuna
import pytest
import torch

from currsearch.backends import SerialBackend
from currsearch.record import record
from currsearch.search import make_storage, run_search
from estimators import get_estimator


@pytest.fixture(scope="module")
def store(tiny_cfg, tmp_path_factory):
    # on the CPU under CURRSEARCH_TEST_DEVICE=cuda too: a forked child cannot use CUDA once this
    # process has, and these tests are about journals and kills, not devices
    cfg = tiny_cfg.replace(record={"projection_dim": 32}, train={"device": "cpu"})
    s = record(cfg, tmp_path_factory.mktemp("resume") / "s", progress=False)
    s.trainer()
    return s


class Killed(BaseException):
    """Stands in for SIGKILL: no ``except Exception`` cleanup catches it."""


class CountingBackend(SerialBackend):
    """A real serial backend that remembers every order it scored (a spy, not a mock)."""

    def __init__(self, estimator):
        super().__init__(estimator)
        self.scored: list[tuple] = []

    def score(self, orders):
        self.scored += [tuple(o.tolist()) for o in torch.as_tensor(orders).view(-1, self.T)]
        return super().score(orders)


def _forked(fn, cwd, timeout: float = 120) -> int:
    """Run ``fn()`` in a forked child process whose working directory is ``cwd``; return its exit
    code (-9: it SIGKILLed itself, 1: it raised). The child inherits this process's imports, so
    it starts in milliseconds where a fresh interpreter takes 3-4 s of torch and optuna imports.

    Linux only: elsewhere (macOS) forking a process that has loaded torch is unsafe, so the test skips.

    Raises:
        AssertionError: the child ran past ``timeout`` seconds (it is killed first).
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("the kill tests fork their child processes, which is safe on Linux only")

    def run_in_cwd():
        os.chdir(cwd)
        fn()

    child = multiprocessing.get_context("fork").Process(target=run_in_cwd)
    with warnings.catch_warnings():  # Python >= 3.12 warns about forking a threaded process (xdist's I/O thread,
        warnings.simplefilter("ignore", DeprecationWarning)  # which the child never touches)
        child.start()
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        raise AssertionError(f"the child process ran past {timeout} s")
    return child.exitcode


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_child_at(store, journal, point: str, n: int, cwd, trials=24, batch=8) -> None:
    """Run a search in a child process that SIGKILLs itself at the ``n``-th call of ``point``."""
    def search_until_killed():
        owner, attr = {"enqueue": (optuna.Study, "enqueue_trial"), "score": (SerialBackend, "score"),
                       "ask": (optuna.Study, "ask")}[point]
        real, calls = getattr(owner, attr), [0]

        def patched(*a, **k):
            calls[0] += 1
            if calls[0] == n:
                _die()
            return real(*a, **k)

        setattr(owner, attr, patched)  # in the child only
        run_search(str(store.path), n_trials=trials, batch_size=batch, storage=str(journal), progress=False)

    assert _forked(search_until_killed, cwd) == -9


def _rows(res):
    return {tuple(o.tolist()): e.tolist() for o, e in zip(res.orders, res.estimates)}


# ---------------------------------------------------------------- 1. the journal lock


def test_a_kill_holding_the_lock_of_a_relative_journal_does_not_hang_the_rerun(store, tmp_path):
    journal = "runs/main/study.journal"  # relative, like the default --out runs/main

    def die_holding_the_lock():
        optuna.storages.journal.JournalFileSymlinkLock.release = _die  # in the child only
        optuna.storages.journal.JournalFileOpenLock.release = _die
        run_search(str(store.path), n_trials=4, batch_size=4, storage=journal, progress=False)

    assert _forked(die_holding_the_lock, tmp_path) == -9
    lock = tmp_path / (journal + ".lock")
    assert os.path.lexists(lock)  # the stale lock is left behind
    old = time.time() - 45  # the rerun comes 45 s later (the lock is older than Optuna's 30 s grace)
    os.utime(lock, (old, old), follow_symlinks=False)

    def rerun():
        n = run_search(str(store.path), n_trials=4, batch_size=4, storage=journal, progress=False).n_trials
        if n != 4:
            raise SystemExit(f"the rerun ran {n} trials, not 4")

    t0 = time.perf_counter()
    assert _forked(rerun, tmp_path, timeout=30) == 0  # before the fix: loops forever on a symlink that points nowhere
    assert time.perf_counter() - t0 < 25


def test_a_fresh_stale_lock_is_released_within_the_grace_period(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def die_holding_the_lock():
        optuna.storages.journal.JournalFileSymlinkLock.release = _die  # in the child only
        optuna.create_study(storage=make_storage("rel/s.journal"), study_name="x")

    assert _forked(die_holding_the_lock, tmp_path) == -9
    t0 = time.perf_counter()
    storage = make_storage("rel/s.journal", lock_grace_s=2)  # rerun at once; the lock is 0 s old
    optuna.create_study(storage=storage, study_name="y")
    assert time.perf_counter() - t0 < 10


# ---------------------------------------------------------------- 2-3. kills at three points


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    journal = tmp_path_factory.mktemp("ref") / "study.journal"
    return run_search(store, n_trials=24, batch_size=8, storage=str(journal), progress=False)


def _check_rerun_matches(store, journal, uninterrupted, exact: bool):
    res = run_search(store, n_trials=24, batch_size=8, storage=str(journal), progress=False)
    trials = res.study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    assert res.n_trials == uninterrupted.n_trials == 24
    sources = [t.user_attrs["source"] for t in trials if t.state.name == "COMPLETE" and t.user_attrs.get("source")]
    ref_sources = [t.user_attrs["source"] for t in uninterrupted.study.trials if t.user_attrs.get("source")]
    assert sorted(sources) == sorted(ref_sources)  # every start evaluated, exactly once
    assert torch.equal(res.best_order, uninterrupted.best_order)  # the additive optimum is among the starts
    if exact:
        assert _rows(res) == _rows(uninterrupted)
    else:  # sampled after a restart: the result names where its fresh sampler took over
        assert res.resumed_at, "a resumed study must name the trials sampled after the restart"
        got, ref = _rows(res), _rows(uninterrupted)
        late = {tuple(t.user_attrs["order"]) for t in trials
                if t.number >= min(res.resumed_at) and t.state.name == "COMPLETE" and "source" not in t.user_attrs}
        assert set(got) - set(ref) <= late  # only trials sampled after the restart differ
        assert all(got[o] == ref[o] for o in set(got) & set(ref))
        assert len(set(got) - set(ref)) < len(late)  # and not all of them
    return res


def test_kill_while_the_starting_trials_are_queued(store, tmp_path, uninterrupted):
    journal = tmp_path / "study.journal"
    _kill_child_at(store, journal, "enqueue", 3, tmp_path)
    _check_rerun_matches(store, journal, uninterrupted, exact=True)


def test_kill_mid_batch_after_ask_before_tell(store, tmp_path, uninterrupted):
    journal = tmp_path / "study.journal"
    _kill_child_at(store, journal, "score", 1, tmp_path)  # the first batch: 8 trials RUNNING
    stranded = [t.number for t in make_storage(journal).get_all_trials(0) if t.state.name == "RUNNING"]
    assert len(stranded) == 8
    res = _check_rerun_matches(store, journal, uninterrupted, exact=False)  # the killed sampler had drawn some
    assert res.requeued == stranded  # named in the result


def test_kill_between_batches(store, tmp_path, uninterrupted):
    journal = tmp_path / "study.journal"
    _kill_child_at(store, journal, "ask", 17, tmp_path)  # after two batches were told
    _check_rerun_matches(store, journal, uninterrupted, exact=False)


def test_in_process_kill_during_enqueue_then_resume(store, tmp_path, monkeypatch, uninterrupted):
    journal = tmp_path / "study.journal"
    real, calls = optuna.Study.enqueue_trial, [0]

    def dying(self, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise Killed()
        return real(self, *a, **k)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", dying)
    with pytest.raises(Killed):
        run_search(store, n_trials=24, batch_size=8, storage=str(journal), progress=False)
    monkeypatch.setattr(optuna.Study, "enqueue_trial", real)
    _check_rerun_matches(store, journal, uninterrupted, exact=True)


def test_a_ctrl_c_in_the_first_batch_keeps_the_starting_trials(store, tmp_path, monkeypatch, uninterrupted):
    journal = tmp_path / "study.journal"

    def interrupted(self, orders):  # Ctrl-C while the batch of the enqueued starting trials is scored
        raise KeyboardInterrupt

    monkeypatch.setattr(SerialBackend, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_search(store, n_trials=24, batch_size=8, storage=str(journal), progress=False)
    monkeypatch.undo()
    assert not [t for t in make_storage(journal).get_all_trials(0) if t.state.name == "RUNNING"]
    _check_rerun_matches(store, journal, uninterrupted, exact=False)  # every start evaluated, once


# ---------------------------------------------------------------- 4. two searches on one journal


def test_two_searches_on_one_journal_never_score_an_order_twice(store, tmp_path, monkeypatch):
    journal = str(tmp_path / "study.journal")
    est = get_estimator("additive").fit(store)
    a, b = CountingBackend(est), CountingBackend(est)
    real, state = optuna.Study.enqueue_trial, {"raced": False}

    def racing(self, *args, **kw):  # B starts and enqueues its starts while A is enqueueing
        if not state["raced"]:
            state["raced"] = True
            run_search(store, n_trials=0, storage=journal, backend=b, progress=False)
        return real(self, *args, **kw)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", racing)
    run_search(store, n_trials=8, batch_size=8, storage=journal, backend=a, progress=False)
    monkeypatch.setattr(optuna.Study, "enqueue_trial", real)
    res = run_search(store, n_trials=16, batch_size=8, storage=journal, backend=b, progress=False)
    scored = a.scored + b.scored
    assert len(scored) == len(set(scored))  # no order scored twice
    complete = res.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 16
    orders = [tuple(t.user_attrs["order"]) for t in complete]
    assert len(set(orders)) >= 15  # at most the one start enqueued during the race is repeated
    # a duplicate trial (same parameters) is told the stored value, not scored
    first = complete[0]
    res.study.enqueue_trial(first.params)
    n_scored = len(b.scored)
    again = run_search(store, n_trials=17, batch_size=8, storage=journal, backend=b, progress=False)
    assert len(b.scored) == n_scored and again.n_reused == 1
    dup = again.study.trials[-1]
    assert dup.values == first.values and dup.user_attrs["reused_from"] == first.number


def test_a_killed_verification_resumes_and_trains_only_what_it_lacks(tiny_cfg, tmp_path):
    from currsearch.errors import StoreError
    from currsearch.store import TrajectoryStore
    from currsearch.verify import VERIFIED_RUNS, verified_runs, verify
    from test_guided import InterruptedTrainer, Killed  # the real trainer, killed at its n-th training

    store = record(tiny_cfg.replace(record={"projection_dim": 32}), tmp_path / "s", progress=False)
    trainer = store.trainer()
    g = torch.Generator().manual_seed(0)
    cands = {f"search_{i}": torch.randperm(trainer.T, generator=g) for i in range(4)}
    whole = verify(trainer, cands)
    with pytest.raises(Killed):
        verify(InterruptedTrainer(trainer, 3), cands, store=store)
    assert len(verified_runs(TrajectoryStore.open(tmp_path / "s"))) == 2  # kept in the store, on disk
    spy = InterruptedTrainer(trainer, 0)
    again = verify(spy, cands, store=store)
    assert spy.calls == 2  # only the two orders the store lacks
    assert {n: c.verified for n, c in again.candidates.items()} == {n: c.verified for n, c in whole.candidates.items()}
    # a damaged value is caught by the store's manifest checksum, never read as a run
    f = tmp_path / "s" / VERIFIED_RUNS
    f.write_bytes(f.read_bytes().replace(b'"losses": [[', b'"losses": [[1.0, ', 1))
    with pytest.raises(StoreError):
        verify(trainer, cands, store=store)


def test_bad_search_inputs_are_refused_with_a_clear_error(store, tmp_path):
    """A damaged journal, a seed NumPy cannot take and a study with no finished trial each raise
    ConfigError naming the fix, not a JSONDecodeError, a NumPy ValueError or an IndexError."""
    from currsearch.errors import ConfigError
    from currsearch.search import SearchSettings
    from currsearch.trust_region import TrustRegionSettings

    journal = tmp_path / "study.journal"
    journal.write_text("garbage\n{not json either\n")
    with pytest.raises(ConfigError, match="journal .* is damaged"):
        make_storage(journal)
    for settings in (SearchSettings, TrustRegionSettings):
        for seed in (-1, 2**32):
            with pytest.raises(Exception, match="seed"):
                settings(seed=seed)
    res = run_search(store, SearchSettings(trials=0), backend=SerialBackend(get_estimator("reference").fit(store)),
                     progress=False)
    with pytest.raises(ConfigError, match="no finished trial"):
        res.best_order


def test_a_study_resumed_on_another_store_is_refused(store, tmp_path):
    """The journal records the store's identity (config, projection, reference order): resuming
    it on a store recorded from another reference order raises instead of reporting the first
    store's estimates as the second's."""
    from currsearch.errors import ConfigError
    from currsearch.search import SearchSettings

    journal = str(tmp_path / "study.journal")
    settings = SearchSettings(trials=2, storage=journal)
    run_search(store, settings, backend=SerialBackend(get_estimator("reference").fit(store)), progress=False)
    other = record(store.config(), tmp_path / "other", progress=False, reference_order=torch.arange(store.T).flip(0))
    with pytest.raises(ConfigError, match="store"):
        run_search(other, settings, backend=SerialBackend(get_estimator("reference").fit(other)), progress=False)


def test_a_journal_record_cut_by_a_kill_is_dropped_before_the_rerun_appends(store, tmp_path):
    """A kill in the middle of Optuna's append leaves an unterminated last line; the rerun's first
    record would continue it and make the journal unreadable. make_storage cuts it off."""
    from currsearch.search import SearchSettings

    journal = tmp_path / "study.journal"
    backend = SerialBackend(get_estimator("reference").fit(store))
    run_search(store, SearchSettings(trials=2, storage=str(journal)), backend=backend, progress=False)
    intact = journal.read_bytes()
    last = intact.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    journal.write_bytes(intact + last[: len(last) // 2])  # half of a record, no newline
    res = run_search(store, SearchSettings(trials=4, storage=str(journal)), backend=backend, progress=False)
    assert res.n_trials == 4
    assert journal.read_bytes().startswith(intact)  # nothing complete was lost
    for line in journal.read_bytes().splitlines():
        json.loads(line)  # every record is whole
    assert not (tmp_path / "study.journal.lock").exists()  # the lock taken for the cut was released
