"""Kill-safe Optuna studies: storages, stale-lock and stale-trial recovery, idempotent starts.

A search can be killed (``kill -9``, a lost node) at any point; a rerun on the same storage
continues it. This module holds the parts that make that safe (issue 16):

* :func:`make_storage` resolves journal paths to absolute ones (Optuna's symlink lock points
  at the path it is given; a relative target points nowhere and its stale-lock release never
  fires) and releases a lock left by a killed process.
* :class:`Session` marks each call's trials (user attr ``currsearch_session``) and keeps a
  liveness record in the study's user attrs (``currsearch_session:<id>``: host, pid,
  heartbeat time, first trial number), so that a rerun can tell a dead call's RUNNING trials
  from a live concurrent call's.
* :func:`recover_stale_trials` fails a dead call's RUNNING trials and re-enqueues them (with
  the WAITING trials, in trial-number order, so that they are evaluated in the original order);
  :func:`~currsearch.search.ask_and_tell` does the same for the enqueued trials of a batch that
  raised (Ctrl-C, a backend error); both queue through :func:`requeue_in_order`.
* :func:`enqueue_starts` enqueues the starting trials idempotently (``skip_if_exists``) and
  records completion in the user attr ``currsearch_starts_done``.
* :func:`known_values` maps each evaluated order to its stored trial, so that an order is
  never scored twice (a duplicate trial is told the stored value).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from .errors import ConfigError
from .manifest import make_output_dir, pid_running

logger = logging.getLogger(__name__)

LOCK_GRACE_S = 30.0  # a journal lock older than this is stale (Optuna holds it for one append)
STALE_AFTER_S = 600.0  # a session on another host without a heartbeat this long is dead
SESSION_ATTR = "currsearch_session"
STARTS_ATTR = "currsearch_starts_done"


@contextlib.contextmanager
def optuna_warnings_only() -> Iterator[None]:
    """Within the block, Optuna logs warnings and errors only (not one INFO line per trial);
    its previous verbosity is restored on exit, also on an exception."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def release_stale_lock(journal: Path, grace_s: float = LOCK_GRACE_S) -> bool:
    """Remove the symlink lock ``<journal>.lock`` if a killed process left it.

    A lock whose link is older than ``grace_s`` seconds is stale (Optuna holds it for one
    append). A link that points nowhere (made by a process that gave Optuna a relative path;
    Optuna's own grace-period release never fires on it) is released once ``grace_s`` seconds
    old: this waits at most ``grace_s`` seconds. Returns whether a lock was removed.
    """
    lock = Path(str(journal) + ".lock")
    try:
        age = time.time() - os.lstat(lock).st_mtime
    except FileNotFoundError:
        return False
    dangling = not lock.exists()
    if not dangling and age <= grace_s:
        return False  # a live holder, or Optuna's own grace period releases it
    if dangling and age <= grace_s:
        logger.warning("journal lock %s points nowhere; waiting %.0f s before releasing it", lock, grace_s - age)
        time.sleep(grace_s - age)
    try:  # rename first, as Optuna does: only one process wins the release
        stale = lock.with_name(f"{lock.name}.{uuid.uuid4().hex}.stale")
        os.rename(lock, stale)
        os.unlink(stale)
    except FileNotFoundError:
        return False
    logger.warning("released the stale journal lock %s (left by a killed process)", lock)
    return True


def drop_partial_record(journal: Path, lock) -> int:
    """Cut a journal back to its last complete line when a kill left a record half-written.

    Optuna writes each record as one ``\\n``-terminated line under ``lock`` and skips an
    unterminated last line when reading, but its next append would continue that line and
    make the whole journal unreadable. The partial record held an operation that never
    completed, so cutting it loses nothing Optuna could read. The check and the cut are done
    under ``lock`` (a live writer's append is never cut). Returns the bytes removed.
    """
    try:
        with open(journal, "rb") as f:  # the common case, a whole last line, needs no lock
            if f.seek(0, os.SEEK_END) == 0 or (f.seek(-1, os.SEEK_END) >= 0 and f.read(1) == b"\n"):
                return 0
    except FileNotFoundError:
        return 0
    lock.acquire()
    try:
        with open(journal, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return 0
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
            os.fsync(f.fileno())
    finally:
        lock.release()
    logger.warning("journal %s ended in a half-written record (a killed write); removed its %d byte(s)", journal, len(data) - keep)
    return len(data) - keep


def make_storage(storage, lock_grace_s: float = LOCK_GRACE_S) -> optuna.storages.BaseStorage | str | None:
    """Optuna storage from ``None`` (in memory), a path ending in ``.journal``
    (JournalStorage + JournalFileBackend on the absolute path; the parent folder is created,
    a stale lock released), any Optuna RDB storage URL (``sqlite:///x.db``, ``postgresql://...``;
    opened as an ``RDBStorage``) or a storage object (returned as is).

    Args:
        lock_grace_s: seconds after which a journal lock left by a killed process is released
            (Optuna's ``grace_period``; :func:`release_stale_lock`). A record half-written by a
            killed process is cut off (:func:`drop_partial_record`).

    Raises:
        ConfigError: neither a ``.journal`` path nor a URL, a URL that cannot be opened, a
            journal whose folder is a file or lies under one, or a damaged journal file (not JSON lines).
    """
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    s = str(storage)
    if s.endswith(".journal"):
        path = Path(s).expanduser().resolve()  # absolute: Optuna's symlink lock must point at the file
        make_output_dir(path.parent, "--storage")
        release_stale_lock(path, lock_grace_s)
        lock = JournalFileSymlinkLock(str(path), grace_period=max(1, round(lock_grace_s)))
        drop_partial_record(path, lock)
        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"the Optuna journal {str(path)!r} is damaged ({type(err).__name__}: {err}); move it away "
                              "to start the study over (its trials are lost), or pass another --out") from None
    if "://" not in s:
        raise ConfigError(f"storage {s!r} is neither a '.journal' file path nor a storage URL such as sqlite:///study.db")
    try:
        return optuna.storages.RDBStorage(s)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds (bad dialect, bad path, no server)
        first = (str(err).splitlines() or [""])[0][:200]
        raise ConfigError(f"cannot open the Optuna storage {s!r} ({type(err).__name__}: {first}); pass a .journal "
                          "file path or a reachable database URL such as sqlite:///study.db") from None


class Session:
    """One call's liveness record in ``study`` (see the module docstring).

    Attributes:
        id: a fresh hex id; ``first_trial``: the number of trials when the call began.
    """

    def __init__(self, study: optuna.Study):
        self.study = study
        self.id = uuid.uuid4().hex
        self.first_trial = len(study.get_trials(deepcopy=False))
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.beat()

    def beat(self) -> None:
        """Record that this call is alive (one user attr write)."""
        record = {"host": self.host, "pid": self.pid, "heartbeat": time.time(), "first_trial": self.first_trial}
        self.study.set_user_attr(f"{SESSION_ATTR}:{self.id}", record)

    def tag(self, trial: optuna.trial.Trial) -> None:
        """Mark ``trial`` as asked by this call."""
        trial.set_user_attr(SESSION_ATTR, self.id)


def _alive(record: dict[str, Any] | None, stale_after_s: float) -> bool:
    """Whether the session ``record`` may still run: a live pid on this host, else a recent heartbeat."""
    if not record:
        return False
    if record.get("host") == socket.gethostname():
        return pid_running(int(record["pid"]))
    return time.time() - float(record.get("heartbeat", 0)) < stale_after_s


def session_starts(study: optuna.Study) -> list[int]:
    """Sorted first trial numbers of every call after the first (where a fresh sampler took over)."""
    firsts = [v.get("first_trial", 0) for k, v in study.user_attrs.items() if k.startswith(f"{SESSION_ATTR}:")]
    return sorted(f for f in firsts if f > 0)


def fail_unfinished(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Tell FAIL to each of ``trials`` (RUNNING or WAITING) through the public
    ``BaseStorage.set_trial_state_values``, e.g. before their parameters are queued again.

    Returns:
        The trials this call failed, in the given order (one a concurrent call finished first is left out).
    """
    storage = study._storage  # noqa: SLF001 -- Study exposes no public storage handle; the method used is public
    failed = []
    for t in trials:
        try:
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)  # noqa: SLF001
        except optuna.exceptions.UpdateFinishedTrialError:  # a concurrent rerun recovered it first
            continue
        failed.append(t)
    return failed


def requeue_in_order(study: optuna.Study, failed: list[optuna.trial.FrozenTrial]) -> None:
    """Queue the ``failed`` trials (already told FAIL) again together with every WAITING trial
    (told FAIL here, :func:`fail_unfinished`), all in trial-number order, so that the next asks
    run them in the order an uninterrupted call would have: each keeps its parameters (an
    enqueued trial's fixed ones) and user attrs (less the session tag)."""
    waiting = fail_unfinished(study, study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    for t in sorted(failed + waiting, key=lambda t: t.number):
        attrs = {k: v for k, v in t.user_attrs.items() if k != SESSION_ATTR}
        study.enqueue_trial(t.system_attrs.get("fixed_params", t.params), user_attrs=attrs)


def recover_stale_trials(study: optuna.Study, session: Session, stale_after_s: float = STALE_AFTER_S) -> list[int]:
    """Fail the RUNNING trials of dead calls and re-enqueue their parameters.

    A RUNNING trial is stale when the call that asked it is dead (:func:`_alive`), or it has
    no session and started more than ``stale_after_s`` seconds ago. If any is stale, it and
    every WAITING trial are told FAIL (public ``BaseStorage.set_trial_state_values``) and
    re-enqueued with their user attrs in trial-number order, so that they run in the order
    an uninterrupted call would have run them.

    Returns:
        The numbers of the stale RUNNING trials (now FAIL; their parameters queued again).
    """
    sessions = {k.split(":", 1)[1]: v for k, v in study.user_attrs.items() if k.startswith(f"{SESSION_ATTR}:")}
    now = time.time()
    stale = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        sid = t.user_attrs.get(SESSION_ATTR)
        if sid != session.id and (
            not _alive(sessions.get(sid), stale_after_s) if sid else now - t.datetime_start.timestamp() > stale_after_s
        ):
            stale.append(t)
    if not stale:
        return []
    requeue_in_order(study, fail_unfinished(study, stale))
    numbers = [t.number for t in stale]
    logger.warning("re-queued %d trial(s) left RUNNING by a killed search: %s", len(numbers), numbers)
    return numbers


def enqueue_starts(study: optuna.Study, starts: list[tuple[dict[str, Any], str]]) -> int:
    """Enqueue the starting trials ``[(params, source), ...]`` once, even across kills.

    Each is skipped if a trial with the same parameters exists (``skip_if_exists``); the user
    attr ``currsearch_starts_done`` is set when all are in, so later calls skip this.
    Returns the number enqueued now.
    """
    n = 0
    for params, source in starts:
        before = len(study.get_trials(deepcopy=False))
        study.enqueue_trial(params, user_attrs={"source": source}, skip_if_exists=True)
        n += len(study.get_trials(deepcopy=False)) > before
    study.set_user_attr(STARTS_ATTR, True)
    return n


def known_values(study: optuna.Study) -> dict[tuple[int, ...], optuna.trial.FrozenTrial]:
    """``{order tuple: first COMPLETE trial with that order}`` (from the ``"order"`` user attr)."""
    out: dict[tuple[int, ...], optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        o = t.user_attrs.get("order")
        if o is not None and "estimates" in t.user_attrs:
            out.setdefault(tuple(o), t)
    return out
