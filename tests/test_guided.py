"""guided-tpe (currsearch.guided): TPE with real training, guided by surrogates refitted to the
runs. Real tiny training (the session's T = 8 trainer: a plan of its own costs 4-7 s of
tokenization), real Optuna journals, the real pipeline and CLI."""

import dataclasses
import json
import math

import optuna
import pytest
import torch

from currsearch.baselines import real_search
from currsearch.cli import main
from currsearch.errors import ConfigError
from currsearch.guided import GuidedSettings, guided_search, propose
from currsearch.pipeline import PipelineSettings, run_pipeline

S = GuidedSettings(first_batch=16, refit_every=4, enqueue=2, starts=2, max_swaps=None, polish=0.0)  # descents to a local optimum; no polish (tests/test_polish.py)
N = 22  # refits after 16 and 20 runs


@pytest.fixture(scope="module")
def trainer(tiny_trainer):
    return tiny_trainer


@pytest.fixture(scope="module")
def run(trainer):
    # seed 1: its first refit proposes untrained orders (under seed 0 every candidate was a trained order)
    return guided_search(trainer, N, S, seed=1, progress=False)


class Killed(BaseException):
    """Stands in for a kill: no ``except Exception`` cleanup catches it."""


class InterruptedTrainer:
    """The real trainer, interrupted at its ``n``-th training (a spy, not a mock)."""

    def __init__(self, trainer, n):
        self.trainer, self.n, self.calls = trainer, n, 0

    def __getattr__(self, name):
        return getattr(self.trainer, name)

    def train(self, order, **kw):
        self.calls += 1
        if self.calls == self.n:
            raise Killed
        return self.trainer.train(order, **kw)


def _surrogate_runs(res, k):
    return [i for i, s in enumerate(res.sources) if s == f"surrogate:{k}"]


def test_budget_schedule_and_surrogate_orders_are_trained_for_real(run, trainer):
    assert run.n_runs == N and len(run.eval_losses) == N and run.refits == 2
    assert run.sources[:16] == ["tpe"] * 16  # the plain first batch
    first, second = _surrogate_runs(run, 0), _surrogate_runs(run, 1)
    assert 1 <= len(first) <= 2 and first == list(range(16, 16 + len(first)))  # enqueued first in their segment
    assert 1 <= len(second) <= 2 and second[0] == 20
    # the proposals are the surrogate's on the first 16 runs, untrained before
    orders, losses = run.runs.orders, run.runs.losses
    assert [orders[i] for i in first] == propose(trainer.plan, "all", orders[:16], losses[:16], set(map(tuple, orders[:16])), S)
    assert not {tuple(orders[i]) for i in first} & set(map(tuple, orders[:16]))
    # every run, the surrogate's included, is a real training: a fresh one gives the same losses
    for i in (first[0], second[0]):
        assert trainer.train(torch.tensor(orders[i])).eval_losses.tolist() == run.eval_losses[i]
    assert run.runs.losses == [x[-1] for x in run.eval_losses]  # the objective is `all`


def test_the_same_seed_reproduces_and_a_shorter_search_is_a_prefix(run, trainer):
    again = guided_search(trainer, 17, S, seed=1, progress=False)
    assert again.runs.orders == run.runs.orders[:17] and again.runs.losses == run.runs.losses[:17]
    assert again.sources == run.sources[:17] and again.refits == 1 and again.sources[16] == "surrogate:0"


def test_resumes_after_an_interruption_and_retrains_the_interrupted_surrogate_order(run, trainer, tmp_path):
    journal = str(tmp_path / "g.journal")
    with pytest.raises(Killed):  # interrupted at the first surrogate order (the 17th run)
        guided_search(InterruptedTrainer(trainer, 17), 18, S, seed=1, storage=journal, progress=False)
    res = guided_search(trainer, 18, S, seed=1, storage=journal, progress=False)
    # trials 0-15 TPE, 16 the interrupted surrogate order, 17 its queued sibling; the interrupted call queued
    # both again in their order (18, 19), and the resumed call trained those: its own sampler proposed none
    # of these 18 runs (resumed_at lists where a later call's fresh sampler took over)
    assert res.n_runs == 18 and res.resumed_at == [] and res.refits == 1
    # TPE seeded per trial and the interrupted surrogate order queued again in its place (before
    # its sibling): the resumed search trains the orders the uninterrupted one did, in its order
    assert res.runs.orders == run.runs.orders[:18] and res.runs.losses == run.runs.losses[:18]
    assert res.sources == run.sources[:18]
    study = optuna.load_study(study_name="guided-tpe-all-seed1", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(journal)))
    failed = {tuple(t.user_attrs["order"]) for t in study.trials if t.state == optuna.trial.TrialState.FAIL}
    assert failed == set(map(tuple, run.runs.orders[16:18]))  # the interrupted one and its sibling, queued again in order
    with pytest.raises(ConfigError, match="another setup"):  # a resume with other settings is refused
        guided_search(trainer, 18, S.model_copy(update={"enqueue": 1}), seed=1, storage=journal, progress=False)


def reversed_best(plan, objective, orders, losses, exclude, s):
    """A proposer of our own (an ablation's kind): the best real order, reversed."""
    return [orders[min(range(len(losses)), key=losses.__getitem__)][::-1]]


def test_another_proposer_is_trained_and_a_resume_with_the_default_one_is_refused(run, trainer, tmp_path):
    journal = str(tmp_path / "p.journal")
    res = guided_search(trainer, 17, S, seed=1, storage=journal, progress=False, proposer=reversed_best)
    assert res.runs.orders[:16] == run.runs.orders[:16] and res.sources[16] == "surrogate:0"
    assert res.runs.orders[16] == reversed_best(None, "all", run.runs.orders[:16], run.runs.losses[:16], set(), S)[0]
    with pytest.raises(ConfigError, match="proposer"):
        guided_search(trainer, 18, S, seed=1, storage=journal, progress=False)


@pytest.mark.parametrize("name", ["random-search", "optuna-real"])
def test_a_killed_real_search_resumes_into_the_uninterrupted_one(trainer, tmp_path, name):
    """A restarted RandomSampler replayed its first draws after a kill (resumed orders repeated
    early ones); seeded per trial, the resumed search equals the uninterrupted one, past TPE's
    10 random start-up trials too."""
    whole = real_search(trainer, name, 13, seed=5, progress=False)
    journal = str(tmp_path / f"{name}.journal")
    with pytest.raises(Killed):
        real_search(InterruptedTrainer(trainer, 12), name, 13, seed=5, storage=journal, progress=False)
    resumed = real_search(trainer, name, 13, seed=5, storage=journal, progress=False)
    assert resumed.orders == whole.orders and resumed.losses == whole.losses
    assert len(set(map(tuple, resumed.orders))) == 13


class DivergingTrainer(InterruptedTrainer):
    """The real trainer whose ``n``-th run diverges (its eval losses become NaN), as a too high learning rate would."""

    def train(self, order):
        self.calls += 1
        res = self.trainer.train(order)
        return dataclasses.replace(res, eval_losses=torch.full_like(res.eval_losses, math.nan)) if self.calls == self.n else res


def test_a_diverged_run_counts_and_a_resume_keeps_it(trainer, tmp_path):
    journal = str(tmp_path / "runs.journal")
    res = real_search(DivergingTrainer(trainer, 2), "random-search", 3, seed=0, storage=journal, progress=False)
    assert res.n_runs == 3 and res.losses[1] == math.inf and res.best_loss == min(res.losses[0], res.losses[2])
    assert real_search(trainer, "random-search", 3, seed=0, storage=journal, progress=False).losses == res.losses


def test_a_journal_of_another_config_is_refused(trainer, tiny_cfg, tmp_path):
    journal = str(tmp_path / "runs.journal")
    real_search(trainer, "random-search", 2, seed=0, storage=journal, progress=False)
    other = type(trainer).from_config(tiny_cfg.replace(optim={"lr": tiny_cfg.optim.lr * 2}))
    with pytest.raises(ConfigError, match="another config"):
        real_search(other, "random-search", 3, seed=0, storage=journal, progress=False)
    guided_search(trainer, 1, S, seed=0, storage=journal, progress=False)
    with pytest.raises(ConfigError, match="another config"):
        guided_search(other, 1, S, seed=0, storage=journal, progress=False)


def test_run_strategy_guided_tpe_spends_exactly_the_budget_with_ledger_and_baselines(tiny_cfg, tiny_set_args, tmp_path,
                                                                                      capsys):
    out = tmp_path / "g"
    args = ["run", "--quiet", "--out", str(out), "--strategy", "guided-tpe", "--budget", "18", "--refit-every", "2",
            "--enqueue", "2", "--top-k", "2", "--baselines", "optuna-real", "--polish", "0"]
    assert main(args + tiny_set_args) == 0
    assert "guided-tpe: 18 real runs, 1 refits" in capsys.readouterr().out
    report = json.loads((out / "report" / "report.json").read_text())
    led = {e["phase"]: e for e in report["ledger"]["entries"]}
    assert list(led) == ["guided_runs", "surrogate"] and led["surrogate"]["run_equivalents"] == 0
    assert report["ledger"]["real_runs"] == 18 and report["ledger"]["run_equivalents"] == 18
    study = optuna.load_study(study_name="guided-tpe-all-seed0", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "guided.journal"))))
    assert sum(t.state != optuna.trial.TrialState.WAITING for t in study.trials) == 18  # exactly the budget
    search = report["search"]
    assert search["strategy"] == "guided-tpe" and search["sources"][:16] == ["tpe"] * 16
    base = report["baselines"]["optuna-real"]
    assert base["orders"][:16] == [t.user_attrs["order"] for t in study.trials[:16]]  # same sampler and seed
    assert set(report["candidates"]) == {"search_1", "search_2"} and report["best"] == "search_1"
    assert report["candidates"]["search_1"]["verified"]["all"] == min(search["losses"])
    md = (out / "report" / "report.md").read_text()
    assert "## Guided TPE" in md and "## Equal compute" in md
    with pytest.raises(ConfigError, match="guided-tpe strategy spends exactly its --budget"):
        run_pipeline(tiny_cfg, PipelineSettings(out=tmp_path / "x", strategy="guided-tpe", budget=None), progress=False)
