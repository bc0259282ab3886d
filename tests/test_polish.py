"""Suffix polish (currsearch.polish) and resuming training from a prefix state (Trainer.train(start=)):
real tiny training (T = 8), real Optuna journals, the real pipeline."""

import math

import pytest
import torch

from currsearch.errors import ConfigError, OrderError
from currsearch.guided import GuidedSettings, guided_search
from currsearch.pipeline import PipelineSettings, run_pipeline
from currsearch.polish import PolishSettings, eval_fraction, move, suffix_polish
from currsearch.reports.run import render_polish
from test_guided import InterruptedTrainer, Killed

G = GuidedSettings(first_batch=16, refit_every=4, enqueue=2, starts=2, max_swaps=None, polish=0.5)


@pytest.fixture(scope="module")
def trainer(tiny_trainer):
    return tiny_trainer


def test_resuming_from_a_prefix_state_is_bit_identical_and_a_foreign_prefix_is_refused(trainer):
    order = torch.randperm(trainer.T, generator=torch.Generator().manual_seed(3))
    whole = trainer.train(order, keep=[0, 4, 6, trainer.T])  # steps outside (0, T) are not kept
    assert sorted(whole.states) == [4, 6] and whole.states[4].prefix == tuple(order[:4].tolist())
    other = order.clone()
    other[[5, 7]] = other[[7, 5]]
    resumed, fresh = trainer.train(other, start=whole.states[4]), trainer.train(other)
    assert torch.equal(resumed.theta, fresh.theta) and torch.equal(resumed.eval_losses, fresh.eval_losses)
    assert resumed.start_step == 4 and torch.isnan(resumed.train_losses[:4]).all()
    assert torch.equal(resumed.train_losses[4:], fresh.train_losses[4:])
    swapped_early = order.clone()
    swapped_early[[1, 7]] = swapped_early[[7, 1]]
    with pytest.raises(OrderError, match="first 4 batches differ"):
        trainer.train(swapped_early, start=whole.states[4])


def test_guided_search_polishes_within_its_budget_with_real_runs(trainer, tmp_path):
    journal = str(tmp_path / "g.journal")
    plain = guided_search(trainer, 12, G.model_copy(update={"polish": 0.0}), seed=1, storage=journal, progress=False)
    res = guided_search(trainer, 24, G, seed=1, storage=journal, progress=False)  # reuses the plain search's full runs
    assert res.n_runs == 12 and res.runs.orders == plain.runs.orders and res.resumed_at == []
    p, T = res.polish, trainer.T
    assert p.start_loss == plain.best_loss and p.state_runs == 1 and len(p.losses) >= 4
    assert res.run_equivalents <= 24 + 1e-9 and res.run_equivalents == pytest.approx(12 + p.run_equivalents)
    assert all(c == pytest.approx((T - s) / T + p.eval_fraction) for s, c in zip(p.departures, p.costs))
    assert p.eval_fraction > 0 and round(p.eval_fraction / 0.05, 6) % 1 == 0  # measured, rounded up to 0.05
    assert set(p.departures) <= set(PolishSettings().anchors(T)) == {2, 4, 6}
    # each move departs from its incumbent at or after its anchor; every one is a real training
    inc = list(p.start_order)
    best = p.start_loss
    for order, loss, s in zip(p.orders, p.losses, p.departures):
        assert order[:s] == inc[:s] and order != inc
        if loss < best:
            inc, best = order, loss
    assert best == p.best_loss == res.best_loss == min(res.runs.losses + p.losses)
    k = p.losses.index(p.best_loss) if p.best_loss < p.start_loss else 0
    assert trainer.train(torch.tensor(p.orders[k])).eval_losses.tolist() == p.eval_losses[k]
    assert res.best_source == ("polish" if p.best_loss < p.start_loss else res.sources[res.runs.orders.index(res.best_order)])
    cands = res.verification(trainer, 3).candidates
    assert cands["search_1"].verified["all"] == res.best_loss and len(cands) == 3


def test_a_killed_polish_resumes_into_the_uninterrupted_one(trainer, tmp_path):
    start = torch.randperm(trainer.T, generator=torch.Generator().manual_seed(4)).tolist()
    loss = float(trainer.train(torch.tensor(start)).eval_losses[-1])
    whole = suffix_polish(trainer, start, loss, 6.0, seed=2, progress=False)
    journal = str(tmp_path / "p.journal")
    with pytest.raises(Killed):  # the incumbent's run, then 2 moves, then killed in the 3rd
        suffix_polish(InterruptedTrainer(trainer, 4), start, loss, 6.0, seed=2, storage=journal, progress=False)
    res = suffix_polish(trainer, start, loss, 6.0, seed=2, storage=journal, progress=False)
    n = min(len(res.losses), len(whole.losses))  # how many moves fit depends on the measured evaluation time
    assert n >= 3 and res.state_runs == 2 and res.orders[:n] == whole.orders[:n] and res.losses[:n] == whole.losses[:n]
    assert res.run_equivalents == pytest.approx(sum(res.costs) + 2 * (1 + res.eval_fraction))
    assert res.run_equivalents <= 6.0 + 1e-9
    with pytest.raises(ConfigError, match="another setup"):
        suffix_polish(trainer, start, loss, 6.0, seed=3, storage=journal, progress=False)
    with pytest.raises(ConfigError, match="budget"):  # another budget would read back moves it cannot pay for
        suffix_polish(trainer, start, loss, 3.0, seed=2, storage=journal, progress=False)
    # a budget too small for the incumbent's run and one move trains nothing
    none = suffix_polish(trainer, start, loss, 1.2, seed=2, progress=False)
    assert none.state_runs == 0 and none.losses == [] and none.best_loss == loss and none.run_equivalents == 0
    assert "Suffix polish: none" in render_polish(none)


def test_moves_are_deterministic_and_widen_once_the_neighbourhood_is_tried():
    order = list(range(8))
    assert move(order, [4, 6], 0, 5, set()) == move(order, [4, 6], 0, 5, set())
    singles = set()
    for i in range(4, 8):
        for j in range(i + 1, 8):
            o = list(order)
            o[i], o[j] = o[j], o[i]
            singles.add(tuple(o))
    s, cand = move(order, [4, 6], 0, 0, singles | {tuple(order)})
    assert cand[:s] == order[:s] and tuple(cand) not in singles and sorted(cand) == order
    # T = 3: one anchor (step 1) and one transposition; once it is tried no move is left
    assert move([0, 1, 2], [1], 0, 0, {(0, 1, 2)}) == (1, [0, 2, 1])
    assert move([0, 1, 2], [1], 0, 1, {(0, 1, 2), (0, 2, 1)}) is None
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        PolishSettings(starts=(0.5, 1.0))
    with pytest.raises(ValueError):
        GuidedSettings(polish=1.0)
    with pytest.raises(ConfigError, match="polish"):  # a copy's update is validated too (pydantic's own skips it)
        GuidedSettings().model_copy(update={"polish": 1.0})
    # and derived values are derived again: without a budget the job refines (2 rounds), under one it does not
    assert PipelineSettings(budget=None).refine.rounds == 2
    assert PipelineSettings(budget=None).model_copy(update={"budget": 64}).refine.rounds == 0 == PipelineSettings().refine.rounds
    assert GuidedSettings(polish=0.25).full_runs(64) == 48 and GuidedSettings(polish=0.5).full_runs(1) == 1
    assert GuidedSettings().full_runs(64) == 40  # the default polish: 0.375
    assert GuidedSettings().full_runs(5) == 5 and GuidedSettings().full_runs(6) == 4  # a share under 2 goes to full runs
    assert eval_fraction(0.08, 1.0) == pytest.approx(0.10) and eval_fraction(0.1, 1.0) == pytest.approx(0.10)


def test_the_guided_job_counts_its_polish_in_the_ledger(tiny_cfg, tmp_path):
    s = PipelineSettings(out=tmp_path / "g", strategy="guided-tpe", budget=20, guided=G.model_copy(update={"polish": 0.3}),
                         baselines=())
    res = run_pipeline(tiny_cfg, s, progress=False)
    led = {e.phase: e for e in res.ledger.entries}
    assert list(led) == ["guided_runs", "surrogate", "polish"] and led["guided_runs"].run_equivalents == 14
    assert led["polish"].run_equivalents == pytest.approx(res.guided.polish.run_equivalents)
    assert res.guided.polish.run_equivalents <= 6 + 1e-9
    assert res.ledger.run_equivalents <= 20 + 1e-9 and math.isfinite(res.guided.best_loss)
    again = run_pipeline(tiny_cfg, s, progress=False)  # a finished job resumes without training more moves
    assert again.guided.polish.losses == res.guided.polish.losses
