"""Trust-region rounds: stores recorded along any order, the local space, resume, CLI."""

import json

import optuna
import pytest
import torch

from currsearch.cli import main
from currsearch.errors import ConfigError, OrderError, StoreError
from currsearch.record import record
from currsearch.trust_region import rounds_run_equivalents, run_trust_region
from estimators import get_estimator
from search_spaces import BatchInfo, get_space
from search_spaces.local import transpositions_between


def _info(T):
    return BatchInfo(domains=["a", "b"] * (T // 2), difficulty=torch.arange(T, dtype=torch.float64))


def test_local_space_round_trip_and_radius():
    T = 10
    center = torch.randperm(T, generator=torch.Generator().manual_seed(1))
    sp = get_space("local", _info(T), center=center.tolist(), moves=3)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        o = sp.suggest(study.ask())
        assert len(transpositions_between(center, o)) <= 3
        assert torch.equal(sp.suggest(optuna.trial.FixedTrial(sp.encode(o))), o)
    assert torch.equal(sp.suggest(optuna.trial.FixedTrial(sp.default_params()[0])), center)
    far = center.flip(0)  # 5 transpositions away
    with pytest.raises(OrderError, match="more than this space's moves=3"):
        sp.encode(far)
    with pytest.raises(ConfigError, match="moves must be"):
        get_space("local", _info(T), moves=0)
    with pytest.raises(ConfigError, match="center is not an order"):
        get_space("local", _info(T), center=[0, 0, 1])


def test_store_along_another_order(tiny_cfg, tiny_trainer, tmp_path):
    T = tiny_trainer.T
    order = torch.randperm(T, generator=torch.Generator().manual_seed(3))
    store = record(tiny_cfg, tmp_path / "s", progress=False, trainer=tiny_trainer, reference_order=order)
    assert torch.equal(store.reference_order, order)
    true = tiny_trainer.train(order).eval_losses
    assert torch.allclose(store.final()["eval_loss"], true)
    for name in ("additive", "fut1", "fut1-hvp"):  # each reproduces its own recorded run
        est = get_estimator(name).fit(store)
        assert torch.allclose(est.estimate(order), true, atol=1e-5), name
    with pytest.raises(StoreError, match="another reference order"):
        record(tiny_cfg, tmp_path / "s", progress=False, trainer=tiny_trainer, reference_order=torch.arange(T))


def test_trust_region_rounds_resume_and_cli(tiny_cfg, tmp_path):
    kw = dict(rounds=2, trials=6, top_k=1, batch_size=3, progress=False)
    res = run_trust_region(tiny_cfg, tmp_path / "tr", **kw)
    rs = res.rounds
    assert len(rs) == 2 and res.verified_runs == 4
    for x in rs:  # every candidate is within the round's radius of its incumbent, and the incumbent never gets worse
        for c in x.candidates:
            assert len(transpositions_between(torch.tensor(x.incumbent), torch.tensor(c.order))) <= x.radius
        assert x.next_incumbent_loss <= x.incumbent_loss
        assert abs(x.incumbent_estimate - x.incumbent_loss) < 1e-5  # fut1-hvp reproduces its own run
    assert rs[1].incumbent == rs[0].next_incumbent
    again = run_trust_region(tiny_cfg, tmp_path / "tr", **kw)  # finished rounds are read back, not rerun
    assert again.rounds == rs
    # each round counts in its own unit, measured in the round: final once the round ends
    spent = rounds_run_equivalents(rs)
    for x, eq in zip(rs, spent):
        assert 0 < x.unit_seconds and eq == pytest.approx(sum(x.seconds.values()) / x.unit_seconds)
    assert res.run_equivalents == pytest.approx(sum(spent)) == again.run_equivalents
    assert min(spent) >= 1  # at least its recorded run
    # a budget stops before a round that the costliest finished one says would not fit (here read back, as on resume)
    first = spent[0]
    assert run_trust_region(tiny_cfg, tmp_path / "tr", **kw, budget=2 * first).rounds == rs
    clipped = run_trust_region(tiny_cfg, tmp_path / "tr", **kw, budget=2 * first - 0.01)
    assert clipped.rounds == rs[:1] and clipped.verified_runs == 2
    for change in ({"top_k": 2}, {"radius": 2}):
        with pytest.raises(ConfigError, match="other settings"):
            run_trust_region(tiny_cfg, tmp_path / "tr", **{**kw, **change})
    state = tmp_path / "tr" / "trust_region.json"  # a file written before the radius was stored: the default radius
    old = json.loads(state.read_text())
    del old["settings"]["radius"]
    for x in old["rounds"]:  # and rounds written before their unit was: counted in the retrained runs' mean
        del x["unit_seconds"]
    state.write_text(json.dumps(old))
    legacy = run_trust_region(tiny_cfg, tmp_path / "tr", **kw)
    assert [x.incumbent for x in legacy.rounds] == [x.incumbent for x in rs] and legacy.rounds[0].unit_seconds is None
    retrained_mean = sum(x.seconds["verify"] for x in rs) / sum(len(x.candidates) for x in rs)
    assert legacy.run_equivalents == pytest.approx(sum(sum(x.seconds.values()) for x in rs) / retrained_mean)
    # a budget that leaves the first round no time for estimates cuts its search; a larger one finishes it again
    cut = run_trust_region(tiny_cfg, tmp_path / "cut", **{**kw, "rounds": 1}, budget=1 + kw["top_k"])
    assert cut.rounds[0].search_cut and len(cut.rounds[0].candidates) == 0
    # resumed under the same budget, the cut round has no new estimate: it stands as it was, nothing retrained
    assert run_trust_region(tiny_cfg, tmp_path / "cut", **{**kw, "rounds": 1}, budget=1 + kw["top_k"]).rounds == cut.rounds
    whole = run_trust_region(tiny_cfg, tmp_path / "cut", **{**kw, "rounds": 1})
    assert not whole.rounds[0].search_cut and whole.rounds[0].candidates == rs[0].candidates
    assert whole.rounds[0].seconds["record"] >= cut.rounds[0].seconds["record"]  # the cut call's time is counted

    sets = [f"--set=data.{k}={json.dumps(v)}" for k, v in tiny_cfg.to_dict()["data"].items() if k in ("num_batches", "batch_size", "seq_len", "eval_seqs_per_domain", "vocab_size")]
    sets += [f"--set=model.{k}={v}" for k, v in (("n_layer", 1), ("n_embd", 32), ("n_head", 2))]
    sets += ["--set=optim.lr=0.003", "--set=train.warmup_steps=10"]
    out = tmp_path / "cli"
    assert main(["search", *sets, "--rounds", "1", "--budget", "1000", "--trials", "4", "--top-k", "1", "--batch", "2", "--out", str(out), "--quiet"]) == 0
    assert (out / "trust_region.md").is_file() and (out / "trust_region_rounds.png").is_file()
    assert json.loads((out / "best_order.json").read_text())["order"]
    assert main(["search", "--out", str(tmp_path / "x")]) == 2  # neither --store nor --rounds
    assert main(["search", "--store", str(out), "--budget", "5", "--out", str(tmp_path / "x")]) == 2  # --budget needs --rounds


def test_fut1_hvp_estimate_does_not_depend_on_its_batch(tiny_cfg, tiny_trainer, tmp_path):
    """Prefix skipping starts every order at its own checkpoint, whatever shares its chunk."""
    cfg = tiny_cfg.replace(record={"terms": (), "anchor_stride": 2})
    store = record(cfg, tmp_path / "s", progress=False, trainer=tiny_trainer)
    T = store.T
    near = torch.arange(T)
    near[[T - 3, T - 1]] = near[[T - 1, T - 3]]  # departs late: starts from a late checkpoint
    rand = torch.randperm(T, generator=torch.Generator().manual_seed(0))
    est = get_estimator("fut1-hvp", chunk=4).fit(store)
    assert est.start_anchors(torch.stack([near, rand])).tolist() == [(T - 3) // 2, 0]
    alone = est.estimate(near)
    mixed = est.estimate(torch.stack([rand, near, rand]))
    assert torch.allclose(mixed[1], alone, atol=1e-6) and torch.allclose(mixed[0], mixed[2])
