"""The regime measurement (currsearch.regime) on a tiny real config."""

from currsearch.regime import measure_regime
from currsearch.reports.regime import render_markdown


def test_measure_regime_tiny(tiny_cfg, tmp_path):
    r = measure_regime(tiny_cfg, n_random=2, baseline=tiny_cfg, progress=False)
    assert r.T == 8 and r.params > 0 and len(r.random) == 2 and len(r.run_seconds) == len(r.baseline_run_seconds)
    assert {o.kind for o in r.structured} >= {"domain-block", "easy-to-hard", "hard-to-easy"}
    assert len({tuple(o.order[-2:]) for o in r.structured if o.kind == "domain-block"}) == 4  # each domain last once
    assert r.random_std >= 0 and r.structured_min <= r.structured_max and r.cost_ratio > 0
    assert set(r.below_baseline) == set(r.eval_names) and "all" in r.eval_names
    md = render_markdown(r)
    assert "unigram baseline" in md and "random orders" in md
