"""Search driver and evaluation backends: real Optuna, real local Ray, a tiny recorded store."""

import json
import shutil
import socket
import time

import optuna
import pytest
import torch

from currsearch.backends import RayBackend, SerialBackend, gpus_per_actor
from currsearch.errors import ConfigError, StoreError
from currsearch.orders import random_order, validate_orders
from currsearch.record import record
from currsearch.search import ask_and_tell, run_search
from estimators import get_estimator


@pytest.fixture(scope="module")
def store(tiny_cfg, tmp_path_factory):
    s = record(tiny_cfg.replace(record={"projection_dim": 32}), tmp_path_factory.mktemp("search") / "s", progress=False)
    s.trainer()  # build (and cache) the plan once for every search below
    return s


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


def _is_permutation(order, T):
    return sorted(order.tolist()) == list(range(T))


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
        # the same search over either backend gives the same trials
        a = run_search(store, n_trials=16, batch_size=8, progress=False, backend=serial)
        b = run_search(store, n_trials=16, batch_size=8, progress=False, backend=rb)
        assert torch.equal(a.orders, b.orders) and torch.equal(a.estimates, b.estimates)
    assert ray_local.is_initialized()  # an instance the backend did not start stays up


def test_ray_fits_a_calibrated_estimator_once_and_its_actors_score_like_serial(store, ray_local, orders20):
    kw = {"n_runs": 16}
    with RayBackend(store.path, "calibrated-interactions", estimator_kwargs=kw, num_actors=2, chunk=8) as rb:
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
    with pytest.raises(StoreError, match="readouts_checkpoint"):
        RayBackend(store.path, "additive", estimator_kwargs={"readout": "checkpoint"}, num_actors=1)
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


def test_short_search_beats_the_reference(store):
    res = run_search(store, space="random_keys", sampler="tpe", n_trials=24, batch_size=8, progress=False)
    T = store.T
    assert res.n_trials == 24 and res.n_run == 24
    trials = res.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 24
    for t in trials:
        o = torch.tensor(t.user_attrs["order"])
        validate_orders(o, T)
        assert len(t.user_attrs["estimates"]) == len(store.eval_names)
    ref = [t for t in trials if t.user_attrs.get("source") == "reference"]
    assert len(ref) == 1 and ref[0].user_attrs["order"] == list(range(T))
    assert any(t.user_attrs.get("source") == "assignment:all" for t in trials)
    (best, est), *_ = res.top(3)
    assert _is_permutation(best, T) and est.shape == (len(store.eval_names),)
    # the additive estimator's assignment optimum is exact: the search's best is that order,
    # strictly better than the reference, and no sampled trial beats it
    additive = get_estimator("additive").fit(store)
    opt = additive.assignment_optimum("all")
    assert torch.equal(best, opt) and res.sources[0] == "assignment:all"
    assert float(res.best_value[0]) < ref[0].value
    assert float(res.best_value[0]) == min(t.value for t in trials)
    assert float(res.best_value[0]) == float(additive.estimate(opt)[store.eval_names.index("all")])
    # top-k: distinct orders sorted by the objective, estimates match a fresh scoring
    tops = res.top(5)
    assert len({tuple(o.tolist()) for o, _ in tops}) == 5
    vals = [float(e[store.eval_names.index("all")]) for _, e in tops]
    assert vals == sorted(vals)
    fresh = get_estimator("additive").fit(store).estimate(torch.stack([o for o, _ in tops]))
    torch.testing.assert_close(torch.stack([e for _, e in tops]), fresh, rtol=0, atol=1e-12)


def test_resume_from_a_journal_runs_only_the_missing_trials(store, tmp_path):
    journal = tmp_path / "study.journal"
    first = run_search(store, n_trials=12, batch_size=8, storage=str(journal), study_name="s", progress=False)
    assert first.n_run == 12 and first.n_trials == 12 and journal.is_file()
    second = run_search(store, n_trials=20, batch_size=8, storage=str(journal), study_name="s", progress=False)
    assert second.n_run == 8 and second.n_trials == 20
    trials = second.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 20
    assert sum(t.user_attrs.get("source") == "reference" for t in second.study.trials) == 1  # not re-enqueued
    again = run_search(store, n_trials=20, storage=str(journal), study_name="s", progress=False)
    assert again.n_run == 0 and again.n_trials == 20
    with pytest.raises(ConfigError, match="another setup"):
        run_search(store, n_trials=24, storage=str(journal), study_name="s", space="lehmer", progress=False)
    db = run_search(store, n_trials=8, storage=f"sqlite:///{tmp_path / 'study.db'}", progress=False)
    assert db.n_trials == 8


def test_multi_objective_nsga2_returns_a_pareto_set(store):
    res = run_search(
        store, sampler="nsga2", objectives=("bible", "python"), n_trials=24, batch_size=8,
        sampler_options={"population_size": 8}, progress=False,
    )
    assert len(res.study.directions) == 2 and res.n_trials == 24
    front = res.pareto_set()
    assert front and all(_is_permutation(o, store.T) for o, _ in front)
    assert bool(res.pareto[: len(front)].all())  # Pareto members come first
    cols = [store.eval_names.index("bible"), store.eval_names.index("python")]
    all_vals = res.estimates[:, cols]
    for _, e in front:  # nobody dominates a Pareto member
        v = e[cols]
        assert not ((all_vals <= v).all(1) & (all_vals < v).any(1)).any()
    assert {tuple(o.tolist()) for o, _ in front} == {tuple(t.user_attrs["order"]) for t in res.study.best_trials}


def test_clear_errors(store):
    with pytest.raises(ConfigError, match="unknown sampler 'annealing'.*tpe, cmaes, gp, nsga2, random"):
        run_search(store, sampler="annealing", progress=False)
    with pytest.raises(ConfigError, match="unknown search space 'spiral'"):
        run_search(store, space="spiral", progress=False)
    with pytest.raises(ConfigError, match=r"unknown objective eval set\(s\) \['klingon'\]"):
        run_search(store, objectives=("all", "klingon"), progress=False)
    with pytest.raises(ConfigError, match="single-objective"):
        run_search(store, sampler="cmaes", objectives=("bible", "python"), progress=False)
    with pytest.raises(ConfigError, match="unknown estimator"):
        run_search(store, estimator_name="nope", progress=False)
    with pytest.raises(StoreError, match="readouts_checkpoint"):
        run_search(store, estimator_kwargs={"readout": "checkpoint"}, progress=False)


def test_ask_and_tell_tells_every_trial_and_fails_the_rest_of_a_batch_that_raises():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    calls = []

    def score(trials):
        calls.append(len(trials))
        if len(calls) == 6:  # the third batch of the second call below
            raise RuntimeError("scorer died")
        xs = [t.suggest_float("x", -1.0, 1.0) for t in trials]
        return [(optuna.trial.TrialState.PRUNED, {"reason": "x < 0"}) if x < 0 else (x * x, {"x2": x * x}) for x in xs]

    assert ask_and_tell(study, 5, 2, score) == 5 and calls == [2, 2, 1]  # one score call per batch
    done = study.get_trials(deepcopy=False)
    assert [t.state.name for t in done] == ["PRUNED" if t.params["x"] < 0 else "COMPLETE" for t in done]
    assert all(t.value == t.user_attrs["x2"] for t in done if t.state.name == "COMPLETE")
    with pytest.raises(RuntimeError, match="scorer died"):
        ask_and_tell(study, 6, 2, score)
    states = [t.state.name for t in study.get_trials(deepcopy=False)[5:]]
    assert states[4:] == ["FAIL", "FAIL"] and "RUNNING" not in states  # the third batch: failed, not left running
    with pytest.raises(ValueError, match="returned 1 results for 2 trials"):
        ask_and_tell(study, 2, 2, lambda trials: [(0.0, {})])
    assert [t.state.name for t in study.get_trials(deepcopy=False)[-2:]] == ["FAIL", "FAIL"]


def test_search_settings_validate_with_clear_errors_and_the_old_keywords_still_work(store):
    from currsearch.search import SearchSettings

    s = SearchSettings()
    assert (s.estimator, s.space, s.sampler, s.trials, s.batch, s.objectives, s.seed, s.storage) == (
        "additive", "random_keys", "tpe", 128, 32, ("all",), 0, None)
    for bad, msg in [({"trials": -1}, "trials"), ({"batch": 0}, "batch"), ({"objectives": []}, "is empty"),
                     ({"objectives": ["all", "all"]}, "repeat"), ({"sampler": "annealing"}, "unknown sampler"),
                     ({"nope": 1}, "nope")]:
        with pytest.raises(ConfigError, match=msg):
            SearchSettings(**bad)
    a = run_search(store, SearchSettings(trials=8, batch=4), progress=False)
    b = run_search(store, n_trials=8, batch_size=4, estimator_name="additive", progress=False)
    assert torch.equal(a.orders, b.orders) and a.n_run == 8
