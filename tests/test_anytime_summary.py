"""benchmarks/anytime.py's summary arithmetic: means, the compute multiplier and the paired table."""

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("anytime", Path(__file__).parents[1] / "benchmarks" / "anytime.py")
anytime = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(anytime)


def _points() -> dict:
    """Two seeds, 4 runs per baseline; guided-tpe below TPE at N = 2 on seed 0 only, and not fitting N = 4 on seed 1."""
    return {
        "baseline/random-search/0": [5.0, 4.9, 4.8, 4.7], "baseline/random-search/1": [5.0, 5.0, 4.9, 4.9],
        "baseline/optuna-real/0": [5.0, 4.8, 4.8, 4.6], "baseline/optuna-real/1": [4.9, 4.9, 4.9, 4.8],
        "currsearch/guided-tpe/2/0": {"fits": True, "best_loss": 4.7}, "currsearch/guided-tpe/2/1": {"fits": True, "best_loss": 4.95},
        "currsearch/guided-tpe/4/0": {"fits": True, "best_loss": 4.65}, "currsearch/guided-tpe/4/1": {"fits": False},
    }


def test_summary_means_multiplier_and_paired_differences():
    s = anytime.summarize(_points(), [2, 4], [0, 1], ["guided-tpe"])
    assert s["rows"]["optuna-real"][2][0] == pytest.approx(4.85)
    assert s["rows"]["guided-tpe"][2][0] == pytest.approx(4.825)
    assert 4 not in s["rows"]["guided-tpe"]  # does not fit on seed 1: left out, as in the paired table
    # random search's mean curve 5.0, 4.95, 4.85, 4.8 reaches 4.825 halfway (in log N) from 3 to 4 runs
    assert s["multiplier"]["guided-tpe"][2] == pytest.approx(12 ** 0.5 / 2)
    pair = s["paired"]["guided-tpe"]
    assert pair == {2: {"mean_diff": pytest.approx(-0.025), "ahead": 1, "seeds": 2}}  # -0.1 on seed 0, +0.05 on seed 1
    md = anytime.render(s)
    assert "| guided-tpe | -0.0250 (1 of 2) | n/a |" in md and "paired by seed" in md
    # a point missing on some seed (a stopped run, summarized with --no-run) is "not run", not "does not fit"
    pts = {k: v for k, v in _points().items() if k != "currsearch/guided-tpe/4/1"}
    s = anytime.summarize(pts, [2, 4], [0, 1], ["guided-tpe"])
    assert s["not_run"] == {"guided-tpe": [4]} and "| guided-tpe | 4.8250 ± 0.1768 | not run |" in anytime.render(s)


def test_no_run_refuses_baselines_shorter_than_the_largest_budget(tmp_path, capsys):
    """A row at N must be the best of N baseline runs, not of the fewer a smaller run left in points.json."""
    (tmp_path / "points.json").write_text(json.dumps(_points()))
    assert anytime.main(["--no-run", "--budgets", "2,8", "--seeds", "0,1", "--strategies", "guided-tpe",
                         "--out", str(tmp_path)]) == 2
    assert "lacks 8 baseline runs" in capsys.readouterr().err
    assert anytime.main(["--no-run", "--budgets", "2,4", "--seeds", "0,1", "--strategies", "guided-tpe",
                         "--out", str(tmp_path)]) == 0


def test_points_of_another_config_are_refused(tmp_path, capsys):
    """points.json is tied to the config: a file without a fingerprint (an earlier version's) is adopted,
    one stamped by another config is refused, so no table mixes two configs' baselines and strategies."""
    (tmp_path / "points.json").write_text(json.dumps(_points()))
    argv = ["--no-run", "--budgets", "2,4", "--seeds", "0,1", "--strategies", "guided-tpe", "--out", str(tmp_path)]
    assert anytime.main(argv) == 0
    assert "config" in json.loads((tmp_path / "anytime.json").read_text())["points"]
    (tmp_path / "points.json").write_text(json.dumps({**_points(), "config": "0" * 64}))
    assert anytime.main(argv) == 2
    assert "holds results of another config" in capsys.readouterr().err
    (tmp_path / "points.json").write_text("[1, 2]")
    assert anytime.main(argv) == 2
    assert "not a JSON object" in capsys.readouterr().err


def test_guided_ablation_refuses_runs_of_another_config(tmp_path, capsys):
    """benchmarks/guided_ablation.py shares the cache check: runs stamped by another config stop it before training."""
    spec = importlib.util.spec_from_file_location("guided_ablation", Path(__file__).parents[1] / "benchmarks" / "guided_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    (tmp_path / "guided_ablation.json").write_text(json.dumps({"config": "0" * 64, "runs": {}}))
    with pytest.raises(SystemExit) as exc:
        ablation.main(["--out", str(tmp_path), "--budget", "2"])
    assert exc.value.code == 2
    assert "holds results of another config" in capsys.readouterr().err
