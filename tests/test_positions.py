"""Position analysis (memorization and generalization vs sample position): the moved-batch
orders and their errors, reference reproduction by fut1-hvp, and `currsearch analyze positions`
end to end on a tiny real store."""

import json
import math
import re

import pytest
import torch

from currsearch.cli import main
from currsearch.errors import ConfigError, OrderError
from currsearch.positions import analyze_positions, default_batches, default_positions, position_orders
from currsearch.record import record
from estimators import get_estimator
from estimators.base import Estimator
from estimators.hvp import window_batch_losses


def test_position_orders_move_one_batch_and_keep_the_rest_in_reference_order():
    orders, cells = position_orders(6, [1, 4], [0, 1, 5])
    assert cells == [(1, 0), (1, 1), (1, 5), (4, 0), (4, 1), (4, 5)]
    assert orders.dtype == torch.int64 and orders.shape == (6, 6)
    assert orders.tolist() == [
        [1, 0, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5],  # j == i: the reference order
        [0, 2, 3, 4, 5, 1],
        [4, 0, 1, 2, 3, 5],
        [0, 4, 1, 2, 3, 5],
        [0, 1, 2, 3, 5, 4],
    ]


def test_positions_and_batch_ids_outside_the_plan_give_clear_errors():
    with pytest.raises(OrderError, match=r"position\(s\) \[8\] outside 0\.\.7 \(the window has T = 8 steps\)"):
        position_orders(8, [0], [0, 8])
    with pytest.raises(OrderError, match=r"position\(s\) \[-1\] outside 0\.\.7"):
        position_orders(8, [0], [-1, 3])
    with pytest.raises(OrderError, match=r"unknown batch id\(s\) \[9, -2\]: the plan has T = 8 window batches, ids 0\.\.7"):
        position_orders(8, [1, 9, -2], [0])
    with pytest.raises(OrderError, match="must be integers"):
        position_orders(8, [1.5], [0])
    with pytest.raises(ConfigError, match="at least one of the positions"):
        position_orders(8, [1], [])
    with pytest.raises(ConfigError, match=r"repeat \[2\]"):
        position_orders(8, [2, 2], [0])


def test_default_grid_and_batches():
    assert default_positions(32) == [0, 6, 12, 19, 25, 31]
    assert default_positions(32, n=8) == [0, 4, 9, 13, 18, 22, 27, 31]
    assert default_positions(5) == [0, 1, 2, 3, 4]

    class Plan:
        domains = ["a", "b", "a", "a", "b", "c"]

    assert default_batches(Plan()) == [0, 1, 3, 4, 5]  # earliest and latest of each domain
    assert default_batches(Plan(), per_domain=1) == [0, 1, 5]


@pytest.fixture(scope="module")
def store(tiny_cfg, tmp_path_factory):
    cfg = tiny_cfg.replace(record={"terms": ["batch_losses"], "projection_dim": 16})
    return record(cfg, tmp_path_factory.mktemp("pos") / "store", progress=False)


def test_fut1_hvp_batch_at_its_reference_position_reproduces_the_reference_losses(store):
    T, E = store.T, len(store.eval_names)
    est = get_estimator("fut1-hvp").fit(store)
    orders, cells = position_orders(T, [0, 5], [0, 5])  # (0, 0) and (5, 5) are the reference order
    ev, bl = est.estimate_with_batch_losses(orders)
    assert ev.shape == (4, E) and bl.shape == (4, T) and ev.dtype == bl.dtype == torch.float64
    fin = store.final()
    ref_bl = window_batch_losses(store.trainer(), fin["theta"])
    for c, (i, j) in enumerate(cells):
        if i == j:
            torch.testing.assert_close(ev[c], fin["eval_loss"], rtol=0, atol=1e-5)
            torch.testing.assert_close(bl[c], ref_bl, rtol=0, atol=1e-5)
    assert (bl[1, 0] - bl[0, 0]).abs() > 1e-4  # moving B_0 changes the loss on it
    # one order [T] gives [E], [T]; the reference estimator is the position-blind null model
    e1, b1 = est.estimate_with_batch_losses(orders[1])
    torch.testing.assert_close(e1, ev[1])
    torch.testing.assert_close(b1, bl[1])
    e0, b0 = get_estimator("reference").fit(store).estimate_with_batch_losses(orders)
    torch.testing.assert_close(b0, ref_bl.expand(4, -1), rtol=0, atol=0)


class _NoBatchLosses(Estimator):
    name = "test-no-batch-losses"

    def _fit(self, store):
        pass

    def _estimate(self, orders):
        return torch.zeros(orders.shape[0], len(self.eval_names), dtype=torch.float64)


def test_estimator_without_batch_losses_is_refused(store):
    est = _NoBatchLosses().fit(store)
    ev, bl = est.estimate_with_batch_losses(torch.arange(store.T))
    assert ev.shape == (len(store.eval_names),) and bl is None
    with pytest.raises(ConfigError, match="no per-batch losses.*fut1-hvp"):
        analyze_positions(store, est, [0], [0, 1], n_verify=0)


def _numbers(x):
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return []
    if isinstance(x, (int, float)):
        return [float(x)]
    vals = x.values() if isinstance(x, dict) else x
    return [n for v in vals for n in _numbers(v)]


def _quoted(md):
    """Numbers the markdown quotes (code spans, which hold definitions, left out), with the
    half-unit of their last printed digit."""
    text = re.sub(r"`[^`]*`", " ", md)
    out = []
    for tok in re.findall(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text):
        mant, _, exp = tok.partition("e")
        decimals = len(mant.split(".")[1]) if "." in mant else 0
        out.append((float(tok), 0.5 * 10.0 ** (-decimals) * 10.0 ** int(exp or 0)))
    return out


def test_analyze_positions_command_writes_files_whose_summary_numbers_are_in_the_json(tiny_cfg, tiny_set_args, tmp_path, capsys):
    out = tmp_path / "positions"
    args = ["analyze", "positions", "--quiet", "--out", str(out), "--batches", "1,6", "--positions", "0,4,7", "--verify", "4"]
    record_args = ["--set", 'record.terms=["batch_losses"]', "--set", "record.projection_dim=16"]
    assert main(args + tiny_set_args + record_args) == 0
    names = ("positions.json", "positions.md", "heatmap_memorization.png", "heatmap_generalization.png", "curves.png")
    for name in names:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "store" / "manifest.json").is_file()  # recorded into OUT/store
    res = json.loads((out / "positions.json").read_text())
    md = (out / "positions.md").read_text()
    assert res["n_cells"] == 6 and res["positions"] == [0, 4, 7] and res["batch_ids"] == [1, 6]
    v = res["validation"]
    assert v["n_moved"] == 3 and v["n_cells"] == 5 and v["n_trainings"] == 4
    assert len(res["grid"]["memorization"]) == 2 and len(res["grid"]["memorization"][0]) == 3
    for c in v["cells"]:
        if c["kind"] == "reference":  # fut1-hvp is exact at the reference order
            assert all(abs(e) < 1e-4 for e in c["error"].values())
    # the true values are real retraining: retrain one moved cell here
    from currsearch.store import TrajectoryStore

    cell = next(c for c in v["cells"] if c["kind"] == "moved")
    st = TrajectoryStore.open(out / "store")
    order = position_orders(st.T, [cell["batch"]], [cell["position"]])[0][0]
    tres = st.trainer().train(order)
    assert abs(tres.eval_losses[-1] - cell["true"]["generalization_all"]) < 1e-6
    assert abs(float(window_batch_losses(st.trainer(), tres.theta)[cell["batch"]]) - cell["true"]["memorization"]) < 1e-6
    # every number the summary quotes is a number of positions.json
    pool = _numbers(res)
    quoted = _quoted(md)
    assert len(quoted) > 20
    for x, tol in quoted:
        assert any(abs(x - y) <= tol * (1 + 1e-9) + 1e-12 for y in pool), f"{x} quoted in positions.md is not in positions.json"
    s = res["summary"]
    for key in ("mean", "min", "max"):
        assert f"{s['recency'][key]:+.4f}" in md
    assert f"{s['forgetting']['mean_per_position']:+.3g}" in md
    assert f"{s['interference']['own_domain']:+.4f}" in md and f"{s['interference']['other_domains']:+.4f}" in md
    for q, m in v["metrics"].items():
        assert math.isfinite(m["spearman"]) or m["n"] < 3, q
        assert f"{m['fraction_explained']:.3f}" in md
    # bad input on the recorded store: one error line, exit 2
    capsys.readouterr()
    assert main(["analyze", "positions", "--quiet", "--out", str(out), "--positions", "0,8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "outside 0..7" in err[0]
    assert main(["analyze", "positions", "--quiet", "--out", str(out), "--batches", "2,x"]) == 2
    assert "--batches takes comma-separated integers" in capsys.readouterr().err
    # --set on a recorded store overrides the store's config, not the defaults: a key that changes
    # no number is accepted, one that changes the trajectory is refused naming that key alone
    few = ["analyze", "positions", "--quiet", "--out", str(out), "--batches", "1", "--positions", "0,4", "--verify", "0"]
    assert main(few + ["--set", f"train.warmup_cache={tmp_path / 'wc'}"]) == 0
    capsys.readouterr()
    assert main(few + ["--set", "optim.lr=0.0123"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "data." not in err and "model." not in err
