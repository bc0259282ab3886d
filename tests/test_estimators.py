"""Estimators: reference reproduction, T = 2 direct computations, shapes, missing terms."""

import itertools
import json

import numpy as np
import pytest
import torch

from currsearch.adam import AdamState, adam_direction, clip_grad
from currsearch.errors import ConfigError, CurrsearchError, StoreError
from currsearch.orders import random_order
from currsearch.record import eval_gradients, record
from currsearch.train import Trainer
from estimators import available, get_estimator
from estimators.calibrated import CalibratedInteractions, CalibratedPositions, fit_ridge, interaction_features, load_or_fit_runs

TRAJECTORY_ESTIMATORS = ["additive", "fut1", "fut2", "fut1-hvp"]


@pytest.fixture(scope="module")
def store8(tiny_cfg, tmp_path_factory):
    return record(tiny_cfg.replace(record={"projection_dim": 64}), tmp_path_factory.mktemp("s8") / "s", progress=False)


@pytest.fixture(scope="module")
def store2(tiny_cfg, tmp_path_factory):
    cfg = tiny_cfg.replace(data={"num_batches": 2}, optim={"weight_decay": 0.1}, record={"projection_dim": 32})
    return record(cfg, tmp_path_factory.mktemp("s2") / "s", progress=False)


def test_registry():
    assert set(available()) >= {"reference", "additive", "fut1", "fut2", "fut1-hvp"}
    with pytest.raises(ConfigError, match="unknown estimator"):
        get_estimator("nope")


@pytest.mark.parametrize("name", ["reference"] + TRAJECTORY_ESTIMATORS)
def test_reference_order_reproduces_reference_losses_and_shapes(name, store8):
    est = get_estimator(name).fit(store8)
    T, E = store8.T, len(store8.eval_names)
    ref = store8.final()["eval_loss"]
    torch.testing.assert_close(est.estimate(torch.arange(T)), ref, rtol=0, atol=1e-5)
    orders = torch.stack([torch.arange(T), random_order(T, 1), random_order(T, 2)])
    out = est.estimate(orders)
    assert out.shape == (3, E) and out.dtype == torch.float64 and out.device.type == "cpu"
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], ref, rtol=0, atol=1e-5)


def _direct_reversed_order(store):
    """gamma_2 for the order (1, 0) by hand: exact first step, first-order second step."""
    tr = store.trainer()
    fm, oc = tr.model, tr.cfg.optim
    c0, c1 = store.checkpoint(0, device=tr.device), store.checkpoint(1, device=tr.device)
    st = AdamState(c0["adam_m"], c0["adam_v"], int(c0["adam_step"]))
    _, g = fm.grad(c0["theta"], tr.batch(1))
    step, st = adam_direction(clip_grad(g, oc.grad_clip), st, c0["theta"], fm.decay_mask, oc)
    gamma1 = c0["theta"] - tr.lr(0) * step
    delta = gamma1 - c1["theta"]
    th = c1["theta"].clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(fm.loss(th, tr.batch(0)), th, create_graph=True)
    (hv,) = torch.autograd.grad(g1 @ delta, th)
    scale = torch.clamp(oc.grad_clip / (g1.detach().norm() + 1e-6), max=1.0)
    step, _ = adam_direction(scale * (g1.detach() + hv), st, gamma1, fm.decay_mask, oc)
    return gamma1 - tr.lr(1) * step


def test_fut1_hvp_equals_direct_computation_at_T2(store2):
    est = get_estimator("fut1-hvp").fit(store2)
    gamma2 = est.final_parameters(torch.tensor([[1, 0]]))[0]
    # float noise between jvp and double backward, amplified by Adam where v is tiny: ~1e-6 on a few coordinates
    torch.testing.assert_close(gamma2, _direct_reversed_order(store2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(est.estimate(torch.tensor([1, 0])), store2.trainer().evaluate(gamma2), rtol=1e-5, atol=1e-6)


def test_additive_equals_direct_computation_at_T2(store2):
    tr = store2.trainer()
    fm, oc = tr.model, tr.cfg.optim
    eg = eval_gradients(tr, store2.final(device=tr.device)["theta"]).double()
    change = torch.zeros(len(store2.eval_names), dtype=torch.float64, device=tr.device)
    for t, (new, old) in enumerate([(1, 0), (0, 1)]):
        c = store2.checkpoint(t, device=tr.device)
        st = AdamState(c["adam_m"], c["adam_v"], int(c["adam_step"]))
        gam = {}
        for l in (new, old):
            _, g = fm.grad(c["theta"], tr.batch(l))
            gam[l], _ = adam_direction(clip_grad(g, oc.grad_clip), st, c["theta"], fm.decay_mask, oc)
        change -= tr.lr(t) * (eg @ (gam[new] - gam[old]).double())
    direct = store2.final()["eval_loss"] + change.cpu()
    torch.testing.assert_close(get_estimator("additive").fit(store2).estimate(torch.tensor([1, 0])), direct, rtol=0, atol=1e-6)


def test_additive_assignment_optimum_is_the_exact_minimum(tiny_cfg, tmp_path):
    s = record(tiny_cfg.replace(data={"num_batches": 5}, record={"terms": ["readouts"]}), tmp_path / "s", progress=False)
    est = get_estimator("additive").fit(s)
    perms = torch.tensor(list(itertools.permutations(range(5))))
    best = perms[est.estimate(perms)[:, -1].argmin()]
    opt = est.assignment_optimum("all")
    assert torch.isclose(est.estimate(opt)[-1], est.estimate(best)[-1], rtol=0, atol=1e-12)


def test_missing_term_names_term_and_record_option(tiny_cfg, tmp_path):
    s = record(tiny_cfg.replace(record={"terms": ["batch_losses"], "anchor_stride": 4}), tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match=r"needs the recorded term\(s\) \['readouts'\].*record.terms"):
        get_estimator("additive").fit(s)
    with pytest.raises(StoreError, match="updates"):
        get_estimator("fut1").fit(s)
    with pytest.raises(StoreError, match="readouts_checkpoint"):
        get_estimator("additive", readout="checkpoint").fit(s)


def _cached(runs: dict) -> dict:
    """The parts of an estimator's ``runs`` that do not depend on which call trained them."""
    return {k: runs[k] for k in ("orders", "kinds", "losses") if k in runs}


def _swap(order: torch.Tensor, s: int, t: int) -> torch.Tensor:
    out = order.clone()
    out[s], out[t] = order[t], order[s]
    return out


def test_calibrated_fits_real_runs_caches_them_and_its_assignment_optimum_is_exact(tiny_trainer, tmp_path, tiny_cfg):
    store = record(tiny_cfg.replace(record={"terms": ()}), tmp_path / "s", progress=False, trainer=tiny_trainer)
    est = get_estimator("calibrated", n_runs=12).fit(store)
    assert len(est.runs["orders"]) == 12 and list(store.path.glob("calibration/runs_*.json"))
    # the fitted model reproduces its training runs roughly: on the runs it was fitted to it beats
    # their mean loss (in-sample R^2 > 0 for every eval set; ridge with an intercept guarantees
    # R^2 >= 0 for its own predictions, so a negative value means estimate() does not apply
    # the fitted coefficients to the right positions/batches)
    o = torch.tensor(est.runs["orders"])
    fitted, truth = est.estimate(o), torch.tensor(est.runs["losses"], dtype=torch.float64)
    assert fitted.shape == (12, len(store.eval_names))
    sse, sst = ((fitted - truth) ** 2).sum(0), ((truth - truth.mean(0)) ** 2).sum(0)
    assert (sse < sst).all(), f"in-sample R^2 {(1 - sse / sst).tolist()} not > 0"
    # ... and is exactly additive over positions: swapping the batches at steps s and t changes
    # the estimate by the same amount in any two orders that hold the same batches there
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        a = torch.randperm(store.T, generator=g)
        s, t = sorted(torch.randperm(store.T, generator=g)[:2].tolist())
        rest = [i for i in range(store.T) if i not in (s, t)]
        b = a.clone()
        b[rest] = a[rest][torch.randperm(len(rest), generator=g)]
        four = est.estimate(torch.stack([a, _swap(a, s, t), b, _swap(b, s, t)]))
        torch.testing.assert_close(four[0] - four[1], four[2] - four[3], rtol=0, atol=1e-12)
    again = get_estimator("calibrated", n_runs=12).fit(store)  # served from the cache: same model
    assert torch.equal(again.cost, est.cost) and _cached(again.runs) == _cached(est.runs)
    perms = torch.tensor(list(itertools.permutations(range(store.T))))
    all_est = est.estimate(perms)[:, store.eval_names.index("all")]
    best = est.assignment_optimum("all")
    assert torch.isclose(est.estimate(best)[-1], all_est.min())
    with pytest.raises(ConfigError, match="n_runs >= 8"):
        get_estimator("calibrated", n_runs=2)


def test_calibrated_interactions_fits_three_families_caches_them_and_finds_a_swap_local_optimum(tiny_trainer, tmp_path, tiny_cfg, monkeypatch):

    store = record(tiny_cfg.replace(record={"terms": ()}), tmp_path / "s", progress=False, trainer=tiny_trainer)
    est = get_estimator("calibrated-interactions", n_runs=16).fit(store)
    kinds = est.runs["kinds"]
    assert len(kinds) == 16 and {k.split("-")[0] for k in kinds} == {"random", "near", "clumped"}
    assert est.group_kind == "domain" and est.groups.shape == (store.T,)
    o = torch.tensor(est.runs["orders"])
    assert sorted(o[0].tolist()) == list(range(store.T))
    assert est.estimate(o).shape == (16, len(store.eval_names)) and est.estimate(o).dtype == torch.float64
    again = get_estimator("calibrated-interactions", n_runs=16).fit(store)  # from the cache
    assert torch.equal(again.W, est.W) and _cached(again.runs) == _cached(est.runs)
    # each run's training seconds are cached: a fit that reads runs back reports the time they took
    secs = est.runs["seconds"]
    assert all(t > 0 for t in secs) and est.runs["read_back"] == [False] * 16 and est.fit_runs_read_back() == (0.0, 0)
    assert again.runs["read_back"] == [True] * 16 and again.fit_runs_read_back() == (pytest.approx(sum(secs)), 0)
    # an interrupted fit (5 of 16 runs saved, no coefficients) resumes and gives the same model
    (cache,) = store.path.glob("calibration/interactions_*.json")
    partial = json.loads(cache.read_text())
    partial["losses"], partial["seconds"] = partial["losses"][:5], partial["seconds"][:5]
    del partial["fit"]
    store.write_listed_bytes(cache.relative_to(store.path).as_posix(), json.dumps(partial).encode())  # as the fit's saves
    resumed = get_estimator("calibrated-interactions", n_runs=16).fit(store)
    assert _cached(resumed.runs) == _cached(est.runs) and torch.allclose(resumed.W, est.W)
    assert resumed.runs["read_back"] == [True] * 5 + [False] * 11 and resumed.runs["seconds"][:5] == secs[:5]
    assert len(resumed.runs["seconds"]) == 16
    assert resumed.fit_runs_read_back() == (pytest.approx(sum(secs[:5])), 0)
    secs = resumed.runs["seconds"]
    # a setting of the fit only (the clumped runs' weight) refits from the cached runs, no retraining
    def no_training(*args, **kwargs):
        raise AssertionError("refitting must not retrain")

    monkeypatch.setattr(Trainer, "train", no_training)
    reweighted = get_estimator("calibrated-interactions", n_runs=16, clumped_weight=1.0).fit(store)
    assert _cached(reweighted.runs) == _cached(est.runs) and not torch.equal(reweighted.W, est.W)
    # another fit on this store whose orders were trained for this one reuses their runs, no retraining
    some = [est.runs["orders"][i] for i in (7, 2, 11)]
    other = load_or_fit_runs(store, "other", ["x"], lambda: (torch.tensor(some), ["random"] * 3), lambda runs: {})
    assert other["losses"] == [est.runs["losses"][i] for i in (7, 2, 11)]
    assert other["seconds"] == [secs[i] for i in (7, 2, 11)] and other["read_back"] == [True] * 3
    # a cache written before run times were kept: its runs are read back untimed
    legacy = json.loads(cache.read_text())
    del legacy["seconds"]
    store.write_listed_bytes(cache.relative_to(store.path).as_posix(), json.dumps(legacy).encode())
    old = get_estimator("calibrated-interactions", n_runs=16).fit(store)
    assert old.runs["seconds"] == [None] * 16 and old.fit_runs_read_back() == (0.0, 16)
    monkeypatch.undo()
    # features: a fully blocked order has T - G adjacent same-group steps; in any order the counts
    # a_l of same-group batches after batch l sum to sum_d k_d (k_d - 1) / 2 (k_d: group sizes)
    G, T = est.n_groups, store.T
    blocked = torch.argsort(est.groups, stable=True)[None]
    f = interaction_features(torch.cat([blocked, o[:3]]), est.groups, G)
    assert f[0, -(2 * G + 3 * T):-(G + 3 * T)].sum() == T - G
    k = torch.bincount(est.groups.cpu()).double()
    assert torch.equal(f[:, -3 * T:-2 * T].sum(1), torch.full((4,), float((k * (k - 1) / 2).sum()), dtype=torch.float64))
    best = est.assignment_optimum("all")
    assert sorted(best.tolist()) == list(range(store.T))
    e = store.eval_names.index("all")
    iu = torch.triu_indices(store.T, store.T, 1)
    swaps = best.expand(iu.shape[1], -1).clone()
    r = torch.arange(iu.shape[1])
    swaps[r, iu[0]], swaps[r, iu[1]] = best[iu[1]], best[iu[0]]
    assert est.estimate(swaps)[:, e].min() >= est.estimate(best)[e] - 1e-12
    # the same model fitted to given runs (no store, no runs of its own): the same coefficients
    given = CalibratedInteractions.from_runs(store, store.eval_names, o, est.runs["losses"], kinds=kinds)
    assert torch.equal(given.W, est.W) and torch.equal(given.b, est.b)
    assert torch.equal(given.swap_descent(best, "all"), best)  # a swap-local optimum stays put
    with pytest.raises(ConfigError, match="losses must be"):
        CalibratedInteractions.from_runs(store, ["all"], o, est.runs["losses"])
    with pytest.raises(ConfigError, match="n_runs >= 16"):
        get_estimator("calibrated-interactions", n_runs=8)


def test_position_only_model_fits_runs_and_its_assignment_optimum_is_exact(tiny_trainer):
    g = torch.Generator().manual_seed(0)
    orders = torch.stack([torch.randperm(tiny_trainer.T, generator=g) for _ in range(24)])
    pos = torch.argsort(orders, 1).double() / (tiny_trainer.T - 1)  # [n, T]: position of batch l
    w = torch.linspace(-1, 1, tiny_trainer.T, dtype=torch.float64)
    est = CalibratedPositions.from_runs(tiny_trainer.plan, ["all"], orders, (pos @ w)[:, None])
    assert est.W.shape == (tiny_trainer.T, 1)
    every = torch.tensor(list(itertools.permutations(range(tiny_trainer.T))))
    best = est.estimate(est.assignment_optimum("all")[None])[0, 0]
    assert torch.isclose(best, est.estimate(every)[:, 0].min())
    # a loss linear in the positions is recovered: the batch of the largest w goes first, of the smallest last
    assert est.assignment_optimum("all")[-1].item() == 0 and est.assignment_optimum("all")[0].item() == tiny_trainer.T - 1


def test_a_ridge_fit_leaves_out_diverged_runs():
    """A fit run whose training diverged (NaN or inf loss) would make every coefficient NaN: it is left out."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(24, 4))
    y = X @ np.array([1.0, -2.0, 0.5, 0.0]) + 5.0 + 0.01 * rng.normal(size=24)
    bad = y.copy()
    bad[[3, 10]] = [np.nan, np.inf]
    keep = np.isfinite(bad)
    w, b = fit_ridge(X, bad)
    w_ref, b_ref = fit_ridge(X[keep], y[keep])
    assert np.isfinite(w).all() and np.allclose(w, w_ref) and b == pytest.approx(b_ref)
    with pytest.raises(CurrsearchError, match="optim.lr"):
        fit_ridge(X, np.full(24, np.nan))
