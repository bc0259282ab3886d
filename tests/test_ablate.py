"""Data ablations (Na et al. 2024): partition models, merged estimates, resume, validation, search.

Real tiny training throughout (T = 8 window batches, 4 domains -> 4 partitions of 2 batches).
"""

import json
import shutil

import pytest
import torch

from currsearch.ablate import (
    AblationModels,
    MergeEstimator,
    all_subsets,
    check_partitions,
    default_partitions,
    parse_subsets,
    run_subset_search,
    sample_subsets,
    search_subsets,
    subset_label,
    train_partitions,
    train_union,
    union_counts,
    union_stream,
    validate_subsets,
)
from currsearch.errors import ConfigError, StoreError
from currsearch.ablate.results import SubsetSearchReport, SubsetValidation
from currsearch.reports.ablate import render_validation_markdown, write_search_report, write_validation_report


@pytest.fixture(scope="module")
def models(tiny_cfg, tiny_trainer, tmp_path_factory):
    return train_partitions(tiny_cfg, tmp_path_factory.mktemp("ablate") / "models", trainer=tiny_trainer)


@pytest.fixture(scope="module")
def est(models):
    return MergeEstimator(models)


def _payload(m: AblationModels) -> dict:
    return {k: v["sha256"] for k, v in m.manifest["files"].items()}


def test_partitions_budget_and_streams(tiny_trainer, models):
    domains = tiny_trainer.plan.domains
    parts = default_partitions(domains)
    assert [p.name for p in parts] == tiny_trainer.plan.domain_names == models.names
    assert sorted(l for p in parts for l in p.batches) == list(range(tiny_trainer.T))
    assert all(domains[l] == p.name for p in parts for l in p.batches)
    split = default_partitions(domains, 2)
    assert [p.name for p in split][:2] == [f"{parts[0].name}/0", f"{parts[0].name}/1"] and len(split) == 8
    with pytest.raises(ConfigError, match="fewer than split = 3"):
        default_partitions(domains, 3)
    with pytest.raises(ConfigError, match="at least 2 partitions"):
        check_partitions({"all": list(range(8))}, 8)
    with pytest.raises(ConfigError, match="disjoint"):
        check_partitions({"a": [0, 1], "b": [1, 2]}, 8)
    with pytest.raises(ConfigError, match="outside"):
        check_partitions({"a": [0], "b": [9]}, 8)
    # matched budget: n = 2 steps per partition model; a union of |S| partitions gets |S| * n
    assert models.steps == 2 and models.manifest["tokens_per_step"] == 4 * 32
    assert union_counts(torch.tensor([0.5, 0.5, 0.0, 0.0]), 2) == [2, 2, 0, 0]
    assert union_counts(torch.tensor([0.75, 0.25, 0.0, 0.0]), 2) == [3, 1, 0, 0]
    w = torch.tensor([0.5, 0.5, 0.0, 0.0])
    a, b = parts[0].batches, parts[1].batches
    assert union_stream(parts, w, 2) == [a[0], b[0], a[1], b[1]]  # evenly interleaved, not blocks
    assert all_subsets(4).shape == (15, 4) and all_subsets(4)[-1].all()
    s = sample_subsets(6, 10, seed=1)
    assert s.shape == (10, 6) and s[0].all() and len({tuple(r.tolist()) for r in s}) == 10 and s.any(1).all()


def test_single_partition_average_is_that_model(models, est):
    K = models.K
    thetas = models.thetas()
    eye = torch.eye(K, dtype=torch.bool)
    assert torch.equal(est.merge(eye), thetas)  # parameters bit for bit
    assert torch.equal(est.estimate(eye), models.eval_losses())  # and losses
    assert torch.equal(est.estimate(models.names[1])[0], models.eval_losses()[1])  # by name
    assert torch.equal(est.estimate(torch.eye(K)[2:3] * 7.0), models.eval_losses()[2:3])  # any positive weight
    # the real singleton union (matched budget) is exactly the partition model
    r = train_union(models, models.names[0])
    assert torch.equal(r["theta"], thetas[0]) and r["steps"] == models.steps
    # uniform and weighted averages
    a, b = models.names[:2]
    torch.testing.assert_close(est.merge(f"{a}+{b}")[0], (thetas[0] + thetas[1]) / 2)
    torch.testing.assert_close(est.merge(f"{a}:3+{b}:1")[0], 0.75 * thetas[0] + 0.25 * thetas[1])
    assert parse_subsets("*", models.names).tolist() == [[1.0] * K]
    assert subset_label(torch.tensor([0.5, 0.5, 0, 0]), models.names) == f"{a}+{b}"
    out = est.estimate(torch.tensor([[True, True, False, False], [True, True, True, True]]))
    assert out.shape == (2, len(models.eval_names)) and out.dtype == torch.float64


def test_subsets_validated(est, models):
    K, (a, b) = models.K, models.names[:2]
    with pytest.raises(ConfigError, match="empty"):
        est.estimate(torch.zeros(1, K, dtype=torch.bool))
    with pytest.raises(ConfigError, match="empty"):
        est.estimate([" + "])
    with pytest.raises(ConfigError, match="unknown partition 'nope'"):
        est.estimate([f"{a}+nope"])
    with pytest.raises(ConfigError, match="negative"):
        est.estimate(torch.tensor([[1.0, -0.5, 0.0, 0.0]]))
    with pytest.raises(ConfigError, match="non-negative"):
        est.estimate([f"{a}:-1+{b}"])
    with pytest.raises(ConfigError, match="non-finite"):
        est.estimate(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ConfigError, match=r"shape \[n, K=4\]"):
        est.estimate(torch.ones(2, K + 1, dtype=torch.bool))
    with pytest.raises(ConfigError, match="twice"):
        est.estimate([f"{a}+{a}"])


def test_killed_train_resumes_without_retraining(tiny_cfg, tiny_trainer, models, tmp_path):
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_partitions(tiny_cfg, out, trainer=tiny_trainer, crash_after=1)
    with pytest.raises(StoreError, match="incomplete"):
        AblationModels.open(out)
    part = AblationModels.open(out, allow_incomplete=True)
    assert part.manifest["partitions_done"] == [models.names[0]]
    first = out / "partitions" / "part_000.safetensors"
    st, secs = first.stat(), part.manifest["seconds"][models.names[0]]
    stray = out / "partitions" / ".part_001.safetensors.tmp4242"  # a kill in the middle of an atomic write
    stray.write_bytes(b"partial")
    resumed = train_partitions(tiny_cfg, out, trainer=tiny_trainer)
    assert not stray.exists()
    # the finished partition was neither retrained nor rewritten
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == (st.st_mtime_ns, st.st_ino)
    assert resumed.manifest["seconds"][models.names[0]] == secs
    # same result as the uninterrupted run, file for file
    assert _payload(resumed) == _payload(models)
    assert torch.equal(resumed.thetas(), models.thetas())
    # a complete directory: nothing to do
    mt = {p.name: p.stat().st_mtime_ns for p in (out / "partitions").iterdir()}
    train_partitions(tiny_cfg, out, trainer=tiny_trainer)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "partitions").iterdir()} == mt
    # another config or other partitions: refused, naming what differs
    with pytest.raises(StoreError, match=r"optim\.lr"):
        train_partitions(tiny_cfg.replace(optim={"lr": 1e-3}), out)
    with pytest.raises(StoreError, match="other partitions"):
        train_partitions(tiny_cfg, out, split=2, trainer=tiny_trainer)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        train_partitions(tiny_cfg, tmp_path / "junk", trainer=tiny_trainer)


def test_tampered_partition_file_is_detected_and_retrained(tiny_cfg, tiny_trainer, models, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(models.path, out)
    f = out / "partitions" / "part_001.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="part_001.safetensors.*SHA-256"):
        AblationModels.open(out)
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(StoreError, match="truncated"):
        MergeEstimator(out)
    # a rerun of `ablate train` repairs what it names: the damaged model is trained again, the
    # missing base recomputed, and the intact partition models are left alone
    (out / "base.safetensors").unlink()
    with pytest.raises(StoreError, match=r"missing; rerun `currsearch ablate train --out"):
        AblationModels.open(out)
    intact = out / "partitions" / "part_000.safetensors"
    st = intact.stat()
    repaired = train_partitions(tiny_cfg, out, trainer=tiny_trainer)
    assert (intact.stat().st_mtime_ns, intact.stat().st_ino) == (st.st_mtime_ns, st.st_ino)
    assert _payload(repaired) == _payload(models)
    assert torch.equal(repaired.thetas(), models.thetas())
    AblationModels.open(out)  # verifies every file
    with pytest.raises(StoreError, match="no manifest"):
        AblationModels.open(tmp_path)


def test_validate_and_search_write_reports(models, est, tmp_path):
    v = validate_subsets(models)
    write_validation_report(v, tmp_path / "val")
    assert v.exhaustive and len(v.subsets) == 15
    for name in ("validation.json", "validation.md", "validation_scatter.png"):
        assert (tmp_path / "val" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "val" / "validation.json").read_text())
    assert set(saved["metrics"]) == set(models.eval_names)
    for ev in models.eval_names:
        m = saved["metrics"][ev]
        assert m["all"]["n"] == 15 and m["size>=2"]["n"] == 11 and -1 <= m["all"]["spearman"] <= 1
        assert -1 <= m["all"]["pearson_ppl"] <= 1 and m["by_size"]["2"]["n"] == 6
    for r in v.subsets:  # singletons: the merged model is the real model
        if r.size == 1:
            assert r.merged == r.real
        assert r.steps == r.size * models.steps
    assert v.metrics[models.eval_names[-1]].multi.n == 11  # attribute access to the "size>=2" entry
    md = (tmp_path / "val" / "validation.md").read_text()
    assert "Spearman rho" in md
    # the JSON file reads back to an equal markdown (NaN written as null and read back as NaN)
    assert render_validation_markdown(SubsetValidation.from_json(saved)) == md

    out = tmp_path / "search"
    res, study = run_subset_search(models, out, n_trials=10, top_k=2, batch_size=4)
    write_search_report(res, out, study)
    for name in ("search.json", "search.md", "optimization_history.png", "study.journal"):
        assert (out / name).stat().st_size > 0
    s = res.summary
    assert {"full", "search_1", "search_2"} <= set(res.candidates) and s.best_single.startswith("single:")
    assert res.candidates["full"].steps == models.K * models.steps
    assert s.merged_optimum is not None and isinstance(s.beats_full, bool)
    saved = json.loads((out / "search.json").read_text())
    assert list(saved) == ["method", "models", "partitions", "eval_names", "search", "candidates", "summary"]
    assert SubsetSearchReport.from_json(saved) == res  # search.json reads back to the same result
    # the study resumes from its journal: only the missing trials run
    res2 = search_subsets(est, n_trials=13, storage=str(out / "study.journal"), batch_size=4)
    assert res2.n_run == 3 and res2.n_trials == 13
    with pytest.raises(ConfigError, match="another setup"):
        search_subsets(est, n_trials=13, storage=str(out / "study.journal"), study_name="ablate-subsets-all", objective="all", weights=True)
    # mixture weights (in memory): rows are normalized weights, best first
    rw = search_subsets(est, n_trials=8, weights=True, batch_size=4)
    assert torch.allclose(rw.weights.sum(1), torch.ones(rw.weights.shape[0], dtype=torch.float64))
    assert (rw.values[1:] >= rw.values[:-1]).all()
    with pytest.raises(ConfigError, match="unknown objective"):
        search_subsets(est, n_trials=1, objective="nope")


def test_cli(tiny_set_args, models, tmp_path, capsys):
    from currsearch.cli import main

    out = tmp_path / "m"
    assert main(["ablate", "train", "--out", str(out), "--quiet", *tiny_set_args]) == 0
    assert _payload(AblationModels.open(out)) == _payload(models)  # CLI == API, bit for bit
    assert "K = 4 partitions" in capsys.readouterr().out
    a, b = models.names[:2]
    assert main(["ablate", "estimate", "--models", str(out), f"{a}+{b}", "*"]) == 0
    assert f"{a}+{b}" in capsys.readouterr().out
    assert main(["ablate", "estimate", "--models", str(out), "nope"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["ablate", "validate", "--models", str(out), "--max-subsets", "5", "--quiet"]) == 0
    assert (out / "validate" / "validation.md").exists()
    assert main(["ablate", "search", "--models", str(out), "--trials", "6", "--top-k", "1", "--weights", "--quiet"]) == 0
    assert (out / "search" / "search.md").exists()
    assert main(["ablate", "validate", "--models", str(tmp_path / "none")]) == 2


def test_carried_adam_state_and_custom_partitions(tiny_cfg, tmp_path):
    from currsearch.ablate import train_stream
    from currsearch.train import Trainer

    cfg = tiny_cfg.replace(train={"carry_optimizer_state": True})
    tr = Trainer.from_config(cfg)
    m = train_partitions(cfg, tmp_path / "warm", partitions={"a": [0, 1, 2], "b": [5]}, trainer=tr)
    assert m.names == ["a", "b"] and m.steps == 3  # b (1 batch) wraps around to the same 3-step budget
    assert int(m.base()["adam_step"]) == cfg.train.warmup_steps  # carried, not fresh
    s = tr.window_start()
    theta_b, _, _ = train_stream(tr, s.theta, s.adam, s.step_offset, [5, 5, 5])
    assert torch.equal(m.partition(1)["theta"], theta_b)
    assert "carried" in m.summary()
