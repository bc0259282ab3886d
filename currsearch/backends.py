"""Evaluation backends: score many candidate orders with a fitted estimator.

A backend maps orders (int64 ``[n, T]``, permutations of ``0..T-1``) to estimated final
eval losses (float64 ``[n, E]``, nats/token, columns in ``eval_names`` order, on the CPU)::

    with SerialBackend(get_estimator("additive").fit(store)) as b:
        losses = b.score(orders)

    with RayBackend(store.path, "additive", num_actors=4) as b:     # same numbers, in parallel
        losses = b.score(orders)

* :class:`SerialBackend` calls ``estimator.estimate`` in this process, chunk by chunk.
* :class:`RayBackend` runs one Ray actor per worker. Each actor opens the store once and
  fits its own copy of the estimator on its device, then scores chunks of orders handed
  out by a :class:`ray.util.ActorPool`; results come back in input order. A dead actor is
  replaced by a fresh one and its chunk retried.

How the store reaches the actors: each actor opens the store from its path
(``TrajectoryStore.open(path, verify=False)``; the driver opens and checksums it once) and
fits from there, i.e. the store directory must be readable at the same path on every node
(always true for a local Ray instance; on a cluster use a shared filesystem). Shipping the
store's arrays through the object store (``ray.put``) would avoid that requirement at the
price of one copy per node; it is not done here because the estimators fit from a
:class:`~currsearch.store.TrajectoryStore` and the files are memory-mapped anyway.

GPUs: for a store recorded with ``train.device=cuda`` each actor requests a share of a GPU
(``num_gpus_per_actor``, by default :func:`gpus_per_actor`: the cluster's GPUs split evenly
among the actors) and holds its own copy of the model and the store there.

Both backends give identical numbers for the same orders and chunk size when the estimator
runs on the same device: the same estimator code runs on the same float64 data (a CPU
store's actors estimate on the CPU, a CUDA store's on their GPU, ``device="cuda"``; give
the serial estimator the same ``device`` to compare).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch  # ray is imported where a Ray backend uses it: a serial search never pays its ~0.8 s import

from estimators import available, get_estimator

from .errors import ConfigError, CurrsearchError, StoreError
from .orders import validate_orders
from .store import TrajectoryStore
from .train import Trainer


def _as_batch(orders, T: int) -> torch.Tensor:
    """Validated int64 ``[n, T]`` on the CPU (a single ``[T]`` order becomes ``[1, T]``)."""
    o = validate_orders(orders, T).cpu()
    return o.view(-1, T)


class Backend(ABC):
    """The contract of an evaluation backend (see the module docstring).

    Attributes:
        T: number of batches in the window (orders are permutations of ``0..T-1``).
        eval_names: the E eval-set names, the column order of :meth:`score`.
        estimator_name: registered name of the estimator that scores.

    A backend is a context manager: ``with`` closes it (:meth:`close`).
    """

    T: int
    eval_names: list[str]
    estimator_name: str

    @abstractmethod
    def score(self, orders) -> torch.Tensor:
        """Estimated final losses: orders int64 ``[n, T]`` (or ``[T]``) -> float64 ``[n, E]``
        (nats/token, on the CPU), rows in input order; a single ``[T]`` order gives ``[1, E]``.

        Raises:
            OrderError: an invalid order.
        """

    @abstractmethod
    def assignment_optimum(self, eval_set: str) -> torch.Tensor | None:
        """The estimator's own optimum order for ``eval_set`` (int64 ``[T]``) when it has one
        (estimators with ``has_optimum``), else ``None``.

        Raises:
            ConfigError: ``eval_set`` is not one of :attr:`eval_names`.
        """

    def _check_eval_set(self, eval_set: str) -> None:
        if eval_set not in self.eval_names:
            raise ConfigError(f"unknown eval set {eval_set!r}; the store has {self.eval_names}")

    def close(self) -> None:
        """Release resources (no-op by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SerialBackend(Backend):
    """Score orders in this process with a fitted estimator.

    Args:
        estimator: a fitted :class:`~estimators.base.Estimator`.
        chunk: orders per ``estimate`` call (bounds peak memory; results do not depend on it).

    Attributes:
        estimator, T, eval_names, estimator_name, chunk.

    Raises:
        ConfigError: ``chunk < 1``. RuntimeError: the estimator was not fitted.
    """

    def __init__(self, estimator, chunk: int = 256):
        if chunk < 1:
            raise ConfigError(f"SerialBackend: chunk must be >= 1, got {chunk}")
        if getattr(estimator, "store", None) is None:
            raise RuntimeError(f"SerialBackend needs a fitted estimator; call {type(estimator).__name__}.fit(store) first")
        self.estimator = estimator
        self.chunk = int(chunk)
        self.T = estimator.T
        self.eval_names = list(estimator.eval_names)
        self.estimator_name = estimator.name

    def score(self, orders) -> torch.Tensor:
        """Estimated final losses: orders int64 ``[n, T]`` (or ``[T]``) -> float64 ``[n, E]``
        (nats/token, CPU). A single ``[T]`` order gives ``[1, E]``.

        Raises:
            OrderError: an invalid order.
        """
        o = _as_batch(orders, self.T)
        if o.shape[0] == 0:
            return torch.empty(0, len(self.eval_names), dtype=torch.float64)
        out = [self.estimator.estimate(c).to("cpu", torch.float64) for c in torch.split(o, self.chunk)]
        return torch.cat(out)

    def assignment_optimum(self, eval_set: str) -> torch.Tensor | None:
        """The estimator's own optimum order for ``eval_set`` (int64 ``[T]``) when it has
        one (``assignment_optimum``, additive and calibrated estimators), else ``None``.

        Raises:
            ConfigError: an eval set the store lacks.
        """
        self._check_eval_set(eval_set)
        return self.estimator.assignment_optimum(eval_set).cpu() if self.estimator.has_optimum else None

    def __repr__(self) -> str:
        return f"SerialBackend({self.estimator_name!r}, T={self.T}, chunk={self.chunk})"


# ---------------------------------------------------------------- Ray


class _ScoringWorker:
    """Body of a Ray actor: opens the store and fits the estimator once (``setup``)."""

    def __init__(self, store_path: str, estimator_name: str, estimator_kwargs: dict, num_threads: int | None):
        self.store_path = store_path
        self.estimator_name = estimator_name
        self.estimator_kwargs = dict(estimator_kwargs)
        self.num_threads = num_threads
        self.est = None

    def setup(self) -> tuple[int, list[str], str]:
        """Open the store, fit the estimator; return ``(T, eval_names, actor id)`` (the id in
        hex, from Ray's public runtime context). Errors (StoreError, ConfigError) propagate to
        the driver as their own class."""
        import ray
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        store = TrajectoryStore.open(self.store_path, verify=False)
        cfg = store.config()
        if cfg.train.device.startswith("cuda") and ray.get_gpu_ids():
            # Ray shows the actor only its assigned GPU(s) (CUDA_VISIBLE_DEVICES), so the recorded
            # cuda:N is this actor's first visible GPU: the model goes there, same initial weights
            store.use_trainer(Trainer.from_config(cfg.replace(train={"device": "cuda"})))
        self.est = get_estimator(self.estimator_name, **self.estimator_kwargs).fit(store)
        return self.est.T, list(self.est.eval_names), ray.get_runtime_context().get_actor_id()

    def score(self, orders):
        """numpy int64 ``[m, T]`` -> numpy float64 ``[m, E]``."""
        out = self.est.estimate(torch.tensor(orders))
        return out.to("cpu", torch.float64).numpy()

    def assignment_optimum(self, eval_set: str):
        return self.est.assignment_optimum(eval_set).cpu().numpy() if self.est.has_optimum else None

    def pid(self) -> int:
        return os.getpid()


def _actor_error(err, what: str) -> CurrsearchError:
    """The error a Ray actor's method raised (``ray.exceptions.RayTaskError``), without Ray's
    remote traceback: the actor's own :class:`CurrsearchError` (a damaged store, a bad setting)
    as it is, anything else (CUDA out of memory, a device the actor's node lacks) as a
    CurrsearchError naming the cause, ``what`` the actor was doing and what to try."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, CurrsearchError):
        return cause
    said = f"{type(cause).__name__}: {cause}" if cause is not None else str(err).strip().splitlines()[-1]
    return CurrsearchError(
        f"a Ray actor failed {what}: {said}. If it ran out of memory, use a smaller chunk or "
        "fewer actors per GPU; if its node lacks the device, set the estimator's device or num_gpus_per_actor"
    )


def gpus_per_actor(device: str, num_actors: int, cluster_gpus: float) -> float:
    """The GPUs each of ``num_actors`` Ray actors requests by default (``RayBackend``'s
    ``num_gpus_per_actor=None``) for a store recorded on ``device`` (its ``train.device``).

    Every actor holds its own copy of the model and the store on its GPU (the design of the
    Ray backend: one GPU copy of the store per actor). Off CUDA: 0. On CUDA with G GPUs in the
    cluster: 1 each when G >= num_actors, else ``1 / ceil(num_actors / G)``, i.e. the actors
    share the GPUs evenly, at most ``ceil(num_actors / G)`` per GPU (a fraction Ray can pack:
    e.g. 4 actors on 1 GPU request 0.25 each, 3 actors on 2 GPUs 0.5 each).

    Args:
        device: the store's ``train.device`` (``"cpu"``, ``"mps"``, ``"cuda"``, ``"cuda:N"``).
        num_actors: number of actors (>= 1).
        cluster_gpus: GPUs in the Ray cluster (``ray.cluster_resources()["GPU"]``, 0 when none).

    Raises:
        ConfigError: a CUDA store and a cluster without GPUs.
    """
    if not device.startswith("cuda"):
        return 0.0
    gpus = int(cluster_gpus)
    if gpus < 1:
        raise ConfigError(
            f"the store was recorded with train.device={device!r}, so its model runs on a GPU in every Ray actor, but "
            "the Ray cluster has no GPU; run on a machine or cluster with GPUs, or record the store with train.device=cpu"
        )
    return 1.0 if gpus >= num_actors else 1.0 / -(-num_actors // gpus)


def _check_address(address: str, timeout: float) -> None:
    """Fail fast (ConfigError) when ``host:port`` does not accept TCP connections: a plain
    ``ray.init(address=...)`` to an unreachable address retries for minutes."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not of the form host:port (or ray://host:port, or 'auto')")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConfigError(
            f"cannot reach a Ray cluster at {address!r} ({err}); start one with `ray start --head` "
            "and pass its address (head-node host:port), or leave address unset to run Ray locally"
        ) from None


def _init_ray(address: str | None, cpus_needed: float, init_kwargs: dict[str, Any] | None) -> bool:
    """Start a new local Ray instance (``address`` None, with at least ``cpus_needed`` logical
    CPUs; Ray's ``address="local"``, so neither a cluster already running on this machine nor
    ``RAY_ADDRESS`` is joined by surprise) or join ``address``, unless Ray is already
    initialized here; return whether it started one.

    Raises:
        ConfigError: Ray could not start or join.
    """
    import ray
    if ray.is_initialized():
        return False
    init = {"include_dashboard": False, "log_to_driver": True}
    if address is None:  # joining an existing cluster with num_cpus set is a ValueError in ray.init
        init.update(address="local", num_cpus=max(os.cpu_count() or 1, int(-(-cpus_needed // 1))))
    else:
        init["address"] = address
    init.update(init_kwargs or {})
    try:
        ray.init(**init)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
        raise ConfigError(f"could not start or join Ray (address={address!r}): {err}") from None
    return True


class RayBackend(Backend):
    """Score orders on a pool of Ray actors, one estimator copy per actor.

    Args:
        store_path: trajectory store directory (or an open ``TrajectoryStore``); must be
            readable at this path from every Ray node (see module docstring).
        estimator_name: registered estimator name (``estimators.available()``). An estimator
            whose fit trains real runs cached in the store (``needs_runs``: the calibrated ones,
            which retrain orders for real) is fitted once here before the actors start, so
            the actors read the cache instead of each repeating the real runs.
        estimator_kwargs: keyword arguments of the estimator (e.g. ``{"readout": "checkpoint"}``);
            ``device`` defaults to ``"cuda"`` when the actors get GPUs (``num_gpus_per_actor > 0``,
            given or by default), else ``"cpu"``.
        num_actors: number of actors (workers).
        chunk: orders per actor call.
        address: ``None`` starts (or reuses) a local Ray instance; ``"auto"``, ``"host:port"`` or
            ``"ray://host:port"`` joins an existing cluster (checked with a TCP connect first).
            When Ray is already initialized in this process, that instance is reused and
            :meth:`close` leaves it running.
        num_cpus_per_actor: logical CPUs reserved per actor (also its torch thread count).
        num_gpus_per_actor: GPUs per actor, fractional allowed (e.g. 0.25 puts 4 actors on one GPU);
            ``None`` (default) follows the store's ``train.device``: 0 for a CPU store, for a
            CUDA store the even share of the cluster's GPUs of :func:`gpus_per_actor`. An
            actor with GPUs runs the store's model on its own GPU (a recorded ``cuda:N`` maps
            to the actor's assigned GPU).
        max_retries: how often one chunk may be retried after its actor failed.
        connect_timeout: seconds to wait for a TCP connection to ``address``.
        ready_timeout: seconds to wait for an actor to be scheduled and fitted.
        init_kwargs: extra keyword arguments of ``ray.init`` (e.g. ``{"num_cpus": 8}``).

    Attributes:
        T, eval_names, estimator_name, actors (current handles), n_replaced (actors replaced
        after dying), started_ray (whether this backend called ``ray.init``).

    Raises:
        ConfigError: a bad argument, an unreachable ``address``, or actors that could not be
            scheduled within ``ready_timeout`` (too few CPUs/GPUs in the cluster).
        StoreError: the store cannot be opened or lacks the estimator's terms (both checked before
            Ray starts), or changed before an actor opened it (from that actor).
    """

    def __init__(
        self,
        store_path,
        estimator_name: str,
        estimator_kwargs: dict[str, Any] | None = None,
        num_actors: int = 2,
        chunk: int = 64,
        address: str | None = None,
        num_cpus_per_actor: float = 1,
        num_gpus_per_actor: float | None = None,
        max_retries: int = 3,
        connect_timeout: float = 5.0,
        ready_timeout: float = 300.0,
        init_kwargs: dict[str, Any] | None = None,
    ):
        import ray
        if num_actors < 1:
            raise ConfigError(f"RayBackend: num_actors must be >= 1, got {num_actors}")
        if chunk < 1:
            raise ConfigError(f"RayBackend: chunk must be >= 1, got {chunk}")
        if num_cpus_per_actor < 0 or (num_gpus_per_actor is not None and num_gpus_per_actor < 0):
            raise ConfigError("RayBackend: num_cpus_per_actor and num_gpus_per_actor must be >= 0")
        self.actors: list = []
        self.actor_ids: list[str] = []
        self.started_ray = False
        self._pool = None
        store = store_path if isinstance(store_path, TrajectoryStore) else TrajectoryStore.open(store_path)
        self.store_path = str(Path(store.path).resolve())
        self.T = store.T
        self.eval_names = list(store.eval_names)
        self.estimator_name = estimator_name
        if estimator_name not in available():
            raise ConfigError(f"unknown estimator {estimator_name!r}; choose one of {available()}")
        kwargs = dict(estimator_kwargs or {})
        probe = get_estimator(estimator_name, **{**kwargs, "device": "cpu"})
        probe.check_terms(store)  # a missing term fails here, before Ray and the actors start
        self.num_actors, self.chunk, self.max_retries = int(num_actors), int(chunk), int(max_retries)
        self.n_replaced = 0
        self.ready_timeout = float(ready_timeout)
        if address is not None:
            _check_address(address, connect_timeout)
        self.started_ray = _init_ray(address, num_actors * num_cpus_per_actor, init_kwargs)
        try:
            if num_gpus_per_actor is None:
                num_gpus_per_actor = gpus_per_actor(store.config().train.device, self.num_actors,
                                                    ray.cluster_resources().get("GPU", 0))
            kwargs.setdefault("device", "cuda" if num_gpus_per_actor > 0 else "cpu")
            self.estimator_kwargs = kwargs
            self._resources = {"num_cpus": num_cpus_per_actor, "num_gpus": num_gpus_per_actor}
            self._check_resources()
            if probe.needs_runs:  # fit once here (real runs, cached in the store; after the cheap checks above,
                probe.fit(store)  # so a bad address or resource request fails at once); the actors read the cache
            self._remote_cls = ray.remote(num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor)(_ScoringWorker)
            self._threads = max(1, int(num_cpus_per_actor)) if num_cpus_per_actor else None
            started = [self._start_actor() for _ in range(self.num_actors)]
            self.actors = [a for a, _ in started]
            self.actor_ids = self._wait_ready([r for _, r in started])
        except BaseException:  # a Ray instance started here does not outlive a failed start
            self.close()
            raise
        self._reset_pool()

    # -- actors
    def _start_actor(self):
        """A new actor and the ObjectRef of its ``setup`` call."""
        a = self._remote_cls.remote(self.store_path, self.estimator_name, self.estimator_kwargs, self._threads)
        return a, a.setup.remote()

    def _check_resources(self) -> None:
        """Fail at once (ConfigError) when the cluster has fewer CPUs/GPUs in all than the
        actors request, instead of waiting ``ready_timeout`` for actors that cannot start."""
        import ray
        need = {"CPU": self.num_actors * self._resources["num_cpus"], "GPU": self.num_actors * self._resources["num_gpus"]}
        have = {k: ray.cluster_resources().get(k, 0) for k in need}
        short = {k: v for k, v in need.items() if v > have[k] + 1e-9}
        if short:
            raise ConfigError(
                f"{self.num_actors} Ray actors need {need['CPU']:g} CPUs and {need['GPU']:g} GPUs, the cluster has "
                f"{have['CPU']:g} and {have['GPU']:g}; use fewer actors (--actors) or a larger cluster"
            )

    def _wait_ready(self, refs) -> list[str]:
        """Wait for the actors' ``setup``; return their actor ids (hex).

        Raises:
            ConfigError: not ready within ``ready_timeout``. StoreError: the store changed.
            CurrsearchError: an actor's setup raised (:func:`_actor_error`).
        """
        import ray
        try:
            ready = ray.get(list(refs), timeout=self.ready_timeout)
        except ray.exceptions.RayTaskError as err:
            raise _actor_error(err, "to start (opening the store and fitting the estimator)") from None
        except ray.exceptions.GetTimeoutError:
            def pick(r):
                return {k: r.get(k, 0) for k in ("CPU", "GPU")}

            raise ConfigError(
                f"Ray actors were not ready within {self.ready_timeout:.0f} s: each needs {self._resources} and the "
                f"cluster has {pick(ray.cluster_resources())} in all, {pick(ray.available_resources())} free; use fewer "
                "actors or smaller num_cpus_per_actor/num_gpus_per_actor"
            ) from None
        for T, names, _ in ready:
            if T != self.T or names != self.eval_names:  # the store changed under us
                raise StoreError(f"store {self.store_path!r} changed while the Ray backend started (T or eval sets differ)")
        return [actor_id for _, _, actor_id in ready]

    def _reset_pool(self) -> None:
        from ray.util import ActorPool
        self._pool = ActorPool(list(self.actors))

    def _replace(self, dead_id: str | None) -> None:
        """Swap the actor whose id (hex, as reported by its ``setup``) is ``dead_id`` (or,
        unknown, every dead one) for a fresh one."""
        import ray
        for i, a in enumerate(self.actors):
            if dead_id is not None and self.actor_ids[i] != dead_id:
                continue
            if dead_id is None:  # find out who is dead
                try:
                    ray.get(a.pid.remote(), timeout=30)
                    continue
                except ray.exceptions.GetTimeoutError:  # alive, busy with a long chunk queued before the call
                    continue
                except ray.exceptions.RayActorError:
                    pass
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
            new, ready = self._start_actor()
            try:
                (new_id,) = self._wait_ready([ready])
            except BaseException:
                ray.kill(new)
                raise
            self.actors[i], self.actor_ids[i] = new, new_id
            self._pool.push(new)
            self.n_replaced += 1

    # -- scoring
    def score(self, orders, on_chunk: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Estimated final losses: orders int64 ``[n, T]`` (or ``[T]``) -> float64 ``[n, E]``
        (nats/token, CPU), rows in input order. A single ``[T]`` order gives ``[1, E]``.

        Args:
            on_chunk: optional callback ``(chunks_done, chunks_total)`` after each chunk.

        Raises:
            OrderError: an invalid order. CurrsearchError: a chunk failed more than
            ``max_retries`` times because its actor died, or its estimate raised in the actor
            (:func:`_actor_error`).
        """
        import ray
        if self._pool is None:
            raise RuntimeError("RayBackend is closed")
        o = _as_batch(orders, self.T)
        if o.shape[0] == 0:
            return torch.empty(0, len(self.eval_names), dtype=torch.float64)
        chunks = [c.contiguous().numpy() for c in torch.split(o, self.chunk)]
        results: list = [None] * len(chunks)
        tries = [0] * len(chunks)
        submitted: list[int] = []  # chunk index of each pool task, in submission order

        def fn(actor, i):
            return actor.score.remote(chunks[i])

        for i in range(len(chunks)):
            self._pool.submit(fn, i)
            submitted.append(i)
        k = done = 0
        try:
            while self._pool.has_next():
                i = submitted[k]  # ActorPool.get_next returns tasks in submission order
                k += 1
                try:
                    results[i] = self._pool.get_next()
                except ray.exceptions.RayActorError as err:
                    tries[i] += 1
                    if tries[i] > self.max_retries:
                        raise CurrsearchError(
                            f"RayBackend: chunk {i} failed {tries[i]} times because its actor died ({err}); giving up"
                        ) from None
                    if isinstance(err, ray.exceptions.ActorDiedError):
                        self._replace(err.actor_id)
                    else:  # temporarily unavailable: wait a little and retry on the same pool
                        time.sleep(0.5)
                    self._pool.submit(fn, i)
                    submitted.append(i)
                    continue
                except ray.exceptions.RayTaskError as err:
                    raise _actor_error(err, f"scoring chunk {i} of {len(chunks)}") from None
                done += 1
                if on_chunk is not None:
                    on_chunk(done, len(chunks))
        except BaseException:
            # abandon in-flight tasks: a fresh pool over the live actors (their queued work
            # finishes and is dropped), so the next call starts clean
            self._reset_pool()
            raise
        return torch.cat([torch.tensor(r) for r in results]).to(torch.float64)

    def assignment_optimum(self, eval_set: str) -> torch.Tensor | None:
        """The estimator's own optimum order for ``eval_set`` (int64 ``[T]``, computed on one
        actor) when it has one (``has_optimum``), else ``None``.

        Raises:
            ConfigError: an eval set the store lacks. CurrsearchError: the actor raised (:func:`_actor_error`).
        """
        import ray
        self._check_eval_set(eval_set)
        try:
            out = ray.get(self.actors[0].assignment_optimum.remote(eval_set))
        except ray.exceptions.RayTaskError as err:
            raise _actor_error(err, "computing the assignment optimum") from None
        return None if out is None else torch.tensor(out, dtype=torch.int64)

    def close(self) -> None:
        """Kill the actors; shut Ray down only if this backend started it (an external
        cluster or an instance started by the caller stays up). Idempotent."""
        import ray
        if ray.is_initialized():
            for a in self.actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001 - already dead
                    pass
        self.actors, self.actor_ids = [], []
        self._pool = None
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        self.started_ray = False

    def __repr__(self) -> str:
        return f"RayBackend({self.estimator_name!r}, T={self.T}, actors={len(self.actors)}, chunk={self.chunk})"
