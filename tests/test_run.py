"""End-to-end commands: `currsearch run` (record, search, verify, report), `currsearch search`
(resumable study), and the exported order sampler."""

import dataclasses
import json

import optuna
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from currsearch.baselines import real_search
from currsearch.cli import main
from currsearch.errors import ConfigError, OrderError
from currsearch.export import OrderSampler, export_order
from currsearch.orders import parse_order
from currsearch.reports.run import comparison
from currsearch.pipeline import PipelineSettings, RefineSettings, VerifySettings, run_pipeline, size_to_budget
from currsearch.search import SearchSettings
from currsearch.train import Trainer
from currsearch.trust_region import record_config, rounds_run_equivalents
from estimators import get_estimator


RECORD_ARGS = ["--set", "record.projection_dim=16", "--set", "record.anchor_stride=4"]
RUN_ARGS = ["--trials", "16", "--top-k", "2", "--batch", "8", "--random", "3", "--rounds", "1", "--tr-trials", "4",
            "--fit-runs", "16", "--no-budget"]


@pytest.fixture(scope="module")
def run_dir(tiny_set_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "main"
    assert main(["run", "--quiet", "--out", str(out)] + RUN_ARGS + tiny_set_args + RECORD_ARGS) == 0
    return out


def test_run_writes_the_report_and_verified_losses_are_real(run_dir, tiny_cfg, tiny_set_args, capsys):
    rep = run_dir / "report"
    for name in ("report.json", "report.md", "optimization_history.png", "estimated_vs_verified.png",
                 "best_order_domains.png", "best_order.json"):
        assert (rep / name).is_file() and (rep / name).stat().st_size > 0, name
    assert (run_dir / "study.journal").is_file() and (run_dir / "store").is_dir()
    report = json.loads((rep / "report.json").read_text())
    cands = report["candidates"]
    kinds = {v["kind"] for v in cands.values()}
    assert kinds == {"searched", "reference", "random", "heuristic", "fit"}  # fit: the best calibration run
    assert sum(v["kind"] == "searched" for v in cands.values()) == 3  # search_1, search_2, search_trust_region
    # the trust-region rounds start from the best verified candidate and move only on verified gains
    tr = report["trust_region"]
    assert tr["start_loss"] == min(v["verified"]["all"] for n, v in cands.items() if n != "search_trust_region")
    assert cands["search_trust_region"]["verified"]["all"] == tr["final_loss"] <= tr["start_loss"]
    assert (run_dir / "trust_region" / "trust_region.md").is_file()
    md = (rep / "report.md").read_text()
    assert "random median" in md and "every heuristic" in md and "trust-region rounds" in md
    # the compute ledger: every phase, training phases counted exactly
    assert "## Compute ledger" in md
    led = {e["phase"]: e for e in report["ledger"]["entries"]}
    assert list(led) == ["record", "fit", "search", "verify", "trust_region"]
    assert led["fit"]["real_runs"] == 16 and led["record"]["real_runs"] == 1
    assert led["verify"]["real_runs"] == len({tuple(v["order"]) for n, v in cands.items()
                                              if n not in ("search_trust_region", "fit_best")})
    trainer = Trainer.from_config(Config_from(tiny_cfg))
    T = trainer.T
    for name, v in cands.items():
        assert sorted(v["order"]) == list(range(T)), name
        assert v["estimated"] is not None and set(v["verified"]) == set(report["eval_names"])
    # verified losses equal a fresh real training of the same order (searched + one baseline)
    for name in ["search_1", "search_2", "search_trust_region", "reference", "fit_best"]:
        res = trainer.train(torch.tensor(cands[name]["order"]))
        assert res.eval_losses.tolist() == [cands[name]["verified"][n] for n in res.eval_names], name
    best = parse_order(str(rep / "best_order.json"), T)
    assert best.tolist() == cands[report["best"]]["order"] and report["best"].startswith("search_")
    s = report["summary"]
    assert s["random_median"] in cands and cands[s["random_median"]]["kind"] == "random"
    # rerun: everything resumes (store complete, study complete, trust-region rounds done), same report
    assert main(["run", "--quiet", "--out", str(run_dir)] + RUN_ARGS + tiny_set_args + RECORD_ARGS) == 0
    again = json.loads((rep / "report.json").read_text())["candidates"]
    strip = lambda d: {n: {k: x for k, x in v.items() if k != "seconds"} for n, v in d.items()}  # noqa: E731
    assert strip(again) == strip(cands)


def Config_from(tiny_cfg):
    return tiny_cfg.replace(record={"projection_dim": 16, "anchor_stride": 4})


def test_search_rerun_continues_the_study(run_dir, tmp_path, capsys):
    out = tmp_path / "search"
    store = str(run_dir / "store")
    # the run's store holds no pair terms (calibrated-interactions needs none): search it with the null model
    opts = ["--estimator", "reference"]
    assert main(["search", "--quiet", "--store", store, "--out", str(out), "--trials", "8", "--batch", "4"] + opts) == 0
    first = json.loads((out / "search.json").read_text())
    assert first["n_trials"] == 8 and (out / "study.journal").is_file() and (out / "best_order.json").is_file()
    assert main(["search", "--quiet", "--store", store, "--out", str(out), "--trials", "12", "--batch", "4"] + opts) == 0
    second = json.loads((out / "search.json").read_text())
    assert second["n_trials"] == 12 and second["n_run"] == 4
    study = optuna.load_study(study_name=second["study"],
                              storage=optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    assert len(study.trials) == 12
    T = len(second["top"][0]["order"])
    assert all(sorted(t["order"]) == list(range(T)) for t in second["top"])
    assert main(["search", "--quiet", "--store", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err


def test_budget_is_respected_and_baselines_reproduce(tiny_cfg, tmp_path, capsys):
    cfg = Config_from(tiny_cfg)
    s = PipelineSettings(out=tmp_path / "b", budget=20, baselines=("random-search", "optuna-real"),
                         search=SearchSettings(estimator="calibrated-interactions", trials=8, batch=8),
                         verify=VerifySettings(top_k=2), refine=RefineSettings(rounds=0))
    res = run_pipeline(cfg, s, progress=False)
    plan, led = res.budget, res.ledger
    # recording without pair terms costs one run; the fit gets every run the budget leaves
    assert plan.record == 1.0 and plan.verify == 2 and plan.fit_runs == 17 and plan.total == 20
    assert [e.phase for e in led.entries] == ["record", "fit", "search", "verify"]
    assert led.real_runs == 20 and led.run_equivalents == 20  # the search's sampler/surrogate time: seconds only
    # no baseline orders under a budget; the best of the fit's real runs is kept (no retraining)
    assert set(res.verification.candidates) == {"search_1", "search_2", "fit_best"}
    trainer = Trainer.from_config(cfg)
    best_fit = res.verification.candidates["fit_best"]
    assert best_fit.verified["all"] == float(trainer.train(torch.tensor(best_fit.order)).eval_losses[-1])
    for name, b in res.baselines.items():
        assert b.n_runs == 20 and b.best_loss == min(b.losses), name
    for name, n in (("random-search", 4), ("optuna-real", 12)):  # the same seed reproduces the same runs
        assert real_search(trainer, name, n, seed=0, progress=False).losses == res.baselines[name].losses[:n], name
    # an impossible budget is refused, naming the minimum, before anything is written
    with pytest.raises(ConfigError, match="budget 10 is below the minimum 19"):
        run_pipeline(cfg, s.model_copy(update={"budget": 10, "out": tmp_path / "x"}), progress=False)
    assert not (tmp_path / "x").exists()
    # an estimator without a fit spends what is left on verifying searched orders, and searches at least that many
    fut1 = type(get_estimator("fut1"))
    sized, plan = size_to_budget(s.model_copy(update={"search": s.search.model_copy(update={"estimator": "fut1"})}),
                                 trainer, record_config(cfg, fut1), fut1)
    assert plan.fit_runs == 0 and sized.verify.top_k == 17 and sized.search.trials == 17  # fut1 records 2.3 runs
    hvp = type(get_estimator("fut1-hvp"))  # ~3 real runs per estimate: a search on it cannot be sized to a budget
    with pytest.raises(ConfigError, match="fut1-hvp costs about 3 real runs per estimate"):
        size_to_budget(s, trainer, record_config(cfg, hvp), hvp)
    # the equal-compute verdict is on the eval set the job and its baselines minimized
    on_bible = dataclasses.replace(res, settings=s.model_copy(update={"search": s.search.model_copy(
        update={"objectives": ["bible"]})}))
    c = comparison(on_bible)
    assert c["eval_set"] == "bible" and c["currsearch"][1] == min(v.verified["bible"] for v in res.verification.candidates.values())
    # trust-region rounds under a budget count in the ledger's unit (their budget rule and the ledger agree)
    with_round = s.model_copy(update={"budget": 35, "baselines": (), "out": tmp_path / "r",
                                      "refine": RefineSettings(rounds=1, trials=4, top_k=1)})
    res = run_pipeline(cfg, with_round, progress=False)
    tr, tr_entry = res.trust_region, next(e for e in res.ledger.entries if e.phase == "trust_region")
    assert res.budget.refine == (1 + 1 + 4 * 3) + 1 and len(tr.rounds) == 1
    assert tr.run_equivalents == pytest.approx(sum(rounds_run_equivalents(tr.rounds, res.ledger.run_seconds)))
    assert tr_entry.run_equivalents == pytest.approx(tr.run_equivalents + 1)  # + the final incumbent's check
    # a resumed job reads its rounds back and still counts what they cost
    again = run_pipeline(cfg, with_round, progress=False)
    assert again.trust_region.rounds == tr.rounds
    # ... and the seconds its fit's and verification's runs took when they were trained (read back, not retrained)
    store = tmp_path / "r" / "store"
    (fit_cache,) = (store / "calibration").iterdir()
    fit_s = sum(json.loads(fit_cache.read_text())["seconds"])
    verify_s = sum({tuple(c.order): c.seconds for n, c in again.verification.candidates.items() if n in ("search_1", "search_2")}.values())
    led = {e.phase: e for e in again.ledger.entries}
    assert led["fit"].seconds >= fit_s > 0 and led["verify"].seconds >= verify_s > 0
    assert led["fit"].untimed_runs == led["verify"].untimed_runs == 0
    assert next(e for e in again.ledger.entries if e.phase == "trust_region").run_equivalents == pytest.approx(
        tr.run_equivalents * res.ledger.run_seconds / again.ledger.run_seconds + 1)
    # another budget on the same --out is refused before its fit spends a run (its search would refuse it after)
    fits = sorted((tmp_path / "r" / "store" / "calibration").iterdir())
    before = [f.read_bytes() for f in fits]
    with pytest.raises(ConfigError, match="another budget split"):
        run_pipeline(cfg, with_round.model_copy(update={"budget": 36}), progress=False)
    with pytest.raises(ConfigError, match="seed"):  # so is another sampler seed (it would read seed 0's trials back)
        run_pipeline(cfg, with_round.model_copy(update={"search": with_round.search.model_copy(update={"seed": 1})}),
                     progress=False)
    assert [f.read_bytes() for f in sorted((tmp_path / "r" / "store" / "calibration").iterdir())] == before


class _Batches(Dataset):
    def __init__(self, n):
        self.items = [torch.full((2, 3), i) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_order_sampler_with_a_plain_dataloader(tmp_path):
    order = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    sampler = OrderSampler(order)
    assert list(sampler) == order.tolist() and len(sampler) == 7
    loader = DataLoader(_Batches(7), batch_size=None, sampler=sampler)
    seen = [int(b[0, 0]) for b in loader]
    assert seen == order.tolist()
    assert list(OrderSampler([5, 5, 0], allow_repeats=True)) == [5, 5, 0]
    with pytest.raises(OrderError, match="not a permutation"):
        OrderSampler([0, 0, 2])
    path = export_order(tmp_path / "o.json", order, note="x")
    assert parse_order(str(path), 7).tolist() == order.tolist()
    assert json.loads(path.read_text())["note"] == "x"
