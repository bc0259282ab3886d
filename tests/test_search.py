"""Search driver: real Optuna studies on a tiny recorded store (the Ray backend: test_backends_ray.py)."""

import optuna
import pytest
import torch

from currsearch.errors import ConfigError, StoreError
from currsearch.orders import validate_orders
from currsearch.search import ask_and_tell, run_search
from estimators import get_estimator


@pytest.fixture(scope="module")
def store(search_store):
    return search_store


def _is_permutation(order, T):
    return sorted(order.tolist()) == list(range(T))


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
    with pytest.raises(ConfigError, match="seed"):  # another seed would read the old seed's trials back as its own
        run_search(store, n_trials=24, storage=str(journal), study_name="s", seed=1, progress=False)
    db = run_search(store, n_trials=8, storage=f"sqlite:///{tmp_path / 'study.db'}", progress=False)
    assert db.n_trials == 8
    # max_seconds: the first batch is asked in full, no later one when the time is spent
    timed = run_search(store, n_trials=20, batch_size=4, storage=str(journal), study_name="t", max_seconds=1e-9, progress=False)
    assert timed.n_run == 4 and timed.n_trials == 4


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
                     ({"nope": 1}, "nope"), ({"max_seconds": 0}, "max_seconds")]:
        with pytest.raises(ConfigError, match=msg):
            SearchSettings(**bad)
    a = run_search(store, SearchSettings(trials=8, batch=4), progress=False)
    b = run_search(store, n_trials=8, batch_size=4, estimator_name="additive", progress=False)
    assert torch.equal(a.orders, b.orders) and a.n_run == 8
