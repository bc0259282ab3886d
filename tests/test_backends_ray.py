"""Ray scoring backend (currsearch.backends.RayBackend): a real local Ray instance scores like
the serial backend, replaces killed actors, refuses what the cluster cannot hold. Its own file,
run first (the longest, tests/conftest.py), so that under ``pytest -n`` its Ray start-up overlaps
the other files' tests."""

import json
import shutil
import socket
import time

import pytest
import torch

from currsearch.backends import RayBackend, SerialBackend, gpus_per_actor
from currsearch.errors import ConfigError, CurrsearchError, StoreError
from currsearch.orders import random_order
from currsearch.search import run_search
from estimators import get_estimator


@pytest.fixture(scope="module")
def store(search_store):
    return search_store


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def orders20(store):
    T = store.T
    return torch.stack([torch.arange(T)] + [random_order(T, seed) for seed in range(19)])


def _actor_device(store) -> str:
    """The estimator device RayBackend's actors default to for ``store`` (its GPU for a CUDA
    store): a serial estimator on the same device gives the same numbers."""
    return "cuda" if store.config().train.device.startswith("cuda") else "cpu"


def _kill(ray, actor):
    """ray.kill, then wait until the actor is really dead (the kill is asynchronous)."""
    ray.kill(actor)
    for _ in range(200):
        try:
            ray.get(actor.pid.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed actor is still alive")


def test_serial_and_ray_agree_and_a_killed_actor_is_replaced(store, ray_local, orders20):
    serial = SerialBackend(get_estimator("additive", device=_actor_device(store)).fit(store), chunk=4)
    expected = serial.score(orders20)
    assert expected.shape == (20, len(store.eval_names)) and expected.dtype == torch.float64
    with RayBackend(store.path, "additive", num_actors=2, chunk=4) as rb:
        assert not rb.started_ray  # reused the fixture's instance
        assert torch.equal(rb.score(orders20), expected)

        def kill_first_actor(done, total):  # mid-run: after the first of 5 chunks
            if done == 1:
                _kill(ray_local, rb.actors[0])

        assert torch.equal(rb.score(orders20, on_chunk=kill_first_actor), expected)
        assert rb.n_replaced == 1
        _kill(ray_local, rb.actors[1])  # dead before the next call is submitted to it
        assert torch.equal(rb.score(orders20), expected)
        assert rb.n_replaced == 2 and len(rb.actors) == 2
        assert torch.equal(rb.assignment_optimum("all"), serial.assignment_optimum("all"))
        for backend in (rb, serial):  # an unknown eval set: one clear error, not the estimator's ValueError
            with pytest.raises(ConfigError, match="unknown eval set 'nope'"):
                backend.assignment_optimum("nope")
        # the same search over either backend gives the same trials
        a = run_search(store, n_trials=16, batch_size=8, progress=False, backend=serial)
        b = run_search(store, n_trials=16, batch_size=8, progress=False, backend=rb)
        assert torch.equal(a.orders, b.orders) and torch.equal(a.estimates, b.estimates)
    assert ray_local.is_initialized()  # an instance the backend did not start stays up


def test_ray_fits_a_calibrated_estimator_once_and_its_actor_scores_like_serial(store, ray_local, orders20):
    kw = {"n_runs": 16}
    with RayBackend(store.path, "calibrated-interactions", estimator_kwargs=kw, num_actors=1, chunk=8) as rb:
        (cache,) = store.path.glob("calibration/interactions_*.json")  # written once, by the driver
        serial = get_estimator("calibrated-interactions", **kw, device=_actor_device(store)).fit(store)  # reads the same cache
        assert torch.equal(rb.score(orders20), serial.estimate(orders20).cpu())
        assert torch.equal(rb.assignment_optimum("all"), serial.assignment_optimum("all"))


def test_ray_backend_errors(store, ray_local):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match="cannot reach a Ray cluster"):
        RayBackend(store.path, "additive", address=f"127.0.0.1:{port}", connect_timeout=2)
    with pytest.raises(ConfigError, match="unknown estimator"):
        RayBackend(store.path, "nope")
    with pytest.raises(StoreError, match="readouts_checkpoint"):  # a missing term: refused before any actor starts
        RayBackend(store.path, "additive", estimator_kwargs={"readout": "checkpoint"}, num_actors=1)
    if not torch.cuda.is_available():  # an error inside an actor (here: a device its node lacks) reads as one line
        with pytest.raises(CurrsearchError, match=r"a Ray actor failed to start.*: .*CUDA.*device") as info:
            RayBackend(store.path, "additive", estimator_kwargs={"device": "cuda"}, num_actors=1)
        assert "Traceback" not in str(info.value)
    t0 = time.perf_counter()  # issue 16 item 20: 3 one-CPU actors on a 2-CPU cluster fail at once
    with pytest.raises(ConfigError, match=r"3 Ray actors need 3 CPUs and [\d.]+ GPUs, the cluster has 2"):
        RayBackend(store.path, "additive", num_actors=3)
    assert time.perf_counter() - t0 < 30


def test_gpu_request_follows_the_store_device(store, ray_local, tmp_path):
    # the default request: 0 off CUDA; on CUDA the cluster's GPUs shared evenly (a fraction Ray can pack)
    assert gpus_per_actor("cpu", 4, 8) == 0 and gpus_per_actor("mps", 2, 0) == 0
    assert gpus_per_actor("cuda", 2, 2) == 1 and gpus_per_actor("cuda:1", 1, 4) == 1
    assert gpus_per_actor("cuda", 4, 1) == 0.25 and gpus_per_actor("cuda", 3, 2) == 0.5 and gpus_per_actor("cuda", 5, 2) == 1 / 3
    with pytest.raises(ConfigError, match="train.device='cuda'.*no GPU"):
        gpus_per_actor("cuda", 2, 0)
    if ray_local.cluster_resources().get("GPU", 0):
        pytest.skip("the CPU-cluster checks below need a Ray cluster without GPUs")
    # a store recorded on CUDA (its manifest's train.device; the data files are unchanged): its actors
    # request GPUs, which a CPU-only cluster refuses at once, before any actor starts
    cuda_store = tmp_path / "cuda_store"
    shutil.copytree(store.path, cuda_store)
    m = json.loads((cuda_store / "manifest.json").read_text())
    m["config"]["train"]["device"] = "cuda"
    (cuda_store / "manifest.json").write_text(json.dumps(m))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="train.device='cuda'.*the Ray cluster has no GPU"):
        RayBackend(cuda_store, "additive", num_actors=2)
    with pytest.raises(ConfigError, match="2 Ray actors need 2 CPUs and 1 GPUs, the cluster has 2 and 0"):
        RayBackend(cuda_store, "additive", num_actors=2, num_gpus_per_actor=0.5)
    assert time.perf_counter() - t0 < 30
    assert ray_local.is_initialized()  # the caller's instance stays up after a refused start
