"""Fidelity harness: Kendall distance, held-out orders, metrics, evaluation core and report."""

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch

from currsearch.errors import ConfigError
from currsearch.fidelity import (
    DISTANCE_BINS,
    check_disjoint,
    distance_bin,
    evaluate_estimators,
    fidelity_metrics,
    heldout_orders,
    kendall_distance,
    normalized_kendall_distance,
    retrain_orders,
    run_fidelity_settings,
)
from currsearch.reports.fidelity import write_report
from estimators.base import Estimator


@pytest.fixture
def own_trainer(tiny_cfg):
    """A private tiny Trainer (data shared via the process cache) run on one thread: tiny models
    gain nothing from intra-op threads, which cost 10x on a busy 2-core machine. Private, so the
    shared ``tiny_trainer``'s cached warm-up phase is never computed under another thread count
    (that changes bits and would break other tests' bit-identity checks)."""
    from currsearch.train import Trainer

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Trainer.from_config(tiny_cfg)
    torch.set_num_threads(n)


def _brute(a, b):
    pa = {int(x): i for i, x in enumerate(a)}
    pb = {int(x): i for i, x in enumerate(b)}
    return sum((pa[x] - pa[y]) * (pb[x] - pb[y]) < 0 for x, y in itertools.combinations(pa, 2))


def test_kendall_distance_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 7, 40):
        for _ in range(5):
            a, b = torch.randperm(T, generator=g), torch.randperm(T, generator=g)
            assert kendall_distance(a, b) == _brute(a, b)
        r = torch.arange(T)
        assert kendall_distance(r, r) == 0
        assert kendall_distance(r, r.flip(0)) == T * (T - 1) // 2
    assert normalized_kendall_distance(torch.arange(9), torch.arange(9).flip(0)) == 1.0
    with pytest.raises(ValueError):
        kendall_distance(torch.arange(3), torch.arange(4))


def _tiny_orders(trainer, **kw):
    p = trainer.plan
    diff = torch.tensor([m["unigram_nll"] for m in p.metadata])
    return heldout_orders(trainer.T, p.domains, diff, **kw)


def test_heldout_orders(tiny_trainer):
    T, domains = tiny_trainer.T, tiny_trainer.plan.domains
    orders = _tiny_orders(tiny_trainer, n_random=10, n_near=4)
    names = [h.name for h in orders]
    assert len(names) == len(set(names))
    assert len({tuple(h.order.tolist()) for h in orders}) == len(orders)
    ref = torch.arange(T)
    for h in orders:
        assert sorted(h.order.tolist()) == list(range(T)) and h.order.dtype == torch.int64
        assert h.distance == _brute(h.order, ref)
    kinds = {h.kind for h in orders}
    assert {"reference", "random", "domain-block", "easy-to-hard", "hard-to-easy"} <= kinds
    assert any(k.startswith("near-") for k in kinds)
    assert orders[0].kind == "reference" and orders[0].distance == 0
    for h in orders:
        if h.kind.startswith("near-"):
            k = int(h.kind.split("-")[1])
            assert 0 < h.distance and int((h.order != ref).sum()) <= 2 * k
        if h.kind == "domain-block":
            seq = [domains[i] for i in h.order.tolist()]
            runs = [d for d, _ in itertools.groupby(seq)]
            assert len(runs) == len(set(domains))  # each domain one contiguous block
            assert h.name == "block-" + "-".join(runs)
            for d in runs:  # reference order inside a block
                idx = [i for i in h.order.tolist() if domains[i] == d]
                assert idx == sorted(idx)
    D = len(set(domains))
    assert sum(h.kind == "domain-block" for h in orders) == math.factorial(D)
    assert [h.name for h in _tiny_orders(tiny_trainer, n_random=10, n_near=4)] == names  # deterministic
    with pytest.raises(ConfigError):
        _tiny_orders(tiny_trainer, n_random=-1)
    mixed = heldout_orders(T, ["mixed"] * T, torch.zeros(T), n_random=2, n_near=1)
    assert not any(h.kind == "domain-block" for h in mixed)


def test_fidelity_metrics_known_values():
    true = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0, 6.0])
    m = fidelity_metrics(true + 0.5, true)
    assert m["spearman"] == pytest.approx(1.0) and m["kendall"] == pytest.approx(1.0)
    assert m["top1"] == 1.0 and m["top5"] == 1.0 and m["n"] == 6
    assert m["absdiff"] == pytest.approx(0.5) and m["spread"] == pytest.approx(5.0)
    assert m["err_frac_of_spread"] == pytest.approx(0.1)
    assert m["rel_err"] == pytest.approx((0.5 / true).mean().item())
    r = fidelity_metrics(-true, true)
    assert r["spearman"] == pytest.approx(-1.0) and r["kendall"] == pytest.approx(-1.0) and r["top1"] == 0.0
    assert math.isnan(fidelity_metrics(true[:2], true[:2])["spearman"])
    assert math.isnan(fidelity_metrics(torch.ones(6), true)["spearman"])
    assert fidelity_metrics(torch.tensor([]), torch.tensor([]))["n"] == 0
    assert [distance_bin(d) for d in (0.0, 0.019, 0.02, 0.5, 1.0)] == [0, 0, 1, 5, 5]


class _Lookup(Estimator):
    """Fake estimator: the true loss of a known order plus fixed noise."""

    name = "fake-lookup"

    def __init__(self, table, noise, eval_names):
        super().__init__()
        self.table, self.noise, self._names = table, noise, eval_names

    def _fit(self, store):
        self.eval_names = list(reversed(self._names))  # columns in another order: the harness must reorder

    def _estimate(self, orders):
        rows = [self.table[tuple(o.tolist())] + self.noise for o in orders]
        return torch.stack(rows).flip(-1)


def test_evaluate_and_report_on_real_retraining(own_trainer, tmp_path):
    orders = _tiny_orders(own_trainer, n_random=2, n_near=1, near=(1, 2))[:6]
    assert len(orders) == 6
    cache = tmp_path / "true.json"
    true, sec = retrain_orders(own_trainer, orders, progress=False, cache=cache)
    # the cache answers for the same orders without a trainer; other orders or a damaged file retrain
    cached, cached_sec = retrain_orders(SimpleNamespace(), orders, cache=cache)
    assert torch.equal(cached, true) and cached_sec == sec
    assert torch.equal(retrain_orders(own_trainer, orders[:2], progress=False, cache=cache)[0], true[:2])
    cache.write_text("{not json")
    assert torch.equal(retrain_orders(own_trainer, orders[:2], progress=False, cache=cache)[0], true[:2])
    names = list(own_trainer.plan.eval_names)
    assert true.shape == (6, len(names)) and true.dtype == torch.float64 and sec > 0
    table = {tuple(h.order.tolist()): true[i] for i, h in enumerate(orders)}
    store = SimpleNamespace(terms=(), path="fake", eval_names=names, T=own_trainer.T)
    ests = {"exact": _Lookup(table, 0.0, names).fit(store),
            "noisy": _Lookup(table, 0.01 * torch.arange(1, len(names) + 1, dtype=torch.float64), names).fit(store)}
    info = {"bytes": 1234, "record_seconds": 2.0, "reference_seconds": 0.5}
    res = evaluate_estimators(orders, true, names, ests, sec, {"exact": 0.1}, info)
    ex = res["estimators"]["exact"]
    assert ex["metrics"]["all"]["all"]["spearman"] == pytest.approx(1.0)
    assert ex["metrics"]["all"]["all"]["absdiff"] == 0.0
    assert ex["cost"]["record_over_reference"] == 4.0 and ex["cost"]["store_bytes"] == 1234
    assert ex["cost"]["retrain_seconds_per_order"] == sec and ex["cost"]["speedup"] > 0
    assert math.isnan(res["estimators"]["noisy"]["cost"]["fit_seconds"])
    write_report(res, tmp_path)
    for f in ("fidelity.json", "fidelity.md", "scatter_exact.png", "scatter_noisy.png", "rho_vs_distance.png"):
        assert (tmp_path / f).stat().st_size > 0
    js = json.loads((tmp_path / "fidelity.json").read_text())
    assert js["true_losses"] == true.tolist()
    assert [o["name"] for o in js["orders"]] == [h.name for h in orders]
    noisy = js["estimators"]["noisy"]
    est = torch.tensor(noisy["estimates"], dtype=torch.float64)
    assert torch.allclose(est, true + 0.01 * torch.arange(1, len(names) + 1))
    kinds = [h.group for h in orders]
    for j, ev in enumerate(names):
        m = fidelity_metrics(est[:, j], true[:, j])
        got = noisy["metrics"][ev]["all"]
        for k, v in m.items():
            assert got[k] == (None if isinstance(v, float) and math.isnan(v) else pytest.approx(v))
        sel = torch.tensor([k in ("reference", "near") for k in kinds])
        assert noisy["metrics"][ev]["near"]["n"] == int(sel.sum())
        assert noisy["metrics"][ev]["near"]["absdiff"] == pytest.approx(fidelity_metrics(est[sel, j], true[sel, j])["absdiff"])
        assert sum(b["n"] for b in noisy["by_distance"][ev]) == len(orders)
        assert noisy["metrics"][ev]["all"]["absdiff"] == pytest.approx(0.01 * (j + 1))
    assert len(js["distance_bins"]) == len(DISTANCE_BINS)
    md = (tmp_path / "fidelity.md").read_text()
    assert "| noisy |" in md and "rho random" in md and "true spread" in md


def test_settings_validation(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="settings"):
        run_fidelity_settings(tiny_cfg, ["x"], tmp_path, settings=("fresh", "hot"))
    with pytest.raises(ConfigError):
        run_fidelity_settings(tiny_cfg, ["x"], tmp_path, settings=())


def test_heldout_orders_are_disjoint_from_calibration_orders_by_construction():
    """Calibration orders (here: every random and near order a first draw holds out, plus the
    reference) are never held out again: random and near orders are redrawn, structured ones
    left out; check_disjoint rejects any overlap."""
    doms = ["a", "b"] * 4
    first = heldout_orders(8, doms, torch.arange(8.0), n_random=5, n_near=3, seed=0)
    calibration = [h.order.tolist() for h in first if h.kind == "random" or h.kind.startswith("near") or h.kind == "reference"]
    again = heldout_orders(8, doms, torch.arange(8.0), n_random=5, n_near=3, seed=0, exclude=calibration)
    check_disjoint(again, calibration)
    assert not {tuple(h.order.tolist()) for h in again} & {tuple(o) for o in calibration}
    assert sum(h.kind == "random" for h in again) == 5 and "reference" not in {h.name for h in again}
    with pytest.raises(ConfigError, match="also calibration orders"):
        check_disjoint(first, calibration)
